"""The variant ABI between Python and the compiled kernels, written once.

Five ordered lists define how a layer-direction crosses into a kernel:

* :data:`FLAGS` — the variant as bit flags (bit ``k`` is ``1 << k``), from a
  :class:`~lstmkit.spec.CellSpec` by :func:`flags`: one bit per row of the variant table
  (:mod:`lstmkit.variants`) that changes an equation, and per gate the bits that remove it
  (:data:`GATE_REMOVED`), from which the kernels derive which gates they compute and where;
* :data:`PARAMS` — the parameters the recurrence takes besides ``weight_hh``, in the order of
  the ``params`` list of the ``lstmkit::recurrence`` operator (an empty tensor where the
  variant has none) and of its gradient list; the last two are not parameters but zoneout's
  training masks (no gradient);
* :data:`SCALARS` — the variant's numbers (the operator's float arguments), from a spec by
  :func:`scalars`;
* :data:`BUFFERS` — what the forward keeps for backward (and for the trace), in the order of
  the operator's ``buffers`` output, with their shapes given by :func:`buffer_shapes`.
* :data:`ACCUMULATED` — the parameters whose gradients the backward sums over steps and rows
  into one reduction vector per thread, in its order (:func:`acc_offset`).

The C++ kernel does not restate them, nor layer norm's epsilon (:data:`lstmkit.cell.LN_EPS`):
:func:`header` writes them as a C++ header that the build compiles in (``lstmkit_abi.h``),
and the built extension reports the constants it was compiled with (``abi()``), which a test
compares with this module. The Triton kernels read
this module directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from lstmkit import variants
from lstmkit.cell import LN_EPS
from lstmkit.layout import GATES
from lstmkit.spec import CellSpec

__all__ = ["FLAGS", "PARAMS", "NO_GRAD", "BUFFERS", "SCALARS", "SLSTM_KEPT", "SLSTM_STATES", "slstm_slot", "PHIS",
           "GATE_REMOVED", "ACCUMULATED", "acc_offset", "acc_size", "acc_slice", "flags", "flag", "scalars",
           "gate_slots", "mlp_layout", "decode_mlp", "Mlp", "MlpGate", "mlp_width", "mlp_names",
           "buffer_shapes", "cell_state_count", "header"]

#: Variant flags; bit k of the ``flags`` integer is ``FLAGS[k]`` (the variant table's rows).
FLAGS: tuple[str, ...] = variants.FLAGS
#: Per gate of :data:`lstmkit.layout.GATES`, the flag bits that remove it (or derive it from
#: another gate): a gate is computed — has rows in ``weight_hh`` — when none of them is set.
GATE_REMOVED: dict[str, int] = variants.gate_removal_masks()

#: Parameters of the recurrence besides ``weight_hh`` (names as in docs/cell.md, no suffix).
#: ``ln_ih_weight`` and ``bias`` (= b_ih + b_hh) are read by the kernel for layernorm only:
#: every other variant has them folded into its input pre-activations.
#: ``keep_c`` (T, B, H) and ``keep_h`` (T, B, H_out): zoneout's masks in training (1 where a unit
#: keeps its previous state), empty at evaluation (the kernels use the scalars ``zoneout_c/h``).
#: ``mlp``: the deep gates' further layers, one flat tensor (:func:`mlp_layout` says what is where).
PARAMS: tuple[str, ...] = ("peephole_i", "peephole_f", "peephole_o", "weight_gg", "ln_hh_weight",
                           "ln_c_weight", "ln_c_bias", "weight_hr", "ln_ih_weight", "bias", "keep_c", "keep_h",
                           "mlp")

#: The entries of :data:`PARAMS` that are inputs without a gradient (zoneout's masks).
NO_GRAD: frozenset[str] = frozenset({"keep_c", "keep_h"})

#: The operator's float arguments: the cell clip's bound and zoneout's probabilities.
SCALARS: tuple[str, ...] = variants.SCALARS  # (the rows' scalars: clip, zoneout_c, zoneout_h)

#: Buffers the forward keeps for backward, each (T, B, ·) or empty (see :func:`buffer_shapes`).
BUFFERS: tuple[str, ...] = ("G", "C", "RH", "RS", "AH", "AS", "CN", "MLP")

#: The sLSTM's row of the gate buffer ``G``, slot by slot (each H wide): its stabilised gates i',
#: f', the candidate z and o (in :data:`lstmkit.layout.GATES` order), then the raw pre-activations
#: ĩ, f̃ that its backward reads.
SLSTM_KEPT: tuple[str, ...] = (*GATES, "i_raw", "f_raw")
#: The sLSTM's cell states side by side (``c0``, ``c_n`` and the ``C`` buffer: (…, 3H)).
SLSTM_STATES: tuple[str, ...] = ("c", *variants.row("slstm").states)


def slstm_slot(table: str, name: str) -> int:
    """``name``'s slot (H wide) in the sLSTM's row of G (``table`` "kept": :data:`SLSTM_KEPT`) or
    among its cell states ("states": :data:`SLSTM_STATES`); ``name`` "width": how many slots."""
    names = SLSTM_KEPT if table == "kept" else SLSTM_STATES
    return len(names) if name == "width" else names.index(name)

#: The backward's per-parameter reductions (summed over steps and rows into one vector per
#: thread or batch block): the parameters whose gradients it sums there, in this order, each
#: H or R wide. The C++ ``AccLayout`` and the Triton cell take their offsets from here
#: (:func:`acc_offset`).
ACCUMULATED: tuple[tuple[str, str], ...] = (
    ("peephole_i", "H"), ("peephole_f", "H"), ("peephole_o", "H"), ("ln_c_weight", "H"), ("ln_c_bias", "H"),
    ("ln_hh_weight", "R"), ("ln_ih_weight", "R"), ("bias", "R"))

#: The activations between a deep gate's layers, by their code in :func:`mlp_layout`.
PHIS: tuple[str, ...] = ("tanh", "relu", "sigmoid", "identity")


def acc_offset(name: str) -> tuple[int, int]:
    """``(h, r)``: parameter ``name``'s summed gradient starts at ``h·H + r·R`` in the backward's
    reduction vector (:data:`ACCUMULATED`; ``"size"``: that vector's length). (Triton kernels call
    it while they are built: written in the Python their builder reads.)"""
    names = [entry[0] for entry in ACCUMULATED]
    if name != "size" and name not in names:
        raise KeyError(f"{name!r} is not summed in the backward's reduction vector")
    before = ACCUMULATED if name == "size" else ACCUMULATED[:names.index(name)]
    return (sum(entry[1] == "H" for entry in before), sum(entry[1] == "R" for entry in before))


def acc_size(H: int, R: int) -> int:
    """The length of the backward's reduction vector of a layer with hidden size ``H`` and ``R``
    gate rows."""
    h, r = acc_offset("size")
    return h * H + r * R


def acc_slice(name: str, H: int, R: int) -> slice:
    """Where parameter ``name``'s summed gradient lies in the reduction vector of a layer with
    hidden size ``H`` and ``R`` gate rows."""
    h, r = acc_offset(name)
    start = h * H + r * R
    return slice(start, start + (H if dict(ACCUMULATED)[name] == "H" else R))


def flag(name: str) -> int:
    """The bit of one flag."""
    return 1 << FLAGS.index(name)


def flags(spec: CellSpec) -> int:
    """The variant as the kernels' bit flags (:func:`lstmkit.variants.flag_word`)."""
    return variants.flag_word(spec)


@variants.per_spec_cache
def scalars(spec: CellSpec) -> tuple[float, ...]:
    """The values of :data:`SCALARS` for ``spec`` (0 where the variant has none)."""
    return variants.scalar_values(spec)


def gate_slots(flag_bits: int) -> tuple[dict[str, int], dict[str, int]]:
    """Where each gate sits, decoded from the flags as the C++ kernel decodes them: its slot
    among the computed gates (``weight_hh``'s row blocks; -1 if absent), and its slot among the
    computed sigmoid gates i, f, o (fgr's state ``s``; -1 if absent)."""
    computed = [g for g in GATES if not flag_bits & GATE_REMOVED[g]]
    sigmoid = [g for g in computed if g != "g"]
    return ({g: computed.index(g) if g in computed else -1 for g in GATES},
            {g: sigmoid.index(g) if g in sigmoid else -1 for g in GATES if g != "g"})


def mlp_layout(spec: CellSpec, bias: bool) -> list[int]:
    """The deep gates as the operator's ``mlp_layout`` list: ``[phi, has_bias, n_deep]`` then per
    deep gate ``[gate (its index in i, f, g, o), m, n_1, …, n_m]`` (``[]`` without deep gates).
    The ``mlp`` param holds their further layers flat, gate by gate (this order), layer by layer:
    ``W_j`` (n_{j+1} × n_j, n_{m+1} = H) then ``b_j`` (:func:`mlp_names`)."""
    return list(_mlp_layout(spec, bias))


@variants.per_spec_cache
def _mlp_layout(spec: CellSpec, bias: bool) -> tuple[int, ...]:
    if not spec.gate_hidden:
        return ()
    out = [PHIS.index(spec.gate_hidden_activation), int(bias), len(spec.gate_hidden)]
    for g, widths in spec.gate_hidden:
        out += [GATES.index(g), len(widths), *widths]
    return tuple(out)


def mlp_names(spec: CellSpec, bias: bool) -> list[str]:
    """The parameters that make up the flat ``mlp`` param, in its order."""
    return [name for g, widths in spec.gate_hidden for j in range(1, len(widths) + 1)
            for name in (f"mlp_{g}_weight{j}", *([f"mlp_{g}_bias{j}"] if bias else []))]


@dataclass(frozen=True)
class MlpGate:
    """One deep gate of an ``mlp_layout``, where its parts sit (C++: ``MlpGate``, cell_config.h)."""

    gate: str                   #: its letter in :data:`lstmkit.layout.GATES`
    widths: tuple[int, ...]     #: n_1 … n_m, then H: layer j maps n_j to n_{j+1}
    woff: tuple[int, ...]       #: flat offset in ``mlp`` of W_j (n_{j+1} × n_j), j = 1 … m
    boff: tuple[int, ...]       #: flat offset of b_j (n_{j+1}); -1 without biases
    aoff: tuple[int, ...]       #: column of a_j = φ(layer j's input) (n_j wide) in the ``MLP`` buffer


@dataclass(frozen=True)
class Mlp:
    """An ``mlp_layout`` decoded (:func:`decode_mlp`): the deep gates in layout order."""

    phi: str                    #: the activation between layers (:data:`PHIS`)
    bias: bool
    gates: tuple[MlpGate, ...]
    atot: int                   #: columns of the ``MLP`` buffer
    wtot: int                   #: elements of the flat ``mlp`` param


def decode_mlp(layout: list[int] | tuple[int, ...], H: int) -> Mlp:
    """:func:`mlp_layout`'s list read back, as the C++ kernel reads it (``MlpLayout``; a test
    compares the two): per deep gate its widths and the offsets of its weights, biases and
    hidden activations."""
    if not layout:
        return Mlp("tanh", False, (), 0, 0)
    bias, pos, gates, atot, wtot = bool(layout[1]), 3, [], 0, 0
    for _ in range(layout[2]):
        m = layout[pos + 1]
        widths = (*layout[pos + 2:pos + 2 + m], H)
        woff, boff, aoff = [], [], []
        for j in range(m):
            woff.append(wtot)
            wtot += widths[j + 1] * widths[j]
            boff.append(wtot if bias else -1)
            wtot += widths[j + 1] if bias else 0
            aoff.append(atot)
            atot += widths[j]
        gates.append(MlpGate(GATES[layout[pos]], widths, tuple(woff), tuple(boff), tuple(aoff)))
        pos += 2 + m
    return Mlp(PHIS[layout[0]], bias, tuple(gates), atot, wtot)


def mlp_width(layout: list[int] | tuple[int, ...]) -> int:
    """Columns of the ``MLP`` buffer: every deep gate's hidden activations a_1 … a_m."""
    return decode_mlp(layout, 0).atot


def cell_state_count(flag_bits: int) -> int:
    """``S``, the cell states a row carries side by side (``c0``, ``c_n``, the ``C`` buffer are
    (…, S·H)): 1 for the LSTM (c), 3 for the sLSTM (c, n, m), 0 for the RNN — as
    :func:`lstmkit.variants.cell_states` says of a spec."""
    if flag_bits & flag("rnn"):
        return 0
    return 1 + sum(len(r.states) for r in variants.ROWS if r.flag and r.states and flag_bits & flag(r.flag_name))


def buffer_shapes(flag_bits: int, T: int, B: int, R: int, H: int, save: bool,
                  mlp: list[int] | tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Shapes of :data:`BUFFERS` as the forward returns them (``(0,)`` = not kept).

    Args:
        flag_bits: :func:`flags` of the variant. T, B: steps and batch. R: rows of
            ``weight_hh`` (``G·H`` for ``G`` computed gates; deep gates: their first widths). H: cells.
        save: whether the forward keeps anything (training or record mode).
        mlp: :func:`mlp_layout` of the deep gates.

    Every LSTM variant keeps ``C`` (T, B, S·H), the cell states (S = :func:`cell_state_count`);
    ``G`` (T, B, G·H), the gate activations (the sLSTM: (T, B, 6H), ``i', f', z, o`` and the
    pre-activations ``ĩ, f̃``), unless layernorm (without fgr or deep gates) keeps the normalised
    pre-activations ``AH``, ``RH`` (T, B, R) and their 1/std per gate ``AS``, ``RS`` (T, B, G)
    instead and recomputes the gates. With zoneout, ``CN`` (T, B, H) is the cell's new state
    before zoneout mixed the previous one in (``C`` holds the state after). Deep gates keep
    ``MLP`` (T, B, Σ widths), every hidden activation of their MLPs. The RNN keeps nothing but
    its output.
    """
    empty = (0,)
    if not save or flag_bits & flag("rnn"):
        return [empty] * len(BUFFERS)
    G = sum(s >= 0 for s in gate_slots(flag_bits)[0].values())
    ln = bool(flag_bits & flag("layernorm"))
    keep_g = not ln or bool(flag_bits & flag("fgr")) or bool(mlp)
    slstm = bool(flag_bits & flag("slstm"))
    shapes = {"G": (T, B, (len(SLSTM_KEPT) if slstm else G) * H) if keep_g else empty,
              "C": (T, B, cell_state_count(flag_bits) * H),
              "CN": (T, B, H) if flag_bits & flag("zoneout") else empty,
              "MLP": (T, B, mlp_width(mlp)) if mlp else empty}
    for name, width in (("RH", R), ("RS", G), ("AH", R), ("AS", G)):
        shapes[name] = (T, B, width) if ln else empty
    return [shapes[name] for name in BUFFERS]


def header() -> str:
    """The C++ header ``lstmkit_abi.h``: the lists above as constants and enums."""
    lines = ["// Generated by lstmkit/kernels/abi.py at build time: the variant ABI. Do not edit.",
             "#pragma once", "#include <cstdint>", "", "namespace lk::abi {", ""]
    for k, name in enumerate(FLAGS):
        lines.append(f"constexpr int64_t F_{name.upper()} = int64_t(1) << {k};")
    lines += ["", "// the gates in lstmkit.layout.GATES order: every per-gate array of the kernel is indexed so",
              "enum Gate : int { " + ", ".join(f"GATE_{g.upper()} = {k}" for k, g in enumerate(GATES))
              + f", N_GATES = {len(GATES)} }};",
              "constexpr const char* GATE_NAMES[] = {" + ", ".join(f'"{g}"' for g in GATES) + "};",
              "// per gate: the flags that remove it (a gate is computed when none is set)",
              "constexpr int64_t GATE_REMOVED[N_GATES] = {" + ", ".join(str(GATE_REMOVED[g]) for g in GATES) + "};",
              "constexpr int N_FLAGS = " + str(len(FLAGS)) + ";",
              "constexpr int64_t FLAG_BITS[] = {" + ", ".join(f"F_{n.upper()}" for n in FLAGS) + "};"]
    # an enum per list: its members PREFIX_NAME = index, their count and their names
    for enum, prefix, names, what in (("Param", "P", PARAMS, "PARAM"), ("Buffer", "B", BUFFERS, "BUFFER"),
                                      ("Scalar", "S", SCALARS, "SCALAR"),
                                      ("SlstmKept", "SK", SLSTM_KEPT, "SLSTM_KEPT"),
                                      ("SlstmState", "SS", SLSTM_STATES, "SLSTM_STATE")):
        members = ", ".join(f"{prefix}_{n.upper()} = {k}" for k, n in enumerate(names))
        lines += ["", f"enum {enum} : int {{ {members}, N_{what}S = {len(names)} }};",
                  f"constexpr const char* {what}_NAMES[] = {{" + ", ".join(f'"{n}"' for n in names) + "};"]
    lines.append("// per parameter: 1 where it takes no gradient (zoneout's masks)")
    lines.append("constexpr bool PARAM_NO_GRAD[] = {" + ", ".join(str(n in NO_GRAD).lower() for n in PARAMS) + "};")
    lines.append("constexpr const char* FLAG_NAMES[] = {" + ", ".join(f'"{n}"' for n in FLAGS) + "};")
    lines += ["", "// layer norm's epsilon (lstmkit.cell.LN_EPS)", f"constexpr double LN_EPS = {LN_EPS!r};"]
    lines += ["", "// the slope of each hard sigmoid gate activation (lstmkit.variants.HARD_SIGMOID_SLOPES)"]
    lines += [f"constexpr double SLOPE_{name.upper()} = {value!r};"
              for name, value in variants.HARD_SIGMOID_SLOPES.items()]
    lines += ["", "// an activation by its code: a deep gate's between its layers (the mlp layout), the candidate's",
              "// and the output's (Cfg::cand_act, out_act)"]
    lines += [f"constexpr int PHI_{name.upper()} = {k};" for k, name in enumerate(PHIS)]
    lines += ["", "// per parameter (Param): where the backward's reduction vector holds its summed gradient,",
              "// ACC_H[p]·H + ACC_R[p]·R (-1: not summed there); the vector is ACC_SIZE_H·H + ACC_SIZE_R·R long",
              "constexpr int ACC_H[] = {" + ", ".join(str(acc_offset(n)[0] if n in dict(ACCUMULATED) else -1)
                                                     for n in PARAMS) + "};",
              "constexpr int ACC_R[] = {" + ", ".join(str(acc_offset(n)[1] if n in dict(ACCUMULATED) else -1)
                                                     for n in PARAMS) + "};",
              f"constexpr int ACC_SIZE_H = {acc_offset('size')[0]}, ACC_SIZE_R = {acc_offset('size')[1]};"]
    lines += ["", "}  // namespace lk::abi", ""]
    return "\n".join(lines)
