"""``torch.nn.LSTM`` / ``torch.nn.RNN`` ⇄ lstmkit: the same parameters, key for key."""

from __future__ import annotations

from torch import nn

from lstmkit.convert.layer_config import layer_weights
from lstmkit.nn import LSTM, RNN

__all__ = ["from_torch", "to_torch"]


def _flags(m: nn.RNNBase) -> dict[str, object]:
    p = next(m.parameters())
    return dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
                bidirectional=m.bidirectional, device=p.device, dtype=p.dtype)


def from_torch(module: nn.LSTM | nn.RNN) -> LSTM | RNN:
    """An lstmkit layer computing exactly what ``module`` computes (weights copied).

    Raises:
        TypeError: ``module`` is not a ``torch.nn.LSTM`` or ``torch.nn.RNN``.
    """
    if isinstance(module, nn.LSTM):
        out: LSTM | RNN = LSTM(module.input_size, module.hidden_size, proj_size=module.proj_size,
                               **_flags(module))
    elif isinstance(module, nn.RNN):
        out = RNN(module.input_size, module.hidden_size, nonlinearity=module.nonlinearity, **_flags(module))
    else:
        raise TypeError(f"module: expected torch.nn.LSTM or torch.nn.RNN, got {type(module).__name__}")
    # each weight as the module computes with it (a parametrized one, e.g. weight_norm, is computed
    # from its parametrization; the copy holds the value); strict: every key and shape must match
    out.load_state_dict(layer_weights(module))
    out.train(module.training)
    return out


def to_torch(layer: LSTM | RNN) -> nn.LSTM | nn.RNN:
    """The ``torch.nn`` layer computing exactly what ``layer`` computes (weights copied).

    Raises:
        TypeError: ``layer`` is not an lstmkit ``LSTM`` or ``RNN``.
        ValueError: the variant has no ``torch.nn`` equivalent (only vanilla LSTMs — with
            any initial forget bias, with or without a projection — and plain RNNs do).
    """
    if not isinstance(layer, (LSTM, RNN)):
        raise TypeError(f"layer: expected an lstmkit LSTM or RNN, got {type(layer).__name__}")
    flags = dict(num_layers=layer.num_layers, bias=layer.bias, batch_first=layer.batch_first,
                 dropout=layer.dropout, bidirectional=layer.bidirectional,
                 device=layer.weight_ih_l0.device, dtype=layer.weight_ih_l0.dtype)
    if isinstance(layer, RNN):
        if layer.spec.heads != 1:
            raise ValueError(f"layer: torch.nn.RNN has no block-diagonal recurrence; this layer has "
                             f"heads={layer.spec.heads}, which it cannot carry")
        out: nn.LSTM | nn.RNN = nn.RNN(layer.input_size, layer.hidden_size, nonlinearity=layer.nonlinearity,
                                       **flags)
    elif isinstance(layer, LSTM):
        if not layer.spec.is_vanilla:
            raise ValueError(f"layer: torch.nn.LSTM computes only the vanilla cell; this layer is "
                             f"{layer.spec.name!r}, which it cannot carry")
        out = nn.LSTM(layer.input_size, layer.hidden_size, proj_size=layer.proj_size, **flags)
    # each weight as the layer computes with it (a parametrized or pruned one: its value), as from_torch copies
    out.load_state_dict(layer_weights(layer))
    out.train(layer.training)
    return out
