"""Build and load the fused CPU recurrence (``csrc/``), the CPU kernel of ``lstmkit::recurrence``.

The C++ sources are compiled on first use with ``torch.utils.cpp_extension.load`` (ninja and
the machine's g++) and cached. A build is keyed by everything that makes it differ — the
sources, the variant ABI header generated from :mod:`lstmkit.kernels.abi`, the compiler
flags, the torch and Python versions and the CPU capability — so checkouts, virtual
environments and versions on one machine never rebuild one another's::

    $LSTMKIT_CACHE_DIR (default ~/.cache/lstmkit)/lstmkit_cpu_<capability>_<key>/

The capability is torch's (``torch.backends.cpu.get_cpu_capability()``: ``AVX512``, ``AVX2``
or ``DEFAULT``; the environment variable ``ATEN_CPU_CAPABILITY=avx2`` lowers it, for torch
and lstmkit alike). Each builds for that instruction set, not for the building machine
(``-march=x86-64-v4`` / ``-v3``), with a register tile sized for its register file.
``python -m lstmkit build`` builds ahead of time.

What the kernel computes, per variant, and what it keeps for backward: ``csrc/recurrence.cpp``
and :mod:`lstmkit.kernels.ops`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lstmkit import _atomic
from lstmkit._cache import cache_root
from lstmkit.kernels import abi, ops

__all__ = ["available", "load", "build", "prune", "BuildError", "capability", "runs_here", "build_dir", "forward",
           "backward", "IMPL"]

_CSRC = Path(os.path.abspath(__file__)).parent / "csrc"  # (as torch writes it into build.ninja: not resolved)
#: Every source file of the extension (recurrence.cpp includes the headers): the build key hashes them all.
_SOURCES = tuple(sorted(p.name for p in _CSRC.iterdir() if p.suffix in (".cpp", ".h")))
_lock = threading.Lock()
_ext: Any = None
_failed: str | None = None
_NP, _NB, _NS = len(abi.PARAMS), len(abi.BUFFERS), len(abi.SCALARS)

#: Compiler flags per CPU capability: the instruction set (not -march=native, so a build
#: runs on every machine of its capability) and ATen's matching Vectorized<T> width; widest first.
ISA_FLAGS: dict[str, list[str]] = {
    "AVX512": ["-march=x86-64-v4", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-march=x86-64-v3", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
_COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]


def capability() -> str:
    """The CPU capability the kernel is built for: torch's, or ``DEFAULT`` if unknown."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in ISA_FLAGS else "DEFAULT"


def _flags(cap: str) -> list[str]:
    return _COMMON_FLAGS + ISA_FLAGS[cap]


def _key(cap: str) -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (_CSRC / name).read_bytes())
    h.update(abi.header().encode())
    h.update(" ".join(_flags(cap)).encode())
    h.update(f"torch {torch.__version__} python {sys.version_info[:2]} {sys.platform}".encode())
    # the absolute paths torch writes into build.ninja (the sources, torch's headers and libraries,
    # as torch spells them: os.path.abspath, not resolved): two checkouts or environments of the
    # same sources would otherwise rebuild each other's build (a built one is imported directly)
    h.update(f"{_CSRC} {os.path.dirname(os.path.abspath(torch.__file__))}".encode())
    return h.hexdigest()[:16]


def build_dir(cap: str | None = None) -> Path:
    """Where the build for ``cap`` (default: this CPU's) lives."""
    cap = cap or capability()
    return cache_root() / f"lstmkit_cpu_{cap.lower()}_{_key(cap)}"


def _build(cap: str, verbose: bool = False, load: bool = True) -> Any:
    """Compile (or find) the build for ``cap`` and, with ``load``, import it (returned)."""
    from torch.utils.cpp_extension import load as cpp_load

    where = build_dir(cap)
    name = where.name
    include = where / "include"
    include.mkdir(parents=True, exist_ok=True)
    header = include / "lstmkit_abi.h"
    text = abi.header()
    if not header.exists() or header.read_text(encoding="utf-8") != text:
        _atomic.write_text(header, text, what="kernel ABI header")
    built = any(where.glob(f"{name}*.so"))
    if built and load:  # the key names these sources, flags and versions: import it as it is
        module = _import_built(name, where)
        if module is not None:
            return module
    _check_compiler()  # (a missing one would cost a minute of torch's messages and a long error)
    announce = not built and os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks
    if announce:
        print(f"lstmkit: compiling the fused CPU kernel for {cap} (once per machine and version; "
              f"usually 1-2 minutes) into {where}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    options = dict(name=name, sources=[str(_CSRC / "recurrence.cpp")], extra_include_paths=[str(_CSRC), str(include)],
                   extra_cflags=_flags(cap), extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=verbose)
    # torch's build lock is a file that a killed build leaves behind, and every later build then
    # waits on it forever; ours is an flock, which the OS releases when its holder dies. Holding
    # it, no other lstmkit build of this directory runs, so a torch lock found there is stale —
    # but the ninja of a builder killed mid-compile goes on (its compilers with it) after the lock
    # is released: it is waited for, so that two compilers never write the same objects.
    with _atomic.exclusive(where / "build.lock", what="kernel build lock"):
        by_another = not built and any(where.glob(f"{name}*.so"))  # built while this process waited
        _wait_for_orphaned_ninja(where)
        (where / "lock").unlink(missing_ok=True)
        for library in where.glob(f"{name}*.so"):  # damaged since it was built, or without the digest
            if _recorded_digest(library) != _digest(library):  # its build records: linked anew (ninja
                library.unlink()  # takes a newer file as done; importing a truncated one kills the process)
                _digest_file(library).unlink(missing_ok=True)
        try:
            with _ninja_on_path():
                ext = cpp_load(**options) if load else _compile_only(cap, options)
        except RuntimeError as exc:  # torch's "Error building extension", the compiler's output with it
            if not str(exc).startswith("Error building extension"):
                raise
            raise BuildError(_build_failure(exc)) from exc
        for library in where.glob(f"{name}*.so"):  # what ninja built (or found done), loaded: recorded
            digest = _digest(library)
            if _recorded_digest(library) != digest:
                _atomic.write_text(_digest_file(library), digest, what="kernel digest")
    if announce:
        done = "compiled by another process" if by_another else "compiled"
        print(f"lstmkit: kernel {done} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return ext


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs ``ninja`` from the PATH; where none is there, the ``ninja`` package's (a dependency
    of lstmkit's), whose directory is on the PATH only in an activated environment (not for
    ``.venv/bin/python`` called directly), is put there for the build."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja
    except ImportError:  # torch then says that ninja is required
        yield
        return
    path = os.environ.get("PATH")
    os.environ["PATH"] = ninja.BIN_DIR + (os.pathsep + path if path else "")
    try:
        yield
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def _digest_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _digest(library: Path) -> str:
    return hashlib.sha256(library.read_bytes()).hexdigest()


def _recorded_digest(library: Path) -> str | None:
    """The SHA-256 recorded when ``library`` was built (None: none recorded, or unreadable)."""
    try:
        return _digest_file(library).read_text(encoding="ascii").strip()
    except OSError:
        return None


def _import_built(name: str, where: Path) -> Any:
    """The extension built in ``where`` imported directly, or None where it cannot be (a library
    without the digest its build recorded, or another: still being written, truncated or damaged
    since — importing one can kill the process). Without ninja, the build lock or a writable cache:
    a cache on a read-only mount, a machine without ninja, a cache reached through another path
    (torch's ``load`` would rebuild wherever the paths written into build.ninja differ from this
    process's)."""
    import importlib.util

    for library in sorted(where.glob(f"{name}*.so")):
        if _recorded_digest(library) != _digest(library):
            continue
        try:
            spec = importlib.util.spec_from_file_location(name, library)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except ImportError:  # build under the lock, as torch's load does
            continue
    return None


def _orphaned_ninja(where: Path) -> list[int]:
    """The ninja processes building in ``where`` (Linux's /proc; elsewhere none are found). Called
    under the build lock, they are a killed builder's, left running."""
    target, found = str(where.resolve()), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() == "ninja" and os.readlink(proc / "cwd") == target:
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


#: How long a build waits for a killed builder's ninja to finish (a whole build takes 30-120 s).
ORPHAN_WAIT_S = 600.0


def _wait_for_orphaned_ninja(where: Path) -> None:
    """Wait until no killed builder's ninja runs in ``where`` (at most :data:`ORPHAN_WAIT_S`)."""
    pids = _orphaned_ninja(where)
    if not pids:
        return
    print(f"lstmkit: waiting for the compiler of an interrupted build (ninja, pid {', '.join(map(str, pids))}) "
          f"to finish in {where}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while _orphaned_ninja(where) and time.monotonic() < deadline:
        time.sleep(0.2)


def runs_here(cap: str) -> bool:
    """Whether this CPU can run a build for ``cap`` — its instruction set, whatever capability
    torch was told to use (``ATEN_CPU_CAPABILITY`` lowers torch's, not the CPU's)."""
    order = list(ISA_FLAGS)[::-1]  # DEFAULT, AVX2, AVX512
    probe = {"AVX512": "_is_avx512_supported", "AVX2": "_is_avx2_supported"}.get(cap)
    supported = getattr(torch.cpu, probe, None) if probe else None
    if supported is None:  # DEFAULT, or a torch without the probe: what torch uses runs
        return order.index(cap) <= order.index(capability())
    return bool(supported())


def _compile_only(cap: str, options: dict[str, Any]) -> None:
    """Compile the extension without loading it: a build for an instruction set this CPU lacks
    (``lstmkit build --capability AVX512`` on an AVX2 machine, for a cache shared with one)
    would die of an illegal instruction on import. torch offers no public build-only step; its
    builder's own is used, and where this torch's differs, one clear error."""
    from torch.utils import cpp_extension

    try:
        cpp_extension._write_ninja_file_and_build_library(
            **options, extra_cuda_cflags=None, extra_sycl_cflags=None, with_cuda=False, with_sycl=False)
    except (AttributeError, TypeError) as e:
        raise RuntimeError(f"capability: this CPU cannot run {cap} code, so the build would have to be compiled "
                           f"without loading it, which this torch's extension builder does not offer ({e}); build "
                           f"it on a machine with {cap}") from e


class BuildError(OSError):
    """The kernel could not be compiled or linked (the message: the compiler's first errors)."""


def _check_compiler() -> None:
    """A C++ compiler on PATH (``$CXX``, else ``c++``, as torch's build uses), or BuildError."""
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (install g++, or set CXX to one)")


def _build_failure(exc: BaseException) -> str:
    """torch's build error in a line: the compiler's or linker's first error lines (its whole
    output is the exception's cause, and ``lstmkit build --verbose`` shows it)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\berror\b|No space left|not found|cannot", ln, re.I)
              and not ln.startswith(("FAILED:", "ninja: build stopped", "Error building extension"))]
    shown = "; ".join(dict.fromkeys(errors[:3])) or (lines[-1] if lines else type(exc).__name__)
    return f"the fused CPU kernel could not be compiled: {shown[:400]}"


def build(cap: str | None = None, verbose: bool = False) -> Path:
    """Compile (or find) the kernel for ``cap`` (default: this CPU's capability) ahead of
    time — loaded once to check it where this CPU can run it (:func:`runs_here`), compiled
    only where it cannot; returns its build directory. Raises on a failed build."""
    cap = cap or capability()
    if cap not in ISA_FLAGS:
        raise ValueError(f"capability: expected one of {list(ISA_FLAGS)}, got {cap!r}")
    _build(cap, verbose=verbose, load=runs_here(cap))
    return build_dir(cap)


#: A build directory's name: lstmkit_cpu_<capability>_<key> (:func:`build_dir`).
_BUILD_NAME = re.compile(r"lstmkit_cpu_(?:" + "|".join(c.lower() for c in ISA_FLAGS) + r")_[0-9a-f]{16}")


def prune() -> list[tuple[Path, int]]:
    """Remove the kernel builds in the cache other than this installation's (one per capability,
    :func:`build_dir`): those of other versions, sources and environments, which are never removed
    otherwise (3-4 MB each; another checkout or environment sharing the cache builds its own again
    on its next use). A build being compiled (its lock held) is left. Returns each removed
    directory with its size in bytes."""
    keep = {build_dir(cap).name for cap in ISA_FLAGS}
    removed = []
    for directory in sorted(cache_root().glob("lstmkit_cpu_*")):
        if directory.name in keep or not directory.is_dir() or not _BUILD_NAME.fullmatch(directory.name):
            continue
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        try:
            with _atomic.exclusive(directory / "build.lock", what="kernel build lock", wait=False):
                shutil.rmtree(directory)
        except BlockingIOError:  # being built now
            continue
        removed.append((directory, size))
    return removed


def load(verbose: bool = False) -> Any:
    """The compiled extension for this CPU (built on first use). Raises on a failed build, and
    again, without trying anew, on every later call in this process (BuildError)."""
    global _ext, _failed
    if _ext is None:
        with _lock:
            if _failed is not None:
                raise BuildError(_failed)
            if _ext is None:
                try:
                    ext = _build(capability(), verbose=verbose)
                except Exception as exc:
                    _failed = str(exc) if isinstance(exc, BuildError) else repr(exc)
                    raise
                ext.set_messages(ops.NO_DOUBLE_BACKWARD, ops.NO_BATCHED_BACKWARD)
                _ext = ext
    return _ext


def available() -> bool:
    """True if the extension is built and loaded (builds it on the first call).

    Never raises: a failed build gives False and one warning. Under ``torch.compile`` or
    export tracing nothing is built: it answers True unless a build has failed already (the
    operator's CPU implementation builds at the first real call).
    """
    global _failed
    if _ext is not None:
        return True
    if _failed is not None:
        return False
    if torch.compiler.is_compiling():
        return True
    try:
        load()
    except Exception as exc:  # noqa: BLE001 - any build failure means "not available"
        _failed = str(exc) if isinstance(exc, BuildError) else repr(exc)
        warnings.warn(f"lstmkit: the fused CPU kernel could not be built ({_failed}); "
                      f"falling back to slower kernels", RuntimeWarning, stacklevel=2)
        return False
    return True


def bf16_unit() -> str:
    """Where a bfloat16 layer's per-step products run: ``"amx"`` (bfloat16 operands on the AMX
    tiles through torch's oneDNN micro-kernels, float32 accumulation) or ``"float32"`` (the
    products in float32, on CPUs without the unit). Builds the extension on first use."""
    return "amx" if load().bf16_gemm() else "float32"


def full_omp_teams() -> bool:
    """Whether OpenMP gives a parallel region every thread torch asks for — not under
    ``OMP_DYNAMIC`` nor an ``OMP_THREAD_LIMIT`` below torch's thread count, where torch's oneDNN
    computes wrong results (its linear layer, 0.99 relative off, and nn.LSTM's training gradients,
    measured): lstmkit then calls none of oneDNN's. True where the extension cannot be built
    (the torch row, which is oneDNN's, is then what there is) and while torch compiles."""
    if torch.compiler.is_compiling():
        return True
    return bool(load().full_omp_teams()) if available() else True


def first_nonfinite(tensors: list[Tensor]) -> int | None:
    """The index of the first of these floating CPU tensors that holds a NaN or inf (-1: none),
    in one call of the compiled kernel; None while the extension is not loaded (nothing is
    built for a check)."""
    return None if _ext is None else int(_ext.first_nonfinite(tensors))


def _scalars_listed(meta: tuple[Any, ...]) -> tuple[Any, ...]:
    """The operators' non-tensor arguments ``(flags, mlp_layout, *scalars, H, P[, save])`` as the
    compiled functions take them: the scalars (:data:`~lstmkit.kernels.abi.SCALARS`) as one list."""
    return (*meta[:2], list(meta[2:2 + _NS]), *meta[2 + _NS:])


def forward(xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor, *rest: Any) -> tuple[Tensor, ...]:
    """``lstmkit::recurrence`` on the CPU (arguments and results in :mod:`lstmkit.kernels.ops`)."""
    params, meta = rest[:_NP], rest[_NP:]
    y, h_n, c_n, buffers = (_ext or load()).forward(xg, w_hh, h0, c0, lengths, params, *_scalars_listed(meta))
    return (y, h_n, c_n, *buffers)


def backward(dy: Tensor, dh_n: Tensor, dc_n: Tensor, y: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
             lengths: Tensor, *rest: Any) -> tuple[Tensor, ...]:
    """``lstmkit::recurrence_backward`` on the CPU."""
    params, buffers, meta = rest[:_NP], rest[_NP:_NP + _NB], rest[_NP + _NB:]
    dxg, dw_hh, dh0, dc0, dparams = (_ext or load()).backward(dy, dh_n, dc_n, y, h0, c0, w_hh, lengths, params,
                                                              buffers, *_scalars_listed(meta))
    return (dxg, dw_hh, dh0, dc0, *dparams)


class _CPU:
    """The CPU implementation of the operators: this module's two functions."""

    forward = staticmethod(forward)
    backward = staticmethod(backward)


IMPL = _CPU()
ops.register_device("CPU", IMPL)
