"""The timing tasks of Gers, Schraudolph & Schmidhuber 2002 ("Learning precise timing with
LSTM recurrent networks", JMLR 3:115-143), the experiments that introduced peephole
connections: ``spike_delays`` (MSD, measuring spike delays), ``timed_spikes`` (GTS,
generating timed spikes) and ``periodic`` (PFG, periodic function generation).

The paper trains one memory block online on continual streams, a stream ending at the
first output error (0.49 for the spike tasks, 0.3 for PFG). lstmkit keeps the tasks, the
error thresholds and the claims, and makes each a sequence task that needs the same
machinery: every sequence holds several intervals (or periods), so a net must measure or
generate each one and reset itself after it, without external resets or teacher forcing;
the state starts at zero once per sequence.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmkit.app.tasks._synth_common import SampledTask
from lstmkit.app.tasks.base import (
    EVAL_BATCH_SIZE,
    MAX_LENGTH,
    SPLITS,
    Batch,
    Target,
    Task,
    check_batch_size,
    check_positive,
    check_split,
    check_values,
)

__all__ = ["SpikeDelaysTask", "TimedSpikesTask", "PeriodicTask", "SPIKE_TOLERANCE", "PERIODIC_TOLERANCE",
           "periodic_target", "PERIODIC_SHAPES"]

#: An output of the spike tasks is correct when within this of its target (the paper's threshold).
SPIKE_TOLERANCE = 0.49
#: An output of the periodic functions is correct when within this of its target (the paper's PFG threshold).
PERIODIC_TOLERANCE = 0.3
#: The periodic functions of ``periodic``.
PERIODIC_SHAPES = ("cos", "triangle", "rectangle")

_PAPER = "Gers, Schraudolph & Schmidhuber 2002 (JMLR 3:115-143)"


def _valid(lengths: Tensor, steps: int) -> Tensor:
    """(T, B) bool: step t of sequence b is real (``t < lengths[b]``)."""
    return torch.arange(steps)[:, None] < lengths[None, :]


# ------------------------------------------------------------------------------ MSD


@dataclass
class SpikeDelaysTask(SampledTask):
    """Measuring spike delays (MSD), Gers, Schraudolph & Schmidhuber 2002, §4.

    The input is a train of spikes (1 at a spike, else 0): the first at a step drawn
    uniformly from ``0 … F-1`` (so the start of the sequence is no clock), then
    ``T(n) = T(n-1) + F + I(n)`` for n = 1 … ``spikes``, with ``F = interval`` and I(n)
    uniform in ``0 … jitter``; the sequence ends with the last spike (``lengths`` set).
    At each spike n ≥ 1 the single output must be I(n): the net must count the steps
    since the previous spike and restart the count at every spike. Outputs between
    spikes are free. ``interval=49, jitter=1`` asks it to tell spacings of 49 and 50
    steps apart.

    * ``x`` (T, B, 1); ``y`` (T, B, 2): the target (``[..., 0]``) and 1 where it is read
      (``[..., 1]``: the spikes n ≥ 1).
    * Loss and ``mse``: squared error at the spikes. ``spike_accuracy``: fraction of
      spikes with |err| < 0.49 (the paper's threshold); ``accuracy``: fraction of
      sequences whose every spike is right.

    Target: ``accuracy`` = 1 on ``eval_size`` sequences (every interval of the test
    sequences measured). Published: the abstract's claim that LSTM with peephole
    connections "can learn the fine distinction between sequences of spikes spaced
    either 50 or 49 time steps apart without the help of any short training exemplars";
    its MSD experiments (one memory block, online, lr 1e-5) were learned with and
    without peepholes, the larger F the harder.

    Baseline: ``constant``: answering one fixed I(n) is right at 1/(jitter + 1) of the
    spikes, on a fraction (1/(jitter + 1))^spikes of the sequences.
    """

    seed: int = 0
    interval: int = 10
    jitter: int = 1
    spikes: int = 10
    eval_size: int = 256

    name: ClassVar[str] = "spike_delays"
    input_size = 1
    output_size = 1

    def __post_init__(self) -> None:
        check_positive(self.name, MAX_LENGTH, interval=self.interval, jitter=self.jitter, spikes=self.spikes)
        check_positive(self.name, eval_size=self.eval_size)
        check_positive(self.name, MAX_LENGTH, steps=self._width())
        check_values(self.name, f"an evaluation set of eval_size={self.eval_size} sequences",
                     self.eval_size * self._width() * 3)

    def _width(self) -> int:
        """The longest sequence: first spike at F - 1, every interval F + jitter."""
        return self.interval + self.spikes * (self.interval + self.jitter)

    @classmethod
    def recipe(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Chrono initialisation for twice the longest interval (``chrono=2(F+jitter)``), no
        peepholes, H = 16, Adam 1e-2, batch 32, clip 1, up to 10,000 steps evaluated every 50.

        The state at a spike must still differ by one step's worth between spacings of F and
        F + 1: with a forget-gate bias of 2 (σ(2)^49 ≈ 2e-3 of a cell survives an interval of 49
        at initialisation) every net at ``interval=49`` answered about the mean 0.5 (squared
        error 0.250, at most 0.4 % of the sequences right) for 5,000-8,000 steps: H = 16, 32,
        64, Adam 1e-2 to 1e-3, a bias of 5, layer normalisation, the paper's one-cell block
        (identity candidate, biases f -2, o +2). With chrono the LSTM without peepholes solved
        seeds 0-2; with peepholes seeds 0 and 2 (4,350 and 4,800 steps), while seed 1 stayed at
        the mean for 10,000 steps (also with lr 3e-3 or chrono=200; with H = 32 it met the
        criterion on the validation split at 5,200 steps but missed 3 of the 256 test
        sequences). As the paper found, measuring intervals does not need peepholes; generating
        them does (:class:`TimedSpikesTask`). Measured: docs/results.md (3 seeds, stopped on the
        validation split; the same recipe with peepholes beside it).
        """
        interval, jitter = cls.option(options, "interval"), cls.option(options, "jitter")
        return {"cell": f"chrono={2 * (interval + jitter)}", "hidden_size": 16, "lr": 1e-2, "batch_size": 32,
                "steps": 10_000, "eval_every": 50}

    @property
    def target(self) -> Target:
        return Target(
            metric="accuracy", goal="max", threshold=1.0,
            published=f"{_PAPER}, MSD: output the delay I(n) at each spike within 0.49; the abstract: peephole "
                      "LSTM learns to tell spike spacings of 50 and 49 steps apart without short training "
                      "exemplars; MSD was learned with and without peepholes, larger F being harder. Pass: every "
                      "interval of every test sequence.",
        )

    @property
    def baselines(self) -> dict[str, float]:
        return {"constant": (1 / (self.jitter + 1)) ** self.spikes}

    @property
    def baseline_notes(self) -> dict[str, str]:
        return {"constant": f"always answering the same delay: right at 1/{self.jitter + 1} of the spikes, so on "
                            f"this fraction of the sequences of {self.spikes} intervals"}

    def describe_data(self) -> dict[str, object]:
        return {"interval": self.interval, "jitter": self.jitter, "spikes": self.spikes, "eval_size": self.eval_size}

    def marked_steps(self, x: Tensor) -> list[tuple[int, str]]:
        """The input spikes, labelled with the interval since the previous one."""
        times = (x[:, 0] > 0.5).nonzero().flatten().tolist()
        return [(t, "spike" if k == 0 else f"+{t - times[k - 1]}") for k, t in enumerate(times)]

    def memory_signal(self, x: Tensor) -> tuple[Tensor, str]:
        """Steps since the last input spike (NaN before the first). ``x`` (T, B, 1) -> (T, B)."""
        return _since_last(x[..., 0] > 0.5), "steps since the last input spike"

    def _sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        g = generator
        t0 = torch.randint(0, self.interval, (n, 1), generator=g)
        delays = torch.randint(0, self.jitter + 1, (n, self.spikes), generator=g)
        times = torch.cat([t0, t0 + torch.cumsum(self.interval + delays, 1)], 1)  # (n, spikes + 1)
        return {"times": times, "delays": delays, "lengths": times[:, -1] + 1}

    def _encode(self, raw: dict[str, Tensor]) -> Batch:
        lengths = raw["lengths"]
        t, b = int(lengths.max()), lengths.shape[0]
        rows = torch.arange(b)[:, None]
        x = torch.zeros(b, t)
        x[rows, raw["times"]] = 1.0
        y = torch.zeros(b, t, 2)
        y[rows, raw["times"][:, 1:], 0] = raw["delays"].float()
        y[rows, raw["times"][:, 1:], 1] = 1.0
        return Batch(x.T[..., None].contiguous(), y.transpose(0, 1).contiguous(), lengths.clone())

    def _errors(self, output: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(T, B) output errors and (T, B) bool where they are read."""
        y = batch.y.to(output.device, output.dtype)
        return output[..., 0] - y[..., 0], y[..., 1] > 0.5

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        err, read = self._errors(output, batch)
        return (err * err * read).sum() / read.sum().clamp(min=1)

    def metrics(self, output: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        err, read = self._errors(output.detach(), batch)
        ok = (err.abs() < SPIKE_TOLERANCE) | ~read
        spikes = float(read.sum())
        sq = float((err * err * read).sum())
        return {"accuracy": (float(ok.all(0).sum()), float(batch.size)),
                "spike_accuracy": (float((ok & read).sum()), spikes), "mse": (sq, spikes), "loss": (sq, spikes)}

    def show(self, output: Tensor, batch: Batch, n: int = 3) -> str:
        err, read = self._errors(output.detach(), batch)
        y = batch.y
        lines = []
        for b in range(min(n, batch.size)):
            idx = read[:, b].nonzero().flatten().tolist()
            wrong = [t for t in idx if abs(float(err[t, b])) >= SPIKE_TOLERANCE]
            pairs = " ".join(f"{int(y[t, b, 0])}:{float(output[t, b, 0]):.2f}" for t in idx[:8])
            lines.append(f"{len(idx)} intervals, delay:output {pairs}{' …' if len(idx) > 8 else ''} "
                         f"({'ok' if not wrong else f'{len(wrong)} wrong'})")
        return "\n".join(lines)


def _since_last(events: Tensor) -> Tensor:
    """(T, B) float: steps since the last True of ``events`` (T, B) at or before t; NaN before the first."""
    out = torch.full(events.shape, float("nan"))
    last = torch.full((events.shape[1],), float("nan"))
    for t in range(events.shape[0]):
        last = torch.where(events[t], torch.tensor(float(t)), last)
        out[t] = t - last
    return out


# ------------------------------------------------------------------------------ GTS


@dataclass
class TimedSpikesTask(SampledTask):
    """Generating timed spikes (GTS), Gers, Schraudolph & Schmidhuber 2002, §4.

    At step 0 a cue arrives on one of two input channels; there is no other input. The
    net must then generate a spike (output 1; 0 elsewhere) every ``F`` steps after cue 0
    or every ``F + 1`` steps after cue 1 (``F = interval``), ``spikes`` times; the
    sequence ends with the last spike (``lengths`` set). With ``interval=49`` it must
    tell spacings of 49 and 50 steps apart while generating them, and restart its own
    count after every spike (no external resets, no teacher forcing).

    * ``x`` (T, B, 2); ``y`` (T, B) 0/1 target; the single output is a logit (the spike
      probability is its sigmoid).
    * Loss: binary cross-entropy over all steps. A step is correct when the sigmoid is
      within 0.49 of the target (the paper's threshold); ``accuracy``: fraction of the
      sequences whose every step is correct; ``spike_accuracy``: the spike steps alone;
      ``step_accuracy``: all steps.

    Target: ``accuracy`` = 1 on ``eval_size`` sequences. Published: peephole LSTM
    learned to generate stable streams of precisely timed spikes without external
    resets or teacher forcing (the abstract); the paper reports GTS for LSTM with
    peepholes and forget gates.

    Baselines: ``one_period`` = 0.5, a generator of one of the two periods that ignores
    the cue; ``silent`` = 0, never spiking.
    """

    seed: int = 0
    interval: int = 49
    spikes: int = 5
    eval_size: int = 256

    name: ClassVar[str] = "timed_spikes"
    input_size = 2
    output_size = 1

    def __post_init__(self) -> None:
        check_positive(self.name, MAX_LENGTH, interval=self.interval, spikes=self.spikes)
        check_positive(self.name, eval_size=self.eval_size)
        check_positive(self.name, MAX_LENGTH, steps=self.spikes * (self.interval + 1) + 1)
        check_values(self.name, f"an evaluation set of eval_size={self.eval_size} sequences",
                     self.eval_size * (self.spikes * (self.interval + 1) + 1) * 3)

    @classmethod
    def recipe(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Peepholes and forget-gate bias 2 (``peephole+fb=2``), H = 64, Adam 3e-3, batch 32,
        clip 1, up to 5,000 steps evaluated every 50.

        At ``interval=49`` (seed 0 unless said), H = 16 with Adam 1e-2 and a forget bias of 2
        or 5, or chrono, had at most 20-40 % of the spikes right after 5,000 steps; H = 32 with
        3e-3 solved seed 0 at 7,150 steps but held seeds 1 and 2 at 20-50 % for 16,000; H = 64
        solved seeds 0-2 in 1,900-2,650. Measured: docs/results.md (3 seeds, stopped on the
        validation split; the same recipe without peepholes beside it).
        """
        return {"cell": "peephole+fb=2", "hidden_size": 64, "lr": 3e-3, "batch_size": 32, "steps": 5000,
                "eval_every": 50}

    @property
    def target(self) -> Target:
        return Target(
            metric="accuracy", goal="max", threshold=1.0,
            published=f"{_PAPER}, GTS: every output within 0.49 of the spike train; peephole LSTM with forget "
                      "gates learns to generate stable streams of precisely timed spikes without external resets "
                      "or teacher forcing. Pass: every step of every test sequence.",
        )

    @property
    def baselines(self) -> dict[str, float]:
        return {"one_period": 0.5, "silent": 0.0}

    @property
    def baseline_notes(self) -> dict[str, str]:
        return {"one_period": f"spikes every {self.interval} (or {self.interval + 1}) steps whatever the cue: right "
                              "on the sequences of that cue, half of them",
                "silent": "never spikes: no sequence is right"}

    def describe_data(self) -> dict[str, object]:
        return {"interval": self.interval, "spikes": self.spikes, "eval_size": self.eval_size}

    def marked_steps(self, x: Tensor) -> list[tuple[int, str]]:
        """The cue, and the steps where the spikes must come."""
        period = self.interval + int(x[0].argmax())
        n = self.spikes
        return [(0, f"cue: every {period}")] + [(k * period, "spike") for k in range(1, n + 1)]

    def memory_signal(self, x: Tensor) -> tuple[Tensor, str]:
        """Steps since the cue or the last spike due (t mod period). ``x`` (T, B, 2) -> (T, B)."""
        period = self.interval + x[0].argmax(-1)
        t = torch.arange(x.shape[0])[:, None]
        signal = (t % period[None, :]).float()
        signal[t >= self.spikes * period[None, :] + 1] = float("nan")
        return signal, "steps since the cue or the last spike due"

    def _sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        cue = torch.randint(0, 2, (n,), generator=generator)
        return {"cue": cue, "lengths": self.spikes * (self.interval + cue) + 1}

    def _encode(self, raw: dict[str, Tensor]) -> Batch:
        cue, lengths = raw["cue"], raw["lengths"]
        t, b = int(lengths.max()), cue.shape[0]
        x = torch.zeros(t, b, 2)
        x[0, torch.arange(b), cue] = 1.0
        steps = torch.arange(t)[:, None]
        period = (self.interval + cue)[None, :]
        y = ((steps % period == 0) & (steps > 0) & _valid(lengths, t)).float()
        return Batch(x, y, lengths.clone())

    def _step_ok(self, output: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(T, B) bool correct steps (True on padding) and (T, B) bool real steps."""
        assert batch.lengths is not None
        valid = _valid(batch.lengths, output.shape[0]).to(output.device)
        y = batch.y.to(output.device, output.dtype)
        ok = (torch.sigmoid(output[..., 0]) - y).abs() < SPIKE_TOLERANCE
        return ok | ~valid, valid

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        assert batch.lengths is not None
        valid = _valid(batch.lengths, output.shape[0]).to(output.device, output.dtype)
        per = F.binary_cross_entropy_with_logits(output[..., 0], batch.y.to(output.device, output.dtype),
                                                 reduction="none")
        return (per * valid).sum() / valid.sum()

    def metrics(self, output: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        out = output.detach()
        ok, valid = self._step_ok(out, batch)
        spike = batch.y.to(out.device) > 0.5
        steps = float(valid.sum())
        loss = float(self.loss(out, batch))
        return {"accuracy": (float(ok.all(0).sum()), float(batch.size)),
                "spike_accuracy": (float((ok & spike).sum()), float(spike.sum())),
                "step_accuracy": (float((ok & valid).sum()), steps), "loss": (loss * steps, steps)}

    def show(self, output: Tensor, batch: Batch, n: int = 3) -> str:
        out = output.detach()
        ok, valid = self._step_ok(out, batch)
        lines = []
        for b in range(min(n, batch.size)):
            steps = int(valid[:, b].sum())
            fired = (torch.sigmoid(out[:steps, b, 0]) > 0.5).nonzero().flatten().tolist()
            due = (batch.y[:steps, b] > 0.5).nonzero().flatten().tolist()
            lines.append(f"cue: every {self.interval + int(batch.x[0, b].argmax())}: spikes due at {due}, output "
                         f"above 0.5 at {fired[:12]}{' …' if len(fired) > 12 else ''} "
                         f"({'ok' if bool(ok[:, b].all()) else 'wrong'})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ PFG


def periodic_target(shape: str, period: int, steps: int) -> Tensor:
    """The target of ``periodic``: (steps,) values in [0, 1] at phase φ = (t mod F)/F.

    ``cos``: (1 - cos 2πφ)/2; ``triangle``: 1 - |2φ - 1|; ``rectangle``: 1 for
    1/4 ≤ φ < 3/4, else 0. All three are 0 at t = 0; cos and triangle are 1 at φ = 1/2,
    which an odd F never samples (their largest value is then below 1: 0.996 and 0.96 at
    F = 25).
    """
    if shape not in PERIODIC_SHAPES:
        raise ValueError(f"shape: expected one of {list(PERIODIC_SHAPES)}, got {shape!r}")
    phase = (torch.arange(steps) % period).double() / period
    if shape == "cos":
        out = (1 - torch.cos(2 * math.pi * phase)) / 2
    elif shape == "triangle":
        out = 1 - (2 * phase - 1).abs()
    else:
        out = ((phase >= 0.25) & (phase < 0.75)).double()
    return out.float()


@dataclass
class PeriodicTask(Task):
    """Periodic function generation (PFG), Gers, Schraudolph & Schmidhuber 2002, §4.

    No input (one input unit, always 0): from a zero state the single output must
    generate a periodic function of period ``F = period`` (:func:`periodic_target`:
    ``shape`` cos, triangle or rectangle, values in [0, 1], 0 at t = 0) for as long as it
    runs. There is nothing random: every training sequence is the same ``periods``
    periods long (3 by default); the validation split runs ``eval_periods`` periods and
    the test split twice as many, so the test asks for the pattern far longer than
    anything trained and longer than anything validated (a generator that drifts or
    decays fails it).

    * ``x`` (T, 1, 1) zeros; ``y`` (T, 1) the target; ``lengths`` None.
    * Loss and ``mse``: squared error over all steps; ``max_error``: the largest
      absolute error over the split's sequence (one sequence per split, so the batch
      size is ignored); ``solved``: 1 when every step is within 0.3 (the paper's PFG
      threshold), else 0.

    Target: ``max_error`` ≤ 0.3 on the test split. Published: with peephole connections
    all of cos, triangle and rectangle were learned at F = 10 and F = 25, without them
    only cos at F = 10 (the paper's account); cos at F = 25 with a stricter threshold of
    0.15: RMSE 0.086 ± 0.002 after (2,704 ± 49) × 10³ training steps.

    Baseline: ``best_constant``, the largest error of the best constant output, the middle
    of the target's range: half that range (0.5 where F is even; 0.498 for cos and 0.48 for
    triangle at F = 25).
    """

    seed: int = 0
    shape: str = "cos"
    period: int = 10
    periods: int = 3
    eval_periods: int = 50

    name: ClassVar[str] = "periodic"
    splits: ClassVar[tuple[str, ...]] = SPLITS
    input_size = 1
    output_size = 1

    def __post_init__(self) -> None:
        if self.shape not in PERIODIC_SHAPES:
            raise ValueError(f"task 'periodic': shape must be one of {list(PERIODIC_SHAPES)}, got {self.shape!r}")
        check_positive(self.name, MAX_LENGTH, period=self.period, periods=self.periods,
                       eval_periods=self.eval_periods)
        if self.period < 2:
            raise ValueError(f"task 'periodic': period must be at least 2, got {self.period}")
        check_positive(self.name, MAX_LENGTH, test_steps=2 * self.eval_periods * self.period,
                       train_steps=self.periods * self.period)

    @classmethod
    def recipe(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Peepholes (``peephole``), H = 16, Adam 1e-2, one sequence per batch (they are all
        the same), clip 1, 3,000 steps evaluated every 25, the weights of the smallest
        validation ``max_error`` kept; **no early stop** (``stop_at_target=False``).

        The largest error falls through 0.3 and back while training; weights kept at the
        first validation evaluation below it generated the 50 validation periods but not
        the 100 test periods (seed 0: cos F = 10, 25 and triangle F = 10, validation
        0.24-0.30, test 0.33-0.61); trained to the budget they keep a margin. With 1,500
        steps the rectangle at F = 25 was solved on 2 of 3 seeds (seed 0: 0.51), with 3,000
        on 3 of 3. Measured: docs/results.md (3 seeds; the same recipe without peepholes
        beside it).
        """
        return {"cell": "peephole", "hidden_size": 16, "lr": 1e-2, "batch_size": 1, "steps": 3000,
                "eval_every": 25, "stop_at_target": False}

    @property
    def target(self) -> Target:
        return Target(
            metric="max_error", goal="min", threshold=PERIODIC_TOLERANCE,
            published=f"{_PAPER}, PFG (no input, error threshold 0.3): with peepholes cos, triangle and rectangle "
                      "at F = 10 and 25 were learned, without peepholes only cos at F = 10; cos at F = 25 with "
                      "threshold 0.15: RMSE 0.086 ± 0.002 after 2.7 million steps.",
        )

    @property
    def baselines(self) -> dict[str, float]:
        period = periodic_target(self.shape, self.period, self.period)  # every phase the task samples
        return {"best_constant": float(period.max() - period.min()) / 2}

    @property
    def baseline_notes(self) -> dict[str, str]:
        return {"best_constant": "always outputting the middle of the target's range (0.5 where F is even), the "
                                 "best constant: its largest error is half the range"}

    def describe_data(self) -> dict[str, object]:
        return {"shape": self.shape, "period": self.period, "train_steps": self.periods * self.period,
                "valid_steps": self.eval_periods * self.period, "test_steps": 2 * self.eval_periods * self.period}

    def _steps(self, split: str) -> int:
        check_split(self.name, split, self.splits)
        return {"train": self.periods, "valid": self.eval_periods, "test": 2 * self.eval_periods}[split] * self.period

    def _batch(self, steps: int, n: int) -> Batch:
        y = periodic_target(self.shape, self.period, steps)[:, None].expand(steps, n).contiguous()
        return Batch(torch.zeros(steps, n, 1), y)

    def memory_signal(self, x: Tensor) -> tuple[Tensor, str]:
        """The phase of the period, t mod F. ``x`` (T, B, 1) -> (T, B)."""
        t = torch.arange(x.shape[0])[:, None] % self.period
        return t.float().expand(x.shape[0], x.shape[1]).clone(), "phase: steps since the period began"

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Endless copies of the one training sequence (``batch_size`` of them per batch)."""
        check_batch_size(self.name, batch_size)
        batch = self._batch(self._steps("train"), batch_size)

        def batches() -> Iterator[Batch]:
            while True:
                yield Batch(batch.x, batch.y)

        return batches()

    def eval_batches(self, split: str = "test", batch_size: int = EVAL_BATCH_SIZE) -> Iterator[Batch]:
        """The one sequence of ``split`` (``batch_size`` is ignored)."""
        check_batch_size(self.name, batch_size)
        return iter([self._batch(self._steps(split), 1)])

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return F.mse_loss(output[..., 0], batch.y.to(output.device, output.dtype))

    def metrics(self, output: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        err = (output.detach()[..., 0] - batch.y.to(output.device, output.dtype)).abs()
        n = float(err.numel())
        sq = float((err * err).sum())
        worst = err.amax(0)  # (B,)
        return {"max_error": (float(worst.max()), 1.0), "solved": (float((worst < PERIODIC_TOLERANCE).sum()),
                                                                   float(batch.size)),
                "mse": (sq, n), "loss": (sq, n)}

    def show(self, output: Tensor, batch: Batch, n: int = 3) -> str:
        out, y = output.detach()[:, 0, 0], batch.y[:, 0]
        err = (out - y).abs()
        per = self.period
        first = " ".join(f"{float(v):.2f}" for v in out[:per])
        last = " ".join(f"{float(v):.2f}" for v in out[-per:])
        target = " ".join(f"{float(v):.2f}" for v in y[:per])
        return (f"{self.shape}, period {per}, {out.shape[0]} steps: target {target}\n"
                f"first period {first}\nlast period  {last}\nlargest error {float(err.max()):.3f} at t="
                f"{int(err.argmax())} ({'ok' if float(err.max()) < PERIODIC_TOLERANCE else 'wrong'})")
