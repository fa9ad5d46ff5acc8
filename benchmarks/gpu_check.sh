#!/usr/bin/env bash
# One prepared command for a lent GPU machine (see benchmarks/README.md): the CUDA tests, then the
# 1024x1024 benchmark. Wheels that machine lacks travel in .whl/ (open_clip_torch, ftfy, wcwidth,
# pycocotools, lvis). Logs and the result JSON go to $OUT (or ./gpu_out).
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -x -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
  echo "gpu tests exit: $?" | tee -a "$OUT/gpu.txt"
fi
timeout "${BENCH_TIMEOUT:-360}" python3 benchmarks/run.py --device cuda --size 1024 --out "$OUT/cuda_1024.json" \
  ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
echo "bench exit: $?" | tee -a "$OUT/gpu.txt"
# vild-detect's folder pipeline with the model on the GPU (the shipped demo model: no downloads)
timeout "${DETECT_TIMEOUT:-120}" python3 benchmarks/detect_folder.py --device cuda --threads 0 --batch-size 8 \
  --out "$OUT/detect_folder_cuda.json" 2>&1 | tee "$OUT/detect_folder.log"
echo "detect_folder exit: $?" | tee -a "$OUT/gpu.txt"
