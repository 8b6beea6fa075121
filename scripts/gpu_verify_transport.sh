#!/usr/bin/env bash
# GPU check of the transport package (CUDA IPC between two processes), run on a CUDA
# machine from the repo root with the wheels in .whl/ (see scripts/gpu_verify.sh).
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
set -o pipefail
timeout 400 python3 -m pytest -q -rs tests/test_transport_cuda_ipc.py tests/test_transport_wire.py tests/test_transport_resharding.py tests/test_transport_zmq.py tests/test_transport_shm.py -p no:cacheprovider 2>&1 | tee $OUT/transport.log | tail -30
