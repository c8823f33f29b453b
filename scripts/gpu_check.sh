#!/usr/bin/env bash
# What a session lent a GPU machine runs (CI has no GPU): the CUDA tests, the GPU benchmark, then the
# core tests on that machine's own torch build. bgsave is taken from src/, no install needed.
#
# Usage: bash scripts/gpu_check.sh OUTDIR     (logs and benchmarks JSON land in OUTDIR)
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

$py -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv
nproc; free -g | head -2; df -h . | tail -1

echo "== CUDA tests"
$py -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log"
cuda=${PIPESTATUS[0]}
if [ "$cuda" != 0 ]; then  # tell a warning turned error (this machine's torch) from a real failure
    echo "== CUDA tests again, warnings not errors"
    $py -m pytest -q -p no:cacheprovider -W default -m cuda tests/test_cuda.py 2>&1 | tail -25
fi

echo "== GPU benchmark"
timeout "${BENCH_TIMEOUT:-330}" $py benchmarks/bench_gpu.py --out "$out/gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench_gpu.log"
bench=${PIPESTATUS[0]}

echo "== core tests on this torch"
timeout "${CORE_TIMEOUT:-120}" $py -m pytest -q -p no:cacheprovider -x --timeout 60 \
    tests/test_manager.py tests/test_snapshot.py tests/test_resume.py tests/test_worker_health.py \
    tests/test_update_metadata.py tests/test_write_behind.py 2>&1 | tee "$out/core_tests.log" | tail -25
core=${PIPESTATUS[0]}
echo "cuda tests rc=$cuda, benchmark rc=$bench, core tests rc=$core"

echo "== NCCL training group + bgsave (cpu:gloo,cuda:nccl), one rank"
timeout "${NCCL_TIMEOUT:-180}" $py -m torch.distributed.run --standalone --nproc-per-node 1 \
    scripts/nccl_check.py --out "$out/nccl.json" 2>&1 | tee "$out/nccl.log" | tail -12
echo "nccl check rc=${PIPESTATUS[0]}"
