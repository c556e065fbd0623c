"""Block-diagonal recurrence (``heads=k``) on every variant: against the float64 NumPy oracle,
the fused kernel against the reference (lengths, stacked, bidirectional, projection, record
mode), gradcheck, the textbook matrices of ``gates()`` / ``describe()``, ONNX, and the refusals."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kernel_compare
import lstmkit
import test_oracle
from conftest import assert_rel
from lstmkit import kernels
from lstmkit.spec import resolve
from test_gradcheck import _check
from variants import HEADS_VARIANTS, LSTM_VARIANTS


def _with_heads(cell, k: int):
    """``cell`` with k heads, or None where its deep gates' widths do not divide by k."""
    try:
        return resolve(cell).replace(heads=k)
    except ValueError:
        return None


EVERY = {vid: spec for vid, c in LSTM_VARIANTS.items() if (spec := _with_heads(c, 2)) is not None}
EVERY.update({vid: resolve(c) for vid, c in HEADS_VARIANTS.items()})


def test_every_variant_but_odd_deep_widths_takes_heads():
    skipped = set(LSTM_VARIANTS) - set(EVERY)
    assert skipped == {"deep_all", "layernorm+deep_g"}  # first widths 3 and 5: no 2 blocks
    with pytest.raises(ValueError, match=r"deep gate 'i''s first width 3 is not divisible by 2"):
        resolve(LSTM_VARIANTS["deep_all"]).replace(heads=2)


# ----------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("cell", list(EVERY.values()), ids=list(EVERY))
def test_oracle_single_layer(cell):
    test_oracle.compare(lstmkit.LSTM(test_oracle.I, test_oracle.H, cell=cell), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", list(HEADS_VARIANTS.values()), ids=list(HEADS_VARIANTS))
def test_oracle_stacked_bidirectional_projection_lengths(cell, dtype):
    layer = lstmkit.LSTM(test_oracle.I, test_oracle.H, num_layers=2, bidirectional=True, proj_size=2, cell=cell)
    test_oracle.compare(layer, dtype, lengths=[2, 5, 3])


@pytest.mark.parametrize("heads", [2, 4])
def test_oracle_rnn(heads):
    test_oracle.compare(lstmkit.RNN(test_oracle.I, test_oracle.H, num_layers=2, bidirectional=True, heads=heads),
                        torch.float64, lengths=[3, 5, 1])


# ----------------------------------------------------------------------------- the fused kernel

# (T, B, I, H, proj, layers, bidirectional, lengths, heads)
SHAPES = {
    "odd_k3": (7, 3, 5, 12, 0, 1, False, None, 3),
    "lengths_k2": (6, 4, 3, 6, 0, 1, False, [6, 2, 5, 1], 2),
    "stacked_bidir_k3": (5, 3, 4, 6, 0, 2, True, [5, 3, 1], 3),
    "projection_k2": (5, 2, 3, 6, 4, 2, False, None, 2),
    "big_k8": (4, 9, 33, 64, 0, 1, True, None, 8),
}


def _claimed(k: int) -> list[object]:
    out = []
    for cell in [*LSTM_VARIANTS.values(), *HEADS_VARIANTS.values()]:
        spec = _with_heads(resolve(cell).replace(heads=1), k)
        if spec is not None and kernels.REGISTRY["cpu_fused"].unsupported(spec, torch.device("cpu"),
                                                                          torch.float64) is None:
            out.append(spec)
    return list(dict.fromkeys(out))


def _claimed_cases() -> list[object]:
    """(shape, cell) for every shape and each variant the fused kernel claims with its heads, ids
    naming both (``-k layernorm`` selects a variant's cases)."""
    out = []
    for shape, (*_, k) in SHAPES.items():
        cells = _claimed(k) if shape != "big_k8" else [resolve("heads=8"), resolve("heads=8+layernorm")]
        out += [pytest.param(shape, spec, id=f"{shape}-{spec.name}") for spec in cells]
    return out


@pytest.mark.parametrize("dtype", kernel_compare.DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,spec", _claimed_cases())
def test_fused_kernel_every_claimed_variant(shape, spec, dtype):
    *dims, _ = SHAPES[shape]
    kernel_compare.compare("cpu_fused", lambda I, H, L, bd, P: lstmkit.LSTM(
        I, H, L, bidirectional=bd, proj_size=P, cell=spec), tuple(dims), dtype)


@pytest.mark.parametrize("dtype", kernel_compare.DTYPES, ids=["f32", "f64"])
def test_fused_kernel_rnn(dtype):
    for shape in ("odd_k3", "stacked_bidir_k3"):
        *dims, k = SHAPES[shape]
        kernel_compare.compare("cpu_fused", lambda I, H, L, bd, P, k=k: lstmkit.RNN(
            I, H, L, bidirectional=bd, heads=k), tuple(dims), dtype, lstm=False)


def test_fused_kernel_threads_and_chunks():
    """Two threads, a batch that splits across them and layernorm's chunked dW_hh: against the reference.
    Without a projection a head is 32 wide, several panels of the backward's dh GEMM, which sums
    the head's gate blocks (a GEMM split over K): the two threads share its panels."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for cell, proj in (("heads=4", 32), ("heads=8+layernorm", 32), ("heads=4+deep=8", 32), ("heads=2", 0),
                           ("heads=2+fgr+layernorm", 0)):
            ref = lstmkit.LSTM(16, 64, cell=cell, proj_size=proj, backend="reference").double()
            fast = lstmkit.LSTM(16, 64, cell=cell, proj_size=proj, backend="cpu_fused").double()
            fast.load_state_dict(ref.state_dict())
            x = torch.randn(30, 40, 16, dtype=torch.float64, requires_grad=True)
            outs = []
            for m in (ref, fast):
                y, (h, c) = m(x)
                loss = (y * y).sum() + (c * 0.5).sum()
                outs.append([y] + list(torch.autograd.grad(loss, [x, *m.parameters()])))
            for a, b in zip(*outs):
                assert_rel(b, a, torch.float64, cell)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cell", [lstmkit.CellSpec(gate_hidden=(3,)), lstmkit.CellSpec(gate_hidden={"f": (4, 2)}),
                                  lstmkit.CellSpec(layernorm=True, gate_hidden={"g": (5,)})],
                         ids=["deep_all", "deep_f", "layernorm+deep_g"])
def test_deep_gates_backward_over_several_chunks(cell):
    """The deep gates' dW_j, db_j are summed chunk by chunk (about 128 rows of dV a thread at a
    time): with two threads 41 steps of 30 rows are five chunks of 9 steps (the last 5), with lengths
    (rows that end inside a chunk), two layers and both directions — float64 against the reference
    to 1e-10."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kernel_compare.compare("cpu_fused", lambda I, H, L, bd, P: lstmkit.LSTM(I, H, L, bidirectional=bd, cell=cell),
                               (41, 30, 3, 5, 0, 2, True, [41, 17, 40, 1, 23] * 6), torch.float64)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kernel_name", ["reference", "cpu_fused"])
@pytest.mark.parametrize("cell", ["heads=2", "heads=2+peephole+layernorm+cifg", "heads=2+fgr+nog+clip=0.4"])
def test_gradcheck(kernel_name, cell):
    _check(lstmkit.LSTM(2, 4, cell=cell, backend=kernel_name), lstm=True)


def test_gradcheck_stacked_bidirectional_projection_lengths():
    m = lstmkit.LSTM(2, 4, num_layers=2, bidirectional=True, proj_size=2, cell="heads=2+peephole+layernorm")
    _check(m, lstm=True, lengths=torch.tensor([2, 4, 1]), T=4, B=3)
    _check(lstmkit.RNN(2, 4, num_layers=2, bidirectional=True, heads=2), lstm=False)


@pytest.mark.parametrize("cell", ["heads=2", "heads=2+layernorm", "vanilla", "layernorm"])
def test_one_row_state_with_any_stride(cell):
    """A batch of one whose initial state has a stride other than its width on the batch axis (a
    transposed column: torch calls it contiguous, its size being 1) trains as the reference loop
    does — the CPU kernel hands BLAS its row strides as leading dimensions only where they are
    valid ones (once MKL refused such a dW_hh product and left it unwritten)."""
    torch.manual_seed(0)
    fused = lstmkit.LSTM(4, 6, cell=cell).double()
    ref = lstmkit.LSTM(4, 6, cell=cell, backend="reference").double()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(3, 1, 4, dtype=torch.float64)
    h0 = torch.randn(6, 1, dtype=torch.float64).t().unsqueeze(0)  # (1, 1, 6), strides (1, 1, 1)
    c0 = torch.randn(1, 1, 6, dtype=torch.float64)
    assert h0.is_contiguous() and h0.stride(1) == 1
    for layer in (fused, ref):
        y, (h, c) = layer(x, (h0, c0))
        (y.sum() + c.sum()).backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_record_mode_matches_reference():
    torch.manual_seed(0)
    ref = lstmkit.LSTM(3, 6, num_layers=2, bidirectional=True, heads=3, cell="layernorm", backend="reference")
    fast = lstmkit.LSTM(3, 6, num_layers=2, bidirectional=True, heads=3, cell="layernorm", backend="cpu_fused")
    ref, fast = ref.double(), fast.double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    tr_ref = lstmkit.trace(ref, x, lengths=[6, 2, 4])
    tr_fast = lstmkit.trace(fast, x, lengths=[6, 2, 4])
    assert tr_fast.kernel == "cpu_fused"
    for layer in range(2):
        for d in range(2):
            for key in tr_ref[layer][d]:
                torch.testing.assert_close(tr_fast[layer][d][key], tr_ref[layer][d][key], equal_nan=True,
                                           rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- the textbook matrices


def test_gates_and_describe_show_the_blocks():
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, heads=2, cell="peephole", num_layers=2, proj_size=2)
    assert layer.weight_hh_l0.shape == (16, 1) and layer.weight_hh_l1.shape == (16, 1)
    g = layer.gates(layer=0)["forget"]
    W = g.W  # (H, I + H_out): [W_x | block-diagonal W_h]
    assert W.shape == (4, 5)
    assert torch.equal(W[:, 3:], torch.block_diag(*g.blocks).detach())
    assert torch.equal(W[:2, 4:], torch.zeros(2, 1)) and torch.equal(W[2:, 3:4], torch.zeros(2, 1))
    W[0, 3] = 5.0
    g.W = W
    assert layer.weight_hh_l0[4, 0].item() == 5.0  # the forget gate's rows come second
    W[0, 4] = 1.0
    with pytest.raises(ValueError, match="block-diagonal .* entries outside the blocks must be 0"):
        g.W = W
    text = lstmkit.describe(layer, file=io.StringIO())
    assert "W_h 2 blocks of 2 × 1" in text and "4 × (3 + 2)" in text
    assert f"parameters: {sum(p.numel() for p in layer.parameters()):,}" in text
    assert "heads=2" in repr(layer)
    assert "heads=2" in repr(lstmkit.RNN(3, 4, heads=2))


def test_a_full_block_diagonal_matrix_computes_the_same_as_a_plain_layer():
    """heads=k is the plain layer whose W_hh is zero outside the blocks: the two agree."""
    torch.manual_seed(0)
    heads = lstmkit.LSTM(3, 6, heads=3, cell="peephole").double()
    plain = lstmkit.LSTM(3, 6, cell="peephole").double()
    state = dict(heads.state_dict())
    state["weight_hh_l0"] = lstmkit.cell.block_diagonal(state["weight_hh_l0"], heads.spec, 6)
    plain.load_state_dict(state)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(heads(x)[0], plain(x)[0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- refusals


def test_sizes_that_do_not_divide_are_refused_before_allocating():
    with pytest.raises(ValueError, match=r"heads: 4 heads split h_\(t-1\) into 4 equal parts, but hidden_size=6"):
        lstmkit.LSTM(3, 6, heads=4)
    with pytest.raises(ValueError, match=r"proj_size=3 is not divisible by 2"):
        lstmkit.LSTM(3, 6, heads=2, proj_size=3)
    with pytest.raises(ValueError, match=r"the cell says heads=2 and the layer heads=3"):
        lstmkit.LSTM(3, 6, cell="heads=2", heads=3)
    with pytest.raises(TypeError, match=r"heads: expected an int"):
        lstmkit.LSTM(3, 6, heads=2.0)
    with pytest.raises(ValueError, match=r"CellSpec.heads: expected a whole number in \[1, 1048576\], got 0"):
        resolve("heads=0")
    with pytest.raises(ValueError, match=r"CellSpec.heads: expected a whole number in \[1, 1048576\], got 1048577"):
        lstmkit.CellSpec(heads=2**20 + 1)
    with pytest.raises(TypeError, match=r"CellSpec.heads: expected a whole number >= 1, got 2.0"):
        lstmkit.CellSpec(heads=2.0)
    assert lstmkit.CellSpec(heads=np.int64(2)) == lstmkit.CellSpec(heads=2)  # a NumPy integer, as the layer takes
    assert lstmkit.LSTM(3, 6, cell="heads=2", heads=2).spec.heads == 2


def test_converters_and_cudnn_refuse_heads_with_the_reason():
    from lstmkit.convert import to_keras, to_torch

    layer = lstmkit.LSTM(3, 4, heads=2)
    with pytest.raises(ValueError, match="vanilla"):
        to_torch(layer)
    with pytest.raises(ValueError, match="vanilla"):
        to_keras(layer)
    assert kernels.REGISTRY["triton"].refuses(layer.spec) is None  # per step (tests/test_triton.py)
    assert "heads=2" in kernels.REGISTRY["torch"].refuses(layer.spec)


def test_onnx_scan_export_and_back():
    from lstmkit.convert import from_onnx, to_onnx

    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, heads=2, cell="peephole").eval()
    proto = to_onnx(layer, sequence_lens=True)
    assert "Scan" in {n.op_type for n in proto.graph.node}
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 2, 3)
    lengths = torch.tensor([5, 3])
    got = sess.run(None, {"X": x.numpy(), "sequence_lens": lengths.int().numpy()})
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
    y, (h, c) = layer(packed)
    y = torch.nn.utils.rnn.pad_packed_sequence(y, total_length=5)[0]
    for a, b in zip(got, (y, h, c)):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-5, atol=1e-5)
    back = from_onnx(proto)
    assert back.spec == layer.spec
    assert all(torch.equal(back.state_dict()[k], v) for k, v in layer.state_dict().items())


def test_inference_in_the_loop(forward_infer_calls):
    """Without gradients, B >= 8: the input projection inside the fused loop (forward_infer) with
    heads, against the reference; and a single step."""

    calls = forward_infer_calls
    torch.manual_seed(0)
    for cell in ("heads=3", "heads=3+layernorm+peephole"):
        ref = lstmkit.LSTM(5, 12, 2, bidirectional=True, proj_size=6, cell=cell, backend="reference").double().eval()
        fast = lstmkit.LSTM(5, 12, 2, bidirectional=True, proj_size=6, cell=cell, backend="cpu_fused").double().eval()
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(6, 10, 5, dtype=torch.float64)
        before = len(calls)
        with torch.no_grad():
            want, got = ref(x, lengths=[6, 2, 5, 1, 6, 3, 4, 6, 1, 2]), fast(x, lengths=[6, 2, 5, 1, 6, 3, 4, 6, 1, 2])
        assert len(calls) - before == 4, cell
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    one = lstmkit.LSTM(5, 12, heads=4, backend="cpu_fused").double().eval()
    ref1 = lstmkit.LSTM(5, 12, heads=4, backend="reference").double().eval()
    ref1.load_state_dict(one.state_dict())
    x1 = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        y, (h, c) = one.step(x1)
        yr, (hr, cr) = ref1.step(x1)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, cr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("k", "widths", "dense"), [(4, (8, 8, 8, 8), True), (2, (6, 6, 6), True),
                                                    (2, (8, 4, 8, 8), False)])
def test_the_triton_rows_recurrent_products_expanded_or_batched_are_the_same(k, widths, dense):
    """The Triton rows' per-step ``h W_hhᵀ`` and ``dz W_hh`` with heads: the block-diagonal weights
    expanded once to a dense matrix (every gate the same rows) and the GEMM batched over the heads
    (a deep gate of another width) agree with the block-diagonal matrix multiplied out in float64."""
    from lstmkit.kernels.triton_gemm import Recurrent

    R, HO, B = sum(widths), 8, 3
    w_hh = torch.randn(R, HO // k, dtype=torch.float64)                     # each row's block
    full = torch.zeros(R, HO, dtype=torch.float64)                         # the block-diagonal matrix
    row = 0
    for w in widths:
        for q in range(w):
            j = q // (w // k)
            full[row, j * (HO // k):(j + 1) * (HO // k)] = w_hh[row]
            row += 1
    rec = Recurrent(w_hh, k, widths, torch.float64)
    assert (rec.dense is not None) == dense
    h, dz = torch.randn(B, HO, dtype=torch.float64), torch.randn(B, R, dtype=torch.float64)
    torch.testing.assert_close(rec.forward(h), h @ full.t(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(rec.grad_h(dz), dz @ full, rtol=1e-13, atol=1e-13)
