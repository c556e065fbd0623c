"""Look inside a layer: each gate as the textbook writes it, and a table of them all.

Each gate is a small fully connected layer over the concatenation ``[x_t, h_{t-1}]``:
``W_k`` has shape ``H × (I + H)``. lstmkit stores the four of them fused, as torch does
(``weight_ih`` is 4H × I, ``weight_hh`` is 4H × H, gate order i, f, g, o); a
:class:`GateView` shows one gate's slice and writes back into that storage.
"""

from __future__ import annotations

import sys
from typing import IO, Any

import torch
from torch import Tensor, nn

from lstmkit._validate import check_bool
from lstmkit.layout import GATE_NAMES, GATES, gate_slices

__all__ = ["GateView", "gate_views", "describe"]

_ABSENT_NOTE = {
    "i": "absent: i ≡ 1 (nig)",
    "f": "absent: f ≡ 1 (nfg)",
    "o": "absent: o ≡ 1 (nog)",
}


class GateView:
    """One gate of one layer and direction.

    Attributes:
        name: ``"input"``, ``"forget"``, ``"candidate"`` or ``"output"``.
        letter: ``"i"``, ``"f"``, ``"g"`` or ``"o"``.
        present: False when the variant has no such gate (then ``note`` says why and
            every tensor attribute is None).
        activation: ``"sigmoid"``, ``"tanh"`` or ``"identity"``.
        W_x: (n, I) view of the gate's rows of ``weight_ih`` (n = H, or the first hidden
            width of a deep gate). Editing it in place edits the layer.
        W_h: (n, H_out) view of the gate's rows of ``weight_hh``.
        b_x, b_h: (n,) views of ``bias_ih`` / ``bias_hh`` (None without bias).
        peephole: (H,) diagonal peephole weight, or None.
        mlp: the deep gate's further layers ``[(weight, bias), …]`` (empty if not deep).
    """

    def __init__(self, letter: str, present: bool, note: str, activation: str,
                 W_x: Tensor | None = None, W_h: Tensor | None = None,
                 b_x: Tensor | None = None, b_h: Tensor | None = None,
                 peephole: Tensor | None = None,
                 mlp: list[tuple[Tensor, Tensor | None]] | None = None) -> None:
        self.letter = letter
        self.name = GATE_NAMES[GATES.index(letter)]
        self.present = check_bool("present", present)
        self.note = note
        self.activation = activation
        self.W_x, self.W_h, self.b_x, self.b_h = W_x, W_h, b_x, b_h
        self.peephole = peephole
        self.mlp = mlp or []

    @property
    def W(self) -> Tensor | None:
        """The textbook matrix ``[W_x | W_h]``, shape (n, I + H_out): a copy.

        Assign to it (``view.W = new``) to write both halves back into the layer.
        """
        if not self.present:
            return None
        return torch.cat([self.W_x.detach(), self.W_h.detach()], dim=1)

    @W.setter
    def W(self, value: Tensor) -> None:
        if not self.present:
            raise ValueError(f"W: the {self.name} gate is absent in this variant ({self.note})")
        want = (self.W_x.shape[0], self.W_x.shape[1] + self.W_h.shape[1])
        if tuple(value.shape) != want:
            raise ValueError(f"W: expected shape {want} for the {self.name} gate, got {tuple(value.shape)}")
        with torch.no_grad():
            self.W_x.copy_(value[:, : self.W_x.shape[1]])
            self.W_h.copy_(value[:, self.W_x.shape[1]:])

    @property
    def b(self) -> Tensor | None:
        """The gate's total bias ``b_x + b_h`` (n,): a copy; None without bias."""
        if self.b_x is None:
            return None
        return (self.b_x + self.b_h).detach()

    @b.setter
    def b(self, value: Tensor) -> None:
        if self.b_x is None:
            raise ValueError(f"b: the {self.name} gate has no bias (absent gate or bias=False)")
        if tuple(value.shape) != tuple(self.b_x.shape):
            raise ValueError(f"b: expected shape {tuple(self.b_x.shape)}, got {tuple(value.shape)}")
        with torch.no_grad():
            self.b_x.copy_(value)
            self.b_h.zero_()

    def __repr__(self) -> str:
        if not self.present:
            return f"GateView({self.name}: {self.note})"
        n, i = self.W_x.shape
        deep = f", mlp={[tuple(w.shape) for w, _ in self.mlp]}" if self.mlp else ""
        return (f"GateView({self.name}: {self.activation}, W {n} × ({i} + {self.W_h.shape[1]})"
                f"{', peephole' if self.peephole is not None else ''}{deep})")


def gate_views(layer: Any, index: int = 0, direction: int = 0) -> dict[str, GateView]:
    """Views of the four gates of ``layer`` (an lstmkit LSTM/RNN) at one layer/direction."""
    spec = layer.spec
    p = layer.layer_params(index, direction)
    rows = gate_slices(spec, layer.hidden_size)
    views: dict[str, GateView] = {}
    for letter in GATES:
        name = GATE_NAMES[GATES.index(letter)]
        if not spec.is_lstm and letter != "g":
            views[name] = GateView(letter, False, "absent: the plain RNN has no gates", "")
            continue
        if letter not in rows:
            coupled = letter == "f" and spec.coupled
            note = "f = 1 − i (cifg), no parameters" if coupled else _ABSENT_NOTE[letter]
            views[name] = GateView(letter, False, note, "sigmoid")
            continue
        sl = rows[letter]
        if letter == "g":
            act = spec.nonlinearity if not spec.is_lstm else spec.candidate_activation
        else:
            act = "sigmoid"
        mlp = []
        for j in range(1, len(spec.hidden_widths(letter)) + 1):
            mlp.append((p[f"mlp_{letter}_weight{j}"], p.get(f"mlp_{letter}_bias{j}")))
        note = "deep gate: an MLP over [x, h]" if mlp else ""
        views[name] = GateView(
            letter, True, note, act,
            W_x=p["weight_ih"].data[sl], W_h=p["weight_hh"].data[sl],
            b_x=p["bias_ih"].data[sl] if "bias_ih" in p else None,
            b_h=p["bias_hh"].data[sl] if "bias_hh" in p else None,
            peephole=p[f"peephole_{letter}"].data if f"peephole_{letter}" in p else None,
            mlp=mlp,
        )
    return views


def _rows_of(layer: Any) -> list[list[str]]:
    spec = layer.spec
    H, h_out = layer.hidden_size, layer.output_size
    table: list[list[str]] = []
    for index in range(layer.num_layers):
        for d in range(layer.num_directions):
            p = layer.layer_params(index, d)
            I = p["weight_ih"].shape[1]
            rows = gate_slices(spec, H)
            dname = "fwd" if d == 0 else "bwd"
            for name, v in gate_views(layer, index, d).items():
                if not v.present:
                    if spec.is_lstm:
                        table.append([str(index), dname, name, "—", v.note, "", "", "0"])
                    continue
                n = v.W_x.shape[0]
                count = n * (I + h_out) + (2 * n if v.b_x is not None else 0)
                extras = []
                if v.peephole is not None:
                    extras.append(f"peephole ({H})")
                    count += H
                if spec.layernorm:
                    extras.append(f"LN gains (2×{n})")
                    count += 2 * n
                if spec.fgr and v.letter in spec.sigmoid_gates:
                    k = len(spec.sigmoid_gates) * H
                    extras.append(f"fgr {H} × {k}")
                    count += H * k
                for w, b in v.mlp:
                    extras.append(f"mlp {w.shape[0]} × {w.shape[1]}")
                    count += w.numel() + (b.numel() if b is not None else 0)
                bias = f"{n} + {n}" if v.b_x is not None else "—"
                table.append([str(index), dname, name, v.activation,
                              f"{n} × ({I} + {h_out})", bias, ", ".join(extras), str(count)])
            if spec.layernorm:
                table.append([str(index), dname, "cell norm", "layernorm", "", f"{H}",
                              f"gain ({H})", str(2 * H)])
            if "weight_hr" in p:
                table.append([str(index), dname, "projection", "linear", f"{h_out} × {H}", "—",
                              "", str(h_out * H)])
            assert rows  # every layer computes at least the candidate
    return table


def describe(model: nn.Module, file: IO[str] | None = None) -> str:
    """Print a table of every gate of every layer and direction of ``model``.

    Columns: layer, direction, gate, activation, the textbook weight shape
    ``n × (I + H_out)`` over ``[x_t, h_{t-1}]``, bias, extras (peepholes, norms, fgr, MLP
    layers) and parameter count; then the total, which equals the number of parameters
    of every lstmkit layer in ``model``.

    Returns:
        The printed text.
    """
    from lstmkit.nn import LSTM, RNN

    out: list[str] = []
    total = 0
    layers = [(name or type(model).__name__, m) for name, m in model.named_modules()
              if isinstance(m, (LSTM, RNN))]
    if not layers:
        raise ValueError(f"model: expected an lstmkit LSTM or RNN (or a module containing one), "
                         f"got {type(model).__name__} with none inside")
    header = ["layer", "dir", "gate", "activation", "W: n × (I + H)", "bias", "extras", "params"]
    for name, layer in layers:
        rows = _rows_of(layer)
        count = sum(p.numel() for p in layer.parameters())
        total += count
        widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
        kind = f"cell={layer.spec.name!r}" if layer.spec.is_lstm else f"rnn({layer.spec.nonlinearity})"
        out.append(f"{name}: {type(layer).__name__}({layer.input_size} → {layer.hidden_size}"
                   f"{f', proj {layer.proj_size}' if layer.proj_size else ''}), {kind}, "
                   f"{layer.num_layers} layer(s) × {layer.num_directions} direction(s)")
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out.append(fmt.format(*header))
        out.append(fmt.format(*("-" * w for w in widths)))
        out.extend(fmt.format(*r) for r in rows)
        out.append(f"parameters: {count:,}")
        out.append("")
    if len(layers) > 1:
        out.append(f"total parameters: {total:,}")
    text = "\n".join(out).rstrip() + "\n"
    print(text, end="", file=file if file is not None else sys.stdout)
    return text
