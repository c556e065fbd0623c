"""The variant table every correctness test runs over (ids -> lstmkit cell argument)."""

from __future__ import annotations

from lstmkit import CellSpec

#: A case for each row of the variant table that changes an equation (with SLSTM_VARIANTS and
#: HEADS_VARIANTS below; test_variants.py checks that every such row has one), plus combinations.
LSTM_VARIANTS: dict[str, object] = {
    "vanilla": "vanilla",
    "peephole": "peephole",
    "nig": "nig",
    "nfg": "nfg",
    "nog": "nog",
    "niaf": "niaf",
    "noaf": "noaf",
    "cifg": "cifg",
    "fgr": "fgr",
    "layernorm": "layernorm",
    "clip": "clip=0.3",
    "forget_bias": "vanilla+fb=1",
    "deep_all": CellSpec(gate_hidden=(3,)),
    "deep_f": CellSpec(gate_hidden={"f": (4, 2)}),
    "peephole+cifg+layernorm": "peephole+cifg+layernorm",
    "fgr+peephole+nog+clip": "fgr+peephole+nog+clip=0.4",
    "fgr+cifg+noaf": "fgr+cifg+noaf",
    "layernorm+deep_g": CellSpec(layernorm=True, gate_hidden={"g": (5,)}),
    "nig+niaf+noaf": "nig+niaf+noaf",
    "nfg+peephole+layernorm": "nfg+peephole+layernorm",
    "cand_relu": "cand_act=relu",
    "out_relu": "out_act=relu",
    "hard_sigmoid": "gate_act=hard_sigmoid",
    "hardsigmoid": "gate_act=hardsigmoid",
    "zoneout": "zoneout=0.3/0.2",
    "zoneout+peephole+layernorm": "zoneout=0.25+peephole+layernorm",
    "hard_sigmoid+cifg+out_relu+clip": "gate_act=hard_sigmoid+cifg+out_act=relu+clip=0.5",
    "deep_relu": "deep=4+deep_act=relu",
    "deep_f_sigmoid": CellSpec(gate_hidden={"f": (4, 2)}, gate_hidden_activation="sigmoid"),
    "deep_identity+peephole": "deep=4+deep_act=identity+peephole",
}

RNN_VARIANTS: dict[str, str] = {"rnn_tanh": "tanh", "rnn_relu": "relu"}

#: Block-diagonal recurrence (``heads=k``): the layer's sizes must divide by k, so the tests that
#: run these pick their sizes (tests/test_heads.py runs every case of LSTM_VARIANTS with heads too).
HEADS_VARIANTS: dict[str, object] = {
    "heads": "heads=2",
    "heads+peephole+layernorm": "heads=2+peephole+layernorm",
    "heads+fgr+cifg+zoneout": "heads=2+fgr+cifg+zoneout=0.2",
    "heads+deep_f": CellSpec(heads=2, gate_hidden={"f": (4, 2)}),
}

#: The sLSTM (``cell="slstm"``): its state is (h, c, n, m), so the tests that run these give and
#: check four states (tests/test_slstm.py).
SLSTM_VARIANTS: dict[str, str] = {
    "slstm": "slstm",
    "slstm_exp": "slstm+forget_act=exp",
    "slstm_n_clamp": "slstm+n_clamp",
    "slstm_heads_exp_clamp": "slstm+heads=2+forget_act=exp+n_clamp",
}
