"""The fused kernel's variants as the operator tests (test_ops.py, test_ops_transforms.py,
test_ops_low_precision.py) build them: one of each kind of operator input, a layer factory,
and a user's whole model (embedding -> lstmkit stack -> linear read-out)."""

from __future__ import annotations

import torch

import lstmkit

#: The fused kernel's variants, one of each kind of operator input (id -> layer factory arguments).
FUSED = {
    "vanilla": dict(cell="vanilla"),
    "peephole": dict(cell="peephole"),
    "cifg": dict(cell="cifg"),
    "nig": dict(cell="nig"),
    "nfg": dict(cell="nfg"),
    "nog": dict(cell="nog"),
    "niaf": dict(cell="niaf"),
    "noaf": dict(cell="noaf"),
    "fgr": dict(cell="fgr"),
    "layernorm": dict(cell="layernorm"),
    "clip": dict(cell="clip=0.5"),
    "projection": dict(cell="vanilla", proj_size=3),
    "heads": dict(cell="peephole+cifg", heads=2, H=6),
    "slstm": dict(cell="slstm+forget_act=exp", heads=2, H=6),
    "rnn": dict(rnn=True),
}


def make(variant: str, I: int = 4, H: int = 5, **extra) -> torch.nn.Module:
    kw = dict(FUSED[variant])
    H = kw.pop("H", H)  # a size the variant's heads divide
    if kw.pop("rnn", False):
        return lstmkit.RNN(I, H, **extra)
    return lstmkit.LSTM(I, H, **kw, **extra)


class Model(torch.nn.Module):
    """A user's whole model: embedding -> lstmkit stack (two layers unless told) -> linear read-out."""

    def __init__(self, variant: str, bidirectional: bool = False, num_layers: int = 2) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 4)
        self.rnn = make(variant, num_layers=num_layers, bidirectional=bidirectional)
        self.out = torch.nn.Linear(self.rnn.num_directions * self.rnn.output_size, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.emb(tokens))  # (T, B, D·H_out)
        return self.out(y)
