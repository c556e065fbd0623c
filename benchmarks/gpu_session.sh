#!/usr/bin/env bash
# One prepared GPU session (planned for about 15 minutes of one H100): the GPU benchmark,
# then the CUDA tests of the Triton kernels; results and logs land in benchmarks/results/.
#
#   bash benchmarks/gpu_session.sh            # from the repository root, on the GPU machine
#
# Needs torch with CUDA, triton >= 3.6, numpy and tqdm (lstmkit's imports), pytest for the
# tests; lstmkit itself runs from src/ (no install). Each part has its own time limit so
# that a slow part cannot eat the other's budget.
set -u
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
python - <<'EOF' | tee "$out/gpu_session_env.txt"
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for m in ("triton", "numpy", "tqdm", "pytest"):
    spec = importlib.util.find_spec(m)
    print(m, "missing" if spec is None else __import__(m).__version__ if hasattr(__import__(m), "__version__") else "ok")
EOF
# 1. The benchmark (< 8 min planned; its Triton builds are warmed in parallel first).
timeout 540 python benchmarks/bench_gpu.py 2>&1 | tee "$out/bench_gpu.log"
# 2. The CUDA tests: the CUDA-only matrix and the float64 tests of every variant on both paths.
timeout 300 python -m pytest tests/test_triton.py -q -x -p no:cacheprovider \
    -k "cuda or every_variant_float64 or record_mode or nan" 2>&1 | tee "$out/test_triton_cuda.log"
