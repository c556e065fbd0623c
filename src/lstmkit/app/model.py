"""The network a :class:`~lstmkit.app.config.TrainConfig` defines: a recurrent stack and a
linear read-out per time step, and its parameter count (checked against the config's bound)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstmkit.app.config import MAX_PARAMETERS, TrainConfig
from lstmkit.nn import LSTM, RNN

__all__ = ["SequenceModel", "parameter_count"]


class SequenceModel(nn.Module):
    """A recurrent stack (lstmkit LSTM or RNN) and a linear read-out per time step.

    Args:
        device: where the parameters live; ``"meta"`` builds the model without memory
            (to count parameters or check a file's shapes before allocating anything).

    Shapes: x (T, B, input_size) -> output (T, B, output_size); state as the layer's.
    """

    def __init__(self, cfg: TrainConfig, input_size: int, output_size: int, device: Any = None) -> None:
        super().__init__()
        kw = dict(num_layers=cfg.num_layers, dropout=cfg.dropout, bidirectional=cfg.bidirectional, device=device)
        if cfg.model == "lstm":
            self.rnn: LSTM | RNN = LSTM(input_size, cfg.hidden_size, proj_size=cfg.proj_size,
                                        cell=cfg.cell, backend=cfg.backend, **kw)
        else:
            self.rnn = RNN(input_size, cfg.hidden_size, nonlinearity=cfg.spec.nonlinearity, backend=cfg.backend, **kw)
        self.head = nn.Linear(self.rnn.output_size * self.rnn.num_directions, output_size, device=device)

    def forward(self, x: Tensor, state: Any = None, lengths: Tensor | None = None) -> tuple[Tensor, Any]:
        """Run the stack; ``lengths`` (B,) packs the batch so padding never enters the state."""
        if lengths is not None and bool((lengths < x.shape[0]).any()):
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            y, state = self.rnn(packed, state)
            y, _ = pad_packed_sequence(y, total_length=x.shape[0])
        else:
            y, state = self.rnn(x, state)
        return self.head(y), state


def parameter_count(cfg: TrainConfig, input_size: int, output_size: int) -> int:
    """Parameters of the model ``cfg`` defines (counted on the ``meta`` device: no memory).

    Raises:
        ValueError: more than :data:`MAX_PARAMETERS`.
    """
    n = sum(p.numel() for p in SequenceModel(cfg, input_size, output_size, device="meta").parameters())
    if n > MAX_PARAMETERS:
        raise ValueError(f"hidden_size, num_layers: the model would have {n:,} parameters, more than the bound of "
                         f"{MAX_PARAMETERS:,} (1 GiB of float32); use a smaller hidden_size or fewer layers")
    return n
