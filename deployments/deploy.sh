#!/usr/bin/env bash
# Register every deployment of prefect.yaml with the server at $PREFECT_API_URL.
#
#   YOKAI_INBOX=s3://bucket/inbox YOKAI_WORKSPACE=/data/yokai/ws deployments/deploy.sh
#
# prefect.yaml's {{ $VAR }} placeholders are filled here: YOKAI_REPO_DIR (where workers find
# the code; default this checkout), YOKAI_INBOX and YOKAI_WORKSPACE (the scheduled ingest's
# defaults). Extra arguments go to `prefect deploy` (e.g. `--name yokai-ingest` instead of all).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export YOKAI_INBOX="${YOKAI_INBOX:-$YOKAI_REPO_DIR/data/inbox}"
export YOKAI_WORKSPACE="${YOKAI_WORKSPACE:-$YOKAI_REPO_DIR/data/workspace}"
echo "deploying from $YOKAI_REPO_DIR to $PREFECT_API_URL (ingest: $YOKAI_INBOX -> $YOKAI_WORKSPACE)"
cd "$YOKAI_REPO_DIR"
if [[ $# -eq 0 ]]; then
    set -- --all
fi
exec "$PREFECT" --no-prompt deploy "$@"
