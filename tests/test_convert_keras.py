"""Keras 3 (torch backend) ⇄ lstmkit: outputs equal to 1e-5 both ways, files included."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import lstmkit
from lstmkit.convert import from_keras, from_keras_file, to_keras

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is imported


class _Keras:
    """The ``keras`` module (installed by make test), imported by the first test that uses it:
    its import takes ~7 s on a slow machine, which every test process paid at collection."""

    def __getattr__(self, name: str):
        if name.startswith("_"):  # what pytest's collection probes on every module attribute
            raise AttributeError(name)
        import keras

        return getattr(keras, name)


keras = _Keras()

X = np.random.default_rng(0).standard_normal((3, 7, 4)).astype("float32")  # (B, T, I)


def _np(t):
    return keras.ops.convert_to_numpy(t)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("unit_forget_bias", [True, False])
def test_single_lstm_sequences_and_states(use_bias, unit_forget_bias):
    keras.utils.set_random_seed(0)
    k = keras.layers.LSTM(5, return_sequences=True, return_state=True, use_bias=use_bias,
                          unit_forget_bias=unit_forget_bias)
    y, h, c = k(X)
    m = from_keras(k)
    assert m.batch_first and m.bias == use_bias
    out, (h_n, c_n) = m(torch.from_numpy(X))
    _close(out.detach(), _np(y))
    _close(h_n[0].detach(), _np(h))
    _close(c_n[0].detach(), _np(c))
    if use_bias and unit_forget_bias:  # Keras' unit forget bias arrives as our forget bias
        assert torch.allclose(m.gates()["forget"].b, torch.ones(5))


def test_go_backwards_is_the_time_reversed_input():
    k = keras.layers.LSTM(5, return_sequences=True, go_backwards=True)
    y = k(X)
    with pytest.warns(UserWarning, match="feed its lstmkit twin the time-reversed input"):
        m = from_keras(k)
    out, _ = m(torch.from_numpy(X).flip(1))
    _close(out.detach(), _np(y))


def test_go_backwards_first_layer_of_a_stack_is_the_reversed_input():
    keras.utils.set_random_seed(2)
    seq = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(5, return_sequences=True, go_backwards=True),
                            keras.layers.LSTM(5, return_sequences=True)])
    with pytest.warns(UserWarning, match="feed its lstmkit twin the time-reversed input"):
        m = from_keras(seq)
    _close(m(torch.from_numpy(X).flip(1))[0].detach(), _np(seq(X)))
    with pytest.raises(ValueError, match=r"has go_backwards=True \(it reads its input reversed\); an lstmkit layer "
                                         r"does not record that"):
        from_keras(seq, allow_go_backwards=False)


def test_go_backwards_after_the_first_layer_is_refused():
    """Keras reverses time between the layers: no input makes one lstmkit LSTM compute that."""
    seq = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(5, return_sequences=True),
                            keras.layers.LSTM(5, return_sequences=True, go_backwards=True)])
    with pytest.raises(ValueError, match=r"\(layer 1 of the stack\) has go_backwards=True: it reverses time between "
                                         r"layers"):
        from_keras(seq)


def test_stacked_sequential_and_bidirectional():
    keras.utils.set_random_seed(1)
    seq = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(6, return_sequences=True),
                            keras.layers.LSTM(6, return_sequences=True), keras.layers.LSTM(6)])
    m = from_keras(seq)
    assert m.num_layers == 3
    _close(m(torch.from_numpy(X))[0][:, -1].detach(), _np(seq(X)))
    bi = keras.Sequential([keras.Input((None, 4)),
                           keras.layers.Bidirectional(keras.layers.LSTM(5, return_sequences=True)),
                           keras.layers.Bidirectional(keras.layers.LSTM(5, return_sequences=True))])
    mb = from_keras(bi)
    assert mb.bidirectional and mb.num_layers == 2
    _close(mb(torch.from_numpy(X))[0].detach(), _np(bi(X)))


@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2, bidirectional=True), dict(bias=False)])
def test_to_keras_and_back(kw):
    torch.manual_seed(0)
    m = lstmkit.LSTM(4, 5, batch_first=True, **kw)
    k = to_keras(m)
    ours = m(torch.from_numpy(X))[0].detach()
    _close(_np(k(X)), ours)
    _close(from_keras(k)(torch.from_numpy(X))[0].detach(), ours)
    ks = to_keras(m, return_sequences=False, return_state=True)
    outs = ks(X)
    _, (h_n, _) = m(torch.from_numpy(X))
    _close(_np(outs[1]), h_n[-1 if not kw.get("bidirectional") else -2].detach())


def test_negative_view_weights_and_bfloat16_keras_layers_convert():
    """to_keras of a float64 layer whose weights carry torch's negation bit raised "Can't call numpy()
    on Tensor that has negative bit set"; from_keras of a bfloat16 Keras LSTM (ml_dtypes' arrays,
    which torch does not read) raised a raw TypeError."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(4, 5, batch_first=True).double()
    want = m(torch.from_numpy(X).double())[0].detach()
    for name, p in list(m.named_parameters()):
        setattr(m, name, torch.nn.Parameter((-p.detach()).clone()._neg_view(), requires_grad=False))
    _close(_np(to_keras(m)(X)), want)
    keras.utils.set_random_seed(0)
    k = keras.layers.LSTM(5, return_sequences=True, dtype="bfloat16", recurrent_initializer="glorot_uniform")
    y = k(X)
    ours = from_keras(k)
    np.testing.assert_allclose(ours.float()(torch.from_numpy(X))[0].detach().numpy(),
                               np.asarray(_np(y), dtype=np.float32), rtol=0.05, atol=0.05)


def test_keras_files(tmp_path):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(5, return_sequences=True)])
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    want = _np(model(X))
    _close(from_keras_file(tmp_path / "m.keras")(torch.from_numpy(X))[0].detach(), want)
    fresh = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(5, return_sequences=True)])
    _close(from_keras_file(tmp_path / "m.weights.h5", model=fresh)(torch.from_numpy(X))[0].detach(), want)
    with pytest.raises(ValueError, match="holds weights without the architecture"):
        from_keras_file(tmp_path / "m.weights.h5")
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError):
        from_keras_file(tmp_path / "bad.keras")
    with pytest.raises(ValueError, match="expected a .keras or .weights.h5 file"):
        (tmp_path / "m.pt").write_bytes(b"")
        from_keras_file(tmp_path / "m.pt")


def test_refusals():
    with pytest.raises(ValueError, match="keras.layers.LSTM cannot carry 'peephole': it computes the vanilla LSTM"):
        to_keras(lstmkit.LSTM(4, 5, cell="peephole"))
    with pytest.raises(ValueError, match="one activation to the candidate and the output"):
        to_keras(lstmkit.LSTM(4, 5, cell="cand_act=relu"))
    with pytest.raises(ValueError, match=r"hard_sigmoid is clamp\(x/6 \+ 1/2\) \(lstmkit's hardsigmoid\)"):
        to_keras(lstmkit.LSTM(4, 5, cell="gate_act=hard_sigmoid"))
    with pytest.raises(ValueError, match="mixes"):
        from_keras(keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(5, return_sequences=True),
                                     keras.layers.LSTM(6)]))
    with pytest.raises(ValueError, match=r"\('softsign', 'sigmoid'\); lstmkit computes activation in"):
        k = keras.layers.LSTM(5, activation="softsign")
        k(X)
        from_keras(k)
    with pytest.raises(ValueError, match="is not an LSTM"):
        from_keras(keras.Sequential([keras.Input((None, 4)), keras.layers.GRU(5)]))


@pytest.mark.parametrize(("activation", "recurrent", "name"), [
    ("relu", "hard_sigmoid", "cand_act=relu+out_act=relu+gate_act=hardsigmoid"),
    ("linear", "sigmoid", "niaf+noaf"),
    ("tanh", "hard_sigmoid", "gate_act=hardsigmoid"),
])
def test_keras_activations_both_ways_against_keras_own_runtime(activation, recurrent, name):
    """Keras' activation (candidate and output) and recurrent_activation (gates) become lstmkit's
    cell words; Keras itself computes the reference, and to_keras gives Keras the same layer back."""
    keras.utils.set_random_seed(5)
    k = keras.layers.LSTM(5, activation=activation, recurrent_activation=recurrent, return_sequences=True)
    want = np.asarray(keras.ops.convert_to_numpy(k(X)))
    layer = from_keras(k)
    assert layer.spec.name == name
    with torch.no_grad():
        got = layer(torch.from_numpy(X))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    back = to_keras(layer)
    np.testing.assert_allclose(np.asarray(keras.ops.convert_to_numpy(back(X))), want, rtol=1e-5, atol=1e-5)


def test_bidirectional_whose_forward_layer_reads_backwards_is_refused():
    """Keras' fused cuDNN path ignores go_backwards on the forward layer, its per-direction path
    does not: the two disagree, so no lstmkit LSTM can match Keras on both."""
    bi = keras.Sequential([keras.Input((None, 4)), keras.layers.Bidirectional(
        keras.layers.LSTM(5, return_sequences=True, go_backwards=True),
        backward_layer=keras.layers.LSTM(5, return_sequences=True))])
    bi.predict(X, verbose=0)
    with pytest.raises(ValueError, match=r"has go_backwards=True on its forward layer, which Keras' fused cuDNN "
                                         r"path ignores"):
        from_keras(bi)


def test_functional_chain_matches_keras_predict_and_other_graphs_are_refused():
    keras.utils.set_random_seed(6)
    L = keras.layers
    inp = keras.Input((None, 4))
    y = L.LSTM(5, return_sequences=True)(inp)
    y, h, c = L.LSTM(5, return_sequences=True, return_state=True)(y)
    chain = keras.Model(inp, [y, h, c])
    want_y, want_h, want_c = chain.predict(X, verbose=0)
    with torch.no_grad():
        out, (h_n, c_n) = from_keras(chain)(torch.from_numpy(X))
    _close(out, want_y)
    _close(h_n[-1], want_h)
    _close(c_n[-1], want_c)

    x5 = np.random.default_rng(1).standard_normal((3, 7, 5)).astype("float32")  # input size = units
    inp = keras.Input((None, 5))
    a, b = L.LSTM(5, return_sequences=True)(inp), L.LSTM(5, return_sequences=True)(inp)
    parallel = keras.Model(inp, [b, a])
    parallel.predict(x5, verbose=0)
    with pytest.raises(ValueError, match=r"is not one chain of its LSTM layers .*: its outputs come from"):
        from_keras(parallel)
    with pytest.raises(ValueError, match=r"is not one chain of its LSTM layers .*: '.*' reads 'flip[_0-9]*', not the "
                                         r"output sequence of"):
        from_keras(keras.Model(inp, L.LSTM(5, return_sequences=True)(keras.ops.flip(a, 1))))  # an op between
    shared = L.LSTM(5, return_sequences=True)
    with pytest.raises(ValueError, match=r"is not one chain of its LSTM layers .*so a layer is run more than once"):
        from_keras(keras.Model(inp, shared(shared(inp))))  # one layer, run twice
    with pytest.raises(ValueError, match=r"the first layer '.*' reads 'flip[_0-9]*', not the model's input"):
        from_keras(keras.Model(inp, L.LSTM(5, return_sequences=True)(keras.ops.flip(inp, 1))))
    h0, c0 = keras.Input((5,)), keras.Input((5,))
    with pytest.raises(ValueError, match=r"it has 3 inputs"):
        from_keras(keras.Model([inp, h0, c0], L.LSTM(5)(inp, initial_state=[h0, c0])))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_stateful_is_refused(bidirectional):
    lstm = keras.layers.LSTM(5, stateful=True, return_sequences=True)
    model = keras.Sequential([keras.Input((7, 4), batch_size=3),
                              keras.layers.Bidirectional(lstm) if bidirectional else lstm])
    first, second = model.predict(X, verbose=0), model.predict(X, verbose=0)
    assert np.abs(first - second).max() > 1e-3  # Keras carries the states into the second call
    with pytest.raises(ValueError, match=r"has stateful=True: Keras carries its states from one batch into the "
                                         r"next"):
        from_keras(model)


def test_damaged_keras_files_get_one_clear_line(tmp_path):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(5, return_sequences=True)])
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    data = (tmp_path / "m.keras").read_bytes()
    for name, content in [("empty.keras", b""), ("cut.keras", data[: len(data) // 2])]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError) as info:
            from_keras_file(tmp_path / name)
        assert str(info.value) == (f"path: {tmp_path / name} is not a .keras model: a .keras file is a zip "
                                   f"archive and this one is not (empty, truncated or another format)")
    wider = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(6, return_sequences=True)])
    with pytest.raises(ValueError) as info:
        from_keras_file(tmp_path / "m.weights.h5", model=wider)
    message = str(info.value)
    assert "\n" not in message and "Target variable" not in message
    assert message.startswith(f"path: cannot load the weights in {tmp_path / 'm.weights.h5'} into the given Keras "
                              f"model (The shape of the target variable")
    assert "variable.shape=(4, 24), Received: value.shape=torch.Size([4, 20])" in message
