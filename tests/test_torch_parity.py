"""A vanilla lstmkit layer is a drop-in for torch.nn.LSTM / nn.RNN: same state_dict,
same outputs, states and gradients of every parameter, input and initial state."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from conftest import assert_close

I, H, T, B = 4, 5, 6, 3

COMBOS = list(itertools.product(
    [1, 2, 3],                      # num_layers
    [False, True],                  # bidirectional
    [False, True],                  # batch_first
    [True, False],                  # bias
    [0, 2],                         # proj_size
    ["batched", "unbatched", "packed"],
))


def _pair(cls_torch, cls_kit, dtype, **kw):
    torch.manual_seed(0)
    ref = cls_torch(I, H, **kw).to(dtype)
    kit = cls_kit(I, H, **kw).to(dtype)
    missing, unexpected = kit.load_state_dict(ref.state_dict())  # strict: raises on mismatch
    assert not missing and not unexpected
    assert [n for n, _ in kit.named_parameters()] == [n for n, _ in ref.named_parameters()]
    return ref, kit


def _inputs(mode, dtype, batch_first, lead, h_out, lstm=True):
    g = torch.Generator().manual_seed(1)
    if mode == "unbatched":
        x = torch.randn(T, I, dtype=dtype, generator=g)
        hx = [torch.randn(lead, h_out, dtype=dtype, generator=g)]
        if lstm:
            hx.append(torch.randn(lead, H, dtype=dtype, generator=g))
    else:
        x = torch.randn(T, B, I, dtype=dtype, generator=g)
        if batch_first and mode == "batched":
            x = x.transpose(0, 1).contiguous()
        hx = [torch.randn(lead, B, h_out, dtype=dtype, generator=g)]
        if lstm:
            hx.append(torch.randn(lead, B, H, dtype=dtype, generator=g))
    x.requires_grad_(True)
    for h in hx:
        h.requires_grad_(True)
    return x, hx


def _run(module, x, hx, mode, lstm=True):
    inp = x
    if mode == "packed":
        lengths = torch.tensor([3, T, 1])  # unsorted, one full length
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)  # time-major x; packs ignore batch_first
    state = (hx[0], hx[1]) if lstm else hx[0]
    out, st = module(inp, state)
    if mode == "packed":
        out = out.data
    return out, (st if lstm else (st,))


def _grads(module, x, hx, out, states):
    g = torch.Generator().manual_seed(2)
    loss = (out * torch.randn(out.shape, dtype=out.dtype, generator=g)).sum()
    for s in states:
        loss = loss + (s * torch.randn(s.shape, dtype=s.dtype, generator=g)).sum()
    params = list(module.parameters())
    return torch.autograd.grad(loss, [x, *hx, *params])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias,proj_size,mode", COMBOS)
def test_lstm_matches_torch(num_layers, bidirectional, batch_first, bias, proj_size, mode, dtype):
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
              bias=bias, proj_size=proj_size)
    ref, kit = _pair(torch.nn.LSTM, lstmkit.LSTM, dtype, **kw)
    D = 2 if bidirectional else 1
    x, hx = _inputs(mode, dtype, batch_first, D * num_layers, proj_size or H)
    out_r, st_r = _run(ref, x, hx, mode)
    out_k, st_k = _run(kit, x, hx, mode)
    assert out_k.shape == out_r.shape
    assert_close(out_k, out_r, dtype, "output")
    assert_close(st_k[0], st_r[0], dtype, "h_n")
    assert_close(st_k[1], st_r[1], dtype, "c_n")
    names = ["input", "h_0", "c_0"] + [n for n, _ in kit.named_parameters()]
    for name, gk, gr in zip(names, _grads(kit, x, hx, out_k, st_k), _grads(ref, x, hx, out_r, st_r)):
        assert_close(gk, gr, dtype, f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("num_layers,bidirectional,mode", [
    (1, False, "batched"), (2, True, "packed"), (2, False, "unbatched"), (3, True, "batched")])
def test_rnn_matches_torch(nonlinearity, num_layers, bidirectional, mode, dtype):
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, nonlinearity=nonlinearity)
    ref, kit = _pair(torch.nn.RNN, lstmkit.RNN, dtype, **kw)
    D = 2 if bidirectional else 1
    x, hx = _inputs(mode, dtype, False, D * num_layers, H, lstm=False)
    out_r, st_r = _run(ref, x, hx, mode, lstm=False)
    out_k, st_k = _run(kit, x, hx, mode, lstm=False)
    assert_close(out_k, out_r, dtype, "output")
    assert_close(st_k[0], st_r[0], dtype, "h_n")
    for gk, gr in zip(_grads(kit, x, hx, out_k, st_k), _grads(ref, x, hx, out_r, st_r)):
        assert_close(gk, gr, dtype, "grad")


@pytest.mark.parametrize("backend", [None, "reference"])
def test_final_states_detach_in_place_as_torchs(backend):
    """``h_n.detach_()`` (a TBPTT loop written for nn.LSTM) raised "Can't detach views in-place" for
    a one-layer stack, whose h_n and c_n were views of its kernel's outputs; first and prepared calls."""
    layer = lstmkit.LSTM(3, 4, backend=backend)
    state = None
    for _ in range(3):
        y, state = layer(torch.randn(5, 2, 3), state)
        y.sum().backward()
        for t in state:
            t.detach_()
        assert not any(t.requires_grad for t in state)


def test_default_state_is_zeros_and_init_matches_torch_distribution():
    torch.manual_seed(3)
    kit = lstmkit.LSTM(I, H, num_layers=2)
    bound = 1 / H ** 0.5
    for name, p in kit.named_parameters():
        assert p.abs().max() <= bound, name
        assert p.std() > bound / 3, name  # not all zeros / constant
    x = torch.randn(T, B, I)
    zeros = (torch.zeros(2, B, H), torch.zeros(2, B, H))
    torch.testing.assert_close(kit(x)[0], kit(x, zeros)[0], rtol=0, atol=0)


def test_sorted_pack_and_output_packing_metadata():
    ref, kit = _pair(torch.nn.LSTM, lstmkit.LSTM, torch.float64, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    for enforce, lengths in ((True, [T, 4, 2]), (False, [2, T, 4])):
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce)
        out_k, _ = kit(packed)
        out_r, _ = ref(packed)
        assert torch.equal(out_k.batch_sizes, out_r.batch_sizes)
        for a, b in ((out_k.sorted_indices, out_r.sorted_indices),
                     (out_k.unsorted_indices, out_r.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        torch.testing.assert_close(out_k.data, out_r.data, rtol=1e-10, atol=1e-10)


def test_dropout_between_layers_train_vs_eval():
    torch.manual_seed(0)
    kit = lstmkit.LSTM(I, H, num_layers=2, dropout=0.5).double()
    plain = lstmkit.LSTM(I, H, num_layers=2).double()
    plain.load_state_dict(kit.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    kit.eval()
    torch.testing.assert_close(kit(x)[0], plain(x)[0], rtol=0, atol=0)  # eval: no dropout
    kit.train()
    a, b = kit(x)[0], kit(x)[0]
    assert not torch.allclose(a, b)                  # train: a fresh mask every call
    assert not torch.allclose(a, plain(x)[0])
    # The first layer's output (h_n[0]) is untouched by dropout: it is applied between layers.
    torch.testing.assert_close(kit(x)[1][0][0], plain(x)[1][0][0], rtol=0, atol=0)
    # dropout=1 drops the whole input of layer 1: same as zeroing its weight_ih.
    full = lstmkit.LSTM(I, H, num_layers=2, dropout=1.0).double().train()
    full.load_state_dict(kit.state_dict())
    zeroed = lstmkit.LSTM(I, H, num_layers=2).double()
    zeroed.load_state_dict(kit.state_dict())
    with torch.no_grad():
        zeroed.weight_ih_l1.zero_()
    torch.testing.assert_close(full(x)[0], zeroed(x)[0], rtol=1e-12, atol=1e-12)


def test_dropout_warning_matches_torch():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        lstmkit.LSTM(I, H, dropout=0.2)


def test_flatten_parameters_and_all_weights_like_torch():
    ref, kit = _pair(torch.nn.LSTM, lstmkit.LSTM, torch.float32, num_layers=2, bidirectional=True, proj_size=2)
    kit.flatten_parameters()  # accepted, as code written for nn.LSTM calls it
    assert [[tuple(w.shape) for w in ws] for ws in kit.all_weights] == \
        [[tuple(w.shape) for w in ws] for ws in ref.all_weights]
    for ws_k, ws_r in zip(kit.all_weights, ref.all_weights):
        for a, b in zip(ws_k, ws_r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(num_layers=2, bidirectional=True, proj_size=2), dict(bias=False),
                                dict(nonlinearity="relu", num_layers=2)], ids=["lstm-proj", "lstm-nobias", "rnn"])
def test_the_operator_and_cudnns_flat_buffer_see_the_weights_in_torchs_order(kw):
    """The order in which the ``torch`` row hands the weights to torch's operator — and in which
    flatten_parameters lays them out for cuDNN on CUDA — is torch.nn.LSTM's ``_flat_weights`` order."""
    from lstmkit.kernels.torch_native import operator_weights

    rnn = "nonlinearity" in kw
    kit = (lstmkit.RNN if rnn else lstmkit.LSTM)(I, H, **kw)
    ref = (torch.nn.RNN if rnn else torch.nn.LSTM)(I, H, **kw)
    name_of = {id(p): n for n, p in kit.named_parameters()}
    assert [name_of[id(w)] for w in operator_weights(kit._all_params())] == ref._flat_weights_names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN)")
@pytest.mark.parametrize("cell", ["vanilla", "peephole"])
def test_cuda_the_torch_rows_weights_are_one_cudnn_buffer(cell):
    """On CUDA the parameters of the cells cuDNN computes are views into one buffer, as
    torch.nn.LSTM's, so cuDNN neither copies them every call nor warns; results and gradients
    match torch.nn.LSTM's. Other cells keep their own parameters."""
    import warnings

    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True).cuda()
    kit = lstmkit.LSTM(I, H, num_layers=2, bidirectional=True, cell=cell)
    if cell == "vanilla":
        kit.load_state_dict(ref.state_dict())
    kit = kit.cuda()
    storages = {p.untyped_storage().data_ptr() for p in kit.parameters()}
    assert len(storages) == (1 if cell == "vanilla" else len(list(kit.parameters())))
    if cell != "vanilla":
        return
    x = torch.randn(5, 3, I, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = kit(x)[0]
        y.sum().backward()
    assert not [w for w in caught if "contiguous chunk" in str(w.message)]
    ref(x)[0].sum().backward()
    torch.testing.assert_close(y, ref(x)[0], rtol=1e-5, atol=1e-5)
    theirs = dict(ref.named_parameters())
    for n, a in kit.named_parameters():
        torch.testing.assert_close(a.grad, theirs[n].grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("cell", ["vanilla", "layernorm", "slstm", "deep=3"])
def test_the_meta_device_gives_shapes_as_nn_lstm(cell):
    """On the meta device (shapes, no values: a model built before ``to_empty``) a layer, its
    step and a cell run as nn.LSTM does there: the finite check has no values to read."""
    x = torch.randn(5, 2, I, device="meta")
    layer = lstmkit.LSTM(I, H, num_layers=2, cell=cell, device="meta")
    want = torch.nn.LSTM(I, H, num_layers=2, device="meta")(x)
    y, state = layer(x)
    assert y.device.type == "meta" and y.shape == want[0].shape
    assert all(s.shape == want[1][0].shape for s in state)
    assert layer.step(x[0])[0].shape == (2, H)
    if cell != "slstm":
        assert lstmkit.LSTMCell(I, H, cell=cell, device="meta")(x[0])[0].shape == (2, H)
