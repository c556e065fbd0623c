"""The variant table: one row per word a user can type, and everything derived from it.

A row says what a word (``peephole``, ``nig``, ``clip=<c>``, …) means: the
:class:`~lstmkit.spec.CellSpec` fields it sets, the parameters it adds (with their shapes),
the gates it removes or couples, whether the ONNX ``LSTM``/``RNN`` operator can carry it, the
kernels' flag bit, and where it comes from in the literature. Derived from :data:`ROWS`,
nowhere written again:

* the presets (:data:`lstmkit.spec.PRESETS`), the parser of ``cell=`` strings and its
  "did you mean", :attr:`CellSpec.name <lstmkit.spec.CellSpec.name>`;
* which gates a spec computes (:func:`computed_gates`) — the kernels' gate offsets come
  from the masks :func:`gate_removal_masks` gives them (``lstmkit.kernels.abi``);
* the kernels' flag bits (:data:`FLAGS`) and a spec's flag word (:func:`flag_word`), and the
  numbers they take at run time (:data:`SCALARS`, :func:`scalar_values`);
* the parameter schema of a layer-direction (:func:`param_shapes`);
* the ONNX exporter's choice between the operator and a ``Scan`` (:func:`onnx_refusal`);
* the variant tables of ``docs/cell.md`` and the README
  (:func:`lstmkit.spec.markdown_table`, checked by ``tests/test_variants.py``), and the test
  matrix (the same test fails when a row has no case against the NumPy oracle).

Adding a variant: its row here, its field in :class:`~lstmkit.spec.CellSpec`, its equations
in :mod:`lstmkit.cell`, its cell step (and BPTT) in each kernel, its oracle case.

This module imports nothing of lstmkit but the gate order (:mod:`lstmkit.layout`): rows read
a spec's fields by name, so :mod:`lstmkit.spec` can build on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from lstmkit.layout import GATES

__all__ = ["Row", "ROWS", "VALUE", "FLAGS", "Dims", "row", "words", "example_cells", "active_rows", "flag_word",
           "cell_states", "example_cell",
           "flag_names", "computed_gates", "gate_removal_masks", "param_shapes", "onnx_refusal",
           "HARD_SIGMOID_SLOPES", "init_fields", "STATES", "state_row", "sigmoid_gates", "per_spec_cache", "SCALARS",
           "scalar_values"]


class _Value:
    """Placeholder in :attr:`Row.sets`: the value typed after ``word=``."""

    def __repr__(self) -> str:
        return "VALUE"


#: In :attr:`Row.sets`, the value the user types after ``word=``.
VALUE: Any = _Value()


@dataclass(frozen=True)
class Dims:
    """The sizes a row's parameters are shaped by: ``H`` cells, ``R`` rows of ``weight_ih``
    (the computed gates' first layers), whether the layer has biases."""

    H: int
    R: int
    bias: bool


ParamFn = Callable[[Any, Dims], dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class Row:
    """One word of the variant table.

    Attributes:
        word: what users type (``"peephole"``); a value word is typed ``word=<value>``.
        sets: the :class:`~lstmkit.spec.CellSpec` fields the word sets; :data:`VALUE` where
            the typed value goes.
        doc: the change to the cell, one line (the docs' table).
        source: where it comes from.
        aliases: other spellings of the same word.
        placeholder: how a value word's value is written in the docs (``<c>``).
        parse: text -> value for a value word (raises ValueError with the reason).
        removes: gates it removes (they are ≡ 1, or absent for the RNN).
        couples: gates it derives from others instead of computing (cifg: ``f = 1 − i``).
        params: its parameters ``name -> shape`` for a spec and sizes (registration order).
        onnx: why the ONNX ``LSTM``/``RNN`` operator cannot carry it (None: it can).
        flag: whether the kernels get a bit for it (False: the word changes no equation the
            kernels compute — an initialisation, or a structure they see in the parameters).
        init: the word sets an initial value only (no equation changes).
        kind: the cell kind it belongs to (``"lstm"``, or ``"rnn"`` for the plain RNN's rows).
        example: a value of a value word, for the docs, ``lstmkit doctor`` and the tests; for a
            word that needs another (``n_clamp`` needs ``slstm``), a whole cell that has it.
        states: the cell states it adds after ``c`` (the sLSTM's normaliser and stabiliser,
            ``("n", "m")``): returned and accepted after ``(h, c)``, kept by the kernels next to
            ``c`` (:func:`cell_states`).
        gate: the gate whose initial bias the row sets (``"f"`` for ``fb``), or ``""``.
        scalars: the numbers the kernels take at run time for this row, by name, each read from a
            spec (0 where the spec has none): the operators' float arguments (:data:`SCALARS`).
    """

    word: str
    sets: Mapping[str, Any]
    doc: str
    source: str
    aliases: tuple[str, ...] = ()
    placeholder: str = ""
    parse: Callable[[str], Any] | None = None
    removes: str = ""
    couples: str = ""
    params: ParamFn | None = None
    onnx: str | None = None
    flag: bool = True
    init: bool = False
    kind: str = "lstm"
    example: str | None = None
    states: tuple[str, ...] = ()
    gate: str = ""
    scalars: Mapping[str, Callable[[Any], float]] = field(default_factory=dict)

    @property
    def takes_value(self) -> bool:
        """True for ``word=<value>`` rows."""
        return any(v is VALUE for v in self.sets.values())

    @property
    def flag_name(self) -> str:
        """The kernels' name for this row's bit (the word, ``=`` as ``_``)."""
        return self.word.replace("=", "_")

    def active(self, spec: Any) -> bool:
        """Whether ``spec`` has this row's setting (a value row: its field is set)."""
        for name, value in self.sets.items():
            current = getattr(spec, name)
            if value is VALUE:
                if current == _default(spec, name):
                    return False
            elif current != value:
                return False
        return True

    def typed(self, spec: Any) -> str:
        """The word as :attr:`CellSpec.name` writes it for ``spec`` (``clip=3``)."""
        if not self.takes_value:
            return self.word
        (name,) = [k for k, v in self.sets.items() if v is VALUE]
        value = getattr(spec, name)
        return f"{self.word}={_FORMAT[self.word](spec, value) if self.word in _FORMAT else _number(value)}"


def _default(spec: Any, name: str) -> Any:
    """The default of field ``name`` of the spec's dataclass (the one place defaults are written)."""
    return spec.__dataclass_fields__[name].default


def _number(value: float) -> str:
    """Shortest text that reads back as exactly ``value`` (``3``, ``-0.5``, ``0.1``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in text.split("x"))
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number (or widths joined by 'x', e.g. deep=16x8)") from None
    if min(widths) < 1:
        raise ValueError(f"{text!r}: a hidden layer's width is at least 1 (without deep gates, leave deep out)")
    return widths


def _parse_zoneout(text: str) -> tuple[float, float]:
    parts = text.split("/")
    if len(parts) > 2:
        raise ValueError(f"{text!r} is not <z> or <z_c>/<z_h>")
    values = tuple(_parse_float(p) for p in parts)
    return (values[0], values[-1])


def _parse_deep(text: str) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
    """``16x8`` (every computed gate) or ``f:16,o:8x8`` (per gate, by letter or name)."""
    if ":" not in text:
        return _parse_widths(text)
    per_gate: dict[str, tuple[int, ...]] = {}
    for part in text.split(","):
        gate, colon, widths = (p.strip() for p in part.partition(":"))
        if not colon or not gate:
            raise ValueError(f"{part!r} is not <gate>:<widths>; per gate, write e.g. deep=f:16,o:8x8")
        if gate in per_gate:
            raise ValueError(f"gate {gate!r} is given twice; give each gate's widths once")
        per_gate[gate] = _parse_widths(widths)
    return per_gate


def _format_deep(spec: Any, pairs: tuple[tuple[str, tuple[int, ...]], ...]) -> str:
    """``deep=``'s value: one set of widths when every computed gate has it, else per gate."""
    def widths(w: tuple[int, ...]) -> str:
        return "x".join(map(str, w))
    if len({w for _, w in pairs}) == 1 and len(pairs) == len(computed_gates(spec)):
        return widths(pairs[0][1])
    return ",".join(f"{g}:{widths(w)}" for g, w in pairs)


def _format_zoneout(spec: Any, z: tuple[float, float]) -> str:
    return _number(z[0]) if z[0] == z[1] else f"{_number(z[0])}/{_number(z[1])}"


#: How a value word writes its field's value, where ``_number`` does not (given the spec and the value).
_FORMAT: dict[str, Callable[[Any, Any], str]] = {"deep": _format_deep, "zoneout": _format_zoneout}


# ---------------------------------------------------------------------------- parameters


def _peephole(spec: Any, d: Dims) -> dict[str, tuple[int, ...]]:
    return {f"peephole_{g}": (d.H,) for g in sigmoid_gates(spec)}


def _fgr(spec: Any, d: Dims) -> dict[str, tuple[int, ...]]:
    n = len(sigmoid_gates(spec)) * d.H
    return {"weight_gg": (n, n)}


def _layernorm(spec: Any, d: Dims) -> dict[str, tuple[int, ...]]:
    return {"ln_ih_weight": (d.R,), "ln_hh_weight": (d.R,), "ln_c_weight": (d.H,), "ln_c_bias": (d.H,)}


def _deep(spec: Any, d: Dims) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for g, widths in spec.gate_hidden:
        sizes = [*widths, d.H]
        for j in range(1, len(sizes)):
            out[f"mlp_{g}_weight{j}"] = (sizes[j], sizes[j - 1])
            if d.bias:
                out[f"mlp_{g}_bias{j}"] = (sizes[j],)
    return out


#: Slopes of the hard sigmoids, ``clamp(slope · x + 1/2, 0, 1)``.
HARD_SIGMOID_SLOPES: Mapping[str, float] = MappingProxyType({"hard_sigmoid": 0.2, "hardsigmoid": 1.0 / 6.0})

_AFFINE = "would need the optional Affine activation, which runtimes need not implement"
_GREFF = "Greff et al. 2017, LSTM: A Search Space Odyssey"

# ---------------------------------------------------------------------------- the table

#: The deep gates' rows: where they come from, and why the ONNX operator cannot carry them.
_DEEPER = "the gates as fully connected layers, made deeper"
_NOT_MLP = "the LSTM operator's gates are single linear layers, not MLPs"

#: The variant table, in the order :attr:`CellSpec.name` writes words and the docs list them.
ROWS: tuple[Row, ...] = (
    Row("vanilla", {}, "the equations of `docs/cell.md`, as `torch.nn.LSTM`",
        "Hochreiter & Schmidhuber 1997; Gers, Schmidhuber & Cummins 2000", flag=False),
    Row("peephole", {"peephole": True}, "i, f see `c_{t-1}`; o sees `c_t` (diagonal weights `peephole_i/f/o`)",
        "Gers & Schmidhuber 2000", params=_peephole),
    Row("cifg", {"coupled": True}, "coupled input and forget gates: `f = 1 − i`", _GREFF, couples="f"),
    Row("fgr", {"fgr": True}, "full gate recurrence: i, f, o also see i, f, o of t−1 (`weight_gg`)", _GREFF,
        params=_fgr, onnx="the LSTM operator has no gate-to-gate recurrence (weight_gg)"),
    Row("layernorm", {"layernorm": True},
        "layer norm on the input and recurrent pre-activations (per gate chunk, where Ba et al. normalise all "
        "4H at once) and on `c_t`",
        "Ba, Kiros & Hinton 2016", aliases=("ln",), params=_layernorm,
        onnx="the LSTM operator has no layer normalisation"),
    Row("nig", {"input_gate": False}, "no input gate: i ≡ 1", _GREFF, removes="i",
        onnx="the LSTM operator always computes the input gate"),
    Row("nfg", {"forget_gate": False}, "no forget gate: f ≡ 1 (the 1997 LSTM)", _GREFF, removes="f",
        onnx="the LSTM operator always computes the forget gate"),
    Row("nog", {"output_gate": False}, "no output gate: o ≡ 1", _GREFF, removes="o",
        onnx="the LSTM operator always computes the output gate"),
    Row("niaf", {"candidate_activation": "identity"}, "identity instead of tanh on the candidate g", _GREFF,
        aliases=("cand_act=identity",), onnx=f"the LSTM operator's identity candidate {_AFFINE}"),
    Row("cand_act=relu", {"candidate_activation": "relu"}, "ReLU instead of tanh on the candidate g",
        "Keras' and ONNX's `activation`"),
    Row("noaf", {"output_activation": "identity"}, "identity instead of tanh on the cell output", _GREFF,
        aliases=("out_act=identity",), onnx=f"the LSTM operator's identity output {_AFFINE}"),
    Row("out_act=relu", {"output_activation": "relu"}, "ReLU instead of tanh on the cell output",
        "Keras' and ONNX's `activation`"),
    Row("gate_act=hard_sigmoid", {"gate_activation": "hard_sigmoid"},
        "the gates i, f, o use `clamp(0.2 u + 0.5, 0, 1)` instead of σ",
        "Keras 2's `recurrent_activation` default; ONNX `HardSigmoid`'s defaults"),
    Row("gate_act=hardsigmoid", {"gate_activation": "hardsigmoid"},
        "the gates i, f, o use `clamp(u / 6 + 0.5, 0, 1)` instead of σ",
        "`torch.nn.Hardsigmoid`; Keras 3's `hard_sigmoid`"),
    Row("deep", {"gate_hidden": VALUE}, "every computed gate an MLP over `[x, h]` with these hidden widths "
        "(`deep=f:32,o:16x8`, or `CellSpec(gate_hidden={\"f\": (32,)})`, per gate)", _DEEPER,
        placeholder="<w>[x<w>…]", parse=_parse_deep, params=_deep, flag=False, example="3", onnx=_NOT_MLP),
    *(Row(f"deep_act={act}", {"gate_hidden_activation": act}, doc, _DEEPER, flag=False,
          example=f"deep=3+deep_act={act}", onnx=_NOT_MLP)
      for act, doc in (("relu", "ReLU instead of tanh between a deep gate's layers"),
                       ("sigmoid", "σ instead of tanh between a deep gate's layers"),
                       ("identity", "no activation between a deep gate's layers (a product of linear maps: "
                                    "a low-rank gate)"))),
    Row("clip", {"cell_clip": VALUE}, "`c_t` clipped to ±c", "TF's `cell_clip`; ONNX's clip bounds the gates",
        aliases=("cell_clip",), placeholder="<c>", parse=_parse_float, example="0.5",
        scalars={"clip": lambda s: float(s.cell_clip or 0.0)},
        onnx="the LSTM operator's clip bounds the gate pre-activations, lstmkit's cell_clip bounds c_t: "
             "different functions"),
    Row("zoneout", {"zoneout": VALUE},
        "in training each unit keeps its previous `c` (prob. z_c) and `h` (prob. z_h); at evaluation the "
        "expectation", "Krueger et al. 2016, Zoneout", placeholder="<z>[/<z_h>]", parse=_parse_zoneout,
        example="0.2/0.1", scalars={"zoneout_c": lambda s: s.zoneout[0], "zoneout_h": lambda s: s.zoneout[1]},
        onnx="the LSTM operator has no zoneout (at evaluation c_t and h_t mix in the previous state)"),
    Row("slstm", {"slstm": True},
        "the sLSTM: exponential input gate `i' = exp(ĩ − m_t)`, forget gate `f' = exp(log σ(f̃) + m_{t−1} − m_t)`, "
        "normaliser `n_t = f' n_{t−1} + i'`, stabiliser `m_t = max(log σ(f̃) + m_{t−1}, ĩ)`, `h_t = o ⊙ c_t / n_t`; "
        "state `(h, c, n, m)`", "Beck et al. 2024, xLSTM: Extended Long Short-Term Memory", states=("n", "m"),
        onnx="the LSTM operator has no exponential gates, normaliser or stabiliser"),
    Row("forget_act=exp", {"forget_activation": "exp"},
        "sLSTM with an exponential forget gate: `f' = exp(f̃ + m_{t−1} − m_t)`, `m_t = max(f̃ + m_{t−1}, ĩ)`",
        "Beck et al. 2024, §2.2", example="slstm+forget_act=exp", onnx="the LSTM operator has no exponential gates"),
    Row("n_clamp", {"n_clamp": True}, "sLSTM with the normaliser kept ≥ 1: `n_t = max(f' n_{t−1} + i', 1)`, as "
        "FlashRNN computes it", "Pöppel et al. 2025, FlashRNN", example="slstm+n_clamp",
        onnx="the LSTM operator has no normaliser"),
    Row("heads", {"heads": VALUE},
        "the recurrent weights block-diagonal: each gate's `W_hh` is k blocks of `n_k/k × H_out/k` on the diagonal "
        "(head j of the gate reads head j of `h_{t-1}`); `weight_hh` is stored `(R, H_out/k)`",
        "Beck et al. 2024, xLSTM (sLSTM heads); Pöppel et al. 2025, FlashRNN", placeholder="<k>", parse=_parse_int,
        flag=False, example="2",
        onnx="the LSTM operator's R is one dense matrix per gate, not k blocks"),
    Row("chrono", {"chrono": VALUE}, "initial `b_f = log U[1, T_max − 1]` per cell, `b_i = −b_f`",
        "Tallec & Ollivier 2018", placeholder="<T_max>", parse=_parse_float, init=True, flag=False, example="50"),
    Row("ib", {"input_bias": VALUE}, "initial input-gate bias", "Hochreiter & Schmidhuber 1997, §5.4",
        aliases=("input_bias",), placeholder="<b>", parse=_parse_float, init=True, flag=False, example="-1",
        gate="i"),
    Row("fb", {"forget_bias": VALUE}, "initial forget-gate bias (1 recommended)", "Jozefowicz et al. 2015",
        aliases=("forget_bias",), placeholder="<b>", parse=_parse_float, init=True, flag=False, example="1",
        gate="f"),
    Row("ob", {"output_bias": VALUE}, "initial output-gate bias", "Hochreiter & Schmidhuber 1997, §5.1",
        aliases=("output_bias",), placeholder="<b>", parse=_parse_float, init=True, flag=False, example="-1",
        gate="o"),
    Row("rnn", {"kind": "rnn"}, "the plain tanh RNN, `h_t = tanh(W_ih x_t + W_hh h_{t-1} + b)` (`lstmkit.RNN`)",
        "Elman 1990", removes="ifo", kind="rnn"),
    Row("rnn_relu", {"kind": "rnn", "nonlinearity": "relu"},
        "the plain RNN with ReLU (`nonlinearity='relu'`), with torch's initialisation (not Le et al.'s identity "
        "`W_hh`)", "Le, Jaitly & Hinton 2015", removes="ifo", kind="rnn"),
)

_BY_WORD: dict[str, Row] = {}
for _row in ROWS:
    for _w in (_row.word, *_row.aliases):
        assert _w not in _BY_WORD, f"variant table: word {_w!r} twice"
        _BY_WORD[_w] = _row

#: The kernels' flag bits: bit ``k`` of a flag word is ``FLAGS[k]``.
FLAGS: tuple[str, ...] = tuple(r.flag_name for r in ROWS if r.flag)

#: The numbers the kernels take at run time (the operators' float arguments), in the rows' order.
SCALARS: tuple[str, ...] = tuple(name for r in ROWS for name in r.scalars)


def scalar_values(spec: Any) -> tuple[float, ...]:
    """The values of :data:`SCALARS` for ``spec`` (0 where the variant has none)."""
    return tuple(float(read(spec)) for r in ROWS for read in r.scalars.values())

#: Every cell state a variant may carry after ``h``: the LSTM's ``c``, then those rows add
#: (the sLSTM's ``n``, ``m``); :func:`cell_states` gives one spec's.
STATES: tuple[str, ...] = ("c", *dict.fromkeys(name for r in ROWS for name in r.states))


def state_row(name: str) -> Row | None:
    """The row that adds cell state ``name`` (None for the LSTM's own ``c``)."""
    return next((r for r in ROWS if name in r.states), None)


def example_cells() -> list[str]:
    """One cell per row of the table (a value word with its example value): what a check of
    every variant runs (``lstmkit doctor``)."""
    return [example_cell(r) for r in ROWS if r.kind == "lstm"]


def example_cell(r: Row) -> str:
    """A cell (a ``cell=`` string) that has row ``r``: the word with its example value, or its example cell."""
    if r.takes_value:
        return f"{r.word}={r.example}"
    return r.example or r.word


def row(word: str) -> Row | None:
    """The row a word (or alias) names, or None."""
    return _BY_WORD.get(word)


def words() -> list[str]:
    """Every word and alias (value words without their value)."""
    return sorted(_BY_WORD)


@functools.lru_cache(maxsize=1024)
def cell_states(spec: Any) -> tuple[str, ...]:
    """The cell's states after ``h``, in order: ``("c",)`` for the LSTM, then those the active
    rows add (the sLSTM: ``("c", "n", "m")``); ``()`` for the plain RNN. A layer returns and
    accepts ``(h, *cell_states)``; the kernels keep them side by side, (B, len · H)."""
    if spec.kind != "lstm":
        return ()
    return ("c", *(name for r in ROWS if r.states and r.sets and r.active(spec) for name in r.states))


def init_fields() -> tuple[str, ...]:
    """The CellSpec fields that only set initial values."""
    return tuple(name for r in ROWS if r.init for name in r.sets)


# The derivations below run on every layer call: each is cached per spec (a CellSpec is frozen
# and hashable), and returns what cannot be changed in place.

_F = Callable[..., Any]


def per_spec_cache(fn: _F) -> _F:
    """``fn`` cached on its (hashable) arguments, except while ``torch.compile`` traces: dynamo
    cannot trace the cache's ``hash`` of the argument tuple (torch 2.11 broke the graph there), and
    the traced program need not look anything up again. ``.uncached`` is ``fn`` itself, for a spec
    still being built (a cache would keep it as a key, hashed before its fields are final)."""
    import torch

    cached = functools.lru_cache(maxsize=1024)(fn)

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)
    call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    call.uncached = fn  # type: ignore[attr-defined]
    return call


@per_spec_cache
def active_rows(spec: Any) -> tuple[Row, ...]:
    """The rows ``spec`` has, without those another active row contains (``rnn`` under
    ``rnn_relu``) and without ``vanilla`` unless nothing else is active."""
    rows = [r for r in ROWS if r.active(spec) and r.sets]
    return tuple(r for r in rows if not any(o is not r and set(r.sets.items()) < set(o.sets.items()) for o in rows))


@per_spec_cache
def flag_names(spec: Any) -> tuple[str, ...]:
    """The flags of the rows ``spec`` has (every active row, ``rnn`` included under ``rnn_relu``)."""
    return tuple(r.flag_name for r in ROWS if r.flag and r.sets and r.active(spec))


@per_spec_cache
def flag_word(spec: Any) -> int:
    """``spec`` as the kernels' flag word (bit ``k`` set if ``FLAGS[k]`` applies)."""
    return sum(1 << FLAGS.index(name) for name in flag_names(spec))


@per_spec_cache
def computed_gates(spec: Any) -> tuple[str, ...]:
    """Gates with parameters of their own, in :data:`lstmkit.layout.GATES` order: those no
    active row removes or couples."""
    gone = {g for r in ROWS if r.active(spec) and r.sets for g in r.removes + r.couples}
    return tuple(g for g in GATES if g not in gone)


@per_spec_cache
def sigmoid_gates(spec: Any) -> tuple[str, ...]:
    """Computed gates among ``i, f, o`` (the LSTM's sigmoid gates)."""
    return tuple(g for g in computed_gates(spec) if g != "g") if spec.kind == "lstm" else ()


def gate_removal_masks() -> dict[str, int]:
    """Per gate, the flag bits that remove it from the computed gates (absent or coupled):
    what the kernels decode their gate offsets from."""
    out = {}
    for g in GATES:
        bits = [r for r in ROWS if g in r.removes + r.couples]
        assert all(r.flag for r in bits), f"variant table: a row removing gate {g} needs a kernel flag"
        out[g] = sum(1 << FLAGS.index(r.flag_name) for r in bits)
    return out


def param_shapes(spec: Any, dims: Dims) -> dict[str, tuple[int, ...]]:
    """The parameters the spec's rows add, ``name -> shape``, in table order."""
    out: dict[str, tuple[int, ...]] = {}
    for r in ROWS:
        if r.params is not None and r.active(spec):
            out.update(r.params(spec, dims))
    return out


@per_spec_cache
def onnx_refusal(spec: Any) -> str | None:
    """Why the ONNX ``LSTM``/``RNN`` operator cannot compute ``spec`` (None if it can)."""
    for r in ROWS:
        if r.onnx is not None and r.sets and r.active(spec):
            return f"{r.onnx}, so variant {r.word!r} (cell {spec.name!r}) cannot be written with it"
    return None
