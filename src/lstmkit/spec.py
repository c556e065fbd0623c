"""The variant space: a frozen, validated description of one recurrent cell.

A variant is data, not a subclass. :class:`CellSpec` says which gates exist, which
activations they use and which extras (peepholes, layer norm, deep gates, …) the cell
has; :func:`resolve` turns a preset name such as ``"peephole+cifg"`` or a spec into a
validated :class:`CellSpec`. The equations live in :mod:`lstmkit.cell` and are written
out in ``docs/cell.md``.

Combinations that make no sense are refused at construction with a message that says
why (for example ``nfg`` with ``cifg``: the coupled forget gate *is* ``1 − i``, so it
cannot also be removed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lstmkit._suggest import did_you_mean
from lstmkit.layout import GATE_NAMES, GATES

__all__ = ["CellSpec", "PRESETS", "INIT_FIELDS", "resolve", "preset_names", "MAX_GATE_WIDTH"]

#: The widest hidden layer a deep gate may have.
MAX_GATE_WIDTH = 2**20
#: Fields that only set initial parameter values: they change no equation, so two specs
#: that differ only in them compute the same function of the same parameters.
INIT_FIELDS: tuple[str, ...] = ("input_bias", "forget_bias", "output_bias", "chrono")

_ACTIVATIONS = ("tanh", "identity")
_NONLINEARITIES = ("tanh", "relu")
_HIDDEN_ACTIVATIONS = ("tanh", "relu", "sigmoid", "identity")


def _freeze_gate_hidden(value: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Normalise ``gate_hidden`` to a sorted tuple of ``(gate letter, widths)`` pairs.

    Accepts a tuple of widths (every computed gate gets those hidden layers), a mapping
    from gate letter or gate name to widths, or an already frozen tuple of pairs.
    """
    if value is None or value == () or value == {}:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        items = [(g, tuple(value)) for g in GATES]
    elif isinstance(value, (tuple, list)) and all(
        isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[0], str) for v in value
    ):
        items = [(k, v) for k, v in value]
    else:
        raise TypeError(
            "gate_hidden: expected a tuple of hidden widths, e.g. (16,), or a mapping from gate "
            f"to widths, e.g. {{'f': (16,)}}; got {value!r}"
        )
    out: dict[str, tuple[int, ...]] = {}
    given: dict[str, str] = {}
    for key, widths in items:
        letter = _gate_letter(key, "gate_hidden")
        if letter in given:
            raise ValueError(f"gate_hidden: gate {letter!r} is given twice (as {given[letter]!r} and {key!r}); "
                             f"give each gate's widths once")
        given[letter] = key
        if not isinstance(widths, (tuple, list)):
            widths = (widths,)
        widths = tuple(widths)
        if not all(isinstance(w, int) and not isinstance(w, bool) and 0 < w <= MAX_GATE_WIDTH for w in widths):
            raise ValueError(
                f"gate_hidden[{key!r}]: expected positive integer widths of at most {MAX_GATE_WIDTH:,} "
                f"(a sane bound), got {widths!r}"
            )
        if widths:
            out[letter] = widths
    return tuple(sorted(out.items(), key=lambda kv: GATES.index(kv[0])))


def _gate_letter(key: str, what: str) -> str:
    if key in GATES:
        return key
    for letter, name in zip(GATES, GATE_NAMES):
        if key == name:
            return letter
    raise ValueError(
        f"{what}: unknown gate {key!r}; expected one of {list(GATES)} or {list(GATE_NAMES)}"
    )


@dataclass(frozen=True)
class CellSpec:
    """What one cell computes. Every field defaults to the vanilla LSTM.

    Args:
        kind: ``"lstm"`` or ``"rnn"`` (the plain Elman RNN, for comparison).
        nonlinearity: the RNN's activation, ``"tanh"`` or ``"relu"`` (rnn only).
        input_gate: ``False`` is NIG: ``i ≡ 1``.
        forget_gate: ``False`` is NFG: ``f ≡ 1``.
        output_gate: ``False`` is NOG: ``o ≡ 1``.
        coupled: CIFG, ``f = 1 − i`` (no forget-gate parameters).
        candidate_activation: ``"tanh"``, or ``"identity"`` (NIAF).
        output_activation: ``"tanh"``, or ``"identity"`` (NOAF).
        peephole: diagonal peephole weights: i and f see ``c_{t-1}``, o sees ``c_t``.
        fgr: full gate recurrence: the sigmoid gates also see the previous step's
            sigmoid-gate activations through ``weight_gg``.
        layernorm: layer norm on the input and recurrent pre-activations (per gate) and
            on ``c_t`` before the output activation (Ba et al. 2016).
        gate_hidden: deep gates: a tuple of hidden widths for every gate, or a mapping
            ``{gate: widths}``; each such gate is an MLP over ``[x_t, h_{t-1}]``.
        gate_hidden_activation: the activation between a deep gate's layers.
        cell_clip: clip ``c_t`` to ``[-cell_clip, cell_clip]`` (``None`` = no clip).

    Initialisation only (they change no equation; see :data:`INIT_FIELDS` and
    docs/cell.md, "Initialisation options"). ``None`` keeps torch's uniform
    initialisation of that bias:

        input_bias: initial value of the input gate's bias ``b_i`` (Hochreiter &
            Schmidhuber 1997 start input gates negative, e.g. −3 and −6 on the adding
            problem, so that the cell ignores inputs until it learns to open).
        forget_bias: initial value of the forget gate's bias ``b_f`` (Gers et al. 2000
            start it positive; Jozefowicz et al. 2015 recommend 1.0; long lags need more).
        output_bias: initial value of the output gate's bias ``b_o`` (Hochreiter &
            Schmidhuber 1997 use −1, −2, …).
        chrono: chrono initialisation for dependencies up to ``T_max = chrono`` steps
            (Tallec & Ollivier 2018): ``b_f = log u`` with ``u ~ U[1, T_max − 1]`` drawn
            per cell, and ``b_i = −b_f``.
    """

    kind: str = "lstm"
    nonlinearity: str = "tanh"
    input_gate: bool = True
    forget_gate: bool = True
    output_gate: bool = True
    coupled: bool = False
    candidate_activation: str = "tanh"
    output_activation: str = "tanh"
    peephole: bool = False
    fgr: bool = False
    layernorm: bool = False
    gate_hidden: Any = field(default=())
    gate_hidden_activation: str = "tanh"
    cell_clip: float | None = None
    forget_bias: float | None = None
    input_bias: float | None = None
    output_bias: float | None = None
    chrono: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "gate_hidden", _freeze_gate_hidden(self.gate_hidden))
        for name in ("input_gate", "forget_gate", "output_gate", "coupled", "peephole", "fgr",
                     "layernorm"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"CellSpec.{name}: expected a bool, got {value!r}")
        if self.kind not in ("lstm", "rnn"):
            raise ValueError(f"CellSpec.kind: expected 'lstm' or 'rnn', got {self.kind!r}")
        _check_choice("nonlinearity", self.nonlinearity, _NONLINEARITIES)
        _check_choice("candidate_activation", self.candidate_activation, _ACTIVATIONS)
        _check_choice("output_activation", self.output_activation, _ACTIVATIONS)
        _check_choice("gate_hidden_activation", self.gate_hidden_activation, _HIDDEN_ACTIVATIONS)
        if self.cell_clip is not None:
            if isinstance(self.cell_clip, bool) or not isinstance(self.cell_clip, (int, float)):
                raise TypeError(f"CellSpec.cell_clip: expected a number or None, got {self.cell_clip!r}")
            if not (math.isfinite(self.cell_clip) and self.cell_clip > 0):
                raise ValueError(
                    f"CellSpec.cell_clip: expected a finite number > 0, got {self.cell_clip!r}"
                )
            object.__setattr__(self, "cell_clip", float(self.cell_clip))
        for name in INIT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CellSpec.{name}: expected a finite number or None, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.chrono is not None and not self.chrono > 2:
            raise ValueError(
                f"CellSpec.chrono: expected T_max > 2 (the forget bias is log U[1, T_max − 1]), "
                f"got {self.chrono!r}"
            )
        self._validate_combination()

    def _validate_combination(self) -> None:
        if self.kind == "rnn":
            changed = [f.name for f in dataclasses.fields(self)
                       if f.name not in ("kind", "nonlinearity")
                       and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(
                    f"CellSpec: the plain RNN (kind='rnn') has no gates or cell state, so "
                    f"{changed} cannot apply to it"
                )
            return
        if self.nonlinearity != "tanh":
            raise ValueError(
                "CellSpec.nonlinearity: only the plain RNN (kind='rnn') takes a nonlinearity; "
                f"got {self.nonlinearity!r} for kind='lstm'"
            )
        if self.coupled and not self.forget_gate:
            raise ValueError(
                "CellSpec: cifg (coupled=True) defines the forget gate as f = 1 − i, so it cannot "
                "also be removed (nfg, forget_gate=False); choose one"
            )
        if self.coupled and not self.input_gate:
            raise ValueError(
                "CellSpec: cifg (coupled=True) needs the input gate: with nig (i ≡ 1) the coupled "
                "forget gate would be f = 1 − i ≡ 0 and the cell would forget everything each step"
            )
        if self.fgr and not self.sigmoid_gates:
            raise ValueError(
                "CellSpec: fgr (full gate recurrence) connects the sigmoid gates i, f, o to each "
                "other, but this variant computes none of them"
            )
        if self.peephole and not self.sigmoid_gates:
            raise ValueError(
                "CellSpec: peephole connections feed c into the sigmoid gates i, f, o, but this "
                "variant computes none of them"
            )
        self._validate_init()
        for letter, _ in self.gate_hidden:
            if letter not in self.computed_gates:
                raise ValueError(
                    f"CellSpec.gate_hidden: gate {letter!r} ({GATE_NAMES[GATES.index(letter)]}) "
                    f"is not computed in this variant, so it cannot be deep"
                )

    def _validate_init(self) -> None:
        """Each initial bias needs its gate computed; chrono sets b_f and b_i itself."""
        no_f = "cifg derives f = 1 − i" if self.coupled else "nfg removes the forget gate"
        for name, gate, why in (("input_bias", "i", "nig removes the input gate"),
                                ("forget_bias", "f", no_f),
                                ("output_bias", "o", "nog removes the output gate")):
            if getattr(self, name) is not None and gate not in self.computed_gates:
                raise ValueError(f"CellSpec.{name}: the {GATE_NAMES[GATES.index(gate)]} gate has no "
                                 f"bias of its own here ({why})")
        if self.chrono is None:
            return
        if self.coupled:
            raise ValueError(
                "CellSpec.chrono: chrono initialisation sets b_f and b_i = −b_f separately, but cifg "
                "has no forget-gate bias (f = 1 − σ(u_i)); for a chrono-like start set the input "
                "bias alone, e.g. ib=-3"
            )
        if "f" not in self.computed_gates or "i" not in self.computed_gates:
            why = "nfg removes the forget gate" if "f" not in self.computed_gates else \
                "nig removes the input gate"
            raise ValueError(f"CellSpec.chrono: chrono initialisation sets the forget and the input "
                             f"gate's biases, but {why}")
        given = [w for w, v in (("fb", self.forget_bias), ("ib", self.input_bias)) if v is not None]
        if given:
            raise ValueError(
                f"CellSpec.chrono: chrono initialisation sets b_f = log U[1, T_max − 1] and "
                f"b_i = −b_f itself; drop {' and '.join(given)}= or drop chrono="
            )

    def without_init(self) -> CellSpec:
        """The same equations with every initialisation-only option cleared."""
        return self.replace(**dict.fromkeys(INIT_FIELDS))

    @property
    def init_biases(self) -> dict[str, float]:
        """The constant initial gate biases this spec sets, by gate letter (chrono excluded)."""
        return {gate: v for gate, v in (("i", self.input_bias), ("f", self.forget_bias),
                                        ("o", self.output_bias)) if v is not None}

    # ---- derived facts (the kernels and the loop read these, never the raw flags) ----

    @property
    def is_lstm(self) -> bool:
        """True for every LSTM variant, False for the plain RNN."""
        return self.kind == "lstm"

    @property
    def is_vanilla(self) -> bool:
        """True when the cell computes the vanilla LSTM (initial biases and chrono change
        only the initialisation, not the equations)."""
        return self.without_init() == CellSpec()

    @property
    def computed_gates(self) -> tuple[str, ...]:
        """Gates with parameters of their own, in canonical order (subset of ``i, f, g, o``)."""
        if self.kind == "rnn":
            return ("g",)
        out = []
        if self.input_gate:
            out.append("i")
        if self.forget_gate and not self.coupled:
            out.append("f")
        out.append("g")
        if self.output_gate:
            out.append("o")
        return tuple(out)

    @property
    def sigmoid_gates(self) -> tuple[str, ...]:
        """Computed gates that are sigmoids (``S`` in docs/cell.md): those of ``i, f, o``."""
        return tuple(g for g in self.computed_gates if g != "g") if self.is_lstm else ()

    def hidden_widths(self, gate: str) -> tuple[int, ...]:
        """Hidden widths of a deep gate's MLP (``()`` for an ordinary gate)."""
        return dict(self.gate_hidden).get(gate, ())

    def first_width(self, gate: str, hidden_size: int) -> int:
        """Rows that ``gate`` occupies in ``weight_ih`` / ``weight_hh`` (``n_k``)."""
        widths = self.hidden_widths(gate)
        return widths[0] if widths else hidden_size

    def gate_rows(self, hidden_size: int) -> int:
        """``R``: rows of ``weight_ih`` (4H for the vanilla LSTM, H for the RNN)."""
        return sum(self.first_width(g, hidden_size) for g in self.computed_gates)

    @property
    def name(self) -> str:
        """A short, stable name: the preset it equals, or the flags that differ."""
        for key, spec in PRESETS.items():
            if spec == self:
                return key
        parts = []
        if self.kind == "rnn":
            return f"rnn({self.nonlinearity})"
        for flag, word in (("peephole", "peephole"), ("coupled", "cifg"), ("fgr", "fgr"),
                           ("layernorm", "layernorm")):
            if getattr(self, flag):
                parts.append(word)
        for flag, word in (("input_gate", "nig"), ("forget_gate", "nfg"), ("output_gate", "nog")):
            if not getattr(self, flag):
                parts.append(word)
        if self.candidate_activation == "identity":
            parts.append("niaf")
        if self.output_activation == "identity":
            parts.append("noaf")
        if self.gate_hidden:
            parts.append("deep(" + ",".join(f"{g}={'x'.join(map(str, w))}"
                                           for g, w in self.gate_hidden) + ")")
        if self.cell_clip is not None:
            parts.append(f"clip={_number(self.cell_clip)}")
        for name, word in _INIT_WORDS:
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{word}={_number(value)}")
        return "+".join(parts) or "vanilla"

    def replace(self, **changes: Any) -> CellSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _number(value: float) -> str:
    """Shortest text that reads back as exactly ``value`` (``3``, ``-0.5``, ``0.1``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


#: (field, preset word) of the initialisation options, in the order ``name`` writes them.
_INIT_WORDS: tuple[tuple[str, str], ...] = (("chrono", "chrono"), ("input_bias", "ib"),
                                            ("forget_bias", "fb"), ("output_bias", "ob"))
#: Words with a value (``word=value``) -> the field they set; long field names work too.
_VALUE_WORDS: dict[str, str] = {"clip": "cell_clip", "cell_clip": "cell_clip",
                                **{w: f for f, w in _INIT_WORDS}, **{f: f for f, _ in _INIT_WORDS}}


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"CellSpec.{name}: expected one of {list(choices)}, got {value!r}")


#: Named presets: the rows of the variant table (Greff et al. 2017 names where they exist).
PRESETS: dict[str, CellSpec] = {
    "vanilla": CellSpec(),
    "peephole": CellSpec(peephole=True),
    "nig": CellSpec(input_gate=False),
    "nfg": CellSpec(forget_gate=False),
    "nog": CellSpec(output_gate=False),
    "niaf": CellSpec(candidate_activation="identity"),
    "noaf": CellSpec(output_activation="identity"),
    "cifg": CellSpec(coupled=True),
    "fgr": CellSpec(fgr=True),
    "layernorm": CellSpec(layernorm=True),
    "rnn": CellSpec(kind="rnn"),
}

# Preset words that are flags (combinable with "+"), with the fields they set.
_WORDS: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "peephole": {"peephole": True},
    "nig": {"input_gate": False},
    "nfg": {"forget_gate": False},
    "nog": {"output_gate": False},
    "niaf": {"candidate_activation": "identity"},
    "noaf": {"output_activation": "identity"},
    "cifg": {"coupled": True},
    "fgr": {"fgr": True},
    "layernorm": {"layernorm": True},
    "ln": {"layernorm": True},
    "rnn": {"kind": "rnn"},
    "rnn_relu": {"kind": "rnn", "nonlinearity": "relu"},
}


def preset_names() -> list[str]:
    """Names accepted by :func:`resolve` (combine flag words with ``+``)."""
    return sorted(_WORDS) + ["clip=<float>", "ib=<float>", "fb=<float>", "ob=<float>",
                             "chrono=<T_max>", "deep=<width>[x<width>…]"]


def resolve(cell: str | CellSpec | Mapping[str, Any] | None = "vanilla", **overrides: Any) -> CellSpec:
    """Turn a preset name, a mapping of fields or a :class:`CellSpec` into a validated spec.

    Names combine with ``+``: ``"peephole+cifg+layernorm"``, ``"vanilla+fb=1"``,
    ``"deep=16"`` (every gate an MLP with one hidden layer of 16), ``"clip=3"``; the
    initialisation words ``ib=``, ``fb=``, ``ob=`` (initial input, forget, output gate
    bias) and ``chrono=T_max`` (chrono initialisation).
    Keyword ``overrides`` replace fields afterwards.

    Raises:
        ValueError: unknown name or an impossible combination (the message says why).
        TypeError: ``cell`` is of another type.
    """
    if cell is None:
        cell = "vanilla"
    if isinstance(cell, CellSpec):
        spec = cell
    elif isinstance(cell, Mapping):
        spec = CellSpec(**cell)
    elif isinstance(cell, str):
        fields: dict[str, Any] = {}
        set_by: dict[str, str] = {}  # field -> the word that set it
        words: set[str] = set()

        def put(word: str, changes: Mapping[str, Any]) -> None:
            if word in words:
                raise ValueError(f"cell: {word!r} is given twice in {cell!r}; give each option once")
            words.add(word)
            for name, value in changes.items():
                if name in set_by:
                    same = "is given twice" if set_by[name].partition("=")[0] == word.partition("=")[0] \
                        else f"and {set_by[name]!r} both set {name}"
                    raise ValueError(f"cell: {word!r} {same} in {cell!r}; give each option once")
                set_by[name] = word
                fields[name] = value

        for word in (w.strip() for w in cell.lower().split("+")):
            if word in _WORDS:
                put(word, _WORDS[word])
            elif word.partition("=")[0] in ("deep", *_VALUE_WORDS) and "=" in word:
                key, _, value = word.partition("=")
                if key == "deep":
                    try:
                        widths = tuple(int(v) for v in value.split("x"))
                    except ValueError:
                        raise ValueError(f"cell: cannot read {word!r}: {value!r} is not a whole number "
                                         f"(or widths joined by 'x', e.g. deep=16x8)") from None
                    put(word, {"gate_hidden": widths})
                else:
                    try:
                        number = float(value)
                    except ValueError:
                        raise ValueError(f"cell: cannot read {word!r}: {value!r} is not a number") from None
                    put(word, {_VALUE_WORDS[key]: number})
            else:
                words = [n for n in preset_names() if "<" not in n]
                raise ValueError(
                    f"cell: unknown variant {word!r} in {cell!r}{did_you_mean(word, words)}; expected "
                    f"names from {preset_names()} joined with '+', or a CellSpec"
                )
        spec = CellSpec(**fields)
    else:
        raise TypeError(f"cell: expected a preset name, a mapping or a CellSpec, got {type(cell).__name__}")
    return spec.replace(**overrides) if overrides else spec
