#!/usr/bin/env bash
# One prepared run for a lent GPU machine: build the CUDA kernels, run the CUDA tests, then the GPU
# benchmark at the DESIGN §7 sizes. Everything lands under $OUT (default ./gpu_out). Budget: < 8 min.
#   OUT=/some/dir bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} DISTILLX_FORCE_CUDA=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
# pip's CUDA wheels keep cuSPARSE/cuBLAS headers beside torch; ATen's CUDA headers include them.
NV_INC=$($PY -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null)
[ -d "$NV_INC" ] && export CPATH=$NV_INC${CPATH:+:$CPATH}

step() { echo "== $* ($(date +%T))" | tee -a "$OUT/steps.txt"; }
step env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"

step build
if ! $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -40
  echo "BUILD FAILED"; exit 1
fi
$PY -m distillx.cli info | tee -a "$OUT/env.txt"

step cuda-tests
timeout 140 $PY -m pytest -q -x tests/cuda 2>&1 | tee "$OUT/tests.txt" | tail -25

step bench-logit
timeout 110 $PY -m distillx.cli bench --device cuda --no-isolate --cases logit_kd --N 8192 --C 128256 \
  --dtype bfloat16 --json "$OUT/bench_logit.json" 2>&1 | tee "$OUT/bench_logit.txt"

step bench-linear
timeout 70 $PY -m distillx.cli bench --device cuda --no-isolate --cases linear_kd --impls eager,distillx \
  --N 8192 --Hs 2048 --Ht 4096 --C 128256 --dtype bfloat16 --json "$OUT/bench_linear.json" 2>&1 | tee "$OUT/bench_linear.txt"
step bench-features
timeout 60 $PY -m distillx.cli bench --device cuda --no-isolate --cases gram_rbf --N 16384 --Ds 256 --Dt 1024 \
  --json "$OUT/bench_gram.json" 2>&1 | tee "$OUT/bench_gram.txt"
timeout 40 $PY -m distillx.cli bench --device cuda --no-isolate --cases attention_map --B 128 --Cs 256 --Ct 1024 \
  --H 56 --W 56 --json "$OUT/bench_attention_map.json" 2>&1 | tee "$OUT/bench_attention_map.txt"
step done
