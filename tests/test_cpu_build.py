"""Builds of the compiled CPU kernel: keyed so that nothing rebuilds another's, the AVX2
build tested on whatever CPU runs the tests (AVX-512 machines too), and threads that never
hang a forked DataLoader worker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from lstmkit.kernels import abi, cpu_ext


def _python(code: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def test_build_directory_is_keyed_by_capability_abi_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    avx2, avx512 = cpu_ext.build_dir("AVX2"), cpu_ext.build_dir("AVX512")
    assert avx2.parent == avx512.parent == tmp_path
    assert avx2.name.startswith("lstmkit_cpu_avx2_") and avx512.name.startswith("lstmkit_cpu_avx512_")
    assert avx2.name.split("_")[-1] != avx512.name.split("_")[-1]
    monkeypatch.setattr(abi, "header", lambda: "// another ABI\n")
    assert cpu_ext.build_dir("AVX2") != avx2  # a changed ABI is a new build, not an overwrite
    with pytest.raises(ValueError, match="capability: expected one of"):
        cpu_ext.build("SSE9")


def test_a_build_waits_for_a_killed_builders_ninja(monkeypatch, tmp_path, capsys):
    """A builder killed mid-compile releases the build lock, but its ninja (and compilers) go on
    in the build directory; the next build started another ninja there, two compilers writing the
    same objects (found by a sweep of multi-process use). It waits for the orphan first. Here the
    orphan is a process named ninja (a copy of sleep) running in the build directory."""
    import shutil
    import threading

    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    where = cpu_ext.build_dir("AVX2")
    where.mkdir(parents=True)
    ninja = tmp_path / "bin" / "ninja"
    ninja.parent.mkdir()
    shutil.copy(shutil.which("sleep"), ninja)
    orphan = subprocess.Popen([str(ninja), "60"], cwd=where)
    try:
        deadline = time.monotonic() + 10  # (a process just started may not be listed under /proc at once)
        while not cpu_ext._orphaned_ninja(where) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu_ext._orphaned_ninja(where) == [orphan.pid]
        assert cpu_ext._orphaned_ninja(tmp_path) == []  # another directory's
        loaded = []

        def fake_load(name, build_directory, **kw):
            loaded.append(orphan.poll())  # the orphan is gone when the build starts
            return object()
        monkeypatch.setattr(cpp, "load", fake_load)
        threading.Timer(1.0, orphan.kill).start()
        t0 = time.monotonic()
        cpu_ext.build("AVX2")
        assert time.monotonic() - t0 >= 0.9 and loaded and loaded[0] is not None
        assert f"pid {orphan.pid}" in capsys.readouterr().err
    finally:
        orphan.kill()
        orphan.wait()


def test_a_process_that_waited_for_another_build_says_so(monkeypatch, tmp_path, capsys):
    """A process that waited on the build lock while another compiled said it had compiled the
    kernel itself ('kernel compiled in 61 s')."""
    import contextlib

    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    where = cpu_ext.build_dir("AVX2")
    real = cpu_ext._atomic.exclusive

    @contextlib.contextmanager
    def another_builds_meanwhile(path, what):
        (where / f"{where.name}.so").write_bytes(b"")  # what the other process built
        with real(path, what=what):
            yield
    monkeypatch.setattr(cpu_ext._atomic, "exclusive", another_builds_meanwhile)
    monkeypatch.setattr(cpp, "load", lambda name, build_directory, **kw: object())
    cpu_ext.build("AVX2")
    err = capsys.readouterr().err
    assert "compiling the fused CPU kernel" in err and "kernel compiled by another process in" in err


_READ_ONLY_AND_NO_NINJA = """
import warnings, torch, lstmkit
from lstmkit import _atomic
from lstmkit.kernels import cpu_ext
def refused(path, what):
    raise OSError(30, f"{what}: cannot write {path} (read-only file system)")
_atomic.exclusive = refused  # the cache on a read-only mount: no lock can be taken
warnings.simplefilter("error")  # a failed load would warn and fall back to the reference loop
layer = lstmkit.LSTM(3, 4)
assert cpu_ext.available() and lstmkit.kernels.select(layer.spec, torch.device("cpu"), torch.float32).name == "cpu_fused"
layer(torch.randn(5, 2, 3))[0].sum().backward()
print("ok", cpu_ext._ext.__file__)
"""


@pytest.mark.skipif(not cpu_ext.available(), reason="the CPU kernel does not build here")
def test_a_built_kernel_loads_from_a_read_only_cache_without_ninja(tmp_path):
    """A cache built once (``lstmkit build``, a shared or copied cache, a container image) is
    imported as it is: on a read-only mount (no build lock), without ninja on the PATH, reached
    through another path (a copy here) — where torch's ``load`` would take the lock, need ninja,
    and recompile wherever the paths in build.ninja differ."""
    import shutil

    built = cpu_ext.build_dir()
    copy = tmp_path / "cache"
    shutil.copytree(built, copy / built.name, ignore=shutil.ignore_patterns("*.o", "build.lock", "lock"))
    no_ninja = tmp_path / "bin"
    no_ninja.mkdir()
    (no_ninja / "ninja").write_text("#!/bin/sh\nexit 127\n")
    (no_ninja / "ninja").chmod(0o755)
    env = {**os.environ, "LSTMKIT_CACHE_DIR": str(copy), "PATH": f"{no_ninja}:{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, "-c", _READ_ONLY_AND_NO_NINJA], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok " + str(copy)), done.stdout
    assert "compiling" not in done.stderr


def test_a_first_build_announces_itself_once(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_load(name, build_directory, **kw):
        calls.append(name)
        (tmp_path / name / f"{name}.so").write_bytes(b"")
        return object()
    monkeypatch.setattr(cpp, "load", fake_load)
    monkeypatch.setattr(cpu_ext, "runs_here", lambda cap: True)  # every build loads here (see below)
    cpu_ext.build("AVX2")
    err = capsys.readouterr().err
    assert "compiling the fused CPU kernel for AVX2" in err and "usually 1-2 minutes" in err
    cpu_ext.build("AVX2")  # built: nothing to say
    assert capsys.readouterr().err == "" and len(calls) == 2
    monkeypatch.setenv("RANK", "1")
    cpu_ext.build("AVX512")  # torchrun's other ranks stay quiet
    assert capsys.readouterr().err == ""


def test_a_build_this_cpu_cannot_run_is_compiled_not_loaded(monkeypatch, tmp_path):
    """``lstmkit build --capability AVX512`` on an AVX2 machine: importing that build would die
    of an illegal instruction, so it is compiled only, through torch's own build step (whose
    signature this torch must accept); a torch without that step gives one clear error."""
    import inspect

    import torch.utils.cpp_extension as cpp

    real = cpp._write_ninja_file_and_build_library
    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_ext, "runs_here", lambda cap: cap != "AVX512")
    monkeypatch.setattr(cpp, "load", lambda **kw: pytest.fail("loaded a build this CPU cannot run"))
    compiled = []
    monkeypatch.setattr(cpp, "_write_ninja_file_and_build_library", lambda **kw: compiled.append(kw))
    assert cpu_ext.build("AVX512") == cpu_ext.build_dir("AVX512")
    (options,) = compiled
    assert "-DCPU_CAPABILITY_AVX512" in options["extra_cflags"] and options["build_directory"] == str(
        cpu_ext.build_dir("AVX512"))
    inspect.signature(real).bind(**options)  # the arguments this torch's build step takes
    monkeypatch.delattr(cpp, "_write_ninja_file_and_build_library")
    with pytest.raises(RuntimeError, match="this CPU cannot run AVX512 code, so the build would have to be compiled "
                                           "without loading it"):
        cpu_ext.build("AVX512")
    # what this machine runs: its own capability (and DEFAULT) always
    monkeypatch.undo()
    assert cpu_ext.runs_here(cpu_ext.capability()) and cpu_ext.runs_here("DEFAULT")


def test_a_killed_build_does_not_hang_the_next(monkeypatch, tmp_path):
    """torch's build lock left behind by a killed build (torch waits on it forever) is removed
    under lstmkit's own lock, which the OS releases when its holder dies."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    where = cpu_ext.build_dir("AVX2")
    where.mkdir(parents=True)
    (where / "lock").write_text("")  # what a build killed mid-compile leaves

    def fake_load(name, build_directory, **kw):
        assert not (tmp_path / name / "lock").exists(), "torch would wait on this lock forever"
        return object()
    monkeypatch.setattr(cpp, "load", fake_load)
    cpu_ext.build("AVX2")


def test_avx2_build_runs_every_variant_like_the_reference():
    """ATEN_CPU_CAPABILITY=avx2 makes torch (and so lstmkit) use AVX2 on any x86 CPU: the
    kernel is built with -march=x86-64-v3 and its 6 x 16 register tile, and must agree with
    the reference kernel (values and gradients, float32 and float64)."""
    import torch

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.fail(f"this x86 test machine reports capability {torch.backends.cpu.get_cpu_capability()}")
    result = _python("""
        import torch, lstmkit
        from lstmkit import kernels
        from lstmkit.kernels import cpu_ext
        from variants import LSTM_VARIANTS
        assert torch.backends.cpu.get_cpu_capability() == "AVX2"
        assert cpu_ext.load().abi()["gemm_tile"] == (6, 16), cpu_ext.load().abi()
        # the parent's build (its capability) loads beside this one: each keeps its own classes
        other = cpu_ext._build("PARENT_CAP")
        assert other.PreparedLayer is not cpu_ext.load().PreparedLayer or "PARENT_CAP" == "AVX2"
        torch.manual_seed(0)
        worst = 0.0
        for name, cell in list(LSTM_VARIANTS.items()) + [("rnn", None)]:
            if cell is not None and kernels.REGISTRY["cpu_fused"].refuses(lstmkit.resolve(cell)):
                continue  # a row the fused kernel does not claim
            for dtype in (torch.float32, torch.float64):
                kw = dict(num_layers=2, bidirectional=True)
                make = (lambda b: lstmkit.RNN(5, 19, backend=b, **kw)) if cell is None else \\
                       (lambda b: lstmkit.LSTM(5, 19, cell=cell, backend=b, **kw))
                fast, ref = make("cpu_fused").to(dtype), make("reference").to(dtype)
                ref.load_state_dict(fast.state_dict())
                x = torch.randn(7, 13, 5, dtype=dtype)
                outs = []
                for m in (fast, ref):
                    xx = x.clone().requires_grad_()
                    with torch.random.fork_rng():  # zoneout: both draw the same masks
                        torch.manual_seed(1)
                        y = m(xx)[0]
                    (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
                    outs.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
                for a, b in zip(*outs):
                    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-3)).item()
                    tol = 1e-4 if dtype == torch.float32 else 1e-10
                    assert err < tol, (name, dtype, err)
                    worst = max(worst, err if dtype == torch.float64 else 0.0)
        print("ok", worst)
    """.replace("PARENT_CAP", cpu_ext.capability()), timeout=900, ATEN_CPU_CAPABILITY="avx2", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_forked_dataloader_workers_never_hang():
    """The parent runs the kernel on two threads, then DataLoader workers (fork) run it: the
    thread count comes from torch at call time (a worker sets 1), so no forked child waits
    for the parent's thread pool. A hang fails by the timeout."""
    result = _python("""
        import torch, lstmkit
        torch.set_num_threads(2)
        layer = lstmkit.LSTM(64, 128)
        x = torch.randn(20, 32, 64)
        with torch.no_grad():
            expected = layer(x)[0].sum().item()   # large enough to use both threads

        class Data(torch.utils.data.Dataset):
            def __len__(self): return 4
            def __getitem__(self, i):
                with torch.no_grad():
                    return layer(x)[0].sum()

        loader = torch.utils.data.DataLoader(Data(), batch_size=1, num_workers=2,
                                             multiprocessing_context="fork")
        got = [float(v) for v in loader]
        assert all(abs(g - expected) < 1e-3 * max(1.0, abs(expected)) for g in got), (got, expected)
        print("ok")
    """, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_the_ninja_package_is_put_on_the_path_for_a_build_where_none_is(monkeypatch):
    """torch runs ``ninja`` from the PATH; the ninja package's binary is there only in an activated
    environment (not for ``.venv/bin/python`` called directly)."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "/nowhere")
    monkeypatch.setattr(cpu_ext.shutil, "which", lambda name: None)
    with cpu_ext._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
        assert os.path.exists(os.path.join(ninja.BIN_DIR, "ninja"))
    assert os.environ["PATH"] == "/nowhere"


def test_a_library_damaged_since_its_build_is_linked_anew_not_imported(monkeypatch, tmp_path):
    """A built library is imported directly only with the digest its build recorded: a truncated or
    overwritten one (an interrupted copy of a cache, a full disk) killed the process on import
    (SIGBUS, SIGSEGV); under the build lock it is removed, so that ninja links it anew."""
    import hashlib

    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    where = cpu_ext.build_dir("AVX2")
    where.mkdir(parents=True)
    library = where / f"{where.name}.so"
    library.write_bytes(b"\x7fELF half of a library")
    (where / f"{where.name}.so.sha256").write_text(hashlib.sha256(b"\x7fELF the whole library").hexdigest())
    assert cpu_ext._import_built(where.name, where) is None  # not imported: its digest differs
    seen = []

    def fake_load(name, build_directory, **kw):
        seen.append(library.exists())  # what ninja finds
        library.write_bytes(b"\x7fELF linked anew")
        return object()
    monkeypatch.setattr(cpp, "load", fake_load)
    monkeypatch.setattr(cpu_ext, "runs_here", lambda cap: True)
    cpu_ext.build("AVX2")
    assert seen == [False]  # removed before the build
    assert (where / f"{where.name}.so.sha256").read_text() == hashlib.sha256(b"\x7fELF linked anew").hexdigest()


def test_a_library_without_its_digest_is_linked_anew_not_imported(monkeypatch, tmp_path):
    """A library whose digest file is missing (a copy cut off between them) was left for ninja,
    which took it as done, and torch imported it: a truncated one killed the process (SIGBUS;
    found by a build sweep). It is linked anew (the objects are there: a second)."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    where = cpu_ext.build_dir("AVX2")
    where.mkdir(parents=True)
    library = where / f"{where.name}.so"
    library.write_bytes(b"\x7fELF half of a library")
    seen = []

    def fake_load(name, build_directory, **kw):
        seen.append(library.exists())
        library.write_bytes(b"\x7fELF linked anew")
        return object()
    monkeypatch.setattr(cpp, "load", fake_load)
    monkeypatch.setattr(cpu_ext, "runs_here", lambda cap: True)
    monkeypatch.setattr(cpu_ext, "_check_compiler", lambda: None)
    cpu_ext.build("AVX2")
    assert seen == [False]


def test_no_compiler_and_a_failed_build_are_one_line_each(monkeypatch, tmp_path, capsys):
    """Without a compiler torch printed its compiler-ABI banner and a 1,600-character error, and
    `lstmkit build` a traceback with exit 1 (found by a build sweep): now one line, exit 2, and a
    failed compile reads as its first errors."""
    from lstmkit.app.cli import main

    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(cpu_ext.BuildError, match=r"no C\+\+ compiler: 'c\+\+' is not on PATH"):
        cpu_ext.build("AVX2")
    assert main(["build", "--capability", "AVX2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lstmkit build: error: no C++ compiler") and len(err.splitlines()) == 1, err
    monkeypatch.setenv("LSTMKIT_CACHE_DIR", "~no-such-user-here/x")
    assert main(["build"]) == 2
    assert "no home directory to expand '~no-such-user-here'" in capsys.readouterr().err
    out = ("Error building extension 'x': [1/2] c++ -c recurrence.cpp\nFAILED: recurrence.o\n"
           "recurrence.cpp:3:1: error: expected ';' before '}' token\nninja: build stopped: subcommand failed.")
    assert cpu_ext._build_failure(RuntimeError(out)) == (
        "the fused CPU kernel could not be compiled: recurrence.cpp:3:1: error: expected ';' before '}' token")


def test_prune_removes_other_builds_but_this_installation_s_and_one_being_built(monkeypatch, tmp_path):
    """Builds of other versions, sources and environments accumulate in a shared cache (113 builds,
    315 MB after a day of development): ``lstmkit build --prune`` removes them, never this
    installation's, one being compiled now, or what is not a build directory."""
    from lstmkit import _atomic

    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    ours = cpu_ext.build_dir("AVX2")
    old, busy = tmp_path / "lstmkit_cpu_avx2_0123456789abcdef", tmp_path / "lstmkit_cpu_avx512_fedcba9876543210"
    other = tmp_path / "lstmkit_cpu_notes"
    for d in (ours, old, busy, other):
        d.mkdir(parents=True)
        (d / "x.so").write_bytes(bytes(1000))
    with _atomic.exclusive(busy / "build.lock"):  # another process compiles there
        removed = cpu_ext.prune()
    assert removed == [(old, 1000)]
    assert not old.exists() and ours.exists() and busy.exists() and other.exists()
