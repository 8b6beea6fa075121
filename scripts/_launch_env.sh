# Shared by scripts/launch_*.sh (sourced, not run): the interpreter, the import path,
# and the node flags that come from the environment.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${DISAGG_PYTHON:-}" ]]; then
    PY="$DISAGG_PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PY="$REPO/.venv/bin/python"
else
    PY=python3
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

# node_args "$@": fail unless a router address is known; set NODE_ARGS from the environment
# (flags given on the command line come after them, so they win).
node_args() {
    local have_router="${DISAGG_ROUTER:-}" arg
    for arg in "$@"; do
        [[ "$arg" == --router || "$arg" == --router=* ]] && have_router=yes
    done
    if [[ -z "$have_router" ]]; then
        echo "$(basename "$0"): error: no router address; set DISAGG_ROUTER=tcp://ROUTER_HOST:PORT" \
             "(the control address the router prints) or pass --router" >&2
        exit 2
    fi
    NODE_ARGS=()
    [[ -n "${DISAGG_MODEL:-}" ]] && NODE_ARGS+=(--model "$DISAGG_MODEL")
    [[ -n "${DISAGG_TP:-}" ]] && NODE_ARGS+=(--tp "$DISAGG_TP")
    [[ -n "${DISAGG_DEVICE:-}" ]] && NODE_ARGS+=(--device "$DISAGG_DEVICE")
    [[ -n "${DISAGG_KV_CACHE_MEMORY:-}" ]] && NODE_ARGS+=(--kv-cache-memory "$DISAGG_KV_CACHE_MEMORY")
    return 0
}
