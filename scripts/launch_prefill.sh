#!/usr/bin/env bash
# Start a disagg prefill node: it connects to the router and sends KV to decode nodes.
#
# Usage: DISAGG_ROUTER=tcp://HOST:PORT scripts/launch_prefill.sh [extra node flags...]
#        (see: python -m prefill_node --help; flags in "$@" override the environment)
#
# Environment:
#   DISAGG_ROUTER             REQUIRED (or --router): the router's control address, tcp://HOST:PORT
#                             (several: comma-separated; a DNS name = every router it resolves to)
#   DISAGG_NODE_ID            unique node name (default prefill-HOST-PID)
#   DISAGG_MODEL              → --model (default: embedded SmolLM2); same model as the decode nodes
#   DISAGG_TP                 → --tp, tensor-parallel degree (SmolLM2: 1, 3 or 9)
#   DISAGG_DEVICE             → --device (cpu, cuda, cuda:N)
#   DISAGG_KV_CACHE_MEMORY    → --kv-cache-memory, KV cache per rank (e.g. 2GiB)
#   DISAGG_KV_TRANSPORT       zmq (any two hosts, default) | shm / cuda_ipc (decode on this host);
#                             prefill and decode nodes must use the same one
#   DISAGG_KV_ADDRESS         unused by prefill nodes (only decode ranks receive KV)
#   DISAGG_SERVED_MODEL_NAME  the model name clients send (default: from the model)
#   DISAGG_DRAIN_TIMEOUT_S    on SIGTERM: stop taking requests, finish those held for up to
#                             this many seconds, deregister, exit 0 (default 30)
#   DISAGG_LOG_LEVEL          INFO, DEBUG, ...
#   DISAGG_PYTHON             the interpreter (default: $REPO/.venv/bin/python, else python3)
#
# Two machines: router + decode on 10.0.0.5, prefill on 10.0.0.6:
#   10.0.0.5$ DISAGG_HOST=0.0.0.0 DISAGG_CONTROL_ADDRESS=tcp://0.0.0.0:7100 scripts/launch_router.sh
#   10.0.0.5$ DISAGG_ROUTER=tcp://10.0.0.5:7100 DISAGG_KV_ADDRESS='tcp://10.0.0.5:*' scripts/launch_decode.sh
#   10.0.0.6$ DISAGG_ROUTER=tcp://10.0.0.5:7100 DISAGG_TP=3 scripts/launch_prefill.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch_env.sh"
node_args "$@"
exec "$PY" -m prefill_node ${NODE_ARGS[@]+"${NODE_ARGS[@]}"} "$@"
