"""``lstmkit convert SRC DST``: every format pair round-trips with equal outputs; every failure
is one line, exit code 2, and leaves the destination directory as it was.

References are independent of the converters: ``torch.nn.LSTM`` for state dicts,
onnxruntime for ``.onnx``, Keras itself for ``.keras`` / ``.weights.h5``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import lstmkit  # noqa: E402
from lstmkit.app import cli  # noqa: E402
from lstmkit.convert import convert_file, read_layer, write_layer  # noqa: E402

RTOL = ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


@pytest.fixture
def main():
    """``lstmkit.app.cli.main``: returns the exit code."""
    return cli.main


def _close(a, b, what=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL, err_msg=what)


def _run(layer_or_module, x):
    """(output, h_n, c_n) as NumPy arrays (c_n None for an RNN)."""
    with torch.no_grad():
        y, st = layer_or_module(x)
    h, c = st if isinstance(st, tuple) else (st, None)
    return y.numpy(), h.numpy(), None if c is None else c.numpy()


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x.numpy()})


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _fails(main, capsys, argv, match):
    """Exit code 2, one line on stderr naming the problem."""
    assert main(["convert", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lstmkit convert: error: "), err
    assert match in err, err
    return err


TORCH_CONFIGS = {
    "single": dict(),
    "stacked_bidirectional": dict(num_layers=2, bidirectional=True),
    "no_bias_3_layers": dict(num_layers=3, bias=False),
    "projection": dict(num_layers=2, proj_size=2),
}


@pytest.mark.parametrize("mid", [".safetensors", ".onnx", ".pth"])
@pytest.mark.parametrize("config", list(TORCH_CONFIGS))
def test_nn_lstm_state_dict_through_each_format_and_back(main, capsys, tmp_path, config, mid):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 5, **TORCH_CONFIGS[config]).eval()
    src = tmp_path / "nn.pt"
    torch.save(ref.state_dict(), src)
    x = torch.randn(6, 2, 3)
    want = _run(ref, x)
    assert main(["convert", str(src), str(tmp_path / f"m{mid}")]) == 0
    assert "lstmkit.LSTM(3, 5" in capsys.readouterr().out
    if mid == ".onnx":  # the intermediate file itself, run by onnxruntime
        for a, b in zip(_ort(tmp_path / "m.onnx", x), want):
            _close(a, b, f"{config} onnxruntime")
    assert main(["convert", str(tmp_path / f"m{mid}"), str(tmp_path / "back.pt")]) == 0
    back = torch.nn.LSTM(3, 5, **TORCH_CONFIGS[config]).eval()
    back.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True))  # strict: same keys and shapes
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k  # exact: every format holds float32 unchanged
    for a, b in zip(_run(back, x), want):
        _close(a, b, config)


def test_nn_rnn_and_relu_needs_cell(main, capsys, tmp_path):
    torch.manual_seed(1)
    ref = torch.nn.RNN(3, 4, num_layers=2, nonlinearity="relu").eval()
    torch.save(ref.state_dict(), tmp_path / "rnn.pt")
    x = torch.randn(5, 2, 3)
    # Without --cell the file reads as the default tanh RNN (a state dict cannot say relu).
    assert main(["convert", str(tmp_path / "rnn.pt"), str(tmp_path / "tanh.onnx")]) == 0
    assert "lstmkit.RNN(3, 4, num_layers=2)" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "rnn.pt"), str(tmp_path / "relu.onnx"), "--cell", "rnn_relu"]) == 0
    y, h = _ort(tmp_path / "relu.onnx", x)
    _close(y, _run(ref, x)[0])
    _close(h, _run(ref, x)[1])
    assert main(["convert", str(tmp_path / "relu.onnx"), str(tmp_path / "relu.safetensors")]) == 0
    layer = read_layer(tmp_path / "relu.safetensors")
    assert isinstance(layer, lstmkit.RNN) and layer.nonlinearity == "relu"
    _close(_run(layer, x)[0], _run(ref, x)[0])
    # A bare state dict in a .safetensors file reads like a .pt one.
    save_file(ref.state_dict(), str(tmp_path / "bare.safetensors"))
    assert main(["convert", str(tmp_path / "bare.safetensors"), str(tmp_path / "bare.pt"), "--cell", "rnn_relu"]) == 0
    back = torch.nn.RNN(3, 4, num_layers=2, nonlinearity="relu")
    back.load_state_dict(torch.load(tmp_path / "bare.pt", weights_only=True))
    _close(_run(back, x)[0], _run(ref, x)[0])


def test_a_state_dict_of_several_dtypes_is_read_at_the_widest(main, capsys, tmp_path):
    """One float16 tensor among float32 ones: the layer is float32 and every value as saved (it
    took weight_ih_l0's dtype and rounded the others to float16, without a word), as
    nn.LSTM.load_state_dict keeps them; likewise a .safetensors file of lstmkit's."""
    torch.manual_seed(2)
    sd = dict(torch.nn.LSTM(4, 6).state_dict())
    sd["weight_ih_l0"] = sd["weight_ih_l0"].half()
    torch.save(sd, tmp_path / "mixed.pt")
    assert main(["convert", str(tmp_path / "mixed.pt"), str(tmp_path / "mixed.safetensors")]) == 0
    for layer in (read_layer(tmp_path / "mixed.pt"), read_layer(tmp_path / "mixed.safetensors")):
        assert all(p.dtype == torch.float32 for p in layer.parameters())
        for k, v in layer.state_dict().items():
            assert torch.equal(v, sd[k].float()), k
    tensors = load_file(str(tmp_path / "mixed.safetensors"))  # lstmkit's own file, its tensors mixed
    tensors["bias_hh_l0"] = tensors["bias_hh_l0"].to(torch.float64)
    with safe_open(str(tmp_path / "mixed.safetensors"), "pt") as f:
        save_file(tensors, str(tmp_path / "wide.safetensors"), metadata=f.metadata())
    assert read_layer(tmp_path / "wide.safetensors").weight_hh_l0.dtype == torch.float64


def test_onnx_options(main, capsys, tmp_path):
    import onnx

    torch.manual_seed(5)
    ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).eval()
    torch.save(ref.state_dict(), tmp_path / "nn.pt")
    assert main(["convert", str(tmp_path / "nn.pt"), str(tmp_path / "m.onnx"), "--opset", "14", "--batch-first",
                 "--onnx-initial-states", "--onnx-sequence-lens"]) == 0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.opset_import[0].version == 14
    assert [i.name for i in proto.graph.input] == ["X", "sequence_lens", "initial_h", "initial_c"]
    x = torch.randn(3, 5, 3)  # batch-first
    lengths = torch.tensor([5, 2, 4])
    h0, c0 = torch.randn(4, 3, 4), torch.randn(4, 3, 4)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"X": x.numpy(), "sequence_lens": lengths.int().numpy(), "initial_h": h0.numpy(),
                          "initial_c": c0.numpy()})
    with torch.no_grad():  # torch.nn.LSTM itself, time-major, packed
        y, (h, c) = ref(pack_padded_sequence(x.transpose(0, 1), lengths, enforce_sorted=False), (h0, c0))
    y, _ = pad_packed_sequence(y, total_length=5)
    for a, b in zip(got, (y.transpose(0, 1), h, c)):
        _close(a, b.numpy(), "onnx options")
    _fails(main, capsys, [tmp_path / "nn.pt", tmp_path / "n.onnx", "--opset", "3"], "opset: expected an int in [14,")
    _fails(main, capsys, [tmp_path / "nn.pt", tmp_path / "n.onnx", "--opset", "0"], "opset: expected an int in [14,")


@pytest.mark.parametrize("layer", [lstmkit.LSTM(3, 4, cell="gate_act=hard_sigmoid+cand_act=relu"),
                                   lstmkit.RNN(3, 4, nonlinearity="relu")], ids=["hard_relu", "rnn_relu"])
def test_a_pt_of_a_variant_warns_that_it_reads_back_only_with_cell(layer, tmp_path):
    """Keys and shapes of a vanilla layer, other equations: read back alone, the .pt is taken for
    the vanilla LSTM (tanh RNN) and computes something else — silently, before this warning; with
    the cell the warning names, it reads back as written. Vanilla and init-only words: no warning."""
    name = layer.spec.name
    with pytest.warns(UserWarning, match=rf"does not record the variant '{re.escape(name)}'; read it back with "
                                         rf"--cell {re.escape(name)}"):
        write_layer(layer, tmp_path / "v.pt")
    assert read_layer(tmp_path / "v.pt").spec != layer.spec  # (what the warning is about)
    back = read_layer(tmp_path / "v.pt", cell=name)
    x = torch.randn(5, 2, 3)
    _close(_run(back, x)[0], _run(layer.eval(), x)[0], name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_layer(lstmkit.LSTM(3, 4, cell="fb=1"), tmp_path / "plain.pt")
        write_layer(lstmkit.RNN(3, 4), tmp_path / "rnn.pt")


def test_variants_travel_in_safetensors_and_need_cell_in_pt(main, capsys, tmp_path):
    torch.manual_seed(2)
    layer = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, cell="peephole+cifg").eval()
    write_layer(layer, tmp_path / "a.safetensors")
    x = torch.randn(2, 6, 3)  # batch-first
    want = _run(layer, x)
    # .safetensors -> .onnx keeps the variant and the layout; onnxruntime agrees.
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "a.onnx")]) == 0
    for a, b in zip(_ort(tmp_path / "a.onnx", x), want):
        _close(a, b, "peephole+cifg onnx")
    # .pt is a bare state dict: reading it back needs the variant.
    assert main(["convert", str(tmp_path / "a.onnx"), str(tmp_path / "a.pt")]) == 0
    assert "warning: DST" in capsys.readouterr().err  # a .pt does not record the variant (needs --cell)
    _fails(main, capsys, [tmp_path / "a.pt", tmp_path / "b.safetensors"],
           "holds parameters of an lstmkit variant (['peephole_i', 'peephole_o']); a state dict does not say which "
           "variant: pass --cell NAME")
    _fails(main, capsys, [tmp_path / "a.pt", tmp_path / "b.safetensors", "--cell", "peephole"],
           "do not match lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, cell='peephole'): missing ['peephole_f_l0'")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors"), "--cell", "peephole+cifg",
                 "--batch-first"]) == 0
    back = read_layer(tmp_path / "b.safetensors")
    assert back.spec.name == "peephole+cifg" and back.batch_first
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # A file that records its variant refuses a contradicting --cell.
    _fails(main, capsys, [tmp_path / "a.safetensors", tmp_path / "c.pt", "--cell", "vanilla"],
           "--cell: SRC")


def test_every_variant_fits_pt_safetensors_and_onnx_but_not_keras(main, capsys, tmp_path):
    torch.manual_seed(3)
    layer = lstmkit.LSTM(3, 4, num_layers=2, cell="fgr+peephole+nog+clip=0.4", proj_size=2).eval()
    x = torch.randn(5, 2, 3)
    want = _run(layer, x)
    write_layer(layer, tmp_path / "v.safetensors")
    before = _snapshot(tmp_path)
    _fails(main, capsys, [tmp_path / "v.safetensors", tmp_path / "v.onnx", "--onnx-method", "operator"],
           "DST: onnx: the LSTM operator has no projection, so proj_size=2 (h_t = W_hr (o ⊙ tanh c_t)) cannot be "
           "written with it; --onnx-method scan (or auto) writes the cell's equations as a Scan graph instead")
    _fails(main, capsys, [tmp_path / "v.safetensors", tmp_path / "v.keras"],
           "DST: keras.layers.LSTM cannot carry")
    _fails(main, capsys, [tmp_path / "v.safetensors", tmp_path / "v.weights.h5"], "computes the vanilla LSTM")
    assert _snapshot(tmp_path) == before  # nothing written, no temporary left
    # The default ONNX method writes the cell's equations as a Scan graph; onnxruntime runs it.
    assert main(["convert", str(tmp_path / "v.safetensors"), str(tmp_path / "v.onnx")]) == 0
    for a, b in zip(_ort(tmp_path / "v.onnx", x), want):
        _close(a, b, "fgr+peephole+nog+clip with projection, onnxruntime")
    assert main(["convert", str(tmp_path / "v.onnx"), str(tmp_path / "v.pt")]) == 0
    assert main(["convert", str(tmp_path / "v.pt"), str(tmp_path / "v2.safetensors"), "--cell",
                 "fgr+peephole+nog+clip=0.4"]) == 0
    back = read_layer(tmp_path / "v2.safetensors")
    assert back.spec == layer.spec
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    for a, b in zip(_run(back, x), want):
        _close(a, b, "variant via .onnx and .pt")


def test_keras_files_both_ways(main, capsys, tmp_path):
    import keras

    torch.manual_seed(4)
    ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True).eval()
    torch.save(ref.state_dict(), tmp_path / "nn.pt")
    x = torch.randn(2, 6, 3)
    want = _run(ref, x)[0]
    assert main(["convert", str(tmp_path / "nn.pt"), str(tmp_path / "m.keras")]) == 0
    assert main(["convert", str(tmp_path / "nn.pt"), str(tmp_path / "m.weights.h5")]) == 0
    # Keras itself runs what was written.
    model = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    _close(keras.ops.convert_to_numpy(model(x.numpy())), want, "keras model")
    # .weights.h5 alone: the architecture is read from the file's layer structure.
    assert main(["convert", str(tmp_path / "m.weights.h5"), str(tmp_path / "w.onnx")]) == 0
    assert main(["convert", str(tmp_path / "m.keras"), str(tmp_path / "k.safetensors")]) == 0
    assert "batch_first=True" in capsys.readouterr().out  # Keras is batch-first
    _close(_ort(tmp_path / "w.onnx", x)[0], want, ".weights.h5 -> onnx")
    _close(_run(read_layer(tmp_path / "k.safetensors"), x)[0], want, ".keras -> safetensors")
    # Keras' single bias arrives as bias_ih with bias_hh = 0: outputs equal, not the split.
    layer = read_layer(tmp_path / "k.safetensors")
    torch.testing.assert_close(layer.bias_ih_l1 + layer.bias_hh_l1, ref.bias_ih_l1 + ref.bias_hh_l1)
    # A weights file of a model with other layers is refused by name.
    other = keras.Sequential([keras.Input((None, 3)), keras.layers.LSTM(4, return_sequences=True),
                              keras.layers.Dense(2)])
    other.save_weights(tmp_path / "dense.weights.h5")
    _fails(main, capsys, [tmp_path / "dense.weights.h5", tmp_path / "d.pt"],
           "expected only LSTM layers or only Bidirectional(LSTM) layers")
    rnn = lstmkit.RNN(3, 4)
    write_layer(rnn, tmp_path / "rnn.safetensors")
    _fails(main, capsys, [tmp_path / "rnn.safetensors", tmp_path / "rnn.keras"], "the plain RNN cannot be carried")


def test_keras_settings_no_lstmkit_file_records(main, capsys, tmp_path):
    """go_backwards is refused (the converted file would compute something else); a .weights.h5
    file cannot say its activations, so the conversion says what it assumed."""
    import keras

    keras.utils.set_random_seed(3)
    gb = keras.Sequential([keras.Input((None, 3)), keras.layers.LSTM(4, return_sequences=True, go_backwards=True)])
    gb.save(tmp_path / "gb.keras")
    before = _snapshot(tmp_path)
    _fails(main, capsys, [tmp_path / "gb.keras", tmp_path / "gb.safetensors"],
           "has go_backwards=True (it reads its input reversed); an lstmkit layer does not record that")
    assert _snapshot(tmp_path) == before
    hard = keras.Sequential([keras.Input((None, 3)), keras.layers.LSTM(4, recurrent_activation="hard_sigmoid")])
    hard.save(tmp_path / "hard.keras")
    hard.save_weights(tmp_path / "hard.weights.h5")
    assert main(["convert", str(tmp_path / "hard.keras"), str(tmp_path / "h.safetensors")]) == 0  # recorded
    assert read_layer(tmp_path / "h.safetensors").spec.gate_activation == "hardsigmoid"
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "hard.weights.h5"), str(tmp_path / "h.pt")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lstmkit convert: warning: "), err
    assert "read as the standard Keras LSTM (sigmoid gates, tanh, go_backwards=False)" in err
    assert "hard_sigmoid" in err and "convert its .keras file instead" in err
    # Nor can one be written with them: read back, it would be taken for the standard LSTM.
    before = _snapshot(tmp_path)
    _fails(main, capsys, [tmp_path / "hard.keras", tmp_path / "again.weights.h5"],
           "DST: a .weights.h5 file holds weights only, not the variant 'gate_act=hardsigmoid' (its activations); "
           "write a .keras file, which records them")
    assert _snapshot(tmp_path) == before


def test_training_run_model_safetensors(main, capsys, tmp_path):
    from lstmkit.app.train import TrainConfig, train

    cfg = TrainConfig(task="adding", task_options={"length": 24}, hidden_size=6, num_layers=2, bidirectional=True,
                      cell="peephole", batch_size=4, steps=2, eval_every=2, threads=1, stop_at_target=False,
                      eval_batch_size=64)
    train(cfg, tmp_path / "run", progress=False)
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "run" / "model.safetensors"), str(tmp_path / "rnn.onnx")]) == 0
    err = capsys.readouterr().err  # the warning, as one line
    assert err.startswith("lstmkit convert: warning: ") and err.count("\n") == 1 and "head.*) is dropped" in err
    layer = read_layer(tmp_path / "rnn.onnx")
    assert layer.spec.name == "peephole" and layer.num_layers == 2 and layer.bidirectional
    for k, v in layer.state_dict().items():
        assert torch.equal(v, weights[f"rnn.{k}"]), k
    x = torch.randn(7, 3, layer.input_size)
    for a, b in zip(_ort(tmp_path / "rnn.onnx", x), _run(layer, x)):
        _close(a, b, "trained peephole via onnxruntime")
    with pytest.warns(UserWarning, match="dropped"):  # the resumable checkpoint holds the same rnn
        convert_file(tmp_path / "run" / "checkpoint.safetensors", tmp_path / "ck.pt")
    assert all(torch.equal(v, weights[f"rnn.{k}"]) for k, v in torch.load(tmp_path / "ck.pt").items())


@pytest.mark.parametrize("model", ["rnn", "rnn_relu"])
def test_a_plain_rnn_runs_files_read_as_its_rnn(model, tmp_path):
    """A run of --model rnn_relu reads back as the ReLU RNN (it was refused: 'kind' rnn_relu)."""
    from lstmkit.app.train import TrainConfig, train

    cfg = TrainConfig(task="adding", task_options={"length": 24}, model=model, hidden_size=5, batch_size=4, steps=2,
                      eval_every=2, threads=1, eval_batch_size=64)
    train(cfg, tmp_path / "run", progress=False)
    for name in ("model.safetensors", "checkpoint.safetensors"):
        with pytest.warns(UserWarning, match="dropped"):
            layer = read_layer(tmp_path / "run" / name)
        assert layer.spec == lstmkit.resolve(model), name


def test_a_runs_own_files_are_not_a_destination(main, capsys, tmp_path):
    """convert writes no file of a training run's directory: the run's model.safetensors (its
    read-out head too) was replaced by a layer file converted from its checkpoint."""
    from lstmkit.app.train import TrainConfig, train

    cfg = TrainConfig(task="adding", task_options={"length": 24}, hidden_size=4, batch_size=4, steps=2, eval_every=2,
                      threads=1, eval_batch_size=64)
    train(cfg, tmp_path / "run", progress=False)
    before = _snapshot(tmp_path / "run")
    for name in ("model.safetensors", "checkpoint.safetensors"):
        _fails(main, capsys, [tmp_path / "run" / "checkpoint.safetensors", tmp_path / "run" / name, "--overwrite"],
               "names a file of the training run in")
    assert _snapshot(tmp_path / "run") == before
    assert main(["convert", str(tmp_path / "run" / "checkpoint.safetensors"), str(tmp_path / "run" / "layer.pt")]) == 0
    # another tool's config.json beside a model.safetensors is no run
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["BertModel"]}')
    assert main(["convert", str(tmp_path / "run" / "layer.pt"), str(tmp_path / "hf" / "model.safetensors")]) == 0


@pytest.mark.parametrize("dst, flag, says", [
    ("m.keras", "--no-batch-first", "Keras layers are batch-first"),
    ("m.weights.h5", "--no-batch-first", "Keras layers are batch-first"),
    ("m.pt", "--batch-first", "records no layout"),
    ("m.pth", "--no-batch-first", "records no layout"),
])
def test_a_layout_dst_cannot_record_is_refused(main, capsys, tmp_path, dst, flag, says):
    torch.save(torch.nn.LSTM(3, 4).state_dict(), tmp_path / "nn.pt")
    before = _snapshot(tmp_path)
    _fails(main, capsys, [tmp_path / "nn.pt", tmp_path / dst, flag], says)
    assert _snapshot(tmp_path) == before
    # what the destination holds anyway is accepted
    if dst.endswith((".keras", ".h5")):
        assert main(["convert", str(tmp_path / "nn.pt"), str(tmp_path / dst), "--batch-first"]) == 0


@pytest.mark.parametrize("dst, flags, says", [
    ("m.safetensors", ["--opset", "5"], "opset / --opset apply to an .onnx DST only"),
    ("m.safetensors", ["--opset", "0"], "opset / --opset apply to an .onnx DST only"),
    ("m.keras", ["--onnx-initial-states", "--onnx-method", "scan"],
     "initial_states / --onnx-initial-states, method / --onnx-method apply to an .onnx DST only"),
    ("m.pt", ["--onnx-sequence-lens"], "sequence_lens / --onnx-sequence-lens apply to an .onnx DST only"),
])
def test_onnx_options_for_another_format_are_refused(main, capsys, tmp_path, dst, flags, says):
    """They were dropped without a word, out-of-range values too (found by a CLI sweep)."""
    torch.save(torch.nn.LSTM(3, 4).state_dict(), tmp_path / "nn.pt")
    before = _snapshot(tmp_path)
    _fails(main, capsys, [tmp_path / "nn.pt", tmp_path / dst, *flags], says)
    assert _snapshot(tmp_path) == before


def test_existing_destination_is_refused_unless_overwrite(main, capsys, tmp_path):
    torch.save(torch.nn.LSTM(3, 4).state_dict(), tmp_path / "a.pt")
    (tmp_path / "out.onnx").write_bytes(b"keep me")
    before = _snapshot(tmp_path)
    _fails(main, capsys, [tmp_path / "a.pt", tmp_path / "out.onnx"], "exists; pass --overwrite")
    assert _snapshot(tmp_path) == before
    assert main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "out.onnx"), "--overwrite"]) == 0
    assert (tmp_path / "out.onnx").read_bytes() != b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "out.onnx"]
    with pytest.raises(FileExistsError):
        convert_file(tmp_path / "a.pt", tmp_path / "out.onnx")
    # a file onto itself (by its name, or another name of it) is refused even with --overwrite: a run's
    # model.safetensors lost its read-out head that way
    (tmp_path / "again.pt").symlink_to(tmp_path / "a.pt")
    before = _snapshot(tmp_path)
    for dst in ("a.pt", "again.pt", "./a.pt"):
        _fails(main, capsys, [tmp_path / "a.pt", tmp_path / dst, "--overwrite"], "is SRC itself")
    assert _snapshot(tmp_path) == before


def test_unreadable_sources_fail_cleanly(main, capsys, tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a zip")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "corrupt.onnx").write_bytes(b"\xff\xfe\xfd garbage" * 7)
    (tmp_path / "corrupt.keras").write_bytes(b"not a zip")
    (tmp_path / "corrupt.weights.h5").write_bytes(b"not hdf5")
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "foreign.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "meta.safetensors"), metadata={"format": "pt"})
    torch.save({"weight_ih_l0": torch.zeros(12, 3), "weight_hh_l0": torch.zeros(12, 4)}, tmp_path / "gru.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"a.weight_ih_l0": torch.zeros(16, 3), "b.weight_ih_l0": torch.zeros(16, 3)}, tmp_path / "two.pt")
    (tmp_path / "model.txt").write_text("hello")
    layer_tensors = lstmkit.LSTM(3, 4).state_dict()
    huge = {"kind": "lstm", "input_size": 3, "hidden_size": 10**6, "num_layers": 1, "bias": True,
            "batch_first": False, "bidirectional": False, "cell": "vanilla"}
    save_file(layer_tensors, str(tmp_path / "huge.safetensors"),
              metadata={"format": "lstmkit-layer-1", "config": json.dumps(huge)})
    save_file(layer_tensors, str(tmp_path / "damaged.safetensors"),
              metadata={"format": "lstmkit-layer-1", "config": "{not json"})
    before = _snapshot(tmp_path)
    out = tmp_path / "out.safetensors"
    _fails(main, capsys, [tmp_path / "missing.pt", out], "SRC: no file at")
    _fails(main, capsys, [tmp_path / "model.txt", out], "SRC: unknown extension of 'model.txt'")
    _fails(main, capsys, [tmp_path / "corrupt.pt", tmp_path / "out.txt"], "DST: unknown extension of 'out.txt'")
    _fails(main, capsys, [tmp_path / "corrupt.pt", out], "not a torch state dict readable with weights_only=True")
    _fails(main, capsys, [tmp_path / "corrupt.safetensors", out], "not a readable safetensors file")
    _fails(main, capsys, [tmp_path / "corrupt.onnx", tmp_path / "out.pt"], "corrupt.onnx: not a readable ONNX model")
    _fails(main, capsys, [tmp_path / "corrupt.keras", out], "corrupt.keras: not a .keras model")
    _fails(main, capsys, [tmp_path / "corrupt.weights.h5", out], "not a readable Keras 3 .weights.h5 file")
    _fails(main, capsys, [tmp_path / "foreign.safetensors", out], "no 'weight_ih_l0' tensor: expected the state dict")
    _fails(main, capsys, [tmp_path / "meta.safetensors", out], "metadata format 'pt' is not one lstmkit reads")
    _fails(main, capsys, [tmp_path / "gru.pt", out], "weight_ih_l0 has 12 rows and weight_hh_l0 4 columns, which is no vanilla LSTM")
    _fails(main, capsys, [tmp_path / "list.pt", out], "holds a list, expected a state dict")
    _fails(main, capsys, [tmp_path / "two.pt", out], "holds 2 recurrent layers")
    _fails(main, capsys, [tmp_path / "huge.safetensors", out],
           "weight_ih_l0: expected shape (4000000, 3) for lstmkit.LSTM(3, 1000000), got (16, 3)")
    _fails(main, capsys, [tmp_path / "damaged.safetensors", out], "damaged metadata (no readable 'config'")
    assert _snapshot(tmp_path) == before  # no output, no temporary, inputs untouched


def test_unwritable_destination_leaves_nothing(main, capsys, tmp_path):
    torch.save(torch.nn.LSTM(3, 4).state_dict(), tmp_path / "a.pt")
    _fails(main, capsys, [tmp_path / "a.pt", tmp_path / "nodir" / "x.onnx"], "DST: directory")
    (tmp_path / "adir.onnx").mkdir()
    _fails(main, capsys, [tmp_path / "a.pt", tmp_path / "adir.onnx", "--overwrite"], "adir.onnx' is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "adir.onnx"]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _fails(main, capsys, [tmp_path / "a.pt", locked / "x.onnx"], "DST: cannot write")
        assert list(locked.iterdir()) == []


def test_failure_while_writing_removes_the_temporary(tmp_path, monkeypatch):
    torch.save(torch.nn.LSTM(3, 4).state_dict(), tmp_path / "a.pt")
    (tmp_path / "out.safetensors").write_bytes(b"old")

    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):  # the disk fills up half way through the write
        fh = real_open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name.startswith(".out.safetensors."):
            fh.write(b"partial")
            fh.close()
            raise OSError(28, "No space left on device")
        return fh

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match=r"DST: cannot write .*out.safetensors \(no space left on the device\); "
                                      r"nothing was changed"):
        convert_file(tmp_path / "a.pt", tmp_path / "out.safetensors", overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "out.safetensors"]
    assert (tmp_path / "out.safetensors").read_bytes() == b"old"


def test_pickle_bomb_is_refused_without_executing(main, capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight_ih_l0": Evil()}, tmp_path / "evil.pt")  # a real torch zip with a pickled payload
    (tmp_path / "raw.pth").write_bytes(pickle.dumps(Evil()))  # a bare pickle
    for name in ("evil.pt", "raw.pth"):
        _fails(main, capsys, [tmp_path / name, tmp_path / "out.safetensors"],
               f"{name}: holds Python objects other than tensors and containers, refused unread")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_installed_entry_point(tmp_path):
    """The console script, once, in a fresh process (its error path is main's, tested above)."""
    torch.save(torch.nn.LSTM(3, 4).state_dict(), tmp_path / "a.pt")
    exe = Path(sys.executable).with_name("lstmkit")
    ok = subprocess.run([str(exe), "convert", str(tmp_path / "a.pt"), str(tmp_path / "a.onnx")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "a.pt (torch) -> " in ok.stdout and (tmp_path / "a.onnx").is_file()
    assert isinstance(read_layer(tmp_path / "a.onnx"), lstmkit.LSTM)


@pytest.mark.parametrize("make, cell", [
    (lambda: lstmkit.RNN(3, 4, heads=2), "rnn+heads=2"),
    (lambda: lstmkit.RNN(3, 4, heads=2, nonlinearity="relu"), "rnn_relu+heads=2"),
    (lambda: lstmkit.LSTM(3, 4, cell="heads=2"), "heads=2"),
    (lambda: lstmkit.LSTM(3, 4, cell="slstm+heads=2"), "slstm+heads=2"),
    (lambda: lstmkit.LSTM(3, 4, cell="deep=4+heads=2"), "deep=4+heads=2"),
    (lambda: lstmkit.LSTM(3, 4, cell="heads=2", proj_size=2), "heads=2"),
], ids=["rnn", "rnn_relu", "lstm", "slstm", "deep", "projection"])
def test_layers_with_heads_read_back_from_every_format(make, cell, tmp_path):
    """Block-diagonal recurrent weights (H_out / heads columns) are read back from the files
    lstmkit writes: an RNN's heads were dropped (its files failed write_layer's own read-back),
    and a bare state dict's hidden size was taken from W_hh's columns (H / heads) even with
    --cell heads=k. The spec's name is what resolve reads back (an RNN's was 'rnn(tanh)')."""
    torch.manual_seed(0)
    layer = make()
    assert lstmkit.resolve(layer.spec.name) == layer.spec
    x = torch.randn(5, 2, 3)
    for ext in ("safetensors", "onnx", "pt"):
        write_layer(layer, tmp_path / f"m.{ext}")
        back = read_layer(tmp_path / f"m.{ext}", cell=cell) if ext == "pt" else read_layer(tmp_path / f"m.{ext}")
        assert back.spec == layer.spec, ext
        torch.testing.assert_close(back(x)[0], layer(x)[0], rtol=0, atol=0, msg=ext)
    if isinstance(layer, lstmkit.RNN):
        with pytest.raises(ValueError, match="torch.nn.RNN has no block-diagonal recurrence"):
            lstmkit.convert.to_torch(layer)
