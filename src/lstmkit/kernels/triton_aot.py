"""Ahead-of-time builds of the Triton kernels for real GPUs, without a GPU.

:func:`launches` runs :class:`~lstmkit.kernels.triton_impl.TritonImpl` forward and backward
on meta tensors with a recorder in place of the launcher, so it yields exactly the kernels,
constexprs, argument types and warp counts that a layer of that shape would launch;
:func:`compile_launch` builds one with ``triton.compile`` for an explicit
``GPUTarget("cuda", cc, 32)`` (sm_80: A100, sm_90: H100) and reads its registers, stack
(spill) bytes and shared memory from the cubin. Used by the tests and by
``benchmarks/bench_gpu.py --aot``. Run it in a process where Triton was imported without
``TRITON_INTERPRET=1`` (its own library functions are interpreter functions otherwise)::

    python -m lstmkit.kernels.triton_aot --cells vanilla,layernorm --dtypes float32 --archs 80,90
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lstmkit.kernels import abi, ops, triton_impl
from lstmkit.kernels.triton_impl import NB, NP, TritonImpl

__all__ = ["Launch", "launches", "compile_launch", "iter_builds", "main", "SHAPE_CLASSES", "ARCHS"]

#: Compute capabilities built ahead of time: A100 (sm_80) and H100 (sm_90).
ARCHS = (80, 90)

#: Shape classes of the launch plan, (B, H, P): each gives other tiles or the other path.
SHAPE_CLASSES: dict[str, tuple[int, int, int]] = {
    "persistent H=32": (8, 32, 0),
    "persistent H=64": (64, 64, 0),
    "persistent H=32 P=16": (8, 32, 16),
    "per-step H=128": (32, 128, 0),
    "per-step H=256 P=128": (64, 256, 128),
    "per-step H=1024": (32, 1024, 0),
}

_PTR = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
        torch.int32: "i32", torch.int64: "i64"}


@dataclass(frozen=True)
class Launch:
    """One kernel build: its name, argument types (Triton signature strings), constexprs,
    warps and the module that defines it."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    module: str = "lstmkit.kernels.triton_kernels"

    def describe(self) -> str:
        c = dict(self.constexprs)
        blocks = "×".join(str(c[k]) for k in ("BB", "BH", "BO") if k in c)
        return f"{self.kernel} [{blocks}] w{self.num_warps}"


def _type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2 ** 31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def launches(cell_flags: int, dtype: torch.dtype, B: int, H: int, P: int, T: int = 2,
             lengths: bool = True, mlp: tuple[int, ...] = ()) -> list[Launch]:
    """The distinct launches of one layer-direction (forward without buffers, as at evaluation;
    forward with buffers and backward, as in training: with zoneout's masks) with these flags,
    dtype and sizes, as on a GPU (the dot sees the layer's dtype); ``mlp``: the deep gates'
    layout (:func:`lstmkit.kernels.abi.mlp_layout`), whose MLPs run in torch around the kernels."""
    v = triton_impl.Variant.from_flags(cell_flags)
    deep = abi.decode_mlp(list(mlp), H)
    R = sum(deep_gate.widths[0] - H for deep_gate in deep.gates) + v.n_gates * H
    _, HO = triton_impl.projection_sizes(v, H, P)
    seen: dict[Launch, None] = {}

    def record(kernel: Any, grid: tuple[int, ...], args: dict[str, Any], consts: dict[str, Any],
               num_warps: int) -> None:
        consts = dict(consts)
        if "MMA" in consts:
            consts["MMA"] = consts["OP"]  # the interpreter's float32 stand-in is not what a GPU runs
        declared = {p.name: p.annotation_type for p in kernel.params}  # e.g. the float64 scalars
        sig = tuple((name, declared.get(name) or _type(value)) for name, value in args.items())
        fn = getattr(kernel, "fn", kernel)  # a JITFunction's Python function
        seen[Launch(fn.__name__, sig, tuple(consts.items()), num_warps, fn.__module__)] = None

    meta = torch.device("meta")
    spec = _spec_params(v, T, B, H, P, R, HO, dtype, meta, masks=False, mlp_size=deep.wtot)
    train = _spec_params(v, T, B, H, P, R, HO, dtype, meta, masks=True, mlp_size=deep.wtot)
    xg = torch.empty((T, B, R), dtype=dtype, device=meta)
    w_hh = torch.empty((R, HO), dtype=dtype, device=meta)
    h0 = torch.empty((B, HO), dtype=dtype, device=meta)
    c0 = torch.empty((B, abi.cell_state_count(cell_flags) * H) if not v.rnn else (0,), dtype=dtype, device=meta)
    lens = torch.full((B,), T, dtype=torch.int64) if lengths else torch.empty((0,), dtype=torch.int64)
    scalars = [0.5 if name == "clip" else 0.0 for name in abi.SCALARS]  # runtime floats: any values compile alike
    impl = TritonImpl()
    old = triton_impl.RECORDER
    triton_impl.RECORDER = record
    try:
        impl.forward(xg, w_hh, h0, c0, lens, *spec, cell_flags, list(mlp), *scalars, H, P, False)
        y, h_n, c_n, *buffers = impl.forward(xg, w_hh, h0, c0, lens, *train, cell_flags, list(mlp), *scalars, H,
                                             P, True)
        impl.backward(torch.empty_like(y), torch.empty_like(h_n), c_n.new_empty(c_n.shape), y, h0, c0, w_hh, lens,
                      *train, *buffers, cell_flags, list(mlp), *scalars, H, P)
    finally:
        triton_impl.RECORDER = old
    return list(seen)


def _spec_params(v: triton_impl.Variant, T: int, B: int, H: int, P: int, R: int, HO: int, dtype: torch.dtype,
                 dev: torch.device, masks: bool, mlp_size: int = 0) -> list[torch.Tensor]:
    """Meta parameters in :data:`~lstmkit.kernels.abi.PARAMS` order, present as the variant has them
    (zoneout's masks keep_c (T, B, H), keep_h (T, B, HO) if ``masks``: training; the deep gates'
    flat layers, ``mlp_size`` elements)."""
    nsh = v.n_sigmoid * H
    shapes = {"peephole_i": (H,) if v.peep and v.gi >= 0 else None,
              "peephole_f": (H,) if v.peep and v.gf >= 0 else None,
              "peephole_o": (H,) if v.peep and v.go >= 0 else None, "weight_gg": (nsh, nsh) if v.fgr else None,
              "ln_hh_weight": (R,) if v.ln else None, "ln_c_weight": (H,) if v.ln else None,
              "ln_c_bias": (H,) if v.ln else None, "weight_hr": (P, H) if P > 0 and not v.rnn else None,
              "ln_ih_weight": (R,) if v.ln else None, "bias": (R,) if v.ln else None,
              "keep_c": (T, B, H) if v.zoneout and masks else None,
              "keep_h": (T, B, HO) if v.zoneout and masks else None, "mlp": (mlp_size,) if mlp_size else None}
    assert set(shapes) <= set(abi.PARAMS) and NB == len(abi.BUFFERS) and ops.NP == NP
    return [torch.empty(shapes.get(n) or (0,), dtype=dtype, device=dev) for n in abi.PARAMS]


def compile_launch(launch: Launch, cc: int) -> dict[str, Any]:
    """Build one launch for ``sm_{cc}``; returns registers, stack (spill) bytes, shared bytes and
    ``ptx``, a digest of the PTX without its debug lines (equal digests: the same machine code
    from two versions of the source)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT builds need Triton imported without TRITON_INTERPRET=1 (its own library is "
                           "interpreted then): run `python -m lstmkit.kernels.triton_aot` in a clean process")
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    consts = dict(launch.constexprs)
    sig = dict(launch.signature)
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn, signature=sig, constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": launch.num_warps})
    usage = _resource_usage(kernel.asm["cubin"])
    return {"registers": usage.get("REG"), "stack": usage.get("STACK"), "local": usage.get("LOCAL"),
            "shared": kernel.metadata.shared, "ptx": _ptx_digest(kernel.asm["ptx"])}


def _ptx_digest(ptx: str) -> str:
    """sha256 (16 hex digits) of the PTX without line information, file names and comments."""
    import hashlib

    body = "\n".join(line for line in ptx.splitlines() if not line.lstrip().startswith((".loc", ".file", "//")))
    body = re.sub(r"\.section\s+\.debug.*", "", body, flags=re.S)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL of the cubin's one function, by the cuobjdump that ships with Triton."""
    import tempfile

    import triton.backends.nvidia as nv

    tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=False).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


def iter_builds(cells: dict[str, tuple[int, tuple[int, ...]]], dtypes: tuple[torch.dtype, ...],
                classes: dict[str, tuple[int, int, int]]) -> Iterator[tuple[str, torch.dtype, str, Launch]]:
    """Every distinct launch of these variants (name -> flag word and deep gates' layout) ×
    dtypes × shape classes (the RNN has no P)."""
    seen: set[Launch] = set()
    for cell_name, (flags, mlp) in cells.items():
        rnn = bool(flags & abi.flag("rnn"))
        for dtype in dtypes:
            for cls, (B, H, P) in classes.items():
                if rnn and P:
                    continue
                for launch in launches(flags, dtype, B, H, P, mlp=mlp):
                    if launch not in seen:
                        seen.add(launch)
                        yield cell_name, dtype, cls, launch


def main(argv: list[str] | None = None) -> int:
    """Build every launch of the given variants × dtypes × shape classes × archs; one JSON
    object per build on stdout (``ok``, ``error`` or the resource usage). Exit status 1 if
    any build failed."""
    import argparse
    import json

    from lstmkit.spec import resolve

    ap = argparse.ArgumentParser(prog="python -m lstmkit.kernels.triton_aot", description=main.__doc__)
    ap.add_argument("--cells", default="vanilla", help="comma-separated cell arguments (rnn_tanh, rnn_relu: the RNN)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--classes", default=",".join(SHAPE_CLASSES), help="names from SHAPE_CLASSES")
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)))
    ap.add_argument("--plan", help="instead of the product above: 'cell/dtype/class' entries joined by ';'")
    ap.add_argument("--gate-hidden", default=None,
                    help="LETTERS=WIDTH: in every cell, these gates deep with one hidden layer of WIDTH (the "
                         "others shallow), e.g. f=32 or io=32 (CellSpec(gate_hidden=...) has no cell word)")
    args = ap.parse_args(argv)

    def spec_of(c: str) -> Any:
        spec = resolve(c)
        if args.gate_hidden:
            letters, width = args.gate_hidden.split("=")
            spec = spec.replace(gate_hidden={g: (int(width),) for g in letters})
        return spec

    def flags_of(c: str) -> tuple[int, tuple[int, ...]]:
        if c.startswith("rnn_"):
            return abi.flag("rnn") | (abi.flag("rnn_relu") if c == "rnn_relu" else 0), ()
        return abi.flags(spec_of(c)), tuple(abi.mlp_layout(spec_of(c), True))
    if args.plan:
        builds = []
        for entry in args.plan.split(";"):
            c, d, k = entry.rsplit("/", 2)  # a cell may hold "/" (zoneout=0.3/0.2)
            builds += list(iter_builds({c: flags_of(c)}, (getattr(torch, d),), {k: SHAPE_CLASSES[k]}))
    else:
        cells = {c: flags_of(c) for c in args.cells.split(",")}
        dtypes = tuple(getattr(torch, d) for d in args.dtypes.split(","))
        builds = list(iter_builds(cells, dtypes, {k: SHAPE_CLASSES[k] for k in args.classes.split(",")}))
    failed = 0
    for cell_name, dtype, cls, launch in builds:
        for cc in (int(a) for a in args.archs.split(",")):
            row = {"cell": cell_name, "dtype": str(dtype).removeprefix("torch."), "class": cls,
                   "kernel": launch.describe(), "arch": f"sm_{cc}"}
            try:
                row.update(compile_launch(launch, cc), ok=True)
            except Exception as exc:  # noqa: BLE001 - reported per build
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
                failed += 1
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
