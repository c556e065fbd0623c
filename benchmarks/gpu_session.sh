#!/usr/bin/env bash
# One prepared GPU session (sized for a lease of about 15 minutes of one H100/H200, start-up
# included): lstmkit doctor, the CUDA tests of the Triton kernels, the GPU benchmark under a
# time budget, then where the GPU time of a few cells goes (benchmarks/gpu_profile.py);
# results and logs land in benchmarks/results/ (the benchmark writes after every shape, so a
# run cut short keeps what it measured), and are copied to $OUT when it is set (a lent machine
# sends back only what is there).
#
#   bash benchmarks/gpu_session.sh            # from the repository root, on the GPU machine
#   TESTS_S=150 BENCH_S=240 PROFILE_S=60 bash benchmarks/gpu_session.sh   # the parts' time limits
#
# Run it with the machine's own python first on PATH (a symbolic link to a virtual environment's
# python is not that environment).
# Needs torch with CUDA, triton >= 3.6, numpy and tqdm (lstmkit's imports), pytest for the
# tests (pytest-xdist, if present, spreads the Triton builds over the cores); lstmkit itself
# runs from src/ (no install). Each part has its own limit so a slow part cannot eat the other's.
# The benchmark's sLSTM section times FlashRNN too when it is importable: carry its package
# (pure Python and Triton; `make test` installs it) as .venv/lib/python3.11/site-packages/flashrnn.
set -u
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
peers=.venv/lib/python3.11/site-packages
if [ -d "$peers/flashrnn" ] && ! python -c "import flashrnn" 2>/dev/null; then
    mkdir -p /tmp/lstmkit_peers && ln -sfn "$PWD/$peers/flashrnn" /tmp/lstmkit_peers/flashrnn
    export PYTHONPATH="$PYTHONPATH:/tmp/lstmkit_peers"   # flashrnn alone, not the rest of a site-packages
fi
TESTS_S=${TESTS_S:-150}
BENCH_S=${BENCH_S:-240}
PROFILE_S=${PROFILE_S:-60}
python - <<'PY' 2>&1 | tee "$out/gpu_session_env.txt"
import importlib.util, os, platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      torch.cuda.get_device_name(0), "python", platform.python_version(), "cpus", os.cpu_count())
for m in ("triton", "numpy", "tqdm", "pytest", "xdist", "flashrnn"):
    spec = importlib.util.find_spec(m)
    print(m, "missing" if spec is None else getattr(__import__(m), "__version__", "ok"))
PY
# 0. lstmkit doctor: every kernel row on every variant, on the CPU and the GPU, against the reference.
timeout 120 python -m lstmkit doctor 2>&1 | tee "$out/doctor.log"
# 1. The CUDA tests: the CUDA-only matrix and the float64 tests of every variant on both paths.
par=$(python -c "import xdist" 2>/dev/null && echo "-n 12" || echo "")
timeout "$TESTS_S" python -m pytest tests/test_triton.py tests/test_triton_cuda.py tests/test_triton_row.py tests/test_torch_parity.py -q -p no:cacheprovider $par --tb=short -rf \
    -k "cuda or every_variant_float64 or record_mode or nan or common_shape" 2>&1 | tee "$out/test_triton_cuda.log"
# 2. The benchmark (its Triton builds are warmed in parallel first; no shape starts after the budget).
timeout $((BENCH_S + 60)) python benchmarks/bench_gpu.py --budget "$BENCH_S" 2>&1 | tee "$out/bench_gpu.log"
# 3. Where a call's GPU time goes: kernels against wall time, launches, the top kernels.
timeout "$PROFILE_S" python benchmarks/gpu_profile.py --cells vanilla,deep=32,slstm+heads=4 --shapes 0 \
    --stem gpu_profile_cells 2>&1 | tail -3
if [ -n "${OUT:-}" ]; then   # at most 8 files come back from a lent machine
    cp "$out"/gpu_session_env.txt "$out"/doctor.log "$out"/test_triton_cuda.log "$out"/bench_gpu.log \
       "$out"/bench_gpu.json "$out"/bench_gpu.md "$out"/gpu_profile_cells.json "$out"/gpu_profile_cells.md "$OUT"/ \
       2>/dev/null || true
fi
