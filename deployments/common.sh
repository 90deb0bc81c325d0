# Sourced by the deployments/*.sh scripts: paths and defaults shared by all of them.
# shellcheck shell=bash
YOKAI_REPO_DIR="${YOKAI_REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
YOKAI_RUN_DIR="${YOKAI_RUN_DIR:-$YOKAI_REPO_DIR/.prefect-run}"   # pid files and logs
PREFECT="${PREFECT:-prefect}"                                        # the prefect CLI to use
YOKAI_PREFECT_HOST="${YOKAI_PREFECT_HOST:-127.0.0.1}"
YOKAI_PREFECT_PORT="${YOKAI_PREFECT_PORT:-4200}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://$YOKAI_PREFECT_HOST:$YOKAI_PREFECT_PORT/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export YOKAI_REPO_DIR YOKAI_RUN_DIR
mkdir -p "$YOKAI_RUN_DIR"

# Stop a process group that one of our scripts started with setsid (leader pid in the file $1).
# Prefect 3.9's CLI turns the first SIGTERM into a SIGINT that it does not always act on; its
# second SIGTERM makes it SIGKILL itself. So: SIGTERM, wait up to $2 s, SIGTERM again, wait 5 s,
# then SIGKILL, and finally clear what is left of the group (flow-run subprocesses).
yokai_stop_pidfile() {
    local pidfile="$1" wait_s="${2:-15}" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    _yokai_wait_gone() {  # pid seconds
        local i
        for ((i = 0; i < $2 * 5; i++)); do
            kill -0 "$1" 2>/dev/null || return 0
            sleep 0.2
        done
        return 1
    }
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! _yokai_wait_gone "$pid" "$wait_s"; then
            kill -TERM "$pid" 2>/dev/null || true
            if ! _yokai_wait_gone "$pid" 5; then
                echo "pid $pid ($(basename "$pidfile" .pid)) ignored SIGTERM; killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
                _yokai_wait_gone "$pid" 5 || true
            fi
        fi
    fi
    # Children left in the group (setsid made the leader's pid the group id).
    if kill -0 -- "-$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}
