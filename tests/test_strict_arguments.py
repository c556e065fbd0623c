"""Every public ``bool`` and ``int`` argument refuses a value of the wrong type, naming itself.

torch refuses ``nn.LSTM(4, 8, bias="no")`` (``bias should be of type bool, got: str``);
lstmkit refuses such values everywhere, before anything is built. The test walks the
public API — ``lstmkit.__all__``, ``lstmkit.convert.__all__`` and the public methods of the
layer classes — reads each callable's type hints, and for every argument typed ``bool``
or ``int`` (optional or not) calls it with a wrong value; the call must raise TypeError or
ValueError whose message names the argument. A public callable with such an argument
that this file cannot call yet fails the test (add its valid call to ``CALLS``).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lstmkit
import lstmkit.convert as convert

I, H = 3, 4


def _tf1_kernel() -> np.ndarray:
    return np.zeros((I + H, 4 * H), np.float32)


def _layer() -> lstmkit.LSTM:
    return lstmkit.LSTM(I, H)


#: A valid call of each public callable that has bool/int arguments: fn(**kwargs) -> call.
CALLS: dict[str, Callable[[dict[str, Any], Path], Any]] = {
    "LSTM": lambda kw, _: lstmkit.LSTM(**{"input_size": I, "hidden_size": H, **kw}),
    "RNN": lambda kw, _: lstmkit.RNN(**{"input_size": I, "hidden_size": H, **kw}),
    "LSTMCell": lambda kw, _: lstmkit.LSTMCell(**{"input_size": I, "hidden_size": H, **kw}),
    "CellSpec": lambda kw, _: lstmkit.CellSpec(**kw),
    "GateView": lambda kw, _: lstmkit.GateView(**{"letter": "i", "present": True, "note": "",
                                                  "activation": "sigmoid", **kw}),
    "LSTM.gates": lambda kw, _: _layer().gates(**kw),
    "LSTM.layer_params": lambda kw, _: _layer().layer_params(**kw),
    "LSTMCell.gates": lambda kw, _: lstmkit.LSTMCell(I, H).gates(**kw),
    "LSTMCell.layer_params": lambda kw, _: lstmkit.LSTMCell(I, H).layer_params(**kw),
    "from_keras": lambda kw, _: convert.from_keras(convert.to_keras(_layer()), **kw),
    "to_keras": lambda kw, _: convert.to_keras(_layer(), **kw),
    "from_keras_file": lambda kw, tmp: convert.from_keras_file(tmp / "missing.keras", **kw),
    "from_tf1": lambda kw, _: convert.from_tf1(_layer(), _tf1_kernel(), np.zeros(4 * H, np.float32), **kw),
    "to_tf1": lambda kw, _: convert.to_tf1(_layer(), **kw),
    "from_haste": lambda kw, _: convert.from_haste(_layer(), np.zeros((I, 4 * H), np.float32),
                                                   np.zeros((H, 4 * H), np.float32),
                                                   np.zeros(4 * H, np.float32), **kw),
    "to_haste": lambda kw, _: convert.to_haste(_layer(), **kw),
    "to_onnx": lambda kw, tmp: convert.to_onnx(_layer(), tmp / "m.onnx", **kw),
    "convert_file": lambda kw, tmp: convert.convert_file(tmp / "missing.pt", tmp / "out.onnx", **kw),
    "read_layer": lambda kw, tmp: convert.read_layer(tmp / "missing.pt", **kw),
    "write_layer": lambda kw, tmp: convert.write_layer(convert.read_layer(_saved(tmp)), tmp / "out.pt", **kw),
    "from_flashrnn": lambda kw, _: convert.from_flashrnn(torch.zeros(4, 2, 2, 2), torch.zeros(4, 2, 2), **kw),
    "to_flashrnn": lambda kw, _: convert.to_flashrnn(_layer(), **kw),
    "from_xlstm_slstm": lambda kw, _: convert.from_xlstm_slstm(
        {"_recurrent_kernel_": torch.zeros(2, 8, 2), "_bias_": torch.zeros(16)}, **kw),
}
#: Wrong values per annotated type: each must be refused.
WRONG = {bool: ["no", 1, None, 1.0], int: ["3", 2.5, True, None]}


def _saved(tmp: Path) -> Path:
    path = tmp / "saved.pt"
    if not path.exists():
        torch.save(_layer().state_dict(), path)
    return path


def _public() -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {n: getattr(lstmkit, n) for n in lstmkit.__all__}
    out.update({n: getattr(convert, n) for n in convert.__all__})
    for cls in (lstmkit.LSTM, lstmkit.RNN, lstmkit.LSTMCell):
        for klass in cls.__mro__:
            if klass.__module__.startswith("lstmkit"):
                for n, f in vars(klass).items():
                    if inspect.isfunction(f) and not n.startswith("_"):
                        out.setdefault(f"LSTM.{n}" if issubclass(lstmkit.LSTM, klass) else f"{cls.__name__}.{n}", f)
    return {n: f for n, f in out.items() if callable(f)}


def _typed_args() -> list[tuple[str, str, type, bool]]:
    """(callable, argument, bool or int, optional) for every such argument of the public API."""
    found = []
    for name, obj in _public().items():
        fn = obj.__init__ if inspect.isclass(obj) else obj
        hints = typing.get_type_hints(fn)
        for arg, hint in hints.items():
            if arg == "return":
                continue
            options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) \
                else (hint,)
            base = [t for t in options if t in (bool, int)]
            if base and all(t in (bool, int, type(None)) for t in options):
                found.append((name, arg, base[0], type(None) in options))
    return found


ARGS = _typed_args()


def test_the_walk_finds_the_arguments_torch_types():
    names = {(c, a) for c, a, _, _ in ARGS}
    for want in [("LSTM", "bias"), ("LSTM", "batch_first"), ("LSTM", "bidirectional"), ("LSTM", "num_layers"),
                 ("LSTM", "proj_size"), ("LSTMCell", "bias"), ("LSTM.gates", "layer"), ("to_onnx", "opset")]:
        assert want in names, want


@pytest.mark.parametrize(("fn", "arg", "kind", "optional"), ARGS, ids=[f"{c}-{a}" for c, a, _, _ in ARGS])
def test_a_wrong_type_is_refused_naming_the_argument(fn, arg, kind, optional, tmp_path):
    assert fn in CALLS, f"{fn} has a {kind.__name__} argument {arg!r}: add a valid call of it to CALLS"
    for wrong in WRONG[kind]:
        if wrong is None and optional:
            continue
        with pytest.raises((TypeError, ValueError)) as err:
            CALLS[fn]({arg: wrong}, tmp_path)
        assert arg in str(err.value), f"{fn}({arg}={wrong!r}): {err.value}"


def test_torch_wording_for_the_layer_flags():
    with pytest.raises(TypeError, match=r"bias: expected a bool, got str \('no'\)"):
        lstmkit.LSTM(4, 8, bias="no")
    with pytest.raises(TypeError, match="batch_first: expected a bool"):
        lstmkit.LSTM(4, 8, batch_first="no")
    with pytest.raises(TypeError, match="layer: expected an int, got bool"):
        lstmkit.LSTM(4, 8, num_layers=2).gates(layer=True)


# ---------------------------------------------------------------------------- issue rows


def test_a_repeated_cell_word_is_refused():
    for cell, message in [("fb=1+fb=2", r"'fb' is given twice \('fb=1' and 'fb=2'\)"),
                          ("clip=3+clip=1", "'clip' is given twice"),
                          ("peephole+peephole", "'peephole' is given twice"),
                          ("layernorm+ln", "'ln' and 'layernorm' both set layernorm"),
                          ("clip=3+cell_clip=1", "both set cell_clip")]:
        with pytest.raises(ValueError, match=message):
            lstmkit.resolve(cell)
        with pytest.raises(ValueError, match=message):
            lstmkit.LSTM(I, H, cell=cell)


def test_a_gate_given_twice_in_gate_hidden_is_refused():
    with pytest.raises(ValueError, match="gate 'f' is given twice"):
        lstmkit.CellSpec(gate_hidden=[("f", (4,)), ("f", (8,))])
    with pytest.raises(ValueError, match=r"gate 'f' is given twice \(as 'f' and 'forget'\)"):
        lstmkit.CellSpec(gate_hidden={"f": (4,), "forget": (8,)})


def test_deep_widths_for_every_gate_deepen_the_gates_the_variant_computes():
    """``deep=n`` (gate_hidden=(n,)) is every computed gate's MLP: with cifg, nog, nig+nfg it
    skips the removed gates (once it named the removed gate and refused), and the name reads
    back; a removed gate named explicitly is still refused."""
    for cell, gates in (("cifg+deep=8", "igo"), ("nog+deep=4x3", "ifg"), ("nig+nfg+deep=8", "go")):
        spec = lstmkit.resolve(cell)
        assert [g for g, _ in spec.gate_hidden] == list(gates) and spec.name == cell
        assert lstmkit.resolve(spec.name) == spec
        layer = lstmkit.LSTM(3, 4, cell=cell)
        assert {n.split("_")[1] for n, _ in layer.named_parameters() if n.startswith("mlp_")} == set(gates)
    with pytest.raises(ValueError, match="gate 'f' \\(forget\\) is not computed in this variant, so it cannot be deep"):
        lstmkit.CellSpec(coupled=True, gate_hidden={"f": (4,)})


def test_deep_width_must_be_a_whole_number():
    with pytest.raises(ValueError, match="'1.5' is not a whole number"):
        lstmkit.resolve("deep=1.5")


def test_a_backend_that_cannot_run_the_variant_is_refused_at_construction():
    """Deep gates and the sLSTM: the fused CPU kernel and the Triton kernels run them, torch's
    own LSTM does not (refused when the layer is built, not at its first forward)."""
    for cell in ("deep=8", "slstm"):
        for backend in ("cpu_fused", "triton"):
            assert lstmkit.LSTM(I, H, cell=cell, backend=backend).backend == backend
        with pytest.raises(ValueError, match=f"backend: kernel 'torch' cannot run this layer: torch's LSTM computes "
                                             f"the vanilla cell \\(with projection\\) only, not '{cell}'"):
            lstmkit.LSTM(I, H, cell=cell, backend="torch")


def _tiny_run(root: Path) -> Path:
    from lstmkit.app.train import TrainConfig, train

    cfg = TrainConfig(task="adding", task_options={"length": 22, "eval_size": 8}, hidden_size=4, batch_size=4,
                      steps=2, eval_every=2, eval_batch_size=8)
    train(cfg, root / "run", progress=False)
    return root / "run"


def test_a_repeated_key_in_a_run_config_or_checkpoint_is_refused(tmp_path):
    """A config file or a checkpoint's metadata that gives a key twice (JSON parsers keep the
    last silently) is refused, naming the key."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lstmkit.app import runs

    run = _tiny_run(tmp_path)
    config = (run / runs.CONFIG).read_text()
    (run / runs.CONFIG).write_text(config.replace('{', '{"cell": "peephole", ', 1))
    with pytest.raises(ValueError, match="the key 'cell' is given twice"):
        runs.read_config(run)
    ck = run / runs.CHECKPOINT
    with safe_open(str(ck), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta["config"] = meta["config"].replace('{', '{"seed": 7, ', 1)
    save_file(tensors, str(ck), metadata=meta)
    with pytest.raises(runs.CheckpointError, match="the key 'seed' is given twice"):
        runs.read_checkpoint(ck)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstmkit", *argv], capture_output=True, text=True, timeout=300)


def test_cli_refuses_repeated_cell_words_and_jobs_0_in_one_line(tmp_path):
    for argv, message in [
        (["train", "adding", "--cell", "fb=1+fb=2", "--out", str(tmp_path / "a")], "'fb' is given twice"),
        (["study", "--task", "adding", "--variants", "vanilla", "--jobs", "0", "--out", str(tmp_path / "c")],
         r"jobs: expected an int in \[1, 256\], got 0"),
    ]:
        proc = _cli(*argv)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and re.search(message, proc.stderr), proc.stderr
        assert not any(tmp_path.iterdir()), "nothing is created before the arguments are checked"


def test_a_deep_width_below_one_is_named_as_typed():
    """``deep=0`` was refused as "gate_hidden['i']: …", naming a gate the user never typed."""
    for cell in ("deep=0", "deep=3x0", "deep=-2"):
        with pytest.raises(ValueError, match=rf"cannot read '{cell}': .*width is at least 1"):
            lstmkit.resolve(cell)


def test_a_choice_at_its_default_may_be_stated():
    """``gate_act=sigmoid`` (and the other choices at their defaults) change nothing; they were
    unknown words, and "did you mean" offered another activation."""
    assert lstmkit.resolve("gate_act=sigmoid+cand_act=tanh+out_act=tanh+deep=2+deep_act=tanh") == \
        lstmkit.resolve("deep=2")
    assert lstmkit.resolve("slstm+forget_act=sigmoid") == lstmkit.resolve("slstm")
    with pytest.raises(ValueError, match="did you mean 'gate_act=sigmoid'"):
        lstmkit.resolve("gate_act=sigmod")
    with pytest.raises(ValueError, match=r"'gate_act' is given twice \('gate_act=sigmoid' and 'gate_act=hard_sigmoid'\)"):
        lstmkit.resolve("gate_act=sigmoid+gate_act=hard_sigmoid")
    with pytest.raises(ValueError, match="'cand_act=tanh' and 'niaf' both set candidate_activation"):
        lstmkit.resolve("niaf+cand_act=tanh")
