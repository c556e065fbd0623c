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
