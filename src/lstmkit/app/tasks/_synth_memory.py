"""Long-lag memory tasks: ``adding``, ``temporal_order`` and ``copy``.

Each sequence is an i.i.d. sample (:class:`~lstmkit.app.tasks._synth_common.SampledTask`):
training batches are fresh draws from the trainer's generator, evaluation splits are
fixed samples of ``eval_size`` sequences seeded by the task's ``seed`` and the split.
Tasks with one answer per sequence read the model's output at the sequence's last valid
step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmkit.app.tasks._synth_common import MarkedPairTask, SampledTask, last_step
from lstmkit.app.tasks.base import MAX_LENGTH, Batch, Target, check_positive, check_values

__all__ = ["AddingTask", "TemporalOrderTask", "CopyTask", "hochreiter_adding_baselines"]

#: |error| below which an adding answer counts as correct (H&S 1997 §5.4).
ADDING_TOLERANCE = 0.04


def _p_abs_sum_below(c: float) -> float:
    """P(|U1 + U2| < c) for independent U1, U2 ~ U[-1, 1] (triangular density on [-2, 2])."""
    c = min(c, 2.0)
    return c - c * c / 4


def hochreiter_adding_baselines(length: int) -> dict[str, float]:
    """Exact scores of the constant prediction 0.5 (the mean target) on the 1997 form.

    With probability ``q = 0.1 + 0.9 / (T//2 - 2)`` one of the two marks falls on the
    first pair, whose value is then zero, so the target is ``0.5 + X/4`` with one
    U[-1, 1] term; otherwise it has two. Returns ``accuracy`` (|err| < 0.04, i.e. the sum
    within 0.16 of 0) and ``mse`` (1/48 or 1/24). For T = 100: 0.15436 and 0.03919.
    """
    q = 0.1 + 0.9 / (length // 2 - 2)
    c = 4 * ADDING_TOLERANCE
    return {"accuracy": q * c + (1 - q) * _p_abs_sum_below(c),
            "mse": q / 48 + (1 - q) / 24}


@dataclass
class AddingTask(MarkedPairTask):
    """The adding problem, in two forms (``form``): Hochreiter & Schmidhuber 1997 §5.4
    (Experiment 4) and Le, Jaitly & Hinton 2015 / Arjovsky, Shah & Bengio 2016.

    ``x`` (T, B, 2): per step a (value, marker) pair; ``y`` (B,) the target; the model's
    single output (output_size 1) at each sequence's last valid step is the answer.

    * ``form="hochreiter"``: Hochreiter & Schmidhuber 1997 §5.4. Values U[-1, 1]; length
      uniform in ``[T, T + T//10]`` (``lengths`` set; padding steps are zero). One of
      the first 10 pairs is marked (X1), then one of the first ``T//2 - 1`` pairs not yet
      marked (X2); markers are 1 there, -1 on the first and last pair, else 0. When the
      first pair is marked its marker is 1 and its value is set to 0 (the paper: "we set
      X1 to zero"; we do the same when X2 lands there). Target ``0.5 + (X1 + X2)/4``.
    * ``form="le"``: Le, Jaitly & Hinton 2015 / Arjovsky, Shah & Bengio 2016. Fixed
      length T; values U[0, 1]; one marker (1) uniformly in each half
      (``[0, T//2)``, ``[T//2, T)``); target ``X1 + X2``.

    Loss and ``mse``: squared error at the last step, mean over sequences. ``accuracy``:
    fraction with |err| < 0.04 (the 1997 criterion; in the ``le`` form, on the unscaled
    sum, four times stricter than the 1997 scaling).

    Targets:
    * hochreiter: ``accuracy`` ≥ 1 - 3/2560 (at most 3 of the 2,560 test sequences
      wrong). Published, Table 7: T=100: 1/2560 wrong after 74,000
      training sequences; T=500: 0 after 209,000; T=1000: 1 after 853,000.
    * le: ``mse`` ≤ 0.01, our operational threshold (6 % of the constant predictor's
      1/6, i.e. 94 % of the target's variance explained): the papers give curves only.
      The LSTM beats the baseline at every T in Arjovsky et al. (T up to 750).

    Baselines (constant predictions, exact):
    * hochreiter, ``accuracy`` of predicting 0.5: ≈ 0.1544 at T = 100
      (:func:`hochreiter_adding_baselines`; its MSE ≈ 0.0392).
    * le, ``mse`` of predicting 1 (the mean, so the best constant): E[(X1+X2-1)^2] =
      2·Var U[0,1] = 1/6 ≈ 0.1667, Arjovsky et al.'s "0.167". Le et al. print 0.1767 for
      the same predictor; that does not match the exact value (a misprint, or a
      different sampling); it is listed as ``le2015_printed``. Accuracy of predicting 1:
      0.0784.
    """

    seed: int = 0
    length: int = 100
    form: str = "hochreiter"
    eval_size: int = 2560

    name: ClassVar[str] = "adding"
    tolerance: ClassVar[float] = ADDING_TOLERANCE
    input_size = 2
    output_size = 1

    @classmethod
    def recipe(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Chrono initialisation for lags up to 1.5 T (``chrono=1.5T``), H = 64, Adam 3e-3,
        batch 32, clip 1: 10,000 steps (T ≤ 200) or 6,000 (longer), evaluated every 100
        (200) steps.

        Measured (docs/results.md; 3 seeds each, stopped on the validation split): 1997
        form T = 100: 48,000-54,400 sequences, about 30 s on one core; T = 500:
        57,600-76,800 sequences, 3-5 minutes; Le form T = 100: about 35,000 sequences.
        With a constant forget bias instead the same runs need 3x longer (``fb=5``,
        T = 100: 138,000-170,000 sequences) or do not leave the baseline within 100,000
        sequences (``fb=5``, ``fb=7`` at T = 500).
        """
        length = cls.option(options, "length")
        short = length <= 200
        return {"cell": f"chrono={round(1.5 * length)}", "hidden_size": 64, "lr": 3e-3, "batch_size": 32,
                "steps": 10_000 if short else 6_000, "eval_every": 100 if short else 200}

    def __post_init__(self) -> None:
        check_positive(self.name, MAX_LENGTH, length=self.length)
        check_positive(self.name, eval_size=self.eval_size)
        check_values(self.name, f"an evaluation set of eval_size={self.eval_size} sequences of length="
                     f"{self.length}", self.eval_size * (self.length + self.length // 10) * self.input_size)
        if self.form not in ("hochreiter", "le"):
            raise ValueError(f"task 'adding': form must be 'hochreiter' or 'le', got {self.form!r}")
        if self.form == "hochreiter" and self.length < 22:
            raise ValueError("task 'adding': form 'hochreiter' needs length >= 22 (X2 among the first "
                             f"T//2 - 1 pairs, which must include the first 10), got {self.length}")
        if self.form == "le" and self.length < 2:
            raise ValueError(f"task 'adding': form 'le' needs length >= 2, got {self.length}")

    @property
    def target(self) -> Target:
        if self.form == "hochreiter":
            return Target(
                metric="accuracy", goal="max", threshold=1 - 3 / 2560,
                published="Hochreiter & Schmidhuber 1997, §5.4, Table 7: 2,560 test sequences, correct "
                          "if |err| < 0.04; T=100: 1 wrong after 74,000 training sequences; T=500: 0 "
                          "(209,000); T=1000: 1 (853,000). Pass: at most 3/2560 wrong.",
            )
        return Target(
            metric="mse", goal="min", threshold=0.01,
            published="Le, Jaitly & Hinton 2015 (Fig. 2, curves; predicting 1 printed as MSE 0.1767) and "
                      "Arjovsky, Shah & Bengio 2016 (baseline 0.167; LSTM beats it at T = 100-750). "
                      "Threshold 0.01 (6 % of the exact baseline 1/6) is lstmkit's operational one.",
        )

    @property
    def baselines(self) -> dict[str, float]:
        if self.form == "hochreiter":
            return {"constant_0.5": hochreiter_adding_baselines(self.length)["accuracy"]}
        return {"constant_1": 1 / 6, "le2015_printed": 0.1767}

    @property
    def baseline_notes(self) -> dict[str, str]:
        return {"constant_0.5": "always answering 0.5, the mean target: needs no memory at all",
                "constant_1": "always answering 1, the mean target (the best constant): needs no memory at all",
                "le2015_printed": "the MSE Le, Jaitly & Hinton (2015) print for always answering 1 (the exact "
                                  "value is 1/6)"}

    def describe_data(self) -> dict[str, object]:
        return {"form": self.form, "length": self.length, "eval_size": self.eval_size}

    def marked_steps(self, x: Tensor) -> list[tuple[int, str]]:
        """The two flagged pairs (marker 1), labelled with their values."""
        flagged = (x[:, 1] == 1).nonzero().flatten().tolist()
        return [(t, f"X{k + 1} = {float(x[t, 0]):+.2f}") for k, t in enumerate(flagged)]

    def _sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        t, g = self.length, generator
        rows = torch.arange(n)
        if self.form == "le":
            values = torch.rand(n, t, generator=g)
            i1 = torch.randint(0, t // 2, (n,), generator=g)
            i2 = t // 2 + torch.randint(0, t - t // 2, (n,), generator=g)
            markers = torch.zeros(n, t)
            markers[rows, i1] = 1
            markers[rows, i2] = 1
            return {"values": values, "markers": markers, "lengths": torch.full((n,), t),
                    "target": values[rows, i1] + values[rows, i2]}
        pairs = self._pairs_1997(n, t, True, g, marked_first=0.0)
        values = pairs["values"]
        target = 0.5 + (values[rows, pairs["i1"]] + values[rows, pairs["i2"]]) / 4
        return {"values": values, "markers": pairs["markers"], "lengths": pairs["lengths"], "target": target}

    @property
    def _lengths_vary(self) -> bool:
        return self.form != "le"


# ----------------------------------------------------------------- temporal order

#: Input symbols of the temporal order task, one-hot in this order.
ORDER_SYMBOLS = "EBabcdXY"
#: (first, last) positions of the X/Y symbols, by variant (0-based; E is position 0).
ORDER_WINDOWS = {"6a": ((10, 20), (50, 60)), "6b": ((10, 20), (33, 43), (66, 76))}
#: A sequence counts as correct when every output is within this error of its one-hot target.
ORDER_TOLERANCE = 0.3


@dataclass
class TemporalOrderTask(SampledTask):
    """Temporal order, Hochreiter & Schmidhuber 1997 §5.6 (Experiment 6).

    A sequence of length uniform in [100, 110] starts with E and ends with the trigger B;
    the other symbols are uniform from {a, b, c, d}, except X or Y (p = 1/2 each) at
    ``t1`` ∈ [10, 20] and ``t2`` ∈ [50, 60] (``variant="6a"``: 4 classes, XX→Q=0,
    XY→R=1, YX→S=2, YY→U=3), or at [10, 20], [33, 43], [66, 76] (``"6b"``: 8 classes,
    XXX→Q=0, XXY→R, XYX→S, XYY→U, YXX→V, YXY→A, YYX→B, YYY→C=7: the X/Y string read as a
    binary number with Y=1). Positions are 0-based
    indices (E at 0), drawn uniformly within each window.

    * ``x`` (T, B, 8) one-hot over ``EBabcdXY`` (zero padding, ``lengths`` set);
      ``y`` (B,) int64 class. Output: ``output_size`` class logits (4 or 8), read at the
      last valid step (the trigger B).
    * Loss: cross-entropy of the logits at the last step.
    * ``accuracy``: the paper's criterion "every output has |err| < 0.3" applied to the
      softmax of the logits against the one-hot target. It is equivalent to
      p(true class) > 0.7 (then every other p < 0.3). ``argmax_accuracy`` is also given.

    Target: ``accuracy`` at Table 9's error rate: 6a ≥ 1 - 1/2560 (published: 1 of 2,560
    test sequences wrong after 31,390 training sequences, 20 trials); 6b ≥ 1 - 2/2560
    (2 wrong after 571,100). Eval: ``eval_size`` = 2,560 sequences, as the paper's test set.

    Baseline: ``chance`` = 1/4 (6a), 1/8 (6b): confident guesses.
    """

    seed: int = 0
    variant: str = "6a"
    eval_size: int = 2560

    name: ClassVar[str] = "temporal_order"
    input_size = len(ORDER_SYMBOLS)
    output_size = 4

    @classmethod
    def recipe(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Forget bias 3 (``fb=3``), H = 64, Adam 3e-3, batch 32, clip 1, up to 8,000 steps.

        A forget bias of 3 lets the error reach the X/Y symbols 90 steps back (about
        σ(3)^90 ≈ 1 % survives at initialisation, against 1e-27 at torch's default);
        Measured (docs/results.md; 3 seeds each): 6a 38,400-137,600 sequences, 6b
        32,000-51,200 sequences.
        """
        return {"cell": "fb=3", "hidden_size": 64, "lr": 3e-3, "batch_size": 32, "steps": 8000,
                "eval_every": 100}

    def __post_init__(self) -> None:
        check_positive(self.name, eval_size=self.eval_size)
        check_values(self.name, f"an evaluation set of eval_size={self.eval_size} sequences",
                     self.eval_size * 110 * self.input_size)
        if self.variant not in ORDER_WINDOWS:
            raise ValueError(f"task 'temporal_order': variant must be '6a' or '6b', got {self.variant!r}")
        self.output_size = 2 ** len(ORDER_WINDOWS[self.variant])

    @property
    def target(self) -> Target:
        wrong, seqs = {"6a": (1, "31,390"), "6b": (2, "571,100")}[self.variant]
        return Target(
            metric="accuracy", goal="max", threshold=1 - wrong / 2560,
            published=f"Hochreiter & Schmidhuber 1997, §5.6, Table 9, task {self.variant}: {wrong} of 2,560 "
                      f"test sequences wrong (correct: every output |err| < 0.3) after {seqs} training "
                      "sequences.",
        )

    @property
    def baselines(self) -> dict[str, float]:
        return {"chance": 1 / self.output_size}

    @property
    def baseline_notes(self) -> dict[str, str]:
        return {"chance": f"a confident guess among the {self.output_size} classes: the class is decided by the "
                          f"X/Y symbols far back, so without them nothing better is possible"}

    def describe_data(self) -> dict[str, object]:
        return {"variant": self.variant, "classes": self.output_size, "eval_size": self.eval_size}

    def marked_steps(self, x: Tensor) -> list[tuple[int, str]]:
        """The X/Y symbols that decide the class."""
        sym = x.argmax(-1)
        return [(t, ORDER_SYMBOLS[int(sym[t])]) for t in range(x.shape[0])
                if float(x[t].sum()) > 0 and int(sym[t]) >= 6]

    def _sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        g, rows = generator, torch.arange(n)
        lengths = 100 + torch.randint(0, 11, (n,), generator=g)
        seq = 2 + torch.randint(0, 4, (n, 110), generator=g)  # a, b, c, d
        windows = ORDER_WINDOWS[self.variant]
        label = torch.zeros(n, dtype=torch.int64)
        for lo, hi in windows:
            pos = lo + torch.randint(0, hi - lo + 1, (n,), generator=g)
            bit = torch.randint(0, 2, (n,), generator=g)
            seq[rows, pos] = 6 + bit  # X or Y
            label = 2 * label + bit
        seq[:, 0] = 0  # E
        seq[rows, lengths - 1] = 1  # trigger B
        seq[torch.arange(110)[None, :] >= lengths[:, None]] = -1  # padding
        return {"seq": seq, "lengths": lengths, "label": label}

    def _encode(self, raw: dict[str, Tensor]) -> Batch:
        t = int(raw["lengths"].max())
        seq = raw["seq"][:, :t].T  # (T, B)
        x = F.one_hot(seq.clamp(min=0), len(ORDER_SYMBOLS)).float() * (seq >= 0)[..., None]
        return Batch(x, raw["label"].clone(), raw["lengths"].clone(), y_batch_dim=0)

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(last_step(output, batch.lengths), batch.y.to(output.device))

    def metrics(self, output: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        logits = last_step(output.detach(), batch.lengths)
        y = batch.y.to(output.device)
        p_true = logits.softmax(-1).gather(1, y[:, None])[:, 0]
        n = float(y.numel())
        return {
            "accuracy": (float((p_true > 1 - ORDER_TOLERANCE).sum()), n),
            "argmax_accuracy": (float((logits.argmax(-1) == y).sum()), n),
            "loss": (float(F.cross_entropy(logits, y, reduction="sum")), n),
        }

    def show(self, output: Tensor, batch: Batch, n: int = 3) -> str:
        logits = last_step(output.detach(), batch.lengths)
        p = logits.softmax(-1)
        names = "QRSUVABC"  # the paper's class names (6a uses the first four)
        lines = []
        for b in range(min(n, logits.shape[0])):
            steps = int(batch.lengths[b]) if batch.lengths is not None else output.shape[0]
            seq = batch.x[:steps, b].argmax(-1)
            xy = [f"{ORDER_SYMBOLS[int(seq[t])]}@{t}" for t in range(steps) if int(seq[t]) >= 6]
            y, k = int(batch.y[b]), int(logits[b].argmax())
            lines.append(f"T={steps}, {' '.join(xy)}: target {names[y]}, predicted {names[k]} "
                         f"(p={float(p[b, y]):.3f} for the target; {'ok' if p[b, y] > 0.7 else 'wrong'})")
        return "\n".join(lines)


# ----------------------------------------------------------------------- copy

#: Classes of the copy task: 0 blank, 1..8 symbols, 9 delimiter.
COPY_CLASSES = 10
COPY_SYMBOLS = 10  # symbols to remember


@dataclass
class CopyTask(SampledTask):
    """Copy memory, Arjovsky, Shah & Bengio 2016 (protocol from reproduction code).

    A sequence of ``T + 20`` steps (``T = length``): 10 symbols uniform from {1..8},
    ``T - 1`` blanks (0), the delimiter (9), 10 blanks. The target is blank at every step
    except the last 10, which must recall the 10 symbols in order.

    * ``x`` (T+20, B, 10) one-hot; ``y`` (T+20, B) int64 classes; 10 output logits.
    * Loss and ``xent``: cross-entropy averaged over all T+20 steps and sequences.
    * ``recall_accuracy``: argmax accuracy on the 10 recalled symbols.

    Baseline: ``uniform_recall`` = 10·ln 8 / (T + 20) (0.1733 at T = 100): output blank
    until the delimiter's 10 blanks start, then uniform over the 8 symbols. It needs no
    memory of the content; its recall accuracy is 1/8.

    Target: ``xent`` ≤ 0.1 × baseline, our operational threshold (≤ 0.21 nats per
    recalled symbol on average). Published (Arjovsky et al. Fig. 1, S/R): the LSTM
    (128 units, RMSProp 1e-3, batch 50) stalls at the baseline as T grows
    (T ∈ {100, 200, 300, 500}); the uRNN goes below it.
    """

    seed: int = 0
    length: int = 100
    eval_size: int = 2560

    name: ClassVar[str] = "copy"
    input_size = COPY_CLASSES
    output_size = COPY_CLASSES

    def __post_init__(self) -> None:
        check_positive(self.name, MAX_LENGTH, length=self.length)
        check_positive(self.name, eval_size=self.eval_size)
        check_values(self.name, f"an evaluation set of eval_size={self.eval_size} sequences of length="
                     f"{self.length}", self.eval_size * (self.length + 20) * self.input_size)

    @classmethod
    def recipe(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Chrono initialisation for lags up to 1.25 (T + 20), H = 128, Adam 3e-3, batch 32,
        clip 1, 20,000 steps evaluated every 200, the weights of the best validation
        cross-entropy kept; **no early stop** (``stop_at_target=False``).

        The cross-entropy falls smoothly through the threshold, so weights kept at the first
        validation evaluation that crosses it sit on the threshold and their test value
        lands on either side (seed 2 of a stop-at-target recipe: validation 0.01730, test
        0.01772, threshold 0.01733); training on to the budget leaves a margin. Measured at
        T = 100 (docs/results.md): see there; lr 1e-3 is about 3x slower, and a constant
        forget bias (``fb=5``) had not left the plateau after 350,000 sequences.
        """
        length = cls.option(options, "length")
        return {"cell": f"chrono={round(1.25 * (length + 20))}", "hidden_size": 128, "lr": 3e-3,
                "batch_size": 32, "steps": 20_000, "eval_every": 200, "stop_at_target": False}

    @property
    def baseline(self) -> float:
        """10·ln 8 / (T + 20)."""
        return COPY_SYMBOLS * math.log(8) / (self.length + 20)

    @property
    def target(self) -> Target:
        return Target(
            metric="xent", goal="min", threshold=0.1 * self.baseline,
            published="Arjovsky, Shah & Bengio 2016, copy task: baseline cross-entropy 10 ln 8/(T+20); the "
                      "LSTM stalls at the baseline as T grows (T = 100-500), the uRNN goes below it. "
                      "Threshold 0.1 x baseline is lstmkit's operational one.",
        )

    @property
    def baselines(self) -> dict[str, float]:
        return {"uniform_recall": self.baseline}

    @property
    def baseline_notes(self) -> dict[str, str]:
        return {"uniform_recall": "blank until the recall starts, then each of the 8 symbols with probability 1/8: "
                                  "knows the format of the task but remembers nothing"}

    def describe_data(self) -> dict[str, object]:
        return {"length": self.length, "steps": self.length + 20, "eval_size": self.eval_size}

    def marked_steps(self, x: Tensor) -> list[tuple[int, str]]:
        """The 10 symbols to remember and the delimiter that asks for them."""
        sym = x.argmax(-1)
        return [(t, str(int(sym[t]))) for t in range(COPY_SYMBOLS)] + \
            [(t, "recall") for t in range(x.shape[0]) if int(sym[t]) == COPY_CLASSES - 1]

    def _sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {"digits": 1 + torch.randint(0, 8, (n, COPY_SYMBOLS), generator=generator)}

    def _encode(self, raw: dict[str, Tensor]) -> Batch:
        digits = raw["digits"].T  # (10, B)
        t, b = self.length, digits.shape[1]
        seq = torch.zeros(t + 20, b, dtype=torch.int64)
        seq[:COPY_SYMBOLS] = digits
        seq[t + 9] = 9
        y = torch.zeros(t + 20, b, dtype=torch.int64)
        y[t + 10:] = digits
        return Batch(F.one_hot(seq, COPY_CLASSES).float(), y)

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), batch.y.to(output.device).reshape(-1))

    def metrics(self, output: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        out, y = output.detach(), batch.y.to(output.device)
        xent = float(F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"))
        recall = (out[-COPY_SYMBOLS:].argmax(-1) == y[-COPY_SYMBOLS:]).sum()
        n = float(y.numel())
        return {"xent": (xent, n), "recall_accuracy": (float(recall), float(COPY_SYMBOLS * y.shape[1])),
                "loss": (xent, n)}

    def show(self, output: Tensor, batch: Batch, n: int = 3) -> str:
        pred = output.detach()[-COPY_SYMBOLS:].argmax(-1).cpu()  # (10, B)
        y = batch.y[-COPY_SYMBOLS:]
        lines = []
        for b in range(min(n, y.shape[1])):
            ok = int((pred[:, b] == y[:, b]).sum())
            lines.append(f"remember {' '.join(map(str, y[:, b].tolist()))}  recalled "
                         f"{' '.join(map(str, pred[:, b].tolist()))}  ({ok}/10)")
        return "\n".join(lines)
