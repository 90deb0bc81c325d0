#!/usr/bin/env bash
# Start a process worker for one work pool in the background.
#
#   deployments/start_worker.sh yokai-cpu [--limit 4]
#   deployments/start_worker.sh yokai-gpu            # --limit defaults to the number of local GPUs
#
# Run it on every machine that should take work from the pool; all of them need this repository
# at the same path (YOKAI_REPO_DIR used at deploy time), PREFECT_API_URL pointing at the server,
# and the same workspace: a shared folder or S3 (docs/orchestration.md).
# Extra arguments go to `prefect worker start`. Logs and pid: $YOKAI_RUN_DIR/worker-<pool>-<n>.{log,pid}.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

pool="${1:?usage: start_worker.sh POOL [prefect worker start options]}"
shift

extra=("$@")
if [[ "$pool" == *gpu* && ! " ${extra[*]} " =~ " --limit " ]] && command -v nvidia-smi >/dev/null; then
    ngpu="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [[ "${ngpu:-0}" -gt 0 ]] && extra+=(--limit "$ngpu")
fi

# Results must be readable by whichever worker runs a retry or the parent flow.
export PREFECT_RESULTS_PERSIST_BY_DEFAULT=true
[[ -n "${YOKAI_RESULTS_DIR:-}" ]] && export PREFECT_RESULTS_LOCAL_STORAGE_PATH="$YOKAI_RESULTS_DIR"
[[ -n "${YOKAI_RESULTS_BLOCK:-}" ]] && export PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK="$YOKAI_RESULTS_BLOCK"

n=1
while [[ -f "$YOKAI_RUN_DIR/worker-$pool-$n.pid" ]] && kill -0 "$(cat "$YOKAI_RUN_DIR/worker-$pool-$n.pid")" 2>/dev/null; do
    n=$((n + 1))
done
name="$(hostname -s)-$pool-$n"
log="$YOKAI_RUN_DIR/worker-$pool-$n.log"

cd "$YOKAI_REPO_DIR"
setsid "$PREFECT" worker start --pool "$pool" --type process --name "$name" "${extra[@]}" \
    >>"$log" 2>&1 < /dev/null &
echo $! > "$YOKAI_RUN_DIR/worker-$pool-$n.pid"
sleep 1
if ! kill -0 "$(cat "$YOKAI_RUN_DIR/worker-$pool-$n.pid")" 2>/dev/null; then
    echo "worker $name exited at once; last log lines:" >&2
    tail -n 30 "$log" >&2
    exit 1
fi
echo "worker $name started (pid $(cat "$YOKAI_RUN_DIR/worker-$pool-$n.pid")), polling $pool at $PREFECT_API_URL; log $log"
