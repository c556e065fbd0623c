"""``sunspots`` and ``co2``: one-step-ahead forecasting of statsmodels' bundled series.

Data (no network; the CSV files inside the statsmodels wheel):

* ``sunspots``: ``statsmodels.datasets.sunspots``, yearly mean sunspot activity
  (``SUNACTIVITY``) 1700-2008, 309 values.
* ``co2``: ``statsmodels.datasets.co2``, weekly Mauna Loa CO2 (ppm) 1958-03-29 to
  2001-12-29, 2,284 weeks of which 59 are missing; the missing weeks are filled by
  linear interpolation between their neighbours (the weeks are equally spaced, so this is
  linear in time; a gap at either end would take the nearest value).

Split, chronological: the first 70 % of the values are ``train``, the next 15 % ``valid``,
the last 15 % ``test`` (sunspots 216/46/47, co2 1,599/343/342).

Modelled series ``m``: the values (or, with ``difference=True``, the first differences
``m[j] = s[j] - s[j-1]``), normalised as ``z = (m - mean) / std`` with the mean and the
(population) standard deviation of the *train* part only. Step ``j`` reads the previous
``lags`` values ``[z[j-1], …, z[j-lags]]`` and predicts ``z[j]``. The model's output
(T, B, 1) is that prediction, in normalised units; with ``difference=True`` the level
forecast is ``s[j-1] + m̂[j]``, whose error equals the error of ``m̂[j]``.

Sequence task. Training batches: ``B`` random windows of ``window`` consecutive target
steps inside the train part, start positions drawn from the trainer's generator.
Evaluation (``eval_batches``): one sequence (B = 1, ``batch_size`` is ignored) covering
the split, preceded by ``window`` warm-up steps taken from the end of the part before it
(none for ``train``); warm-up targets are NaN, which the loss and the metrics skip.

Loss: MSE in normalised units. Metrics: ``mse`` and ``rmse`` in original units, ``loss``
(normalised MSE). ``rmse`` is reported as ``(rmse · n, n)``: exact for one batch (every
evaluation here is one batch), a count-weighted mean of per-batch RMSEs otherwise; the
(sum, count) interface cannot aggregate a square root exactly.

Baselines (test RMSE, original units): ``persistence`` (``ŝ[j] = s[j-1]``) and ``ar``
(statsmodels ``AutoReg`` with a constant, on the train part of the levels, the order p ≤ 12
chosen by AIC with ``ar_select_order``; one-step-ahead forecasts from the true past).
There is no published LSTM result on these series. Measured (statsmodels 0.15.0), test
RMSE: sunspots persistence 29.09, AR(9) 17.69; co2 persistence 0.501, AR(12) 0.450 ppm.
On co2 the test levels lie above every training level (the trend), so a level model
must extrapolate; ``difference=True`` avoids that.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from lstmkit._optional import require
from lstmkit.app.tasks._corpus_util import sha256_hex
from lstmkit.app.tasks.base import EVAL_BATCH_SIZE, Batch, Target, Task, check_positive

__all__ = ["CO2", "SeriesData", "Sunspots", "load_series"]

_FRACTIONS = (0.70, 0.15)  # train, valid; test is the rest
_MAX_AR_LAG = 12


@dataclass(frozen=True)
class SeriesData:
    """A raw series.

    Attributes:
        name: ``"sunspots"`` or ``"co2"``.
        values: (N,) float64 values in original units (gaps filled).
        labels: (N,) time labels as strings (year or ISO date).
        filled: how many missing values were filled.
        unit: unit of the values.
        source: where the values come from.
    """

    name: str
    values: np.ndarray
    labels: list[str]
    filled: int
    unit: str
    source: str


@functools.lru_cache(maxsize=4)
def load_series(name: str) -> SeriesData:
    """Load ``"sunspots"`` or ``"co2"`` from statsmodels' bundled datasets."""
    require(f"task {name!r}", "statsmodels")
    import statsmodels

    version = f"statsmodels {statsmodels.__version__}"
    if name == "sunspots":
        from statsmodels.datasets import sunspots

        df = sunspots.load_pandas().data
        values = df["SUNACTIVITY"].to_numpy(dtype=np.float64)
        labels = [str(int(y)) for y in df["YEAR"]]
        return SeriesData(name, values, labels, 0, "sunspot number (yearly mean)",
                          f"{version}, statsmodels.datasets.sunspots")
    if name == "co2":
        from statsmodels.datasets import co2

        series = co2.load_pandas().data["co2"]
        filled = int(series.isna().sum())
        series = series.interpolate(method="linear", limit_direction="both")
        labels = [d.strftime("%Y-%m-%d") for d in series.index]
        return SeriesData(name, series.to_numpy(dtype=np.float64), labels, filled, "ppm CO2 (weekly)",
                          f"{version}, statsmodels.datasets.co2")
    raise ValueError(f"load_series: unknown series {name!r}; expected 'sunspots' or 'co2'")


def _rmse(err: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(err))))


@dataclass
class _SeriesTask(Task):
    """One-step-ahead forecasting of a statsmodels series (see the module docstring).

    Options:
        window: target steps per training window, and warm-up steps before an
            evaluated split.
        lags: previous values read at each step (``input_size``).
        difference: model first differences instead of levels.
        seed: unused by the data (split and statistics are fixed); kept for the common
            interface.

    Shapes: ``x`` (T, B, lags), ``y`` (T, B, 1) normalised targets (NaN = not scored),
    output (T, B, 1).
    """

    window: int = 64
    lags: int = 1
    difference: bool = False
    seed: int = 0

    series: ClassVar[str] = ""
    output_size = 1

    @classmethod
    def recipe(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """H = 32, Adam 3e-3, 16 windows per batch, up to 1,000 steps, stopping after 4
        evaluations without improvement (these series are short: a few hundred values)."""
        return {"hidden_size": 32, "lr": 3e-3, "batch_size": 16, "steps": 1000, "eval_every": 100,
                "patience": 4}

    def __post_init__(self) -> None:
        check_positive(self.name, window=self.window, lags=self.lags)
        if not isinstance(self.difference, bool):
            raise ValueError(f"task {self.name!r}: difference must be true or false, got {self.difference!r}")
        self.input_size = self.lags
        d = self.raw
        n = len(d.values)
        if self.lags >= n or self.window >= n:
            raise ValueError(f"task {self.name!r}: window={self.window} and lags={self.lags} must be smaller than the "
                             f"series' {n} values")
        n_train, n_valid = round(_FRACTIONS[0] * n), round(_FRACTIONS[1] * n)
        #: target index ranges [lo, hi) of the splits
        self.ranges = {"train": (0, n_train), "valid": (n_train, n_train + n_valid),
                       "test": (n_train + n_valid, n)}
        first = 1 if self.difference else 0  # first defined index of m
        m = np.full(n, np.nan)
        m[first:] = np.diff(d.values) if self.difference else d.values
        train_m = m[first:n_train]
        self.mean, self.std = float(train_m.mean()), float(train_m.std())
        #: (N,) normalised modelled series (NaN where undefined)
        self.z = (m - self.mean) / self.std
        #: first index j whose inputs z[j-1], …, z[j-lags] exist
        self.first_target = first + self.lags
        feats = np.full((n, self.lags), np.nan)
        for k in range(1, self.lags + 1):
            feats[k:, k - 1] = self.z[:-k]
        self._x = torch.from_numpy(feats).float()
        self._y = torch.from_numpy(self.z).float()
        if n_train - self.window < self.first_target:  # a window's first target needs `lags` values before it
            most = n_train - self.window - first
            raise ValueError(f"task {self.name!r}: window={self.window} and lags={self.lags}"
                             f"{' (after difference=true)' if self.difference else ''} do not fit the "
                             f"{n_train}-value train part: window + lags{' + 1' if first else ''} <= {n_train}"
                             f"{f', so lags <= {most} at this window' if most >= 1 else ''}")

    @property
    def raw(self) -> SeriesData:
        """The raw series (values in original units)."""
        return load_series(self.series)

    def describe_data(self) -> dict[str, object]:
        d = self.raw
        return {
            "series": d.name,
            "source": d.source,
            "unit": d.unit,
            "values": len(d.values),
            "span": [d.labels[0], d.labels[-1]],
            "filled_missing": d.filled,
            "values_sha256": sha256_hex(np.ascontiguousarray(d.values).tobytes()),
            "splits": {s: {"values": hi - lo, "span": [d.labels[lo], d.labels[hi - 1]]}
                       for s, (lo, hi) in self.ranges.items()},
            "modelled": "first differences" if self.difference else "levels",
            "train_mean": self.mean,
            "train_std": self.std,
            "lags": self.lags,
            "window": self.window,
            "ar_order": self._baselines[1],
        }

    # ------------------------------------------------------------------ target, baselines

    @functools.cached_property
    def _baselines(self) -> tuple[dict[str, float], int]:
        from statsmodels.tsa.ar_model import AutoReg, ar_select_order

        s = self.raw.values
        lo, hi = self.ranges["test"]
        n_train = self.ranges["train"][1]
        persistence = _rmse(s[lo:hi] - s[lo - 1 : hi - 1])
        sel = ar_select_order(s[:n_train], maxlag=_MAX_AR_LAG, ic="aic", trend="c")
        p = max(sel.ar_lags) if sel.ar_lags else 0
        params = AutoReg(s[:n_train], lags=p, trend="c").fit().params
        pred = np.full(hi - lo, params[0])
        for k in range(1, p + 1):
            pred += params[k] * s[lo - k : hi - k]
        return {"persistence": persistence, "ar": _rmse(s[lo:hi] - pred)}, p

    @property
    def baselines(self) -> dict[str, float]:
        """Test RMSE in original units: ``persistence`` and ``ar`` (AutoReg, AIC order ≤ 12)."""
        return dict(self._baselines[0])

    @property
    def baseline_notes(self) -> dict[str, str]:
        return {"persistence": "next value = the last one",
                "ar": f"a linear autoregression AR({self._baselines[1]}) fitted on the training part (statsmodels "
                      f"AutoReg, order by AIC): the threshold"}

    @property
    def target(self) -> Target:
        """rmse (min) ≤ the AR baseline's test RMSE."""
        return Target(
            metric="rmse",
            goal="min",
            threshold=self._baselines[0]["ar"],
            published=(
                "no published LSTM target; compared with persistence and AR baselines "
                f"(threshold: statsmodels AutoReg AR({self._baselines[1]}), order by AIC ≤ "
                f"{_MAX_AR_LAG}, fitted on the train part)"
            ),
        )

    # ------------------------------------------------------------------ batches

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Endless batches of ``batch_size`` random windows of the train part:
        x (window, B, lags), y (window, B, 1)."""
        n_train = self.ranges["train"][1]
        lo, hi = self.first_target, n_train - self.window + 1
        steps = torch.arange(self.window)
        while True:
            starts = torch.randint(lo, hi, (batch_size,), generator=generator)
            idx = starts.view(1, -1) + steps.view(-1, 1)  # (window, B)
            yield Batch(x=self._x[idx], y=self._y[idx].unsqueeze(-1))

    def eval_batches(self, split: str = "test", batch_size: int = EVAL_BATCH_SIZE) -> Iterator[Batch]:
        """One batch (B = 1): the split with ``window`` warm-up steps before it (NaN targets)."""
        if split not in self.ranges:
            raise ValueError(f"{self.name}: unknown split {split!r}; expected train, valid or test")
        lo, hi = self.ranges[split]
        start = max(self.first_target, lo - self.window)
        idx = torch.arange(start, hi)
        y = self._y[idx].clone()
        y[: max(0, lo - start)] = float("nan")
        y[idx < self.first_target] = float("nan")
        yield Batch(x=self._x[idx].unsqueeze(1), y=y.view(-1, 1, 1))

    # ------------------------------------------------------------------ loss, metrics

    def _errors(self, output: Tensor, batch: Batch) -> Tensor:
        """Errors (normalised units) at the scored steps, flattened."""
        y = batch.y.to(device=output.device, dtype=output.dtype)
        err = output - y
        mask = ~torch.isnan(y)
        if batch.lengths is not None:
            t, b = output.shape[:2]
            steps = torch.arange(t, device=output.device).view(t, 1, 1)
            mask = mask & (steps < batch.lengths.to(output.device).view(1, b, 1))
        return err[mask]

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        """MSE in normalised units over the scored steps."""
        return self._errors(output, batch).square().mean()

    def metrics(self, output: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        """``mse`` and ``rmse`` in original units, ``loss`` (normalised MSE), as (sum, count)."""
        err = self._errors(output, batch).double()
        n = float(err.numel())
        sq = float(err.square().sum())
        mse = sq * self.std**2
        rmse = (mse / n) ** 0.5 * n if n else 0.0
        return {"mse": (mse, n), "rmse": (rmse, n), "loss": (sq, n)}

    def show(self, output: Tensor, batch: Batch, n: int = 3) -> str:
        """Up to ``n`` sequences: the last 8 scored steps, target next to prediction
        (original units; differences when ``difference=True``)."""
        what = "difference" if self.difference else "value"
        lines = []
        for b in range(min(n, output.shape[1])):
            y = batch.y[:, b, 0]
            pos = torch.nonzero(~torch.isnan(y)).flatten()[-8:]
            lines.append(f"sequence {b} ({what}, {self.raw.unit}):")
            for t in pos.tolist():
                tv = float(y[t]) * self.std + self.mean
                pv = float(output[t, b, 0]) * self.std + self.mean
                lines.append(f"  step {t:4d}  target {tv:10.3f}  predicted {pv:10.3f}")
        return "\n".join(lines)


@dataclass
class Sunspots(_SeriesTask):
    """Yearly sunspot activity 1700-2008 (statsmodels), one-step-ahead forecasting."""

    name = "sunspots"
    series = "sunspots"


@dataclass
class CO2(_SeriesTask):
    """Weekly Mauna Loa CO2 1958-2001 (statsmodels; 59 gaps interpolated), one-step-ahead."""

    name = "co2"
    series = "co2"
