"""Converters: exact round trips, and outputs proven equal by each framework's own equations."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune

import lstmkit
from lstmkit.convert import from_haste, from_tf1, from_torch, to_haste, to_tf1, to_torch


@pytest.mark.parametrize("num_layers,bidirectional,proj_size,bias,batch_first",
                         list(itertools.product([1, 2], [False, True], [0, 2], [True, False], [False, True])))
def test_torch_round_trip_every_flag(num_layers, bidirectional, proj_size, bias, batch_first):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size,
                        bias=bias, batch_first=batch_first).double()
    kit = from_torch(ref)
    back = to_torch(kit)
    assert type(back) is torch.nn.LSTM and back.batch_first == batch_first and back.proj_size == proj_size
    for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    if batch_first:
        x = x.detach().transpose(0, 1).contiguous().requires_grad_(True)
    ya, (ha, ca) = ref(x)
    yb, (hb, cb) = kit(x)
    for a, b in ((ya, yb), (ha, hb), (ca, cb)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad(ya.sum() + ca.sum(), [x, *ref.parameters()])
    gb = torch.autograd.grad(yb.sum() + cb.sum(), [x, *kit.parameters()])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_from_torch_reads_parametrized_weights():
    """A ``weight_norm``-ed nn.LSTM: its weight as it computes with it (it raised torch's raw
    "Error(s) in loading state_dict" on the parametrization's keys)."""
    ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).double()
    torch.nn.utils.parametrizations.weight_norm(ref, "weight_hh_l0")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(from_torch(ref)(x)[0], ref(x)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("how", ["weight_norm", "prune"])
def test_a_parametrized_or_pruned_layer_converts_and_writes_its_computed_weights(how, tmp_path):
    """A layer whose weight is parametrized (``weight_norm``) or pruned: ``to_torch`` and the weights
    files take each weight as the layer computes with it — to_torch raised torch's raw state-dict
    key error, and write_layer wrote files of the parametrization's keys that read_layer refused."""
    from lstmkit.convert.files import read_layer, write_layer

    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for layer in (lstmkit.LSTM(3, 4, num_layers=2).double(), lstmkit.LSTM(3, 4, cell="peephole").double()):
        if how == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(layer, "weight_hh_l0")
        else:
            prune.l1_unstructured(layer, "weight_hh_l0", amount=0.5)
        want = layer(x)[0]
        if layer.spec.is_vanilla:
            torch.testing.assert_close(to_torch(layer)(x)[0], want, rtol=1e-10, atol=1e-10)
        for name in ("a.safetensors", "a.pt"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a .pt of a variant: read back with cell=
                write_layer(layer, tmp_path / name, overwrite=True)
                back = read_layer(tmp_path / name, cell=layer.spec.name if name.endswith(".pt") else None)
            torch.testing.assert_close(back.double()(x)[0], want, rtol=1e-10, atol=1e-10)


def test_write_layer_refuses_onnx_options_for_another_format(tmp_path):
    """write_layer(layer, "x.pt", opset=13) dropped the ONNX option silently (convert_file and the
    command line refused it); nothing is written."""
    from lstmkit.convert.files import write_layer

    with pytest.raises(ValueError, match=r"DST: opset / --opset apply to an .onnx DST only, and x.pt is torch"):
        write_layer(lstmkit.LSTM(3, 4), tmp_path / "x.pt", opset=13)
    assert list(tmp_path.iterdir()) == []


def test_converters_refuse_what_is_not_a_layer_naming_the_argument():
    """``to_torch(None)`` / an LSTMCell raised AttributeError from the attributes read before the
    type check; ``read_layer(None)`` pathlib's TypeError, which named no argument."""
    from lstmkit.convert.files import read_layer

    for bad in (None, lstmkit.LSTMCell(3, 4)):
        with pytest.raises(TypeError, match="layer: expected an lstmkit LSTM or RNN"):
            to_torch(bad)
    with pytest.raises(TypeError, match="SRC: expected a file name"):
        read_layer(None)


@pytest.mark.parametrize("fmt", ["tf1", "haste"])
def test_array_importers_write_through_parametrizations_and_read_any_numpy_layout(fmt):
    """from_tf1 / from_haste copied into the tensor a parametrized weight computes (thrown away: the
    layer kept its old weight, 0.06 off, silently) and into a pruned weight (overwritten at the next
    call); arrays with negative strides or big-endian bytes were refused with torch's or a wrong
    message, a read-only array leaked torch's warning, a negative-view tensor was refused."""
    from torch.nn.utils.parametrizations import weight_norm

    load, save = {"tf1": (from_tf1, to_tf1), "haste": (from_haste, to_haste)}[fmt]
    torch.manual_seed(0)
    src, x = lstmkit.LSTM(3, 4, num_layers=2).double().eval(), torch.randn(5, 2, 3, dtype=torch.float64)
    dst = lstmkit.LSTM(3, 4, num_layers=2).double().eval()
    weight_norm(dst, "weight_hh_l1")
    for i in range(2):
        load(dst, **save(src, index=i), index=i)
    torch.testing.assert_close(dst(x)[0], src(x)[0], rtol=1e-10, atol=1e-10)
    pruned = lstmkit.LSTM(3, 4).double()
    prune.identity(pruned, "weight_hh_l0")
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    with pytest.raises(ValueError, match=r"weight_hh_l0 is not a parameter but a tensor computed before each call "
                                         r"by torch.nn.utils.prune"):
        load(pruned, **save(src))
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())  # nothing written
    arrays = save(src)
    for name, how in (("flipped", lambda a: np.flip(np.flip(a, 0).copy(), 0)), ("big-endian", lambda a: a.astype(">f8")),
                      ("read-only", lambda a: np.lib.stride_tricks.as_strided(a, writeable=False)),
                      ("negative view", lambda a: torch.from_numpy(-a)._neg_view())):
        layer = lstmkit.LSTM(3, 4).double().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (torch's "NumPy array is not writable" leaked)
            load(layer, **{k: how(v) for k, v in arrays.items()})
        torch.testing.assert_close(layer(x)[0], _first_layer(src)(x)[0], rtol=1e-10, atol=1e-10, msg=name)


def _first_layer(layer: lstmkit.LSTM) -> lstmkit.LSTM:
    """A one-layer LSTM holding ``layer``'s first layer."""
    one = lstmkit.LSTM(layer.input_size, layer.hidden_size).to(layer.weight_ih_l0.dtype).eval()
    one.load_state_dict({k: v for k, v in layer.state_dict().items() if k.endswith("_l0")})
    return one


def test_flashrnn_arrays_in_any_numpy_layout_and_meta_layers_refused_by_name(tmp_path):
    """from_flashrnn raised torch's errors on an array with negative strides or big-endian bytes;
    exporting a layer on the meta device raised torch's "Cannot copy out of meta tensor" (to_tf1,
    to_haste, write_layer) or returned meta tensors (to_flashrnn)."""
    from lstmkit.convert import from_flashrnn, to_flashrnn
    from lstmkit.convert.files import write_layer

    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, cell="heads=2").double().eval()
    f = {k: v.numpy() for k, v in to_flashrnn(layer).items() if k != "function"}
    x = torch.randn(2, 5, 3, dtype=torch.float64)  # (FlashRNN's layers are batch-first)
    want = layer(x.transpose(0, 1))[0].transpose(0, 1)
    for how in (lambda a: np.flip(np.flip(a, 0).copy(), 0), lambda a: a.astype(">f8")):
        back = from_flashrnn(how(f["R"]), how(f["b"]), how(f["W"])).eval()
        torch.testing.assert_close(back(x)[0], want, rtol=1e-10, atol=1e-10)
    meta = lstmkit.LSTM(3, 4, device="meta")
    for export in (to_tf1, to_haste, to_flashrnn, lambda m: write_layer(m, tmp_path / "m.safetensors")):
        with pytest.raises(ValueError, match="layer: the layer's parameters are on the meta device"):
            export(meta)
    assert list(tmp_path.iterdir()) == []


def test_torch_rnn_round_trip_and_refusals():
    ref = torch.nn.RNN(3, 4, num_layers=2, nonlinearity="relu").double()
    kit = from_torch(ref)
    assert isinstance(kit, lstmkit.RNN) and kit.nonlinearity == "relu"
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(kit(x)[0], ref(x)[0], rtol=1e-10, atol=1e-10)
    assert type(to_torch(kit)) is torch.nn.RNN
    with pytest.raises(ValueError, match=r"torch.nn.LSTM computes only the vanilla cell; this layer is 'peephole'"):
        to_torch(lstmkit.LSTM(3, 4, cell="peephole"))
    to_torch(lstmkit.LSTM(3, 4, cell="vanilla+fb=1"))  # an initial forget bias is still vanilla
    with pytest.raises(TypeError, match="expected torch.nn.LSTM or torch.nn.RNN, got GRU"):
        from_torch(torch.nn.GRU(3, 4))


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def tf1_lstm(x, kernel, bias, forget_bias, h, c):
    """TF1 LSTMCell / LSTMBlockCell, written from TF1's conventions (gate order i, j, f, o)."""
    ys = []
    for x_t in x:
        z = np.concatenate([x_t, h], axis=1) @ kernel + bias
        i, j, f, o = np.split(z, 4, axis=1)
        c = _sigmoid(f + forget_bias) * c + _sigmoid(i) * np.tanh(j)
        h = _sigmoid(o) * np.tanh(c)
        ys.append(h)
    return np.stack(ys), h, c


def haste_lstm(x, kernel, recurrent_kernel, bias, h, c):
    """haste's LSTM (gate order i, g, f, o; kernel over x, recurrent_kernel over h)."""
    ys = []
    for x_t in x:
        z = x_t @ kernel + h @ recurrent_kernel + bias
        i, g, f, o = np.split(z, 4, axis=1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        ys.append(h)
    return np.stack(ys), h, c


@pytest.mark.parametrize("forget_bias", [1.0, 0.0])
def test_tf1_layout_proven_by_tf1_equations(forget_bias):
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 5, num_layers=2).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    y, (h_n, c_n) = layer(x)
    arrays0 = to_tf1(layer, 0, forget_bias=forget_bias)
    arrays1 = to_tf1(layer, 1, forget_bias=forget_bias)
    assert arrays0["kernel"].shape == (3 + 5, 20) and arrays1["kernel"].shape == (5 + 5, 20)
    zeros = np.zeros((2, 5))
    y0, h0, c0 = tf1_lstm(x.numpy(), arrays0["kernel"], arrays0["bias"], forget_bias, zeros, zeros)
    y1, h1, c1 = tf1_lstm(y0, arrays1["kernel"], arrays1["bias"], forget_bias, zeros, zeros)
    np.testing.assert_allclose(y1, y.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c0, c_n[0].detach().numpy(), rtol=1e-10, atol=1e-12)
    # Back into a fresh layer: same outputs.
    other = lstmkit.LSTM(3, 5, num_layers=2).double()
    from_tf1(other, **arrays0, index=0, forget_bias=forget_bias)
    from_tf1(other, **arrays1, index=1, forget_bias=forget_bias)
    torch.testing.assert_close(other(x)[0], y, rtol=1e-12, atol=1e-12)


def test_haste_layout_proven_by_haste_equations():
    torch.manual_seed(1)
    layer = lstmkit.LSTM(3, 4, bidirectional=True).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y, _ = layer(x)
    zeros = np.zeros((2, 4))
    fwd = to_haste(layer, 0, 0)
    y_f, _, _ = haste_lstm(x.numpy(), **fwd, h=zeros, c=zeros)
    bwd = to_haste(layer, 0, 1)
    y_b, _, _ = haste_lstm(x.numpy()[::-1], **bwd, h=zeros, c=zeros)
    np.testing.assert_allclose(np.concatenate([y_f, y_b[::-1]], axis=2), y.detach().numpy(), rtol=1e-10, atol=1e-12)
    other = lstmkit.LSTM(3, 4, bidirectional=True).double()
    from_haste(other, **fwd, index=0, direction=0)
    from_haste(other, **bwd, index=0, direction=1)
    torch.testing.assert_close(other(x)[0], y, rtol=1e-12, atol=1e-12)


def test_tf_converters_refuse_what_the_format_cannot_carry():
    with pytest.raises(ValueError, match=r"the TF1 layout computes only the vanilla LSTM without projection; this layer is .peephole."):
        to_tf1(lstmkit.LSTM(3, 4, cell="peephole"))
    with pytest.raises(ValueError, match=r"haste layout .* .vanilla with proj_size=2."):
        to_haste(lstmkit.LSTM(3, 4, proj_size=2))
    layer = lstmkit.LSTM(3, 4)
    with pytest.raises(ValueError, match=r"kernel: expected shape \(7, 16\), got \(6, 16\)"):
        from_tf1(layer, np.zeros((6, 16)), np.zeros(16))
    with pytest.raises(ValueError, match=r"recurrent_kernel: expected shape \(4, 16\)"):
        from_haste(layer, np.zeros((3, 16)), np.zeros((5, 16)), np.zeros(16))
    with pytest.raises(ValueError, match="non-zero bias but the layer has bias=False"):
        from_haste(lstmkit.LSTM(3, 4, bias=False), np.zeros((3, 16)), np.zeros((4, 16)), np.ones(16))


def test_is_vanilla_ignores_only_the_initial_forget_bias():
    from lstmkit.spec import resolve

    assert resolve("vanilla").is_vanilla and resolve("vanilla+fb=1").is_vanilla
    assert resolve("ib=-3+ob=-1").is_vanilla and resolve("chrono=100").is_vanilla
    for cell in ("peephole", "cifg", "layernorm", "clip=3", "nfg", "rnn"):
        assert not resolve(cell).is_vanilla, cell


# ------------------------------------------------- issue 19: arrays checked as torch checks them


def _tf1_arrays(I=3, H=4, dtype=np.float32):
    rng = np.random.default_rng(0)
    return {"kernel": rng.standard_normal((I + H, 4 * H)).astype(dtype),
            "bias": rng.standard_normal(4 * H).astype(dtype)}


def _haste_arrays(I=3, H=4, dtype=np.float32):
    rng = np.random.default_rng(1)
    return {"kernel": rng.standard_normal((I, 4 * H)).astype(dtype),
            "recurrent_kernel": rng.standard_normal((H, 4 * H)).astype(dtype),
            "bias": rng.standard_normal(4 * H).astype(dtype)}


def _unchanged(layer, before):
    return all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


LOADERS = {"tf1": (from_tf1, _tf1_arrays), "haste": (from_haste, _haste_arrays)}


@pytest.mark.parametrize("fmt", list(LOADERS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nan_or_inf_array_is_refused_naming_it(fmt, bad):
    load, make = LOADERS[fmt]
    for name in make():
        layer = lstmkit.LSTM(3, 4)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        arrays = make()
        arrays[name].flat[5] = bad
        with pytest.raises(ValueError, match=rf"^{name}: contains NaN or inf \(1 of \d+ values, first at \("):
            load(layer, **arrays)
        assert _unchanged(layer, before), f"{fmt}/{name}: the layer was changed before the refusal"


@pytest.mark.parametrize("fmt", list(LOADERS))
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, object, np.complex64])
def test_a_non_floating_array_is_refused_not_cast(fmt, dtype):
    load, make = LOADERS[fmt]
    for name in make():
        layer = lstmkit.LSTM(3, 4)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        arrays = make()
        arrays[name] = np.ones(arrays[name].shape, dtype=dtype)
        with pytest.raises(TypeError, match=rf"^{name}: expected a floating array \(float16, float32 or float64\), "
                                            rf"got {np.dtype(dtype)}"):
            load(layer, **arrays)
        assert _unchanged(layer, before)


def test_a_list_or_a_tensor_that_requires_grad_is_refused():
    layer = lstmkit.LSTM(3, 4)
    arrays = _tf1_arrays()
    with pytest.raises(TypeError, match=r"^kernel: expected a floating array .* got int64"):
        from_tf1(layer, [[1] * 16] * 7, arrays["bias"])
    with pytest.raises(TypeError, match=r"^bias: expected a NumPy array, got Tensor"):
        from_tf1(layer, arrays["kernel"], torch.zeros(16, requires_grad=True))
    from_tf1(layer, torch.from_numpy(arrays["kernel"]), arrays["bias"])  # a plain CPU tensor reads as an array


@pytest.mark.parametrize("fmt", list(LOADERS))
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_float64_arrays_are_converted(fmt, dtype):
    load, make = LOADERS[fmt]
    arrays = {k: v.astype(dtype) for k, v in make().items()}
    got, want = lstmkit.LSTM(3, 4), lstmkit.LSTM(3, 4)
    load(got, **arrays)
    load(want, **{k: v.astype(np.float32) for k, v in arrays.items()})
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


def test_a_value_beyond_the_layer_dtype_is_refused():
    arrays = _tf1_arrays(dtype=np.float64)
    arrays["kernel"][0, 0] = 1e300  # finite in float64, inf in the float32 layer
    layer = lstmkit.LSTM(3, 4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"^kernel: values beyond the range of the layer's float32 \(largest "
                                         r"magnitude 1e\+300\) would be stored as inf"):
        from_tf1(layer, **arrays)
    assert _unchanged(layer, before)
    from_tf1(layer.double(), **arrays)  # a float64 layer holds it


def test_a_bias_for_a_layer_without_bias_leaves_the_layer_untouched():
    layer = lstmkit.LSTM(3, 4, bias=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="non-zero bias but the layer has bias=False"):
        from_haste(layer, **_haste_arrays())
    assert _unchanged(layer, before)


def test_a_layer_without_bias_takes_tf1_arrays_only_with_forget_bias_0():
    """All-zero TF1 arrays into a bias-free layer: the cell's run-time forget_bias (1.0 unless
    given) is what the layer cannot hold, and the message says so (it blamed the arrays' bias)."""
    layer = lstmkit.LSTM(3, 5, bias=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"forget_bias: the TF1 cell adds forget_bias=1.0 .* bias=False cannot"):
        from_tf1(layer, np.zeros((8, 20)), np.zeros(20))
    assert _unchanged(layer, before)
    from_tf1(layer, np.ones((8, 20)), np.zeros(20), forget_bias=0.0)
    assert bool((layer.weight_ih_l0 == 1).all())


def test_a_bfloat16_layer_exports_float32_arrays():
    """NumPy has no bfloat16: to_tf1 / to_haste raised torch's "unsupported ScalarType BFloat16";
    the arrays are float32 now, every value as in the layer."""
    layer = lstmkit.LSTM(3, 4, dtype=torch.bfloat16)
    tf1, haste = to_tf1(layer, forget_bias=0.0), to_haste(layer)
    assert {a.dtype for a in (*tf1.values(), *haste.values())} == {np.dtype(np.float32)}
    assert set(np.abs(haste["kernel"]).ravel()) <= set(layer.weight_ih_l0.abs().float().flatten().tolist())


def test_scalar_arguments_are_checked_naming_themselves():
    arrays = _tf1_arrays()
    layer = lstmkit.LSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match=r"^forget_bias: expected a finite float, got nan"):
        from_tf1(layer, **arrays, forget_bias=float("nan"))
    with pytest.raises(TypeError, match=r"^forget_bias: expected a float, got str"):
        to_tf1(layer, forget_bias="1")
    with pytest.raises(TypeError, match=r"^forget_bias: expected a float, got bool"):
        from_tf1(layer, **arrays, forget_bias=True)
    with pytest.raises(TypeError, match=r"^index: expected an int, got bool"):
        from_haste(layer, **_haste_arrays(), index=True)
    with pytest.raises(ValueError, match=r"^index: expected an int in \[0, 1\], got 2"):
        to_haste(layer, index=2)
    with pytest.raises(ValueError, match=r"^direction: expected an int in \[0, 0\], got 1"):
        to_tf1(layer, direction=1)
    from_tf1(layer, **arrays, forget_bias=0)  # an int is a real number
