"""The Triton row's wiring: the flags its kernels claim and how they decode the flag word, the
parameters its ahead-of-time builds make, when it is selected (and the fallback without
Triton), the path rule and its override, NaN kept in its sequence, no kernel built at
``import lstmkit``; and every kernel compiled ahead of time for sm_80 and sm_90 (a clean
subprocess: Triton's own library is interpreted once TRITON_INTERPRET=1 is set in this one)
and the GPU benchmark's dry run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lstmkit
from lstmkit import kernels, variants
from lstmkit.kernels import abi
from lstmkit.kernels.triton_impl import PATH_ENV
from lstmkit.spec import resolve
from triton_checks import DEVICE

pytest.importorskip("triton")


@pytest.mark.parametrize(("cell", "P"), [("peephole+cifg", 0), ("fgr+peephole+nog", 3), ("layernorm+peephole", 0),
                                         ("zoneout=0.3/0.2", 3), ("deep=f:3+layernorm", 0), ("slstm+heads=2", 0)])
@pytest.mark.parametrize("masks", [False, True])
def test_ahead_of_time_builds_take_the_parameters_a_layer_gives(cell, P, masks):
    """The ahead-of-time builds (triton_aot) make the operator's parameters from a flag word
    alone; their shapes are those of a real layer's (the operator's params list: peepholes,
    W_gg, the layer norms, W_hr, the summed bias, zoneout's training masks, the flat MLP)."""
    from lstmkit.kernels import fused, triton_aot, triton_impl

    spec, (T, B, H) = resolve(cell), (5, 2, 6)
    layer = lstmkit.LSTM(4, H, cell=spec, proj_size=P, heads=spec.heads)
    params = layer.layer_params(0, 0)
    real, _ = fused.operator_params(params, spec, torch.empty(0))
    R, HO = params["weight_hh"].shape[0], layer.output_size
    shapes = {n: tuple(t.shape) for n, t in zip(abi.PARAMS, real)}
    if spec.layernorm:
        shapes["bias"] = (R,)
    if masks and spec.zoneout != (0.0, 0.0):
        shapes.update(keep_c=(T, B, H), keep_h=(T, B, HO))
    mlp = abi.decode_mlp(list(abi.mlp_layout(spec, True)), H) if spec.gate_hidden else None
    built = triton_aot._spec_params(triton_impl.Variant.from_flags(abi.flags(spec)), T, B, H, P, R, HO,
                                    torch.float32, torch.device("meta"), masks, mlp.wtot if mlp else 0)
    assert {n: tuple(t.shape) for n, t in zip(abi.PARAMS, built)} == shapes


def test_the_kernels_claim_every_row_the_triton_row_implements(monkeypatch):
    """triton_cell.IMPLEMENTED, the rows whose step the kernels compute, is what the Triton kernel
    row says it implements; a flag not claimed is refused, not run as the cell without it."""
    from lstmkit.kernels import triton_cell

    assert triton_cell.IMPLEMENTED == kernels.REGISTRY["triton"].implements
    monkeypatch.setattr(triton_cell, "IMPLEMENTED", triton_cell.IMPLEMENTED - {"clip"})
    layer = lstmkit.LSTM(3, 4, cell="clip=0.5", backend="triton").to(DEVICE)
    with pytest.raises(ValueError, match=r"the kernels do not compute \['clip'\]"):
        layer(torch.randn(2, 1, 3, device=DEVICE))


def test_variant_word_decoders_match_the_abi():
    """The kernels' compile-time decoders of the flag word (triton_cell.has, slot, fgr_slot,
    hard_slope) say what lstmkit.kernels.abi says, for every combination of the bits that
    remove gates, with and without fgr, and a hard sigmoid."""
    from lstmkit.kernels import triton_cell

    removal = [b for b in (1 << k for k in range(len(abi.FLAGS))) if any(b & m for m in abi.GATE_REMOVED.values())]
    for n in range(1 << len(removal)):
        word = sum(b for j, b in enumerate(removal) if n >> j & 1)
        for extra in (0, abi.flag("fgr"), abi.flag("fgr") | abi.flag("gate_act_hardsigmoid")):
            flags = word | extra
            slots, sslots = abi.gate_slots(flags)
            assert {g: triton_cell.slot(flags, g) for g in slots} == slots
            fgr = bool(flags & abi.flag("fgr"))
            assert {g: triton_cell.fgr_slot(flags, g) for g in sslots} == (sslots if fgr else dict.fromkeys(sslots, -1))
            assert [triton_cell.has(flags, name) for name in abi.FLAGS] == [bool(flags & abi.flag(f)) for f in abi.FLAGS]
    for name, slope in variants.HARD_SIGMOID_SLOPES.items():
        assert triton_cell.hard_slope(abi.flags(resolve(f"gate_act={name}"))) == slope
    assert triton_cell.hard_slope(abi.flags(resolve("vanilla"))) == 0.0


# ---------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("cell", ["vanilla", "layernorm", "clip=1", "nig+niaf+noaf"])
def test_nan_stays_in_its_sequence(cell):
    layer = lstmkit.LSTM(3, 40, cell=cell, backend="triton", check_finite=False).to(DEVICE)
    x = torch.randn(4, 2, 3, device=DEVICE)
    x[1, 0, 0] = float("nan")
    out, (h, c) = layer(x)
    assert torch.isnan(out[1:, 0]).all() and torch.isnan(c[:, 0]).all()  # NaN spreads through batch 0
    assert torch.isfinite(out[:, 1]).all()                                # batch 1 is untouched


def test_selection_cuda_layers_choose_triton_cpu_layers_keep_the_cpu_kernel():
    names = list(kernels.REGISTRY)
    assert names.index("cpu_fused") < names.index("triton") < names.index("reference")
    cuda = torch.device("cuda")
    assert kernels.select(resolve("peephole+layernorm"), cuda, torch.bfloat16).name == "triton"
    assert kernels.select(lstmkit.CellSpec(gate_hidden=(3,), layernorm=True), cuda, torch.float32).name == "triton"
    assert kernels.select(resolve("vanilla"), cuda, torch.complex64).name == "reference"
    assert kernels.select(resolve("vanilla"), torch.device("cpu"), torch.float32).name == "cpu_fused"
    # CPU tensors reach the interpreter only when asked for by name, never as a fallback
    cpu_rows = [k.name for k in kernels.REGISTRY.values() if k.automatic(torch.device("cpu"))]
    assert "triton" not in cpu_rows and "cpu_fused" in cpu_rows
    with pytest.raises(ValueError, match="slstm"):
        kernels.select(resolve("slstm"), cuda, torch.float32, backend="torch")


def test_without_triton_cuda_layers_fall_back_to_reference_with_one_warning(monkeypatch):
    import importlib.util

    from lstmkit.kernels import fused

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    monkeypatch.setattr(fused, "_TRITON_MISSING_WARNED", False)
    cuda = torch.device("cuda")
    # cells torch computes itself run its operator on CUDA, Triton or not (the 'torch' row)
    assert kernels.select(resolve("vanilla"), cuda, torch.float32).name == "torch"
    with pytest.warns(RuntimeWarning, match="Triton is not installed") as rec:
        assert kernels.select(resolve("peephole"), cuda, torch.float32).name == "reference"
        assert kernels.select(resolve("zoneout=0.1"), cuda, torch.float32).name == "reference"
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    with pytest.raises(ValueError, match="Triton is not installed"):
        kernels.select(resolve("vanilla"), cuda, torch.float32, backend="triton")


def test_importing_lstmkit_builds_no_triton_kernel():
    """The kernel modules load when a Triton row first runs, not at ``import lstmkit``."""
    code = ("import sys, lstmkit, lstmkit.kernels; "
            "assert not {'lstmkit.kernels.triton_kernels', 'lstmkit.kernels.triton_cell'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_path_rule_and_its_override(monkeypatch):
    from lstmkit.kernels.triton_impl import Variant, choose_path

    monkeypatch.delenv(PATH_ENV, raising=False)
    vanilla, ln = (Variant.from_flags(abi.flags(resolve(c))) for c in ("vanilla", "layernorm"))
    f32, bf16 = torch.float32, torch.bfloat16
    assert choose_path(vanilla, 8, 32, 32, f32, False) == "persistent"   # 16 KiB of weights
    assert choose_path(vanilla, 8, 64, 64, f32, False) == "per_step"     # 64 KiB
    assert choose_path(vanilla, 8, 64, 64, bf16, False) == "persistent"  # 32 KiB
    assert choose_path(ln, 8, 64, 64, bf16, False) == "per_step"         # layernorm: half the budget
    assert choose_path(vanilla, 8, 1024, 1024, bf16, False) == "per_step"
    # the larger budget on GPUs with enough shared memory (H100/H200 227 KiB; A100 163 KiB)
    cuda = torch.device("cuda", 0)
    for smem, want in ((227 * 1024, "persistent"), (163 * 1024, "per_step")):
        props = SimpleNamespace(shared_memory_per_block_optin=smem)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        assert choose_path(vanilla, 8, 64, 64, f32, False, cuda) == want
        assert choose_path(ln, 8, 64, 64, f32, False, cuda) == "per_step"     # layernorm: half the budget
        assert choose_path(vanilla, 8, 128, 128, f32, False, cuda) == "per_step"
    assert choose_path(vanilla, 8, 64, 64, f32, False, torch.device("cpu")) == "per_step"  # the interpreter
    monkeypatch.setenv(PATH_ENV, "per_step")
    assert choose_path(vanilla, 8, 32, 32, f32, False) == "per_step"
    monkeypatch.setenv(PATH_ENV, "persistent")
    assert choose_path(vanilla, 8, 64, 64, f32, False) == "persistent"   # forced, up to 64 KiB
    assert choose_path(vanilla, 8, 1024, 1024, f32, False) == "per_step"  # cannot fit one SM
    monkeypatch.setenv(PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="LSTMKIT_TRITON_PATH"):
        choose_path(vanilla, 8, 32, 32, f32, False)


# ---------------------------------------------------------------------------- AOT


#: Sizes of one block's shared memory (opt-in maximum) per compute capability.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def test_every_kernel_compiles_ahead_of_time_for_sm80_and_sm90():
    """Each kernel of the launch plan (persistent and per step, projection, layernorm, fgr)
    builds for A100 and H100 and fits their shared memory. (Every variant × dtype × shape
    class: ``python benchmarks/bench_gpu.py --aot``, results/gpu_kernels_aot.md.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    plan = ["peephole+cifg+layernorm/bfloat16/per-step H=256 P=128",  # every per-step kernel
            "fgr+peephole+nog+clip=0.4/float32/persistent H=32 P=16",  # persistent: fgr, projection
            "peephole+cifg+layernorm/bfloat16/persistent H=32",        # persistent: layernorm
            # the new rows, zoneout's masks and scalars: per step with a projection, and persistent
            "zoneout=0.3/0.2+gate_act=hard_sigmoid+cand_act=relu+out_act=relu/bfloat16/per-step H=256 P=128",
            "zoneout=0.3/0.2+gate_act=hardsigmoid+peephole/float32/persistent H=32 P=16",
            # the sLSTM (per step only): both forget activations, the normaliser's floor, heads
            "slstm+heads=4/bfloat16/per-step H=128", "slstm+forget_act=exp+n_clamp/float32/per-step H=1024",
            # deep gates: their MLPs in torch; with layernorm the kernels take ready pre-activations (READY)
            "deep=32+layernorm+peephole/bfloat16/per-step H=256 P=128"]
    cmd = [sys.executable, "-W", "ignore", "-m", "lstmkit.kernels.triton_aot", "--plan", ";".join(plan),
           "--archs", "80,90"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [f"{r['cell']} {r['dtype']} {r['kernel']} {r['arch']}: {r.get('error')}" for r in rows if not r["ok"]]
    assert proc.returncode == 0 and not failed, "\n".join(failed) or proc.stderr[-3000:]
    kernels_built = {r["kernel"].split()[0] for r in rows}
    assert kernels_built == {"persistent_forward", "persistent_backward", "step_forward", "step_project",
                             "step_dh", "step_backward"}, kernels_built
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], r


def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/bench_gpu.py runs every code path on tiny shapes (here: the interpreter)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    # the variants whose rows the script builds in its own way (a projection, heads, the sLSTM, a
    # spec no cell word names), and vanilla: every other variant's row is the same code with another
    # cell word
    variants = ["vanilla", "projection", "heads=4", "slstm+heads=4", *bench_gpu.ROW_SPECS]
    assert set(variants) <= set(bench_gpu.VARIANTS)
    result = bench_gpu.main(["--dry-run", "--jobs", "1", "--out", str(tmp_path), "--variants", ",".join(variants)])
    rows = {(r["row"], r["mode"]) for r in result["rows"]}
    for v in variants:
        for mode in ("infer", "train"):
            assert (f"triton:{v}", mode) in rows and (f"reference:{v}", mode) in rows
    assert all(r["kernel"] == "triton" for r in result["rows"] if r["row"].startswith("triton:"))
    assert {r["row"] for r in result["paths"]} == {"persistent", "per_step", "cudnn"}
    if importlib.util.find_spec("flashrnn"):  # the sLSTM against FlashRNN's (on a CPU: its PyTorch loop)
        assert {r["row"] for r in result["peers"]} == {"lstmkit triton", "flashrnn vanilla"}
        assert all(math.isfinite(r["seconds"]) for r in result["peers"])
    assert all(math.isfinite(r["seconds"]) for r in result["paths"])
    md = (tmp_path / "bench_gpu_dry_run.md").read_text()
    assert "Dry run" in md and "Persistent vs per step" in md
