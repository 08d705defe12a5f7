#!/usr/bin/env bash
# One prepared run for a lent GPU machine: build the CUDA kernels (and the CPU ISA libraries), run the
# CUDA tests and the CPU op tests on that machine's CPU (AVX-512 where it has it), then the GPU
# benchmark at the DESIGN sizes. Everything lands under $OUT (default ./gpu_out). Budget: ~6 min.
#   OUT=/some/dir bash scripts/gpu_check.sh [build|tests|bench ...]   (default: all three)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} DISTILLX_FORCE_CUDA=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DISTILLX_REQUIRE_COMPILED=1
export DISTILLX_CPU_ISAS=${DISTILLX_CPU_ISAS:-avx2,avx512}
PY=${PY:-python3}
STEPS=${*:-build tests bench}
# pip's CUDA wheels keep cuSPARSE/cuBLAS headers beside torch; ATen's CUDA headers include them.
NV_INC=$($PY -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null)
[ -d "$NV_INC" ] && export CPATH=$NV_INC${CPATH:+:$CPATH}

step() { echo "== $* ($(date +%T))" | tee -a "$OUT/steps.txt"; }
has() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }

step env
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'cpu', torch.backends.cpu.get_cpu_capability())"
  echo "cpus $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
  echo "avx512 flags: $(grep -m1 -o 'avx512[a-z_0-9]*\|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
} 2>&1 | tee "$OUT/env.txt"

if has build; then
  step build
  if ! $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -40
    echo "BUILD FAILED"; exit 1
  fi
  $PY -m distillx.cli info | tee -a "$OUT/env.txt"
fi

if has tests; then
  step cuda-tests
  timeout 200 $PY -m pytest -q -p no:cacheprovider tests/cuda -n 4 2>&1 | tee "$OUT/tests.txt" | tail -30
  step cpu-op-tests
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/ops -n 12 -x 2>&1 | tee "$OUT/tests_cpu.txt" | tail -12
fi

if has bench; then
  B="$PY -m distillx.cli bench --device cuda --no-isolate -q"
  step bench-logit
  timeout 100 $B --cases logit_kd --N 8192 --C 128256 --dtype bfloat16 2>&1 | tee "$OUT/bench.txt"
  step bench-linear
  timeout 60 $B --cases linear_kd --impls eager,distillx --N 8192 --Hs 2048 --Ht 4096 --C 128256 --dtype bfloat16 \
    2>&1 | tee -a "$OUT/bench.txt"
  step bench-features
  timeout 60 $B --cases gram_rbf --N 16384 --Ds 256 --Dt 1024 2>&1 | tee -a "$OUT/bench.txt"
  timeout 60 $B --cases gram_rbf --impls eager,distillx --N 65536 --Ds 256 --Dt 1024 --repeats 3 --warmup 1 \
    2>&1 | tee -a "$OUT/bench.txt"
  timeout 60 $B --cases attention_relation --BA 192 --L 2048 --ds 64 --dt 64 2>&1 | tee -a "$OUT/bench.txt"
  timeout 60 $B --cases attention_relation --impls eager,distillx --BA 24 --L 8192 --ds 64 --dt 64 \
    2>&1 | tee -a "$OUT/bench.txt"
  timeout 40 $B --cases attention_map --B 128 --Cs 256 --Ct 1024 --H 56 --W 56 2>&1 | tee -a "$OUT/bench.txt"
fi
step done
