"""Each gate as the textbook writes it: a small fully connected layer over ``[x_t, h_{t-1}]``.

``W_k`` has shape ``H × (I + H)``. lstmkit stores the four of them fused, as torch does
(``weight_ih`` is 4H × I, ``weight_hh`` is 4H × H, gate order i, f, g, o); a
:class:`GateView` shows one gate's slice and writes back into that storage. Layers return
them from ``layer.gates()``; :func:`lstmkit.inspect.describe` tabulates them.

Writing ``view.W = ...`` or ``view.b = ...`` checks the value first (a dense floating tensor
of the gate's shape, finite in the layer's dtype: a TypeError or ValueError naming ``W`` or
``b`` otherwise) and writes into the parameter as the layer reads it: a plain parameter in
place; a parametrized one (``torch.nn.utils.parametrizations.weight_norm``,
``register_parametrization``) by assigning the whole modified tensor, which torch passes to
the parametrization's ``right_inverse`` (refused, the layer left as it was, where there is no
``right_inverse`` or the value does not read back); a weight a forward pre-hook computes
before each call (``torch.nn.utils.prune``, the hook-based ``torch.nn.utils.weight_norm``) is
refused, since the next call would overwrite the write.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lstmkit import variants
from lstmkit._param_writes import check_value, write_rows
from lstmkit._validate import check_bool, check_int
from lstmkit.layout import GATE_NAMES, GATES
from lstmkit.spec import gate_slices

__all__ = ["GateView", "GateViews", "gate_views", "activation_of"]

#: Why an LSTM gate is absent, by letter: the variant table's row that removes it alone.
_ABSENT_NOTE = {r.removes: f"absent: {r.removes} ≡ 1 ({r.word})" for r in variants.ROWS if len(r.removes) == 1}


class GateView:
    """One gate of one layer and direction.

    Attributes:
        name: ``"input"``, ``"forget"``, ``"candidate"`` or ``"output"``.
        letter: ``"i"``, ``"f"``, ``"g"`` or ``"o"``.
        present: False when the variant has no such gate (then ``note`` says why and
            every tensor attribute is None).
        activation: as the cell computes the gate: ``"sigmoid"``, ``"hard_sigmoid"`` or
            ``"hardsigmoid"`` (``gate_act``), ``"exp"`` (the sLSTM's input gate, and its
            forget gate with ``forget_act=exp``), ``"tanh"``, ``"relu"`` or ``"identity"``.
        W_x: (n, I) view of the gate's rows of ``weight_ih`` (n = H, or the first hidden
            width of a deep gate). Editing it in place edits a plain parameter; for a
            parametrized or hook-computed weight it is a slice of the computed tensor (a copy
            in effect): assign :attr:`W` instead.
        W_h: (n, H_out) view of the gate's rows of ``weight_hh``; with ``heads = k`` the stored
            blocks, (n, H_out/k): row r holds the ``H_out/k`` weights of its head's block
            (:attr:`blocks`; :attr:`W` shows them in place, zeros between).
        heads: k, the blocks of ``W_h`` (1: a dense ``W_h``).
        b_x, b_h: (n,) views of ``bias_ih`` / ``bias_hh`` (None without bias).
        peephole: (H,) diagonal peephole weight, or None.
        mlp: the deep gate's further layers ``[(weight, bias), …]`` (empty if not deep).
    """

    def __init__(self, letter: str, present: bool, note: str, activation: str,
                 W_x: Tensor | None = None, W_h: Tensor | None = None,
                 b_x: Tensor | None = None, b_h: Tensor | None = None,
                 peephole: Tensor | None = None,
                 mlp: list[tuple[Tensor, Tensor | None]] | None = None, heads: int = 1,
                 storage: tuple[nn.Module, dict[str, str], slice] | None = None) -> None:
        """``storage``: ``(module, names, rows)`` where the views live — the module, its full
        parameter names by base name (``"weight_ih"`` -> ``"weight_ih_l0"``) and the gate's rows —
        so that :attr:`W` and :attr:`b` write through parametrizations; without it (a view built
        by hand) they write into the tensors given, in place."""
        self.letter = letter
        self.name = GATE_NAMES[GATES.index(letter)]
        self.present = check_bool("present", present)
        self.note = note
        self.activation = activation
        self.W_x, self.W_h, self.b_x, self.b_h = W_x, W_h, b_x, b_h
        self.peephole = peephole
        self.mlp = mlp or []
        self.heads = check_int("heads", heads, 1)
        self._storage = storage

    @property
    def blocks(self) -> list[Tensor]:
        """The k diagonal blocks of ``W_h``, each (n/k, H_out/k): views (editing one edits the layer)."""
        if not self.present:
            return []
        return list(self.W_h.chunk(self.heads, dim=0))

    @property
    def W(self) -> Tensor | None:
        """The textbook matrix ``[W_x | W_h]``, shape (n, I + H_out): a copy (with heads, ``W_h``
        block-diagonal: the blocks on the diagonal, zeros elsewhere).

        Assign to it (``view.W = new``) to write both halves back into the layer: ``new`` a
        dense floating-point tensor of this shape, finite in the layer's dtype (TypeError /
        ValueError naming ``W`` otherwise, the layer unchanged); written through a
        parametrization (see the module's docstring).
        """
        if not self.present:
            return None
        return torch.cat([self.W_x.detach(), torch.block_diag(*self.blocks).detach()], dim=1)

    @W.setter
    def W(self, value: Tensor) -> None:
        if not self.present:
            raise ValueError(f"W: the {self.name} gate is absent in this variant ({self.note})")
        n, i = self.W_x.shape
        want = (n, i + self.W_h.shape[1] * self.heads)
        check_value("W", value, want, self.W_x.dtype, f" for the {self.name} gate")
        w_h = value[:, i:]
        blocks = [b.chunk(self.heads, dim=1)[j] for j, b in enumerate(w_h.chunk(self.heads, dim=0))]
        if self.heads > 1 and not torch.equal(torch.block_diag(*blocks), w_h):
            raise ValueError(f"W: with heads={self.heads} the {self.name} gate's W_h is block-diagonal "
                             f"({self.heads} blocks of {n // self.heads} × {w_h.shape[1] // self.heads}); the "
                             f"entries outside the blocks must be 0")
        self._write("W", [("weight_ih", self.W_x, value[:, :i]), ("weight_hh", self.W_h, torch.cat(blocks, dim=0))])

    @property
    def b(self) -> Tensor | None:
        """The gate's total bias ``b_x + b_h`` (n,): a copy; None without bias.

        Assign to it (``view.b = new``) to write ``new`` into ``b_x`` and zeros into ``b_h``:
        checked and written as :attr:`W` is.
        """
        if self.b_x is None:
            return None
        return (self.b_x + self.b_h).detach()

    @b.setter
    def b(self, value: Tensor) -> None:
        if self.b_x is None:
            raise ValueError(f"b: the {self.name} gate has no bias (absent gate or bias=False)")
        check_value("b", value, tuple(self.b_x.shape), self.b_x.dtype)
        self._write("b", [("bias_ih", self.b_x, value), ("bias_hh", self.b_h, torch.zeros_like(self.b_h))])

    def _write(self, what: str, writes: list[tuple[str, Tensor, Tensor]]) -> None:
        """Write each ``(base name, view, new rows)``: into the layer's parameters (all refused, or
        all written) where the view knows its storage, else into the views in place."""
        if self._storage is None:
            with torch.no_grad():
                for _, view, rows in writes:
                    view.copy_(rows)
            return
        module, names, sl = self._storage
        write_rows(module, [(names[base], sl, rows) for base, _, rows in writes], what)
        # a parametrized weight is computed anew on each read: show what the layer now reads
        p = {base: getattr(module, full) for base, full in names.items()}
        self.W_x, self.W_h = p["weight_ih"].detach()[sl], p["weight_hh"].detach()[sl]
        if self.b_x is not None:
            self.b_x, self.b_h = p["bias_ih"].detach()[sl], p["bias_hh"].detach()[sl]

    def __repr__(self) -> str:
        if not self.present:
            return f"GateView({self.name}: {self.note})"
        n, i = self.W_x.shape
        deep = f", mlp={[tuple(w.shape) for w, _ in self.mlp]}" if self.mlp else ""
        k = self.heads
        heads = f", W_h {k} blocks of {n // k} × {self.W_h.shape[1]}" if k > 1 else ""
        return (f"GateView({self.name}: {self.activation}, W {n} × ({i} + {self.W_h.shape[1] * k}){heads}"
                f"{', peephole' if self.peephole is not None else ''}{deep})")


def activation_of(spec: Any, letter: str) -> str:
    """The activation of gate ``letter`` as the cell computes it: the candidate's (the RNN's
    nonlinearity), the gates' (a hard sigmoid where ``gate_act`` says so), the sLSTM's
    exponential input gate and its forget gate (exponential with ``forget_act=exp``; both
    stabilised)."""
    if letter == "g":
        return spec.nonlinearity if not spec.is_lstm else spec.candidate_activation
    if spec.slstm and letter == "i":
        return "exp"
    if spec.slstm and letter == "f":
        return spec.forget_activation  # "sigmoid" (log f = log σ(f̃)) or "exp"
    return spec.gate_activation


class GateViews(dict):  # type: ignore[type-arg]
    """``{"input": GateView, "forget": …, "candidate": …, "output": …}``, which a gate's letter
    (``"i"``, ``"f"``, ``"g"``, ``"o"``, as :func:`lstmkit.trace` keys them) also indexes."""

    def __missing__(self, key: Any) -> GateView:
        if key in GATES:
            return self[GATE_NAMES[GATES.index(key)]]  # type: ignore[no-any-return]
        raise KeyError(f"{key!r}: the gates are {', '.join(map(repr, self))} (or their letters i, f, g, o)")


def gate_views(layer: Any, index: int = 0, direction: int = 0, names: dict[str, str] | None = None) -> GateViews:
    """Views of the four gates of ``layer`` (an lstmkit LSTM/RNN/LSTMCell) at one layer/direction.
    ``names``: the parameters' full names by base name (``"weight_ih"`` -> ``"weight_ih_l0"``), for
    views whose setters write through parametrizations (``layer.gates()``); without, a view's setters
    write into its tensors in place."""
    spec = layer.spec
    p = layer.layer_params(index, direction)
    rows = gate_slices(spec, layer.hidden_size)
    views = GateViews()
    for letter in GATES:
        name = GATE_NAMES[GATES.index(letter)]
        if not spec.is_lstm and letter != "g":
            views[name] = GateView(letter, False, "absent: the plain RNN has no gates", "")
            continue
        if letter not in rows:
            coupled = letter == "f" and spec.coupled
            note = "f = 1 − i (cifg), no parameters" if coupled else _ABSENT_NOTE[letter]
            views[name] = GateView(letter, False, note, activation_of(spec, letter))
            continue
        sl = rows[letter]
        act = activation_of(spec, letter)
        mlp = []
        for j in range(1, len(spec.hidden_widths(letter)) + 1):
            mlp.append((p[f"mlp_{letter}_weight{j}"], p.get(f"mlp_{letter}_bias{j}")))
        note = "deep gate: an MLP over [x, h]" if mlp else ""
        views[name] = GateView(
            letter, True, note, act, storage=None if names is None else (layer, dict(names), sl),
            W_x=p["weight_ih"].detach()[sl], W_h=p["weight_hh"].detach()[sl],
            b_x=p["bias_ih"].detach()[sl] if "bias_ih" in p else None,
            b_h=p["bias_hh"].detach()[sl] if "bias_hh" in p else None,
            peephole=p[f"peephole_{letter}"].detach() if f"peephole_{letter}" in p else None,
            mlp=mlp, heads=spec.heads,
        )
    return views
