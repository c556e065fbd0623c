"""The variant space: a frozen, validated description of one recurrent cell.

A variant is data, not a subclass. :class:`CellSpec` says which gates exist, which
activations they use and which extras (peepholes, layer norm, deep gates, …) the cell
has; :func:`resolve` turns a preset name such as ``"peephole+cifg"`` or a spec into a
validated :class:`CellSpec`. What each word means — the fields it sets, its parameters,
the gates it removes — is the variant table, :mod:`lstmkit.variants`; this module derives
the presets, the parser, :attr:`CellSpec.name` and the parameter schema from it. The
equations live in :mod:`lstmkit.cell` and are written out in ``docs/cell.md``.

Combinations that make no sense are refused at construction with a message that says
why (for example ``nfg`` with ``cifg``: the coupled forget gate *is* ``1 − i``, so it
cannot also be removed).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lstmkit import variants
from lstmkit._suggest import did_you_mean
from lstmkit.layout import GATE_NAMES, GATES

__all__ = ["CellSpec", "PRESETS", "INIT_FIELDS", "resolve", "preset_names", "MAX_GATE_WIDTH", "gate_slices",
           "layer_param_shapes", "check_heads", "markdown_table", "spec_choices"]

#: The widest hidden layer a deep gate may have.
MAX_GATE_WIDTH = 2**20
#: Fields that only set initial parameter values (the table's ``init`` rows): they change no
#: equation, so two specs that differ only in them compute the same function of the same parameters.
INIT_FIELDS: tuple[str, ...] = variants.init_fields()

_CHOICES: dict[str, tuple[str, ...]] = {}

#: The fields of the constant initial gate biases (ib=, fb=, ob=), by gate letter: the variant
#: table's rows that name a gate.
_INIT_BIAS_FIELDS: dict[str, str] = {r.gate: field for r in variants.ROWS if r.gate for field in r.sets}
#: The sLSTM's own options (the rows whose example cell is ``slstm+…``: they need it), by field.
_SLSTM_OPTIONS: dict[str, str] = {field: r.word for r in variants.ROWS if (r.example or "").startswith("slstm+")
                                  for field in r.sets}


@functools.cache
def _fields_of_type(annotation: str) -> tuple[str, ...]:
    """CellSpec's fields annotated ``annotation`` ("bool": the switches; "str": the choices
    and ``kind``), from its dataclass fields."""
    return tuple(f.name for f in dataclasses.fields(CellSpec) if f.type == annotation)


def _widths_for_every_gate(value: Any) -> bool:
    """Whether ``gate_hidden`` is one tuple of widths for every computed gate (``deep=n``)."""
    return isinstance(value, (tuple, list)) and bool(value) and all(_is_width(v) for v in value)


def _is_width(v: Any) -> bool:
    """A whole number (a NumPy integer too, as ``heads`` takes), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _freeze_gate_hidden(value: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Normalise ``gate_hidden`` to a sorted tuple of ``(gate letter, widths)`` pairs.

    Accepts a tuple of widths (every computed gate gets those hidden layers), a mapping
    from gate letter or gate name to widths, or an already frozen tuple of pairs.
    """
    if value is None or (isinstance(value, (tuple, list, Mapping)) and len(value) == 0):
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif _widths_for_every_gate(value):  # the caller keeps the computed gates' (CellSpec.__post_init__)
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
        if not all(_is_width(w) and 0 < w <= MAX_GATE_WIDTH for w in widths):
            raise ValueError(
                f"gate_hidden[{key!r}]: expected positive integer widths of at most {MAX_GATE_WIDTH:,} "
                f"(a sane bound), got {widths!r}"
            )
        if widths:
            out[letter] = tuple(int(w) for w in widths)  # plain ints: specs compare and hash alike
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
        candidate_activation: ``"tanh"``, ``"identity"`` (NIAF) or ``"relu"``.
        output_activation: ``"tanh"``, ``"identity"`` (NOAF) or ``"relu"``.
        gate_activation: the activation of the gates i, f, o: ``"sigmoid"``, ``"hard_sigmoid"``
            (``clamp(0.2 u + 0.5, 0, 1)``, Keras 2 and ONNX) or ``"hardsigmoid"``
            (``clamp(u / 6 + 0.5, 0, 1)``, torch and Keras 3).
        peephole: diagonal peephole weights: i and f see ``c_{t-1}``, o sees ``c_t``.
        fgr: full gate recurrence: the sigmoid gates also see the previous step's
            sigmoid-gate activations through ``weight_gg``.
        layernorm: layer norm on the input and recurrent pre-activations (per gate) and
            on ``c_t`` before the output activation (Ba et al. 2016).
        gate_hidden: deep gates: a tuple of hidden widths for every gate, or a mapping
            ``{gate: widths}``; each such gate is an MLP over ``[x_t, h_{t-1}]``.
        gate_hidden_activation: the activation between a deep gate's layers.
        cell_clip: clip ``c_t`` to ``[-cell_clip, cell_clip]`` (``None`` = no clip).
        zoneout: ``(z_c, z_h)``: in training each unit keeps its previous ``c`` with
            probability ``z_c`` and its previous ``h`` with probability ``z_h`` (masks from
            torch's generator); at evaluation the expectation (Krueger et al. 2016).
        slstm: the sLSTM (Beck et al. 2024): exponential input gate, forget gate
            ``exp(log σ(f̃) + m_{t−1} − m_t)``, normaliser ``n`` and stabiliser ``m`` (cell
            states after ``c``), ``h = o ⊙ c / n`` (docs/cell.md, "The sLSTM").
        forget_activation: the sLSTM's forget gate: ``"sigmoid"`` (``log f = log σ(f̃)``) or
            ``"exp"`` (``log f = f̃``).
        n_clamp: the sLSTM's normaliser kept ``≥ 1`` (``n_t = max(f' n_{t−1} + i', 1)``), as
            FlashRNN computes it.
        heads: ``k`` heads: the recurrent weights are block-diagonal, each gate's ``W_hh``
            k blocks of ``n_k/k × H_out/k`` (head j of a gate reads only head j of
            ``h_{t-1}``), stored compact as ``weight_hh`` ``(R, H_out/k)`` (Beck et al. 2024;
            Pöppel et al. 2025). The layer's sizes must divide by k.

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
    gate_activation: str = "sigmoid"
    peephole: bool = False
    fgr: bool = False
    layernorm: bool = False
    gate_hidden: Any = field(default=())
    gate_hidden_activation: str = "tanh"
    cell_clip: float | None = None
    zoneout: tuple[float, float] = (0.0, 0.0)
    slstm: bool = False
    forget_activation: str = "sigmoid"
    n_clamp: bool = False
    heads: int = 1
    forget_bias: float | None = None
    input_bias: float | None = None
    output_bias: float | None = None
    chrono: float | None = None

    def __post_init__(self) -> None:
        every_gate = _widths_for_every_gate(self.gate_hidden)
        object.__setattr__(self, "gate_hidden", _freeze_gate_hidden(self.gate_hidden))
        for name in _fields_of_type("bool"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"CellSpec.{name}: expected a bool, got {value!r}")
        if self.kind not in ("lstm", "rnn"):
            raise ValueError(f"CellSpec.kind: expected 'lstm' or 'rnn', got {self.kind!r}")
        for name in _fields_of_type("str"):
            if name != "kind":  # (checked above)
                _check_choice(name, getattr(self, name), _CHOICES[name] if _CHOICES else spec_choices(name))
        if not self.gate_hidden and self.gate_hidden_activation != CellSpec.gate_hidden_activation:
            raise ValueError(f"CellSpec: deep_act={self.gate_hidden_activation} is the activation between a deep "
                             f"gate's layers, and this cell has no deep gate; add deep=<w> (or gate_hidden=...)")
        if every_gate and self.kind == "lstm":  # widths for every gate: the gates this variant computes
            # (uncached: hashing self now would keep the hash of the fields before this change)
            computed = variants.computed_gates.uncached(self)
            object.__setattr__(self, "gate_hidden", tuple((g, w) for g, w in self.gate_hidden if g in computed))
        object.__setattr__(self, "zoneout", _check_zoneout(self.zoneout))
        if isinstance(self.heads, bool) or not isinstance(self.heads, numbers.Integral):
            raise TypeError(f"CellSpec.heads: expected a whole number >= 1, got {self.heads!r}")
        object.__setattr__(self, "heads", int(self.heads))  # (a NumPy integer: a plain int, so specs compare equal)
        if not 1 <= self.heads <= MAX_GATE_WIDTH:
            raise ValueError(f"CellSpec.heads: expected a whole number in [1, {MAX_GATE_WIDTH}], got {self.heads!r}")
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

    def __hash__(self) -> int:
        # the kernels look a spec up on every call (lstmkit.variants' caches): hashed once, on first
        # use, not while constructing (torch.compile in torch 2.11 cannot trace hash() of a tuple)
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", h)
        return h  # type: ignore[no-any-return]

    def __getstate__(self) -> dict[str, Any]:  # the hash of strings differs between processes: not pickled
        return {k: v for k, v in self.__dict__.items() if k not in ("_hash", "_vanilla")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def _validate_combination(self) -> None:
        if self.kind == "rnn":
            changed = [f.name for f in dataclasses.fields(self)
                       if f.name not in ("kind", "nonlinearity", "heads")
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
        if self.gate_activation != "sigmoid" and not self.sigmoid_gates:
            raise ValueError(
                f"CellSpec: gate_activation={self.gate_activation!r} sets the activation of the gates i, f, o, but "
                f"this variant computes none of them"
            )
        if self.peephole and not self.sigmoid_gates:
            raise ValueError(
                "CellSpec: peephole connections feed c into the sigmoid gates i, f, o, but this "
                "variant computes none of them"
            )
        self._validate_slstm()
        self._validate_init()
        for letter, widths in self.gate_hidden:
            if letter not in self.computed_gates:
                raise ValueError(
                    f"CellSpec.gate_hidden: gate {letter!r} ({GATE_NAMES[GATES.index(letter)]}) "
                    f"is not computed in this variant, so it cannot be deep"
                )
            if widths[0] % self.heads:
                raise ValueError(
                    f"CellSpec: heads={self.heads} splits each gate's rows of W_hh into {self.heads} blocks, but "
                    f"the deep gate {letter!r}'s first width {widths[0]} is not divisible by {self.heads}")

    def _validate_slstm(self) -> None:
        """The sLSTM's own options need it; the LSTM's rows that it cannot take are refused, saying why."""
        if not self.slstm:
            for name, word in _SLSTM_OPTIONS.items():
                if getattr(self, name) != CellSpec.__dataclass_fields__[name].default:
                    raise ValueError(f"CellSpec: {word} is an option of the sLSTM's exponential gating "
                                     f"(its stabiliser m keeps exp finite); use 'slstm+{word}'")
            return
        why = {
            "peephole": "its gates read c_{t-1} and c_t, which the sLSTM keeps scaled by exp(-m_t)",
            "coupled": "f = 1 − i couples two sigmoids; the sLSTM's input gate is exponential",
            "fgr": "fgr feeds the sigmoid gates' activations back; the sLSTM's i and f are exp(· − m_t)",
            "layernorm": "xLSTM normalises the sLSTM's output outside the cell (a group norm per head)",
            "input_gate": "nig: the sLSTM's exponential input gate is what it adds",
            "forget_gate": "nfg: the sLSTM's forget gate enters its stabiliser m",
            "output_gate": "nog: not part of the sLSTM",
            "candidate_activation": "the sLSTM's candidate is tanh(z̃)",
            "output_activation": "the sLSTM's output is o ⊙ c / n, normalised by n, not squashed",
            "gate_activation": "the sLSTM's output gate is σ and its i, f are exponential",
            "gate_hidden": "deep gates: not part of the sLSTM",
            "cell_clip": "the sLSTM's c is scaled by exp(-m_t); a clip would change its meaning with m",
            "zoneout": "zoneout would mix c and n across different stabilisers m",
            "chrono": "chrono initialisation is derived for sigmoid gates",
        }
        takes = {"kind", "nonlinearity", "slstm", "heads", "gate_hidden_activation", *_SLSTM_OPTIONS,
                 *_INIT_BIAS_FIELDS.values()}  # (deep_act needs deep gates: refused there)
        for f in dataclasses.fields(self):  # every other field at its default (a new one too, until it is said)
            if f.name not in takes and getattr(self, f.name) != f.default:
                raise ValueError(f"CellSpec: the sLSTM (slstm) does not take {f.name}: "
                                 f"{why.get(f.name, 'not part of the sLSTM')}")

    def _validate_init(self) -> None:
        """Each initial bias needs its gate computed; chrono sets b_f and b_i itself."""
        no_f = "cifg derives f = 1 − i" if self.coupled else "nfg removes the forget gate"
        removed = {"i": "nig removes the input gate", "f": no_f, "o": "nog removes the output gate"}
        for gate, name in _INIT_BIAS_FIELDS.items():
            why = removed[gate]
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
        given = [f"{w}=" for w, v in (("fb", self.forget_bias), ("ib", self.input_bias)) if v is not None]
        if given:
            raise ValueError(
                f"CellSpec.chrono: chrono initialisation sets b_f = log U[1, T_max − 1] and "
                f"b_i = −b_f itself; drop {' and '.join(given)} or drop chrono="
            )

    def without_init(self) -> CellSpec:
        """The same equations with every initialisation-only option cleared."""
        return self.replace(**dict.fromkeys(INIT_FIELDS))

    @property
    def init_biases(self) -> dict[str, float]:
        """The constant initial gate biases this spec sets, by gate letter (chrono excluded)."""
        values = {gate: getattr(self, name) for gate, name in _INIT_BIAS_FIELDS.items()}
        return {gate: v for gate, v in values.items() if v is not None}

    # ---- derived facts (the kernels and the loop read these, never the raw flags) ----

    @property
    def is_lstm(self) -> bool:
        """True for every LSTM variant, False for the plain RNN."""
        return self.kind == "lstm"

    @property
    def is_vanilla(self) -> bool:
        """True when the cell computes the vanilla LSTM (initial biases and chrono change
        only the initialisation, not the equations)."""
        vanilla = self.__dict__.get("_vanilla")  # every call asks (the kernel choice): compared once
        if vanilla is None:
            vanilla = all(getattr(self, name) == value for name, value in _VANILLA_EQUATIONS)
            object.__setattr__(self, "_vanilla", vanilla)
        return vanilla  # type: ignore[no-any-return]

    @property
    def has_zoneout(self) -> bool:
        """True when a unit may keep its previous state (either zoneout probability above 0)."""
        return any(z > 0.0 for z in self.zoneout)

    @property
    def computed_gates(self) -> tuple[str, ...]:
        """Gates with parameters of their own, in canonical order (subset of ``i, f, g, o``):
        those no row of the variant table removes or couples."""
        return variants.computed_gates(self)

    @property
    def sigmoid_gates(self) -> tuple[str, ...]:
        """Computed gates among ``i, f, o`` (``S`` in docs/cell.md; σ or a hard sigmoid)."""
        return variants.sigmoid_gates(self)

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
        """A short, stable name: the preset it equals, or its words of the variant table
        joined with ``+``, which :func:`resolve` reads back."""
        for key, spec in PRESETS.items():
            if spec == self:
                return key
        return "+".join(row.typed(self) for row in variants.active_rows(self)) or "vanilla"

    def replace(self, **changes: Any) -> CellSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def spec_choices(name: str) -> tuple[str, ...]:
    """The values field ``name`` takes: its default and those the table's words set."""
    default = CellSpec.__dataclass_fields__[name].default
    return (default, *dict.fromkeys(v for r in variants.ROWS for k, v in r.sets.items()
                                    if k == name and v is not variants.VALUE and v != default))


def _check_zoneout(value: Any) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"CellSpec.zoneout: expected (z_c, z_h) or one number, got {value!r}")
    for z in value:
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not 0.0 <= z < 1.0:
            raise ValueError(f"CellSpec.zoneout: expected probabilities in [0, 1), got {value!r} (with z = 1 a "
                             f"unit would never change)")
    return (float(value[0]), float(value[1]))


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"CellSpec.{name}: expected one of {list(choices)}, got {value!r}")


#: Named presets: the table's words that take no value and are a cell by themselves (Greff et al.
#: 2017 names where they exist); an option of another word (``n_clamp`` of ``slstm``) is not one.
PRESETS: dict[str, CellSpec] = {r.word: CellSpec(**r.sets) for r in variants.ROWS
                                if not r.takes_value and r.example is None}


def preset_names() -> list[str]:
    """Names accepted by :func:`resolve` (combine them with ``+``)."""
    return [w if not (r := variants.row(w)) or not r.takes_value else f"{w}={r.placeholder}"
            for w in variants.words()]


def resolve(cell: str | CellSpec | Mapping[str, Any] | None = "vanilla", **overrides: Any) -> CellSpec:
    """Turn a preset name, a mapping of fields or a :class:`CellSpec` into a validated spec.

    Names combine with ``+``: ``"peephole+cifg+layernorm"``, ``"vanilla+fb=1"``,
    ``"deep=16"`` (every computed gate an MLP with one hidden layer of 16), ``"clip=3"``; the
    initialisation words ``ib=``, ``fb=``, ``ob=`` (initial input, forget, output gate
    bias) and ``chrono=T_max`` (chrono initialisation).
    Keyword ``overrides`` replace fields of a name or mapping before the spec is built (so that
    ``resolve("deep=3", coupled=True)`` is ``"deep=3+cifg"``: the widths go to the computed gates),
    and of a :class:`CellSpec` afterwards.

    Raises:
        ValueError: unknown name or an impossible combination (the message says why).
        TypeError: ``cell`` is of another type.
    """
    if cell is None:
        cell = "vanilla"
    if isinstance(cell, CellSpec):
        spec = cell
    elif isinstance(cell, Mapping):
        spec = CellSpec(**{**cell, **overrides})
        overrides = {}
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
                    option, before = word.partition("=")[0], set_by[name]
                    same = f"{option!r} is given twice ({before!r} and {word!r})" \
                        if before.partition("=")[0] == option else f"{word!r} and {before!r} both set {name}"
                    raise ValueError(f"cell: {same} in {cell!r}; give each option once")
                set_by[name] = word
                fields[name] = value

        for word in (w.strip() for w in cell.lower().split("+")):
            exact = variants.row(word)  # a word without value (choice words such as gate_act=… too)
            if exact is not None and not exact.takes_value:
                put(word, exact.sets)
                continue
            key, eq, text = word.partition("=")
            row = variants.row(key) if eq else exact
            stated_default = _default_choices().get(word)
            if stated_default is not None:  # a choice stated at its default (gate_act=sigmoid): nothing changes
                put(word, stated_default)
                continue
            if row is not None and row.takes_value and eq:
                assert row.parse is not None
                try:
                    value = row.parse(text)
                except ValueError as exc:
                    raise ValueError(f"cell: cannot read {word!r}: {exc}") from None
                put(word, {k: value if v is variants.VALUE else v for k, v in row.sets.items()})
            else:
                known = [n for n in preset_names() if "<" not in n] + list(_default_choices())
                hint = f" (it takes a value: {key}=...)" if row is not None and row.takes_value else \
                    did_you_mean(word, known)
                raise ValueError(
                    f"cell: unknown variant {word!r} in {cell!r}{hint}; expected names from {preset_names()} "
                    f"joined with '+', or a CellSpec"
                )
        spec = CellSpec(**{**fields, **overrides})
        overrides = {}
    else:
        raise TypeError(f"cell: expected a preset name, a mapping or a CellSpec, got {type(cell).__name__}")
    return spec.replace(**overrides) if overrides else spec


@functools.cache
def _default_choices() -> dict[str, dict[str, str]]:
    """The choice words of the table (``gate_act=…``, ``cand_act=…``, ``out_act=…``,
    ``forget_act=…``, ``deep_act=…``) at their field's default value, which no row spells out
    (``gate_act=sigmoid``): word -> ``{field: default}``."""
    words: dict[str, dict[str, str]] = {}
    for row in variants.ROWS:
        if "=" in row.word and len(row.sets) == 1 and not row.takes_value:
            (name,) = row.sets
            default = CellSpec.__dataclass_fields__[name].default
            words[f"{row.word.partition('=')[0]}={default}"] = {name: default}
    return words


# ---------------------------------------------------------------------------- the parameter schema


def gate_slices(spec: CellSpec, hidden_size: int) -> dict[str, slice]:
    """Rows of ``weight_ih`` / ``weight_hh`` / biases that each computed gate occupies."""
    return dict(_gate_slices(spec, hidden_size))


@variants.per_spec_cache
def _gate_slices(spec: CellSpec, hidden_size: int) -> tuple[tuple[str, slice], ...]:
    out, start = [], 0
    for g in spec.computed_gates:
        n = spec.first_width(g, hidden_size)
        out.append((g, slice(start, start + n)))
        start += n
    return tuple(out)


def check_heads(spec: CellSpec, hidden_size: int, proj_size: int = 0) -> None:
    """Raise a ValueError, naming the sizes, unless ``spec.heads`` divides them: ``H_out`` (the
    recurrent input's heads) and every gate's first width (its rows' blocks)."""
    k = spec.heads
    if k == 1:
        return
    h_out = proj_size if proj_size > 0 else hidden_size
    what = f"proj_size={proj_size}" if proj_size > 0 else f"hidden_size={hidden_size}"
    if h_out % k:
        raise ValueError(f"heads: {k} heads split h_(t-1) into {k} equal parts, but {what} is not divisible "
                         f"by {k}")
    for g in spec.computed_gates:
        n = spec.first_width(g, hidden_size)
        if n % k:
            raise ValueError(f"heads: {k} heads split each gate's {n} rows of W_hh into {k} blocks, but "
                             f"hidden_size={hidden_size} is not divisible by {k}")


def layer_param_shapes(spec: CellSpec, input_size: int, hidden_size: int, proj_size: int = 0,
                       bias: bool = True) -> dict[str, tuple[int, ...]]:
    """Names (without suffix) and shapes of one layer-direction's parameters, in order.

    The order is the registration order: torch's four (plus ``weight_hr``) first, so a
    vanilla layer's ``state_dict`` matches ``torch.nn.LSTM``'s key for key; then what the
    variant table's rows add, in table order. With ``heads=k``, ``weight_hh`` holds each
    row's block only: ``(R, H_out/k)`` (:func:`lstmkit.cell.block_diagonal` makes the full matrix).

    Raises:
        ValueError: ``heads`` does not divide the sizes (:func:`check_heads`).
    """
    H, I = hidden_size, input_size
    h_out = proj_size if proj_size > 0 else H
    check_heads(spec, H, proj_size)
    R = spec.gate_rows(H)
    shapes: dict[str, tuple[int, ...]] = {"weight_ih": (R, I), "weight_hh": (R, h_out // spec.heads)}
    if bias:
        shapes["bias_ih"] = (R,)
        shapes["bias_hh"] = (R,)
    if proj_size > 0:
        shapes["weight_hr"] = (proj_size, H)
    shapes.update(variants.param_shapes(spec, variants.Dims(H=H, R=R, bias=bias)))
    return shapes


# ---------------------------------------------------------------------------- the docs' table


def markdown_table() -> str:
    """The variant table as the docs show it (generated; ``tests/test_variants.py`` checks
    that ``docs/cell.md`` and the README hold exactly this)."""
    lines = ["| word | change to the cell | gates | parameters it adds | ONNX operator | source |",
             "|---|---|---|---|---|---|"]
    for r in variants.ROWS:
        typed = f"`{r.word}={r.placeholder}`" if r.takes_value else f"`{r.word}`"
        if r.aliases:
            typed += " (" + ", ".join(f"`{a}`" for a in r.aliases) + ")"
        gates = "; ".join([f"removes {', '.join(r.removes)}"] * bool(r.removes)
                          + [f"{g} derived from the others" for g in r.couples])
        params = ", ".join(f"`{p}`" for p in _param_names(r)) or "—"
        onnx = "carried" if r.onnx is None else "Scan"
        lines.append(f"| {typed} | {r.doc} | {gates} | {params} | {onnx} | {r.source} |")
    return "\n".join(lines)


def _param_names(r: variants.Row) -> list[str]:
    """The names of the parameters a row adds, as the docs list them: those of a vanilla
    spec with the row's setting (its example value), gate letters and layer numbers of deep
    gates' MLPs written ``{k}`` and ``{j}``."""
    if r.params is None:
        return []
    spec = resolve(variants.example_cell(r)) if r.word != "vanilla" else CellSpec()
    names = r.params(spec, variants.Dims(H=2, R=2 * len(spec.computed_gates), bias=True))
    out: list[str] = []
    for n in names:
        n = re.sub(r"^mlp_[ifgo]_(weight|bias)\d+$", r"mlp_{k}_\1{j}", n)
        if n not in out:
            out.append(n)
    return out


#: The fields that shape the equations, with their default (vanilla) values: what
#: :attr:`CellSpec.is_vanilla` compares (without building a spec per call).
_VANILLA_EQUATIONS: tuple[tuple[str, Any], ...] = tuple(
    (f.name, getattr(CellSpec(), f.name)) for f in dataclasses.fields(CellSpec) if f.name not in INIT_FIELDS)
#: :func:`spec_choices` of each field with choices, computed once (the table is constant);
#: empty while the first spec above is built.
_CHOICES.update({name: spec_choices(name) for name in _fields_of_type("str") if name != "kind"})
