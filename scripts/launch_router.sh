#!/usr/bin/env bash
# Start the disagg router (OpenAI HTTP endpoint + the control plane nodes connect to).
#
# Usage: scripts/launch_router.sh [extra router flags...]   (see: python -m router --help)
#
# Environment (read by router/launch.py; flags in "$@" override them):
#   DISAGG_HOST               HTTP interface (default 127.0.0.1; 0.0.0.0 for other machines)
#   DISAGG_PORT               HTTP port (default 8000; 0 = any free port)
#   DISAGG_CONTROL_ADDRESS    where nodes connect (default tcp://127.0.0.1:*, a free port);
#                             for other machines use a fixed port, e.g. tcp://0.0.0.0:7100
#   DISAGG_UPLINK_PORT        TCP port, on the control address's host, of the nodes' uplinks
#                             (what they send; default 0, a free port; -1 = none); for other
#                             machines behind a firewall use a fixed one, e.g. 7101
#   DISAGG_MODEL              model for the tokenizer / chat template (default: embedded SmolLM2)
#   DISAGG_SERVED_MODEL_NAME  the model name clients send (default: from the model)
#   DISAGG_POLICY             cost | local | remote | threshold (default cost)
#   DISAGG_API_KEY            require "Authorization: Bearer KEY"
#   DISAGG_MAX_INFLIGHT       requests in flight before 429 (default 256)
#   DISAGG_DRAIN_TIMEOUT_S    on SIGTERM, let requests in flight finish for up to this many
#                             seconds, then exit (default 30)
#   DISAGG_KEEP_ALIVE_TIMEOUT_S  close idle client connections after this many seconds
#                             (default 75: longer than clients' and load balancers' own)
#   DISAGG_LOG_LEVEL          INFO, DEBUG, ...
#   PROMETHEUS_MULTIPROC_DIR  several workers on one port (--reuse-port): the same directory,
#                             empty before the first starts, for each; /metrics then counts
#                             every worker's requests (prometheus_client's multiprocess mode)
#   DISAGG_PYTHON             the interpreter (default: $REPO/.venv/bin/python, else python3)
#
# Two machines: router + decode on 10.0.0.5, prefill on 10.0.0.6:
#   10.0.0.5$ DISAGG_HOST=0.0.0.0 DISAGG_CONTROL_ADDRESS=tcp://0.0.0.0:7100 scripts/launch_router.sh
#   10.0.0.5$ DISAGG_ROUTER=tcp://10.0.0.5:7100 DISAGG_KV_ADDRESS='tcp://10.0.0.5:*' scripts/launch_decode.sh
#   10.0.0.6$ DISAGG_ROUTER=tcp://10.0.0.5:7100 DISAGG_TP=3 scripts/launch_prefill.sh
#   anywhere$ curl http://10.0.0.5:8000/v1/models
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch_env.sh"
exec "$PY" -m router "$@"
