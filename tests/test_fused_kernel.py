"""The CPU fused kernel's own code paths, each against the reference row, torch or float64:
the oneDNN input projection (and a create_graph gradient through it), two threads splitting a
step by rows or by panels, the narrow GEMM tiles, its vectorised activations, the per-step
GEMM's every path, the input projection inside the loop, the GIL released while it runs, and
workspaces written before they are read."""

from __future__ import annotations

import itertools

import pytest
import torch

import lstmkit
from conftest import assert_rel
from kernel_compare import DTYPES, FUSED, compare
from lstmkit.kernels import abi, cpu_ext, fused
from lstmkit.spec import CellSpec, resolve
from variants import HEADS_VARIANTS, LSTM_VARIANTS, RNN_VARIANTS, SLSTM_VARIANTS


def test_create_graph_through_the_onednn_input_projection():
    """A first-order gradient with create_graph=True (a penalty on a read-out's gradient) where the
    input projection runs on oneDNN (float32, T·B >= 256, I·4H >= 256·1024): its backward refused
    any call in grad mode; now the first-order gradients equal those without create_graph, and a
    second order through the read-out alone runs, as for nn.LSTM."""
    from lstmkit.kernels.fused import _use_onednn

    torch.manual_seed(0)
    rnn, head = lstmkit.LSTM(256, 256), torch.nn.Linear(256, 1)
    assert _use_onednn(16 * 16, rnn.weight_ih_l0)
    x = torch.randn(16, 16, 256, requires_grad=True)
    params = [x, *rnn.parameters(), *head.parameters()]
    plain = torch.autograd.grad(head(rnn(x)[0]).square().mean(), params)
    graph = torch.autograd.grad(head(rnn(x)[0]).square().mean(), params, create_graph=True)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    (second,) = torch.autograd.grad(graph[-2].square().sum(), head.weight)  # through the read-out only
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_onednn_input_projection_matches_linear():
    torch.manual_seed(0)
    x = torch.randn(300, 256, dtype=torch.float64)
    w = torch.randn(1024, 256, dtype=torch.float64) * 0.05
    b = torch.randn(1024, dtype=torch.float64)
    assert fused._use_onednn(300, w.float()) and not fused._use_onednn(300, w)  # float32 only
    assert not fused._use_onednn(300, torch.zeros(512, 128))                    # small: MKL
    xs, ws, bs = (t.float().requires_grad_(True) for t in (x, w, b))
    xd, wd, bd = (t.clone().requires_grad_(True) for t in (x, w, b))
    out = fused.input_linear(xs, ws, bs)
    ref = torch.nn.functional.linear(xd, wd, bd)
    assert out.grad_fn is not None and "_Linear" in type(out.grad_fn).__name__
    g = torch.randn(300, 1024, dtype=torch.float64)
    (out * g.float()).sum().backward()
    (ref * g).sum().backward()
    for name, a, e in (("out", out, ref), ("dx", xs.grad, xd.grad), ("dw", ws.grad, wd.grad),
                       ("db", bs.grad, bd.grad)):
        err = (a.double() - e).abs().max() / e.abs().max()
        assert err < 1e-5, f"{name}: {err:.2e}"


@pytest.mark.parametrize("cell, proj", [("vanilla", 16), ("layernorm+peephole", 0), ("heads=2+fgr", 0),
                                        (CellSpec(gate_hidden={"f": (8, 4), "g": (8,)}), 0), ("heads=2+layernorm", 0)],
                         ids=["projection", "layernorm", "heads+fgr", "deep", "heads+layernorm"])
@pytest.mark.parametrize("split", ["rows", "panels"])
def test_two_threads_split_a_step_by_rows_or_by_panels(cell, proj, split):
    """With two threads the kernel splits each step's GEMMs by the batch's rows (each thread every
    panel of its own rows, no barrier in the time loop: where each thread has a register tile of rows
    and the weights are small, gemm.h's split_by_rows) or by panels (a barrier between the phases).
    Both, forced through the extension's test hook (so that the machine's cache size does not
    choose), on every phase that has a GEMM (projection, layernorm's chunked dW_hh, heads' K-split
    groups, fgr's W_gg, deep gates' MLPs), two layers, both directions, lengths, an odd batch — values,
    every gradient and inference (the input projection in the loop) against the reference, float64.
    (H = 32: each step's work is enough for the kernel to take both threads, choose_threads.)"""
    ext = cpu_ext.load()
    B = 17
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    ext._force_split(1 if split == "rows" else 2)
    try:
        g = torch.Generator().manual_seed(3)
        lengths = torch.randint(1, 8, (B,), generator=g).tolist()
        compare(FUSED[0], lambda I, H, L, bd, P: lstmkit.LSTM(I, H, L, bidirectional=bd, proj_size=P, cell=cell),
                (7, B, 5, 32, proj, 2, True, lengths), torch.float64)
        torch.manual_seed(0)
        ref = lstmkit.LSTM(5, 32, 2, bidirectional=True, proj_size=proj, cell=cell, backend="reference").double()
        fast = lstmkit.LSTM(5, 32, 2, bidirectional=True, proj_size=proj, cell=cell, backend=FUSED[0]).double()
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(7, B, 5, dtype=torch.float64, generator=g)
        with torch.no_grad():
            assert_rel(fast(x, lengths=lengths)[0], ref(x, lengths=lengths)[0], torch.float64, "inference")
    finally:
        ext._force_split(0)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_narrow_gemm_tiles_match_the_reference(batch):
    """Batches of 1-3 rows take the recurrent GEMM's narrow tiles (k split over several register
    sets, summed at the end; K = 5 and 7 leave a remainder), 7 rows a full AVX2 tile plus one:
    values and every gradient against the reference, float64, over a run (packed weights)."""
    torch.manual_seed(batch)
    ref = lstmkit.LSTM(5, 7, num_layers=2, cell="peephole", backend="reference").double()
    fast = lstmkit.LSTM(5, 7, num_layers=2, cell="peephole", backend=FUSED[0]).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, batch, 5, dtype=torch.float64)
    grads = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y, (h, c) = layer(xi)
        (y.square().sum() + h.sum() + c.sum()).backward()
        grads.append([y.detach(), xi.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_fused_activations_accuracy_and_nan(dtype):
    """The kernel's own vectorised exp / tanh / sigmoid / log sigmoid (the sLSTM's, through its
    log1p on [0, 1]) against torch's, over a wide range, with odd lengths (vector tails), extremes
    and NaN."""
    from lstmkit.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.fail("the fused kernel did not build")
    x = torch.cat([torch.linspace(-30, 30, 20001, dtype=torch.float64), torch.randn(777, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -100.0, 500.0, -500.0, float("nan")],
                                dtype=torch.float64)]).to(dtype)
    for which, fn in enumerate((torch.exp, torch.tanh, torch.sigmoid, torch.nn.functional.logsigmoid)):
        got = cpu_ext._ext._act_test(x, which)
        want = fn(x.double())
        finite = torch.isfinite(want) & (want.abs() < 1e30)
        rel = ((got.double() - want).abs() / want.abs().clamp_min(1e-30))[finite]
        tol = 4e-7 if dtype == torch.float32 else 1e-15
        assert rel.max() < tol, f"{fn.__name__}: max relative error {rel.max():.2e}"
        assert torch.isnan(got[-1]), f"{fn.__name__} swallowed NaN"
        if fn in (torch.tanh, torch.sigmoid):  # never beyond their range (float32 rounding reached 1 + 2 ulp)
            assert got[:-1].abs().max() <= 1, f"{fn.__name__}: {got[:-1].abs().max().item()!r} beyond 1"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_step_gemm_every_path_against_float64(dtype):
    """The kernel's per-step GEMM, C (+)= A Wᵀ (+ bias), on every path it takes: W packed ahead (a
    weight that several steps read) or read in place (one step: BLAS gemv for one row, gemm for two
    or three, from four rows on each panel packed at use — AVX-512 builds: BLAS gemm at every row
    count, the path measured faster there), W row- or column-major, one and two
    threads, partial panels and K not a multiple of the vector width — against float64 matmul."""
    from lstmkit.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.fail("the fused kernel did not build")
    gen = torch.Generator().manual_seed(0)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for M, N, K in [(1, 40, 37), (2, 16, 8), (3, 33, 5), (4, 16, 1), (7, 37, 64), (13, 70, 19), (32, 128, 96)]:
        A = torch.randn(M, K, generator=gen, dtype=torch.float64)
        W = torch.randn(N, K, generator=gen, dtype=torch.float64)
        bias = torch.randn(N, generator=gen, dtype=torch.float64)
        C0 = torch.randn(M, N, generator=gen, dtype=torch.float64)
        for uses, column_major, with_bias, acc, threads in itertools.product((1, 2), (False, True), (False, True),
                                                                           (False, True), (1, 2)):
            w = W.t().contiguous().t() if column_major else W  # the same values, strides (1, N)
            got = cpu_ext._ext._gemm_test(A.to(dtype), w.to(dtype), bias.to(dtype) if with_bias else torch.empty(0, dtype=dtype),
                                          C0.to(dtype).clone(), acc, uses, threads)
            want = A.to(dtype).double() @ W.to(dtype).double().t() + (C0.to(dtype).double() if acc else 0)
            if with_bias:
                want = want + bias.to(dtype).double()
            where = f"M={M} N={N} K={K} uses={uses} column_major={column_major} bias={with_bias} acc={acc} threads={threads}"
            torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, where=where: f"{where}: {m}")


def test_fused_kernel_releases_the_gil():
    """Another Python thread runs while the compiled recurrence does, and two threads
    running layers at once get the same results as one after the other."""
    import threading
    import time

    from lstmkit.kernels import cpu_ext

    torch.manual_seed(0)
    layer = lstmkit.LSTM(64, 256, backend="cpu_fused")
    x = torch.randn(50, 8, 64)
    with torch.no_grad():
        layer(x[:5])  # build / load the extension first
    counts = {"n": 0}
    running = threading.Event()
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            if running.is_set():
                counts["n"] += 1

    def rate_while(fn) -> float:
        counts["n"] = 0
        running.set()
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        running.clear()
        return counts["n"] / elapsed

    xg = torch.randn(6000, 8, 4 * 256)  # (T, B, 4H) pre-activations: ~0.5 s of recurrence
    w, h0, c0 = layer.weight_hh_l0.detach(), torch.zeros(8, 256), torch.zeros(8, 256)
    worker = threading.Thread(target=count)
    worker.start()
    try:
        idle = rate_while(lambda: time.sleep(0.3))  # the counter's speed with the GIL free
        nothing = [torch.empty(0)] * len(abi.PARAMS)
        busy = rate_while(lambda: cpu_ext.forward(xg, w, h0, c0, torch.empty(0, dtype=torch.long), *nothing,
                                                  abi.flags(resolve("vanilla")), [], *abi.scalars(resolve("vanilla")),
                                                  256, 0, True))
    finally:
        done.set()
        worker.join()
    # Holding the GIL, the counter would run only around the call (measured: ~0.1 x idle).
    assert busy > 0.4 * idle, (busy, idle)

    # Two layers on two threads: results equal to running them one after the other.
    other = lstmkit.LSTM(64, 256, backend="cpu_fused")
    expected = [m(x)[0].detach() for m in (layer, other)]
    got: list = [None, None]

    def run(k: int, m) -> None:
        got[k] = m(x)[0].detach()

    threads = [threading.Thread(target=run, args=(k, m)) for k, m in enumerate((layer, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_in_loop_projection_rule():
    """The input projection runs inside the loop for one step always; for a sequence with rows
    enough for the register tile while W_ih fits L2, with fewer rows only while it fits L1."""
    rule = fused.in_loop_projection
    assert rule(torch.empty(1, 1, 512), torch.empty(2048, 512))          # one step
    assert rule(torch.empty(100, 32, 128), torch.empty(512, 128))        # 256 KiB, 32 rows
    assert not rule(torch.empty(100, 32, 512), torch.empty(2048, 512))   # 4 MiB
    assert rule(torch.empty(100, 1, 32), torch.empty(128, 32))           # 16 KiB, one row
    assert not rule(torch.empty(100, 4, 64), torch.empty(256, 64))       # 64 KiB, four rows


_ALL_VARIANTS = {**LSTM_VARIANTS, **RNN_VARIANTS, **HEADS_VARIANTS, **SLSTM_VARIANTS}


@pytest.mark.parametrize("name", list(_ALL_VARIANTS))
def test_workspaces_are_written_before_they_are_read(name):
    """A call's workspace parts that its GEMMs write before the cell reads them (r and xg_t,
    Carve::take_rows) are not zeroed. With the extension's test hook filling them with NaN instead,
    every variant must give the same results bit for bit: two layers, both directions, lengths, an
    odd batch — training (values and every gradient), inference (the input projection in the loop);
    one time step (T = 1: the weights read in place through BLAS, a gemm at B = 3 and a gemv at
    B = 1), in inference and in training, each twice (the second call takes the prepared step); and a
    bfloat16 layer's training forward (its xg_t widened row by row into the workspace)."""
    cell = _ALL_VARIANTS[name]
    ext = cpu_ext.load()
    rnn = name in RNN_VARIANTS
    kind = lstmkit.RNN if rnn else lstmkit.LSTM
    opts = {"nonlinearity": cell} if rnn else {"cell": cell}
    lengths = [5, 3, 4]

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        layer = kind(6, 8, 2, bidirectional=True, backend=FUSED[0], **opts)
        x = torch.randn(5, 3, 6, requires_grad=True)
        out = layer(x, lengths=lengths)[0]
        (out * torch.randn_like(out)).sum().backward()
        results = [out, x.grad, *(p.grad for p in layer.parameters())]
        with torch.no_grad():
            layer.eval()
            results.append(layer(x, lengths=lengths)[0])
        single = kind(6, 8, backend=FUSED[0], **opts)
        for x1 in (x[:1].detach(), x[:1, :1].detach()):  # one step: (1, 3, I) and (1, 1, I)
            for _ in range(2):
                with torch.no_grad():
                    results.append(single.eval()(x1)[0])
                x1g = x1.clone().requires_grad_(True)
                out1 = single.train()(x1g)[0]
                out1.sum().backward()
                results += [out1, x1g.grad]
        if not rnn:
            layer16 = kind(6, 8, backend=FUSED[0], dtype=torch.bfloat16, **opts)
            results.append(layer16(x.detach().to(torch.bfloat16).requires_grad_(True))[0].float())
        return results

    expected = run()
    ext._poison_workspaces(True)
    try:
        got = run()
    finally:
        ext._poison_workspaces(False)
    for k, (a, e) in enumerate(zip(got, expected)):
        assert torch.equal(a, e), f"result {k} differs with the workspaces poisoned"
