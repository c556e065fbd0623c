"""Tests of the float64 NumPy oracle (tests/numpy_lstm.py, with its parts numpy_lstm_config.py
and numpy_lstm_steps.py) on its own.

* Its hand-written BPTT is checked against central finite differences for every variant
  of docs/cell.md, alone and combined, with lengths, projection, stacking and both
  directions (every parameter entry, every input, every initial state).
* Its forward pass is checked against properties that follow from docs/cell.md (each
  sequence of a batch alone; reverse direction by explicit per-sequence flipping; removed
  gates as saturated gates; zero peepholes / zero W_gg; clip bound) and, when torch is
  installed, against torch.nn.LSTM / torch.nn.RNN on the variants torch has.
Nothing here imports lstmkit.
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    from . import numpy_lstm as nl
    from . import numpy_lstm_config as nl_config
    from . import numpy_lstm_steps as nl_steps
except ImportError:  # tests/ is not a package: pytest put tests/ on sys.path
    import numpy_lstm as nl
    import numpy_lstm_config as nl_config
    import numpy_lstm_steps as nl_steps

EPS = 1e-6
RTOL = 1e-6
ATOL = 1e-8


# --------------------------------------------------------------------------------------
# Finite-difference machinery
# --------------------------------------------------------------------------------------


def _numgrad(loss, arr: np.ndarray) -> np.ndarray:
    """Central differences of loss() w.r.t. every entry of arr (perturbed in place)."""
    g = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        old = arr[idx]
        arr[idx] = old + EPS
        fp = loss()
        arr[idx] = old - EPS
        fm = loss()
        arr[idx] = old
        g[idx] = (fp - fm) / (2 * EPS)
    return g


def _assert_grad(name: str, analytic: np.ndarray, numeric: np.ndarray, *, must_matter=True):
    assert analytic.shape == numeric.shape, f"{name}: shape {analytic.shape} != {numeric.shape}"
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL, err_msg=name)
    if must_matter:  # a parameter that never reaches the loss would pass vacuously
        assert np.abs(numeric).max() > 1e-6, f"{name}: loss does not depend on it"


def _setup(variant, *, I=2, T=3, B=2, L=1, bidirectional=False, seed=0):
    rng = np.random.default_rng(seed)
    cfg_H = variant["hidden_size"]
    H_out = variant.get("proj_size", 0) or cfg_H
    D = 2 if bidirectional else 1
    layers = nl.init_stack(variant, I, L, bidirectional, rng)
    x = rng.normal(size=(T, B, I))
    h0 = 0.5 * rng.normal(size=(D * L, B, H_out))
    lstm = variant.get("kind", "lstm") == "lstm"
    c0 = rng.normal(size=(D * L, B, cfg_H)) if lstm else None
    if variant.get("slstm"):  # c, n > 0, m side by side
        c0 = np.concatenate([c0, rng.uniform(0.1, 1.5, size=c0.shape), rng.normal(size=c0.shape)], axis=-1)
    wy = rng.normal(size=(T, B, D * H_out))
    wh = rng.normal(size=(D * L, B, H_out))
    wc = rng.normal(size=c0.shape) if lstm else None
    return layers, x, h0, c0, wy, wh, wc


def check_stack_grads(variant, *, I=2, T=3, B=2, L=1, bidirectional=False, lengths=None,
                      seed=0, keep=None):
    """FD-check nl.backward for a whole stack; loss = <wy, y> + <wh, h_n> + <wc, c_n>."""
    layers, x, h0, c0, wy, wh, wc = _setup(variant, I=I, T=T, B=B, L=L,
                                           bidirectional=bidirectional, seed=seed)

    def loss():
        y, hn, cn, _ = nl.forward(x, layers, h0, c0, variant, lengths, bidirectional, keep)
        out = np.sum(wy * y) + np.sum(wh * hn)
        return out + np.sum(wc * cn) if cn is not None else out

    _, _, _, cache = nl.forward(x, layers, h0, c0, variant, lengths, bidirectional, keep)
    dx, dlayers, dh0, dc0 = nl.backward(cache, wy, wh, wc)

    # Padding steps of x (t >= len_b) are never read: their gradient must be exactly 0.
    _assert_grad("x", dx, _numgrad(loss, x))
    _assert_grad("h0", dh0, _numgrad(loss, h0))
    if c0 is not None:
        _assert_grad("c0", dc0, _numgrad(loss, c0))
    else:
        assert dc0 is None
    for l, dirs in enumerate(layers):
        for d, params in enumerate(dirs):
            assert set(dlayers[l][d]) == set(params)
            for name, arr in params.items():
                _assert_grad(f"{name}_l{l}{'_reverse' if d else ''}", dlayers[l][d][name],
                             _numgrad(loss, arr))
    return cache


def check_layer_grads(variant, *, I=2, T=3, B=2, lengths=None, seed=0):
    """FD-check nl.layer_backward (one layer, one direction)."""
    layers, x, h0, c0, wy, wh, wc = _setup(variant, I=I, T=T, B=B, seed=seed)
    params, h0, c0, wh = layers[0][0], h0[0], (None if c0 is None else c0[0]), wh[0]
    wc = None if wc is None else wc[0]

    def loss():
        y, hn, cn, _ = nl.layer_forward(x, params, h0, c0, variant, lengths)
        out = np.sum(wy * y) + np.sum(wh * hn)
        return out + np.sum(wc * cn) if cn is not None else out

    _, _, _, cache = nl.layer_forward(x, params, h0, c0, variant, lengths)
    dx, dparams, dh0, dc0 = nl.layer_backward(cache, wy, wh, wc)
    _assert_grad("x", dx, _numgrad(loss, x))
    _assert_grad("h0", dh0, _numgrad(loss, h0))
    if c0 is not None:
        _assert_grad("c0", dc0, _numgrad(loss, c0))
    for name, arr in params.items():
        _assert_grad(name, dparams[name], _numgrad(loss, arr))
    return cache


# --------------------------------------------------------------------------------------
# Variants of cell.md, one at a time (single layer, with unequal unsorted lengths too)
# --------------------------------------------------------------------------------------

H = 3
SINGLE = {
    "vanilla": {},
    "no_bias": {"bias": False},
    "nig": {"input_gate": False},
    "nfg": {"forget_gate": False},
    "nog": {"output_gate": False},
    "cifg": {"coupled": True},
    "niaf": {"candidate_activation": "identity"},
    "noaf": {"output_activation": "identity"},
    "peephole": {"peephole": True},
    "fgr": {"fgr": True},
    "layernorm": {"layernorm": True},
    "cell_clip": {"cell_clip": 0.4},
    "proj": {"proj_size": 2},
    "deep_i": {"gate_hidden": {"i": (4,)}},
    "deep_f": {"gate_hidden": {"f": (2,)}},
    "deep_g": {"gate_hidden": {"g": (4, 2)}},
    "deep_o": {"gate_hidden": {"o": (2,)}},
    "deep_all": {"gate_hidden": {"i": (2,), "f": (4,), "g": (3, 2), "o": (2, 4)}},
    "deep_relu": {"gate_hidden": {"f": (4, 3), "g": (3,)}, "gate_hidden_activation": "relu"},
    "deep_sigmoid": {"gate_hidden": {"i": (2, 3), "o": (4,)}, "gate_hidden_activation": "sigmoid"},
    "deep_identity": {"gate_hidden": {"g": (3, 2)}, "gate_hidden_activation": "identity"},
    "cand_relu": {"candidate_activation": "relu"},
    "out_relu": {"output_activation": "relu"},
    "hard_sigmoid": {"gate_activation": "hard_sigmoid"},
    "hardsigmoid": {"gate_activation": "hardsigmoid"},
    "zoneout_expectation": {"zoneout": (0.3, 0.2)},
    "heads": {"heads": 3},
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_variant_layer_grads(name):
    variant = {"hidden_size": H, **SINGLE[name]}
    check_layer_grads(variant, T=4, B=2)


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_variant_with_lengths(name):
    variant = {"hidden_size": H, **SINGLE[name]}
    check_stack_grads(variant, T=4, B=3, lengths=np.array([2, 4, 1]))


def test_cell_clip_is_active_in_the_test():
    # The clip test above is only meaningful if some c_pre is clamped and some is not.
    variant = {"hidden_size": H, "cell_clip": 0.4}
    cache = check_layer_grads(variant, T=4, B=2)
    c_pre = np.stack([s["c_pre"] for s in cache["steps"]])
    assert (np.abs(c_pre) > 0.4).any() and (np.abs(c_pre) < 0.4).any()
    c = np.stack([s["c"] for s in cache["steps"]])
    assert np.abs(c).max() <= 0.4


# --------------------------------------------------------------------------------------
# Combinations
# --------------------------------------------------------------------------------------

COMBOS = {
    "everything": {"peephole": True, "coupled": True, "layernorm": True, "fgr": True,
                   "cell_clip": 0.6, "proj_size": 2, "gate_hidden": {"i": (2,), "g": (4, 2)}},
    "peep_fgr_ln": {"peephole": True, "fgr": True, "layernorm": True},
    "peep_cifg": {"peephole": True, "coupled": True},
    "nig_nog_peep_fgr": {"input_gate": False, "output_gate": False, "peephole": True,
                         "fgr": True},
    "nfg_peep_fgr_deep_o": {"forget_gate": False, "peephole": True, "fgr": True,
                            "gate_hidden": {"o": (2,)}},
    "niaf_noaf_ln": {"candidate_activation": "identity", "output_activation": "identity",
                     "layernorm": True},
    "nobias_ln_deep_all": {"bias": False, "layernorm": True,
                           "gate_hidden": {"i": (2,), "f": (2,), "g": (2,), "o": (2,)}},
    "cifg_fgr_deep_f_clip": {"coupled": True, "fgr": True, "cell_clip": 0.5,
                             "gate_hidden": {"g": (2,)}},
    "proj_peep_ln_noaf": {"proj_size": 2, "peephole": True, "layernorm": True,
                          "output_activation": "identity"},
    "fgr_deep_all_proj": {"fgr": True, "proj_size": 1,
                          "gate_hidden": {"i": (2,), "f": (4,), "g": (2,), "o": (3,)}},
    "heads_proj_peep_ln_deep_g": {"hidden_size": 4, "heads": 2, "proj_size": 2, "peephole": True,
                                  "layernorm": True, "gate_hidden": {"g": (4,)}},
}


def _masks(rng, L, D, T, B, H, H_out, z=(0.5, 0.5)):
    """Zoneout masks keep[l][d] = (d_c (T, B, H), d_h (T, B, H_out)) of 0s and 1s."""
    return [[((rng.random((T, B, H)) < z[0]).astype(float), (rng.random((T, B, H_out)) < z[1]).astype(float))
             for _ in range(D)] for _ in range(L)]


def test_zoneout_masks_grads_stacked_bidirectional_projection():
    variant = {"hidden_size": H, "zoneout": (0.5, 0.5), "proj_size": 2, "peephole": True,
               "gate_activation": "hard_sigmoid", "candidate_activation": "relu"}
    keep = _masks(np.random.default_rng(3), 2, 2, 4, 3, H, 2)
    check_stack_grads(variant, T=4, B=3, L=2, bidirectional=True, lengths=np.array([3, 4, 2]), keep=keep)


def test_zoneout_all_kept_freezes_the_state_and_none_kept_is_no_zoneout():
    layers, x, h0, c0, *_ = _setup({"hidden_size": H}, T=4, B=2)
    zo = {"hidden_size": H, "zoneout": (0.5, 0.5)}
    ones = [[(np.ones((4, 2, H)), np.ones((4, 2, H)))]]
    y, hn, cn, _ = nl.forward(x, layers, h0, c0, zo, keep=ones)
    np.testing.assert_array_equal(hn, h0)
    np.testing.assert_array_equal(cn, c0)
    zeros = [[(np.zeros((4, 2, H)), np.zeros((4, 2, H)))]]
    want = nl.forward(x, layers, h0, c0, {"hidden_size": H})
    got = nl.forward(x, layers, h0, c0, zo, keep=zeros)
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(a, b)


def test_hard_sigmoid_gates_are_flat_outside_their_ramp():
    cfg = nl_config._config({"hidden_size": 1, "gate_activation": "hard_sigmoid"})
    u = np.array([-3.0, -2.5, 0.0, 1.0, 2.5, 3.0])
    np.testing.assert_allclose(nl_steps._gate(cfg, u), [0.0, 0.0, 0.5, 0.7, 1.0, 1.0])
    np.testing.assert_allclose(nl_steps._gate_backward(cfg, np.ones(6), nl_steps._gate(cfg, u)), [0, 0, 0.2, 0.2, 0, 0])


@pytest.mark.parametrize("name", list(COMBOS))
def test_combination_grads(name):
    variant = {"hidden_size": H, **COMBOS[name]}
    check_stack_grads(variant, T=4, B=3, lengths=np.array([3, 4, 2]), seed=1)


def test_bidirectional_two_layers_vanilla_lengths():
    variant = {"hidden_size": 2}
    check_stack_grads(variant, T=4, B=3, L=2, bidirectional=True, lengths=[3, 1, 4])


def test_bidirectional_two_layers_projection_full_length():
    variant = {"hidden_size": 3, "proj_size": 2}
    check_stack_grads(variant, T=3, B=2, L=2, bidirectional=True)


def test_bidirectional_two_layers_everything_lengths():
    variant = {"hidden_size": 2, "peephole": True, "coupled": True, "layernorm": True,
               "fgr": True, "cell_clip": 0.6, "proj_size": 1, "gate_hidden": {"g": (3,)}}
    check_stack_grads(variant, T=4, B=3, L=2, bidirectional=True, lengths=[2, 4, 3], seed=3)


def test_unidirectional_three_layers_lengths():
    variant = {"hidden_size": 2, "fgr": True, "peephole": True}
    check_stack_grads(variant, T=3, B=2, L=3, lengths=[1, 3])


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_grads(nonlinearity):
    variant = {"kind": "rnn", "hidden_size": 3, "nonlinearity": nonlinearity}
    check_layer_grads(variant, T=4, B=2, seed=2)
    check_stack_grads(variant, T=4, B=3, L=2, bidirectional=True, lengths=[4, 2, 3], seed=2)


SLSTM = {
    "slstm": {"slstm": True},
    "slstm_exp": {"slstm": True, "forget_activation": "exp"},
    "slstm_n_clamp": {"slstm": True, "n_clamp": True},
    "slstm_heads_exp_clamp": {"slstm": True, "heads": 3, "forget_activation": "exp", "n_clamp": True},
}


@pytest.mark.parametrize("name", list(SLSTM))
def test_slstm_grads(name):
    """Every gradient, through all of c_n, n_n and m_n too (the loss weighs each): the
    stabiliser's max differentiated as computed."""
    variant = {"hidden_size": H, **SLSTM[name]}
    check_layer_grads(variant, T=4, B=2, seed=4)
    check_stack_grads(variant, T=4, B=3, L=2, bidirectional=True, lengths=np.array([2, 4, 1]), seed=4)


def test_slstm_n_clamp_where_it_holds_n():
    """n_t < 1 needs a kept state with n < 1 and a large m (f' = 1, i' small): there the floor
    holds n at 1, and every gradient still matches finite differences."""
    variant = {"hidden_size": H, "slstm": True, "n_clamp": True}
    layers, x, h0, c0, wy, wh, wc = _setup(variant, T=4, B=2, seed=4)
    c0[0, :, H:2 * H] = [[0.2, 0.5, 1.3], [0.3, 0.9, 0.1]]  # n_0
    c0[0, :, 2 * H:] = 4.0  # m_0: the forget branch is the max
    params = layers[0][0]
    _, _, _, cache = nl.layer_forward(x, params, h0[0], c0[0], variant)
    n_raw = np.stack([s["n_raw"] for s in cache["steps"]])
    assert (n_raw < 1).any() and (n_raw > 1).any()

    def loss():
        y, hn, cn, _ = nl.layer_forward(x, params, h0[0], c0[0], variant)
        return np.sum(wy * y) + np.sum(wh[0] * hn) + np.sum(wc[0] * cn)

    dx, dparams, _, _ = nl.layer_backward(cache, wy, wh[0], wc[0])
    _assert_grad("x", dx, _numgrad(loss, x))
    for name, arr in params.items():
        _assert_grad(name, dparams[name], _numgrad(loss, arr))


def test_slstm_from_the_zero_state():
    """From c = n = m = 0 (every cell empty) the first stabiliser is ĩ: i' = 1, n_1 = 1, and the
    gradients of x and every parameter hold (the state's own gradients there are one-sided)."""
    rng = np.random.default_rng(5)
    variant = {"hidden_size": H, "slstm": True}
    params = nl.init_params(variant, 2, rng)
    x = rng.normal(size=(4, 2, 2))
    wy = rng.normal(size=(4, 2, H))

    def loss():
        return np.sum(wy * nl.layer_forward(x, params, None, None, variant)[0])

    y, hn, cn, cache = nl.layer_forward(x, params, None, None, variant)
    np.testing.assert_allclose(cache["steps"][0]["i"], 1.0)
    np.testing.assert_allclose(cn[:, H:2 * H] >= 1.0, True)
    dx, dparams, _, _ = nl.layer_backward(cache, wy, None, None)
    _assert_grad("x", dx, _numgrad(loss, x))
    for name, arr in params.items():
        _assert_grad(name, dparams[name], _numgrad(loss, arr))


def test_slstm_output_does_not_depend_on_the_stabiliser():
    """(c, n, m) and (c e^δ, n e^δ, m − δ) are the same state: h is equal, and so is every later h."""
    rng = np.random.default_rng(6)
    variant = {"hidden_size": H, "slstm": True}
    params = nl.init_params(variant, 2, rng)
    x = rng.normal(size=(5, 2, 2))
    c, n, m = rng.normal(size=(2, H)), rng.uniform(0.5, 2, size=(2, H)), rng.normal(size=(2, H))
    d = rng.normal(size=(2, H))
    a = nl.layer_forward(x, params, None, np.concatenate([c, n, m], 1), variant)[0]
    b = nl.layer_forward(x, params, None, np.concatenate([c * np.exp(d), n * np.exp(d), m - d], 1), variant)[0]
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_rnn_heads_grads():
    check_stack_grads({"kind": "rnn", "hidden_size": 4, "heads": 2}, T=4, B=3, L=2, bidirectional=True,
                      lengths=[4, 2, 3], seed=2)


def test_heads_zero_blocks_equal_a_dense_matrix_with_zeros():
    """heads=k is the plain cell whose W_hh is zero outside the gates' diagonal blocks."""
    rng = np.random.default_rng(0)
    variant = {"hidden_size": 4, "heads": 2, "peephole": True}
    params = nl.init_params(variant, 3, rng)
    dense = dict(params)
    full = np.zeros((16, 4))
    for g in range(4):
        for j in range(2):
            rows = slice(4 * g + 2 * j, 4 * g + 2 * j + 2)
            full[rows, 2 * j:2 * j + 2] = params["weight_hh"][rows]
    dense["weight_hh"] = full
    x = rng.standard_normal((5, 2, 3))
    a = nl.layer_forward(x, params, None, None, variant)[0]
    b = nl.layer_forward(x, dense, None, None, {"hidden_size": 4, "peephole": True})[0]
    np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)


def test_rnn_no_bias_grads():
    check_stack_grads({"kind": "rnn", "hidden_size": 3, "bias": False}, T=3, B=2)


def test_zero_length_sequence():
    # cell.md: steps t >= len_b change nothing; with len_b = 0 the state is h0, c0.
    variant = {"hidden_size": 2}
    layers, x, h0, c0, *_ = _setup(variant, T=3, B=2, bidirectional=True)
    y, hn, cn, _ = nl.forward(x, layers, h0, c0, variant, [0, 3], bidirectional=True)
    assert np.all(y[:, 0] == 0)
    np.testing.assert_array_equal(hn[:, 0], h0[:, 0])
    np.testing.assert_array_equal(cn[:, 0], c0[:, 0])


def test_checker_catches_a_wrong_gradient():
    variant = {"hidden_size": 2, "peephole": True}
    layers, x, h0, c0, wy, wh, wc = _setup(variant)
    _, _, _, cache = nl.forward(x, layers, h0, c0, variant)
    _, dlayers, _, _ = nl.backward(cache, wy, wh, wc)

    def loss():
        y, hn, cn, _ = nl.forward(x, layers, h0, c0, variant)
        return np.sum(wy * y) + np.sum(wh * hn) + np.sum(wc * cn)

    num = _numgrad(loss, layers[0][0]["peephole_o"])
    _assert_grad("peephole_o", dlayers[0][0]["peephole_o"], num)
    wrong = dlayers[0][0]["peephole_o"].copy()
    wrong[1] *= 1.0 + 1e-4
    with pytest.raises(AssertionError):
        _assert_grad("peephole_o", wrong, num)


# --------------------------------------------------------------------------------------
# Forward-pass properties that follow from cell.md
# --------------------------------------------------------------------------------------


def test_param_shapes_worked_example():
    # H=3, I=2, cifg + peephole + fgr + layernorm + projection 2 + deep g (5, 3):
    # C = (i, g, o), S = (i, o), n = (3, 5, 3), R = 11.
    variant = {"hidden_size": 3, "coupled": True, "peephole": True, "fgr": True,
               "layernorm": True, "proj_size": 2, "gate_hidden": {"g": (5, 3)}}
    assert nl.param_shapes(variant, 2) == {
        "weight_ih": (11, 2), "weight_hh": (11, 2), "bias_ih": (11,), "bias_hh": (11,),
        "weight_hr": (2, 3), "peephole_i": (3,), "peephole_o": (3,), "weight_gg": (6, 6),
        "ln_ih_weight": (11,), "ln_hh_weight": (11,), "ln_c_weight": (3,), "ln_c_bias": (3,),
        "mlp_g_weight1": (3, 5), "mlp_g_bias1": (3,), "mlp_g_weight2": (3, 3),
        "mlp_g_bias2": (3,),
    }
    assert nl.param_shapes({"hidden_size": 4, "bias": False, "input_gate": False,
                            "output_gate": False, "peephole": True}, 5) == {
        "weight_ih": (8, 5), "weight_hh": (8, 4), "peephole_f": (4,)}
    assert nl.param_shapes({"kind": "rnn", "hidden_size": 4}, 5) == {
        "weight_ih": (4, 5), "weight_hh": (4, 4), "bias_ih": (4,), "bias_hh": (4,)}


def test_invalid_variants_rejected():
    for bad in ({"hidden_size": 2, "coupled": True, "input_gate": False},
                {"hidden_size": 2, "coupled": True, "forget_gate": False},
                {"hidden_size": 2, "coupled": True, "gate_hidden": {"f": (2,)}},
                {"hidden_size": 2, "gate_hiden": {}},
                {"kind": "rnn", "hidden_size": 2, "peephole": True}):
        with pytest.raises(ValueError):
            nl.param_shapes(bad, 3)


@pytest.mark.parametrize("name", ["vanilla", "everything"])
def test_lengths_equal_running_each_sequence_alone(name):
    variant = {"hidden_size": H, **(COMBOS.get(name, {}))}
    lengths = [2, 4, 1]
    layers, x, h0, c0, *_ = _setup(variant, T=4, B=3, L=2, bidirectional=True, seed=5)
    y, hn, cn, _ = nl.forward(x, layers, h0, c0, variant, lengths, bidirectional=True)
    for b, n in enumerate(lengths):
        yb, hb, cb, _ = nl.forward(x[:n, b:b + 1], layers, h0[:, b:b + 1], c0[:, b:b + 1],
                                   variant, None, bidirectional=True)
        np.testing.assert_allclose(y[:n, b], yb[:, 0], rtol=0, atol=1e-13)
        assert np.all(y[n:, b] == 0)
        np.testing.assert_allclose(hn[:, b], hb[:, 0], rtol=0, atol=1e-13)
        np.testing.assert_allclose(cn[:, b], cb[:, 0], rtol=0, atol=1e-13)


def test_reverse_direction_by_explicit_flipping():
    variant = {"hidden_size": 2, "fgr": True, "peephole": True}
    lengths = [3, 1, 4]
    layers, x, h0, c0, *_ = _setup(variant, T=4, B=3, bidirectional=True, seed=6)
    y, hn, cn, _ = nl.forward(x, layers, h0, c0, variant, lengths, bidirectional=True)
    for b, n in enumerate(lengths):
        xr = x[:n, b:b + 1][::-1]  # x'_t = x_{len_b - 1 - t}
        yr, hr, cr, _ = nl.layer_forward(xr, layers[0][1], h0[1, b:b + 1], c0[1, b:b + 1],
                                         variant)
        np.testing.assert_allclose(y[:n, b, 2:], yr[::-1, 0], rtol=0, atol=1e-14)
        np.testing.assert_allclose(hn[1, b], hr[0], rtol=0, atol=1e-14)
        np.testing.assert_allclose(cn[1, b], cr[0], rtol=0, atol=1e-14)


def _vanilla_with_saturated_gate(params, gate, H_):
    """Vanilla params equal to a no-`gate` variant's, with that gate's rows saturated."""
    cfg_rows = {k: i for i, k in enumerate(k for k in "ifgo" if k != gate)}
    rng = np.random.default_rng(9)
    out = {}
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        rows = []
        for k in "ifgo":
            if k == gate:
                shape = (H_,) + params[name].shape[1:]
                block = rng.uniform(-0.5, 0.5, shape)
                if name == "bias_ih":
                    block = np.full(shape, 60.0)  # σ(≈60) == 1.0 exactly in float64
                rows.append(block)
            else:
                j = cfg_rows[k]
                rows.append(params[name][j * H_:(j + 1) * H_])
        out[name] = np.concatenate(rows)
    return out


@pytest.mark.parametrize("gate,key", [("i", "input_gate"), ("f", "forget_gate"),
                                      ("o", "output_gate")])
def test_removed_gate_equals_saturated_gate(gate, key):
    variant = {"hidden_size": 2, key: False}
    layers, x, h0, c0, *_ = _setup(variant, T=4, B=2, seed=7)
    y, hn, cn, _ = nl.forward(x, layers, h0, c0, variant)
    vparams = _vanilla_with_saturated_gate(layers[0][0], gate, 2)
    y2, hn2, cn2, _ = nl.forward(x, [[vparams]], h0, c0, {"hidden_size": 2})
    np.testing.assert_allclose(y, y2, rtol=0, atol=1e-14)
    np.testing.assert_allclose(cn, cn2, rtol=0, atol=1e-14)


def test_zero_peepholes_and_zero_wgg_equal_vanilla():
    variant = {"hidden_size": 3, "peephole": True, "fgr": True}
    layers, x, h0, c0, *_ = _setup(variant, T=4, B=2, seed=8)
    p = layers[0][0]
    for name in ("peephole_i", "peephole_f", "peephole_o", "weight_gg"):
        p[name][...] = 0.0
    y, hn, cn, _ = nl.forward(x, layers, h0, c0, variant)
    vp = {k: p[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    y2, hn2, cn2, _ = nl.forward(x, [[vp]], h0, c0, {"hidden_size": 3})
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(cn, cn2)


def test_cifg_forget_is_one_minus_input():
    variant = {"hidden_size": 3, "coupled": True, "peephole": True}
    layers, x, h0, c0, *_ = _setup(variant, T=3, B=2)
    _, _, _, cache = nl.layer_forward(x, layers[0][0], h0[0], c0[0], variant)
    for s in cache["steps"]:
        np.testing.assert_array_equal(s["f"], 1.0 - s["i"])


# --------------------------------------------------------------------------------------
# Against torch.nn.LSTM / torch.nn.RNN (vanilla, projection, stacking, packing)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,proj,nonlinearity", [("lstm", 0, "tanh"), ("lstm", 2, "tanh"),
                                                    ("rnn", 0, "tanh"), ("rnn", 0, "relu")])
def test_matches_torch(kind, proj, nonlinearity):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    Hs, I, T, B, L = 3, 2, 4, 3, 2
    if kind == "lstm":
        variant = {"hidden_size": Hs, "proj_size": proj}
        mod = torch.nn.LSTM(I, Hs, num_layers=L, bidirectional=True, proj_size=proj,
                            dtype=torch.float64)
    else:
        variant = {"kind": "rnn", "hidden_size": Hs, "nonlinearity": nonlinearity}
        mod = torch.nn.RNN(I, Hs, num_layers=L, bidirectional=True,
                           nonlinearity=nonlinearity, dtype=torch.float64)
    H_out = proj or Hs
    lengths = [3, 4, 2]
    layers, x, h0, c0, wy, wh, wc = _setup(variant, I=I, T=T, B=B, L=L, bidirectional=True,
                                           seed=11)
    flat = nl.flatten_params(layers)
    assert {k: tuple(v.shape) for k, v in flat.items()} == {
        k: tuple(v.shape) for k, v in mod.named_parameters()}
    with torch.no_grad():
        for k, v in mod.named_parameters():
            v.copy_(torch.from_numpy(flat[k]))

    y, hn, cn, cache = nl.forward(x, layers, h0, c0, variant, lengths, bidirectional=True)
    dx, dlayers, dh0, dc0 = nl.backward(cache, wy, wh, wc)

    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0, requires_grad=True)
    packed = pack_padded_sequence(xt, torch.tensor(lengths), enforce_sorted=False)
    if kind == "lstm":
        c0t = torch.tensor(c0, requires_grad=True)
        out, (hnt, cnt) = mod(packed, (h0t, c0t))
    else:
        out, hnt = mod(packed, h0t)
    yt, _ = pad_packed_sequence(out, total_length=T)
    assert yt.shape == (T, B, 2 * H_out)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(hn, hnt.detach().numpy(), rtol=0, atol=1e-12)
    loss = (yt * torch.from_numpy(wy)).sum() + (hnt * torch.from_numpy(wh)).sum()
    if kind == "lstm":
        np.testing.assert_allclose(cn, cnt.detach().numpy(), rtol=0, atol=1e-12)
        loss = loss + (cnt * torch.from_numpy(wc)).sum()
    loss.backward()
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=0, atol=1e-11)
    np.testing.assert_allclose(dh0, h0t.grad.numpy(), rtol=0, atol=1e-11)
    if kind == "lstm":
        np.testing.assert_allclose(dc0, c0t.grad.numpy(), rtol=0, atol=1e-11)
    dflat = nl.flatten_params(dlayers)
    for k, v in mod.named_parameters():
        np.testing.assert_allclose(dflat[k], v.grad.numpy(), rtol=0, atol=1e-11, err_msg=k)
