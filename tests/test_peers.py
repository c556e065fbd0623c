"""lstmkit against the peers' own code, on the same weights: FlashRNN's ``lstm`` with heads
(``heads=k``), FlashRNN's ``slstm`` (``slstm+n_clamp``) and xLSTM's sLSTM cell and layer
(``slstm``), through their PyTorch paths on the CPU — outputs, every state and the gradients of
the input, the initial states and every weight, float64. Plus the converters' refusals and the
differences between the two packages (docs/slstm.md), each shown on their code."""

from __future__ import annotations

import pytest
import torch

import lstmkit
from lstmkit.convert import from_flashrnn, from_xlstm_slstm, to_flashrnn

flashrnn = pytest.importorskip("flashrnn", reason="make test installs flashrnn (pip --no-deps)")
xlstm_cell = pytest.importorskip("xlstm.blocks.slstm.cell", reason="make test installs xlstm (pip --no-deps)")

B, T, I, NH, D = 3, 6, 5, 2, 3
H = NH * D
DT = torch.float64


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=what)


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    R = (torch.rand(4, NH, D, D, generator=g, dtype=DT) - 0.5) * 1.2
    b = torch.rand(4, NH, D, generator=g, dtype=DT) - 0.5
    W = (torch.rand(4 * H, I, generator=g, dtype=DT) - 0.5) * 1.2
    x = torch.randn(B, T, I, generator=g, dtype=DT)
    return R, b, W, x


def _states(S: int, seed: int) -> list[torch.Tensor]:
    """Random initial states (h, c[, n, m]) (B, H): n in (0.2, 1.5), so n_clamp's floor matters."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, H, generator=g, dtype=DT) for _ in range(S)]
    if S == 4:
        out[2] = torch.rand(B, H, generator=g, dtype=DT) * 1.3 + 0.2
    return out


def _flashrnn_run(function, R, b, W, x, states, backend="vanilla"):
    """FlashRNN on Wx = x Wᵀ: the output (B, T, H) and the last states, each (B, H)."""
    Wx = (x @ W.t()).view(B, T, 4, NH, D)
    st = None if states is None else torch.stack([s.view(B, 1, NH, D) for s in states])  # (S, B, 1, NH, D): SBTHD
    # dtype names the kernels' compute type; the PyTorch paths compute in the tensors' (float64). vanilla_fwbw
    # registers float32 only, and casts only under CUDA autocast.
    kernel_dtype = "float32" if backend == "vanilla_fwbw" else "float64"
    all_states, last = flashrnn.flashrnn(Wx, R, b, states=st, function=function, backend=backend, dtype=kernel_dtype)
    return all_states[0].reshape(B, T, H), [s.reshape(B, H) for s in last]


def _lstmkit_run(layer, x, states):
    y, st = layer(x, None if states is None else tuple(s.unsqueeze(0) for s in states))
    return y, [s[0] for s in st]


def _loss(y, states, seed=9):
    g = torch.Generator().manual_seed(seed)
    return (y * torch.randn(y.shape, generator=g, dtype=DT)).sum() + sum(
        (s * torch.randn(s.shape, generator=g, dtype=DT)).sum() for s in states)


@pytest.mark.parametrize("given_states", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("function", ["lstm", "slstm"])
def test_flashrnn_and_lstmkit_agree(function, given_states):
    """FlashRNN's ``lstm`` with NH heads is lstmkit's ``heads=NH``; its ``slstm`` is ``slstm+n_clamp``:
    outputs, states and every gradient (input, initial states, W, R, b) to 1e-10."""
    R, b, W, x = _weights(0)
    S = 2 if function == "lstm" else 4
    init = _states(S, 1) if given_states else None
    layer = from_flashrnn(R, b, W, function)
    assert layer.spec.heads == NH and layer.spec.name == ("heads=2" if function == "lstm" else "slstm+n_clamp+heads=2")
    leaves = [t.clone().requires_grad_(True) for t in (x, W, R, b)]
    st_f = None if init is None else [s.clone().requires_grad_(True) for s in init]
    y_f, last_f = _flashrnn_run(function, leaves[2], leaves[3], leaves[1], leaves[0], st_f)
    xk = x.clone().requires_grad_(True)
    st_k = None if init is None else [s.clone().requires_grad_(True) for s in init]
    y_k, last_k = _lstmkit_run(layer, xk, st_k)
    _close(y_k, y_f, "output")
    for k, (a, c) in enumerate(zip(last_k, last_f)):
        _close(a, c, f"state {'hcnm'[k]}")
    g_f = torch.autograd.grad(_loss(y_f, last_f), leaves + (st_f or []))
    g_k = torch.autograd.grad(_loss(y_k, last_k), [xk, layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0]
                              + (st_k or []))
    _close(g_k[0], g_f[0], "grad of x")
    _close(g_k[1], g_f[1], "grad of W (weight_ih)")
    _close(g_k[2], g_f[2].reshape(4 * H, D), "grad of R (weight_hh)")
    _close(g_k[3], g_f[3].reshape(4 * H), "grad of b (bias_ih)")
    for k in range(len(st_k or [])):
        _close(g_k[4 + k], g_f[4 + k], f"grad of initial {'hcnm'[k]}")


def test_flashrnn_without_an_input_projection():
    """W=None: the layer's input is FlashRNN's Wx itself, (B, T, 4H) in lstmkit's gate order."""
    R, b, W, x = _weights(2)
    Wx = x @ W.t()
    layer = from_flashrnn(R, b, None, "slstm")
    y_f, _ = _flashrnn_run("slstm", R, b, torch.eye(4 * H, dtype=DT), Wx, None)
    assert layer.input_size == 4 * H
    _close(layer(Wx)[0], y_f, "output")


def test_to_flashrnn_round_trip_and_refusals():
    R, b, W, x = _weights(3)
    layer = from_flashrnn(R, b, W, "slstm")
    back = to_flashrnn(layer)
    assert back["function"] == "slstm"
    for k, v in (("R", R), ("b", b), ("W", W)):
        assert torch.equal(back[k], v), k
    y_f, _ = _flashrnn_run(back["function"], back["R"], back["b"], back["W"], x, None)
    _close(layer(x)[0], y_f, "output")
    assert to_flashrnn(lstmkit.LSTM(3, 4, heads=2))["R"].shape == (4, 2, 2, 2)
    assert to_flashrnn(lstmkit.LSTM(3, 4, cell="slstm"))["function"] == "slstm"  # n ≥ 1 from the zero state anyway
    for layer, match in ((lstmkit.LSTM(3, 4, cell="peephole"), "vanilla LSTM and the sLSTM"),
                         (lstmkit.LSTM(3, 4, cell="slstm+forget_act=exp"), "exponential"),
                         (lstmkit.LSTM(3, 4, proj_size=2), "projection")):
        with pytest.raises(ValueError, match=match):
            to_flashrnn(layer)
    with pytest.raises(ValueError, match="gru and elman"):
        from_flashrnn(R, b, W, "gru")
    with pytest.raises(ValueError, match=r"b: expected \(4, NH, D\)"):
        from_flashrnn(R, b[:, :1], W, "lstm")
    with pytest.raises(ValueError, match=r"lstmkit computes FlashRNN's \['lstm', 'slstm'\], not \['slstm'\]"):
        from_flashrnn(R, b, W, ["slstm"])


@pytest.mark.parametrize("state, kwargs, error, match", [
    ({"_recurrent_kernel_": torch.randn(2, 12, 3), "_bias_": torch.randn(5)}, {}, ValueError,
     r"_bias_: expected 24 values \(4 gates × H = 6\), got shape \(5,\)"),
    ({"_recurrent_kernel_": torch.randn(2, 3, 12), "_bias_": torch.randn(23)}, {}, ValueError, r"expected 24 values"),
    ({"_recurrent_kernel_": torch.randn(2, 5, 3), "_bias_": torch.randn(24)}, {}, ValueError, r"\(NH, 4D, D\)"),
    ({"slstm_cell._recurrent_kernel_": torch.randn(2, 12, 3), "slstm_cell._bias_": torch.randn(24),
      **{f"{g}gate.weight": torch.randn(2, 3, 3) for g in "fzo"}}, {"drop_group_norm": True}, ValueError,
     r"missing \['igate.weight'\]"),
    ({"_recurrent_kernel_": torch.randn(2, 12, 3), "_bias_": torch.randn(24)}, {"dtype": "float32"}, TypeError,
     r"dtype: expected one of"),
])
def test_xlstm_state_dicts_lstmkit_cannot_read_are_refused_by_name(state, kwargs, error, match):
    with pytest.raises(error, match=match):
        from_xlstm_slstm(state, **kwargs)


# ----------------------------------------------------------------------------- xLSTM


def _xlstm_cell(backend: str = "vanilla", seed: int = 0):
    torch.manual_seed(seed)
    cfg = xlstm_cell.sLSTMCellConfig(hidden_size=H, num_heads=NH, backend=backend, dtype="float32",
                                     recurrent_weight_init="standard", bias_init="standard")
    cell = xlstm_cell.sLSTMCell(cfg, skip_backend_init=True) if backend == "cuda" else xlstm_cell.sLSTMCell(cfg)
    return cell.double()


def _xlstm_run(cell, pre, state):
    """xLSTM's cell on the pre-activations (B, T, 4H): output (B, T, H) and the states (h, c, n, m)."""
    y, last = cell(pre, None if state is None else torch.stack(state))  # (B, NH, T, D), (4, B, H)
    return y.permute(0, 2, 1, 3).reshape(B, T, H), list(last.unbind(0))


@pytest.mark.parametrize("given_states", [False, True], ids=["zero_state", "given_state"])
def test_xlstm_cell_and_lstmkit_agree(given_states):
    """xLSTM's sLSTM cell (its PyTorch path) is lstmkit's ``slstm``: outputs, the four states and
    every gradient, the initial states' and the stabiliser's included (both differentiate the max
    as computed)."""
    cell = _xlstm_cell()
    layer = from_xlstm_slstm(cell.state_dict(), dtype=DT)
    assert layer.spec.name == "slstm+heads=2" and layer.input_size == 4 * H
    pre = torch.randn(B, T, 4 * H, dtype=DT, generator=torch.Generator().manual_seed(4))
    init = _states(4, 5) if given_states else None
    pre_x, pre_k = pre.clone().requires_grad_(True), pre.clone().requires_grad_(True)
    st_x = None if init is None else [s.clone().requires_grad_(True) for s in init]
    st_k = None if init is None else [s.clone().requires_grad_(True) for s in init]
    y_x, last_x = _xlstm_run(cell, pre_x, st_x)
    y_k, last_k = _lstmkit_run(layer, pre_k, st_k)
    _close(y_k, y_x, "output")
    for k, (a, c) in enumerate(zip(last_k, last_x)):
        _close(a, c, f"state {'hcnm'[k]}")
    params = [cell._recurrent_kernel_, cell._bias_]
    g_x = torch.autograd.grad(_loss(y_x, last_x), [pre_x, *params, *(st_x or [])])
    g_k = torch.autograd.grad(_loss(y_k, last_k), [pre_k, layer.weight_hh_l0, layer.bias_ih_l0, *(st_k or [])])
    _close(g_k[0], g_x[0], "grad of the input")
    # the converter is a permutation of the entries: it maps xLSTM's gradients to lstmkit's layout too
    mapped = from_xlstm_slstm({"_recurrent_kernel_": g_x[1], "_bias_": g_x[2]}, dtype=DT)
    _close(g_k[1], mapped.weight_hh_l0, "grad of the recurrent kernel")
    _close(g_k[2], mapped.bias_ih_l0, "grad of the bias")
    for k in range(len(st_k or [])):
        _close(g_k[3 + k], g_x[3 + k], f"grad of initial {'hcnm'[k]}")


def test_xlstm_cuda_layout_converts_to_the_same_layer():
    """A cell built for xLSTM's CUDA kernel stores its weights in another layout; from the same
    external weights both convert to the same lstmkit layer."""
    van, cud = _xlstm_cell("vanilla"), _xlstm_cell("cuda", seed=1)
    with torch.no_grad():
        cud._recurrent_kernel_.copy_(cud._recurrent_kernel_ext2int(van._recurrent_kernel_int2ext(van._recurrent_kernel_)))
        cud._bias_.copy_(cud._bias_ext2int(van._bias_int2ext(van._bias_)))
    assert cud._recurrent_kernel_.shape != van._recurrent_kernel_.shape
    a, b = from_xlstm_slstm(van.state_dict(), dtype=DT), from_xlstm_slstm(cud.state_dict(), dtype=DT)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_xlstm_layer_without_its_group_norm():
    """An sLSTMLayer (no convolution): its head-wise projections become weight_ih (note: its
    ``fgate`` module feeds the input gate), and lstmkit computes the layer up to its group norm."""
    from xlstm.blocks.slstm.layer import sLSTMLayer, sLSTMLayerConfig

    torch.manual_seed(0)
    xl = sLSTMLayer(sLSTMLayerConfig(embedding_dim=H, num_heads=NH, conv1d_kernel_size=0, backend="vanilla",
                                     dtype="float32", recurrent_weight_init="standard")).double().eval()
    with pytest.raises(ValueError, match="group_norm.*drop_group_norm=True"):
        from_xlstm_slstm(xl.state_dict())
    layer = from_xlstm_slstm(xl.state_dict(), drop_group_norm=True, dtype=DT)
    x = torch.randn(B, T, H, dtype=DT)
    pre = torch.cat([xl.fgate(x), xl.igate(x), xl.zgate(x), xl.ogate(x)], dim=-1)  # as sLSTMLayer.forward
    want, _ = _xlstm_run(xl.slstm_cell, pre, None)
    _close(layer(x)[0], want, "output before the group norm")
    conv = sLSTMLayer(sLSTMLayerConfig(embedding_dim=H, num_heads=NH, conv1d_kernel_size=4, backend="vanilla",
                                       dtype="float32"))
    with pytest.raises(ValueError, match="causal convolution"):
        from_xlstm_slstm(conv.state_dict(), drop_group_norm=True)


# ----------------------------------------------------------------------------- the differences


def test_the_normaliser_floor_is_the_difference_and_n_clamp_gives_either_number():
    """From the zero state FlashRNN's and xLSTM's sLSTM agree (n_t ≥ 1 by construction); from a
    state with n_0 < 1 they differ, and lstmkit's ``slstm`` gives xLSTM's numbers, ``slstm+n_clamp``
    FlashRNN's."""
    cell = _xlstm_cell()
    plain = from_xlstm_slstm(cell.state_dict(), dtype=DT)
    clamped = lstmkit.LSTM(4 * H, H, cell="slstm+n_clamp", heads=NH, batch_first=True, dtype=DT)
    clamped.load_state_dict(plain.state_dict())
    R, b = plain.weight_hh_l0.detach().reshape(4, NH, D, D), plain.bias_ih_l0.detach().reshape(4, NH, D)
    pre = torch.randn(B, T, 4 * H, dtype=DT, generator=torch.Generator().manual_seed(6))
    eye = torch.eye(4 * H, dtype=DT)
    with torch.no_grad():
        y_fl, _ = _flashrnn_run("slstm", R, b, eye, pre, None)
        y_xl, _ = _xlstm_run(cell, pre, None)
        _close(y_fl, y_xl, "FlashRNN vs xLSTM from the zero state")
        low = _states(4, 7)
        low[2] = torch.full((B, H), 0.3, dtype=DT)  # n_0 < 1
        low[3] = torch.full((B, H), 3.0, dtype=DT)  # a large m_0: f' = 1 and n_1 = n_0 + i' < 1 somewhere
        y_fl, _ = _flashrnn_run("slstm", R, b, eye, pre, low)
        y_xl, _ = _xlstm_run(cell, pre, low)
        assert (y_fl - y_xl).abs().max() > 1e-3
        _close(_lstmkit_run(plain, pre, low)[0], y_xl, "slstm = xLSTM")
        _close(_lstmkit_run(clamped, pre, low)[0], y_fl, "slstm+n_clamp = FlashRNN")


def _fwbw_and_lstmkit_grads(init):
    """Gradients of one output loss (x, W, R, b, h_0, c_0, n_0, m_0) by FlashRNN's ``vanilla_fwbw`` and by
    lstmkit, and lstmkit's layer and the loss's weights."""
    R, b, W, x = _weights(8)
    layer = from_flashrnn(R, b, W, "slstm")
    leaves = [t.clone().requires_grad_(True) for t in (x, W, R, b)]
    st_f = [s.clone().requires_grad_(True) for s in init]
    y_f, _ = _flashrnn_run("slstm", leaves[2], leaves[3], leaves[1], leaves[0], st_f, backend="vanilla_fwbw")
    wy = torch.randn(B, T, H, generator=torch.Generator().manual_seed(3), dtype=DT)
    g_f = torch.autograd.grad((y_f * wy).sum(), leaves + st_f)
    xk = x.clone().requires_grad_(True)
    st_k = [s.clone().requires_grad_(True) for s in init]
    y_k, _ = _lstmkit_run(layer, xk, st_k)
    _close(y_k, y_f, "output")
    g_k = torch.autograd.grad((y_k * wy).sum(), [xk, layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, *st_k])
    return g_f, g_k, layer, x, wy


def _finite_difference(layer, x, init, wy, which, index, eps=1e-6):
    """d(Σ wy · y)/d(init[which][index]) by central differences of lstmkit's forward."""
    plus, minus = [s.clone() for s in init], [s.clone() for s in init]
    plus[which][index] += eps
    minus[which][index] -= eps
    with torch.no_grad():
        return (((_lstmkit_run(layer, x, plus)[0] - _lstmkit_run(layer, x, minus)[0]) * wy).sum() / (2 * eps)).item()


def test_the_kernels_hold_the_stabiliser_constant_in_their_backward():
    """FlashRNN's ``vanilla_fwbw`` (the PyTorch twin of its kernels' backward; xLSTM's CUDA kernel
    does the same) takes no gradient through m: for a loss of the outputs, and states with n ≥ 1,
    its gradients equal lstmkit's (h = o c / n does not depend on m) — except the gradient of m_0,
    0 there, which is not the derivative of the computed function (lstmkit's is, by finite
    differences: m_0 sets the scale of the given c_0, n_0)."""
    init = _states(4, 9)
    init[2] = init[2] + 1.0  # n_0 ≥ 1: the floor never acts
    g_f, g_k, layer, x, wy = _fwbw_and_lstmkit_grads(init)
    for k, name in enumerate(("x", "W", "R", "b", "h_0", "c_0", "n_0")):
        _close(g_k[k], g_f[k].reshape(g_k[k].shape), f"grad of {name}")
    assert torch.equal(g_f[7], torch.zeros_like(g_f[7]))  # FlashRNN's kernels: dL/dm_0 = 0
    assert g_k[7].abs().max() > 1e-3
    assert abs(_finite_difference(layer, x, init, wy, 3, (0, 0)) - g_k[7][0, 0].item()) < 1e-6


def test_where_the_floor_acts_the_kernels_backward_is_not_the_derivative():
    """With n_0 < 1 FlashRNN's floor n_t ≥ 1 acts, h then depends on m, and a backward that holds m
    constant and passes the floor through (FlashRNN's kernels) differs from the derivative of
    FlashRNN's own forward; lstmkit's ``slstm+n_clamp`` gradient is that derivative."""
    init = _states(4, 9)
    init[2] = torch.full((B, H), 0.3, dtype=DT)
    init[3] = torch.full((B, H), 3.0, dtype=DT)  # f' = 1: n_1 = 0.3 + i' < 1 somewhere
    g_f, g_k, layer, x, wy = _fwbw_and_lstmkit_grads(init)
    assert (g_f[3].reshape(-1) - g_k[3]).abs().max() > 1e-2  # the bias's gradient differs
    assert (g_f[6] - g_k[6]).abs().max() > 1e-2  # n_0's too
    for index in ((0, 0), (1, 2), (2, 5)):  # lstmkit's is the derivative
        assert abs(_finite_difference(layer, x, init, wy, 2, index) - g_k[6][index].item()) < 1e-6, index
    eps, bias = 1e-6, layer.bias_ih_l0
    for j in (0, H + 1, 3 * H + 2):  # an input-, forget-, output-gate entry
        with torch.no_grad():
            bias[j] += eps
            plus = (_lstmkit_run(layer, x, init)[0] * wy).sum().item()
            bias[j] -= 2 * eps
            minus = (_lstmkit_run(layer, x, init)[0] * wy).sum().item()
            bias[j] += eps
        assert abs((plus - minus) / (2 * eps) - g_k[3][j].item()) < 1e-6, j
