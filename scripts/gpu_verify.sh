#!/usr/bin/env bash
# GPU verification used for the figures in benchmarks.md: run on a CUDA machine from the repo root
# with wheels for flashinfer-python, apache-tvm-ffi and pyzmq in .whl/ and a config-only model dir in .gpu_model/smollm2.
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export TORCH_CUDA_ARCH_LIST=9.0 FLASHINFER_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
set -o pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, transformers, flashinfer; print(torch.__version__, transformers.__version__, flashinfer.__version__)" | tee -a $OUT/gpu.txt
timeout 330 python3 -m pytest -q -rs -x tests/test_engine_cuda.py tests/test_flashinfer_attention.py tests/test_engine.py tests/test_kv_hooks.py tests/test_model.py -p no:cacheprovider 2>&1 | tee $OUT/pytest.log | tail -25
timeout 200 python3 -m disagg.cli bench engine --model .gpu_model/smollm2 --load-format dummy --device cuda --dtype bfloat16 --batch-sizes 1,8,32 --json 2>$OUT/bench.err | tee $OUT/bench_gpu.json
tail -5 $OUT/bench.err
