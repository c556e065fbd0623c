"""The variant table (lstmkit.variants.ROWS) is the one place each variant is written:
everything derived from it agrees with it, the docs hold its current copy, and every row
that changes an equation has a case in the test matrix (tests/variants.py), which every
kernel and the NumPy oracle run."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lstmkit
from lstmkit import spec as spec_module
from lstmkit import variants
from lstmkit.kernels import abi
from lstmkit.spec import CellSpec, resolve
from variants import HEADS_VARIANTS, LSTM_VARIANTS, RNN_VARIANTS, SLSTM_VARIANTS

ROOT = Path(__file__).resolve().parent.parent
#: Every case of the test matrix as a spec.
MATRIX = [resolve(c) for c in (*LSTM_VARIANTS.values(), *HEADS_VARIANTS.values(), *SLSTM_VARIANTS.values())] + \
    [CellSpec(kind="rnn", nonlinearity=n) for n in RNN_VARIANTS.values()]


def test_the_docs_hold_the_current_table():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "sync_variant_table.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + " (run python tools/sync_variant_table.py)"
    for path in (ROOT / "README.md", ROOT / "docs" / "cell.md"):
        assert spec_module.markdown_table() in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("row", [r for r in variants.ROWS if not r.init and r.sets], ids=lambda r: r.word)
def test_every_row_that_changes_an_equation_has_a_case_in_the_matrix(row):
    assert any(row.active(s) for s in MATRIX), (
        f"variant table row {row.word!r} has no case in tests/variants.py: add one, so that the oracle, "
        f"gradcheck and every kernel that claims it run it")


@pytest.mark.parametrize("row", [r for r in variants.ROWS if r.flag], ids=lambda r: r.word)
def test_every_row_with_a_flag_is_in_the_docs_equations(row):
    """docs/cell.md's equations ("One step" to "Adding a variant": the step, the sLSTM's, the
    RNN's) name every row that changes what the kernels compute, by its word or its field."""
    text = (ROOT / "docs" / "cell.md").read_text(encoding="utf-8")
    equations = text[text.index("## One step"):text.index("## Adding a variant")]
    names = {row.word, row.word.split("=")[0] + "=", *row.aliases, *row.sets}
    assert any(re.search(rf"(?<![\w-]){re.escape(n)}", equations) for n in names), (
        f"variant table row {row.word!r}: docs/cell.md's equations name none of {sorted(names)}")


def test_every_field_of_cellspec_is_set_by_a_row():
    by_rows = {name for r in variants.ROWS for name in r.sets}
    fields = {f.name for f in dataclasses.fields(CellSpec)}
    assert fields == by_rows


@pytest.mark.parametrize("cell", list(LSTM_VARIANTS.values()), ids=list(LSTM_VARIANTS))
def test_name_reads_back_as_the_same_spec(cell):
    spec = resolve(cell)
    assert resolve(spec.name) == spec


@pytest.mark.parametrize("cell", [*LSTM_VARIANTS.values(), "nfg+deep=2", "cifg+deep=3", "nog+nig+deep=2x2"])
def test_equal_specs_hash_equal(cell):
    """Equal specs are one key of a dict: the spec as built, its name read back, its gates' widths
    written per gate (the form a file stores), a pickled copy (widths for every gate are kept for
    the computed gates only; the hash was once taken before that)."""
    import pickle

    spec = resolve(cell)
    per_gate = spec.replace(gate_hidden=dict(spec.gate_hidden)) if spec.gate_hidden else spec
    for same in (resolve(spec.name), per_gate, pickle.loads(pickle.dumps(spec))):
        assert same == spec and hash(same) == hash(spec)
        assert hash(same) == hash(tuple(getattr(same, f.name) for f in dataclasses.fields(same)))


def test_overrides_build_the_spec_with_the_words():
    """Keyword overrides of a name or mapping are fields given with it: widths for every gate go to
    the gates the overridden spec computes (they went to all four, then refused or kept stale)."""
    assert resolve("deep=3", coupled=True) == resolve("deep=3+cifg")
    assert resolve("deep=3", output_gate=False) == resolve("nog+deep=3")
    assert resolve("deep=3+cifg", coupled=False) == resolve("deep=3")
    assert resolve({"gate_hidden": (3,)}, forget_gate=False) == resolve("nfg+deep=3")
    assert resolve(resolve("deep=3"), peephole=True) == resolve("peephole+deep=3")


def test_numpy_integer_widths_are_widths():
    """Deep gates' widths as NumPy integers (an array's entries) are read as ints, as ``heads`` is."""
    import numpy as np

    for given, plain in (((np.int64(16),), (16,)), ({"f": np.int32(4)}, {"f": (4,)}),
                         ({"o": [np.int16(3), 2]}, {"o": (3, 2)})):
        spec = CellSpec(gate_hidden=given)
        assert spec == CellSpec(gate_hidden=plain) and hash(spec) == hash(CellSpec(gate_hidden=plain))
        assert all(type(w) is int for _, widths in spec.gate_hidden for w in widths)


@pytest.mark.parametrize("gate_hidden, word", [
    ({"f": (4,)}, "deep=f:4"),
    ({"i": (8, 8), "forget": (4,)}, "deep=i:8x8,f:4"),
    ({"i": (4,), "f": (4,), "g": (4,)}, "deep=i:4,f:4,g:4"),  # not every computed gate: per gate
    ({"i": (4,), "f": (4,), "g": (4,), "o": (4,)}, "deep=4"),
])
def test_per_gate_deep_widths_are_a_word(gate_hidden, word):
    spec = CellSpec(gate_hidden=gate_hidden)
    assert spec.name == word
    assert resolve(word) == spec
    assert resolve(f"peephole+{word.upper()}") == spec.replace(peephole=True)


@pytest.mark.parametrize("word, says", [
    ("deep=f:4,f:8", "'f' is given twice"),
    ("deep=f4,o:2", "'f4' is not <gate>:<widths>"),
    ("deep=:4", "is not <gate>:<widths>"),
    ("deep=z:4", "unknown gate 'z'"),
    ("deep=f:0", "at least 1"),
    ("cifg+deep=f:4", "gate 'f' (forget) is not computed"),
])
def test_per_gate_deep_word_refusals(word, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        resolve(word)


def test_presets_words_and_flags_come_from_the_rows():
    assert set(lstmkit.PRESETS) == {r.word for r in variants.ROWS if not r.takes_value and r.example is None}
    for r in variants.ROWS:
        for w in (r.word, *r.aliases):
            assert variants.row(w) is r
        if not r.takes_value and r.example is None:
            assert lstmkit.PRESETS[r.word] == CellSpec(**r.sets)
        assert r.active(resolve(variants.example_cell(r))), r.word  # an option's example cell has it
    assert abi.FLAGS == tuple(r.flag_name for r in variants.ROWS if r.flag)
    assert len(set(abi.FLAGS)) == len(abi.FLAGS)
    for spec in MATRIX:
        on = {name for name in abi.FLAGS if abi.flags(spec) & abi.flag(name)}
        assert on == {r.flag_name for r in variants.ROWS if r.flag and r.sets and r.active(spec)}


def test_gates_and_their_offsets_come_from_the_rows():
    for spec in MATRIX:
        removed = {g for r in variants.ROWS if r.sets and r.active(spec) for g in r.removes + r.couples}
        assert spec.computed_gates == tuple(g for g in "ifgo" if g not in removed)
        slots, sigmoid_slots = abi.gate_slots(abi.flags(spec))
        assert [g for g in "ifgo" if slots[g] >= 0] == list(spec.computed_gates)
        assert [g for g in "ifo" if sigmoid_slots[g] >= 0] == list(spec.sigmoid_gates)


def test_parameters_come_from_the_rows():
    spec = resolve("peephole+fgr+layernorm+cifg")
    shapes = spec_module.layer_param_shapes(spec, 3, 4, 0, True)
    assert list(shapes) == ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "peephole_i", "peephole_o",
                            "weight_gg", "ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias"]
    assert shapes["weight_gg"] == (8, 8) and shapes["ln_ih_weight"] == (12,)


def test_the_onnx_choice_comes_from_the_rows():
    for spec in MATRIX:
        refusing = [r for r in variants.ROWS if r.onnx and r.sets and r.active(spec)]
        reason = variants.onnx_refusal(spec)
        assert (reason is None) == (not refusing)
        if refusing:
            assert refusing[0].onnx in reason and repr(refusing[0].word) in reason


def test_unknown_and_valueless_words_explain_themselves():
    with pytest.raises(ValueError, match=r"unknown variant 'peepole'.*did you mean 'peephole'"):
        resolve("peepole")
    with pytest.raises(ValueError, match=r"'clip' .*it takes a value: clip=\.\.\."):
        resolve("clip")
    with pytest.raises(ValueError, match=r"cannot read 'zoneout=0.1/0.2/0.3'"):
        resolve("zoneout=0.1/0.2/0.3")
    with pytest.raises(ValueError, match=r"zoneout: expected probabilities in \[0, 1\)"):
        resolve("zoneout=1")
    assert resolve("zoneout=0.1").zoneout == (0.1, 0.1)
    assert resolve("gate_act=hardsigmoid+cand_act=relu").name == "cand_act=relu+gate_act=hardsigmoid"
    with pytest.raises(ValueError, match="computes none of them"):
        resolve("nig+nfg+nog+gate_act=hard_sigmoid")
