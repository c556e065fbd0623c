"""``chorales``: next-frame prediction on Bach chorale piano rolls (JSB-like).

Data: the four-part Bach chorales of the corpus bundled with music21 (``music21/corpus/
bach``): take ``corpus.getComposer("bach")``,
keep the MusicXML files (``.mxl``/``.xml``; the three ``.krn`` files duplicate ``.mxl``
ones and the ``.rntxt`` files are analyses), sorted by their path inside the corpus,
parse each with ``music21.corpus.parse`` and keep the scores with exactly 4 parts
(365 chorales with music21 10.5.1, as in the notes). No transposition.

Piano roll: one frame per **quarter note** (the JSB convention of Boulanger-Lewandowski
et al. 2012, so that nats/frame are comparable in kind); pitch ``p`` is on in frame ``t``
when a note of any part has ``onset ≤ t < onset + duration`` (in quarter lengths), so
notes shorter than a quarter that do not cover a beat are lost, as in JSB. The pitch
range is fixed to MIDI :data:`PITCH_LOW`–:data:`PITCH_HIGH` (36–81, the range of the
whole corpus; 46 units); notes outside it (none in music21 10.5.1) are dropped and
counted in :meth:`Chorales.describe_data`.

The parsed rolls are cached as a compressed ``.npz`` in ``$LSTMKIT_CACHE`` (default
``~/.cache/lstmkit``); parsing everything (410 files) took 89 s on a busy 2-core machine
(progress on stderr); reading the cache takes well under a second. music21 10.5.1 gives
365 chorales, 19,864 frames (24-193 per chorale, mean 54.4), 3.87 notes per frame;
split 255/55/55 chorales = 13,974/2,861/3,029 frames. Test-split baselines: independent
Bernoulli 11.30 nats/frame, repeat-previous 10.74 (a = 0.79).

Split (fixed, independent of ``seed``): the chorales in corpus-path order are shuffled
by SHA-256 of ``"chorales:" + path`` and cut 70/15/15 (train/valid/test; at least one
each). Task ``limit=N`` uses only the first N chorales in path order (for tests).

Each chorale is one sequence (a sequence task; state reset per chorale). Step ``t``
reads frame ``t - 1`` (a zero frame at ``t = 0``) plus a *start* unit that is 1 only at
``t = 0``, and predicts frame ``t``; every frame is scored. ``x`` (T, B, 47), ``y``
(T, B, 46), ``lengths`` (B,); output (T, B, 46) logits.

Loss: sum over pitches of BCE-with-logits, averaged over frames. Metrics: ``nll`` (=
``loss``, nats per frame, the JSB convention) and ``frame_accuracy`` = ΣTP / Σ(TP + FP +
FN) over frames with a threshold of 0.5 (Bay et al. 2009, as used by Boulanger-
Lewandowski et al. 2012).

Baselines (test nll): ``independent_bernoulli`` (each pitch on with its add-one-smoothed
training frequency) and ``repeat_previous`` (``p = (1 - a)·previous frame + a·q`` with
``q`` the independent frequencies and ``a`` fitted on the training frames).
"""

from __future__ import annotations

import functools
import io
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lstmkit import _atomic
from lstmkit._optional import require
from lstmkit.app.tasks._corpus_util import cache_dir, hash_order, progress, sha256_hex, time_mask
from lstmkit.app.tasks.base import EVAL_BATCH_SIZE, SPLITS, Batch, Target, Task, check_split

__all__ = ["Chorales", "PITCH_HIGH", "PITCH_LOW", "load_chorales"]

#: Lowest and highest MIDI pitch of the piano roll (inclusive).
PITCH_LOW, PITCH_HIGH = 36, 81
N_PITCHES = PITCH_HIGH - PITCH_LOW + 1
#: Frame length in quarter notes.
FRAME_QL = 1.0
_CACHE_VERSION = 1
_NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]


@dataclass(frozen=True)
class ChoraleData:
    """Parsed chorales.

    Attributes:
        paths: corpus-relative paths (e.g. ``"bach/bwv1.6.mxl"``), sorted.
        rolls: one (frames, N_PITCHES) uint8 0/1 array per chorale.
        dropped_notes: note-frames outside the pitch range (dropped).
        music21_version: the parsing music21's version.
        parse_seconds: time the parse took (when it was made, not when read back).
        files_scanned: candidate files parsed to find them.
        cache_file: where the cache lives.
    """

    paths: list[str]
    rolls: list[np.ndarray]
    dropped_notes: int
    music21_version: str
    parse_seconds: float
    files_scanned: int
    cache_file: str


def _candidate_paths() -> tuple[list[tuple[str, str]], str]:
    """[(corpus-relative path, absolute path)] of the bach MusicXML files, and music21's version."""
    import music21
    from music21 import corpus

    root = Path(music21.__file__).parent / "corpus"
    out = []
    for p in corpus.getComposer("bach"):
        p = Path(str(p))
        if p.suffix in (".mxl", ".xml"):
            try:
                rel = p.relative_to(root).as_posix()
            except ValueError:
                rel = p.as_posix()
            out.append((rel, str(p)))
    return sorted(out), music21.__version__


def _roll(score: object) -> tuple[np.ndarray, int]:
    """(frames, 128) uint8 piano roll of a parsed score, and the number of note-frames."""
    ends = []
    events = []
    for part in score.parts:  # type: ignore[attr-defined]
        for n in part.flatten().notes:
            onset, dur = float(n.offset), float(n.quarterLength)
            t0, t1 = math.ceil(onset / FRAME_QL - 1e-9), math.ceil((onset + dur) / FRAME_QL - 1e-9)
            ends.append(t1)
            for p in n.pitches:
                events.append((t0, t1, int(p.midi)))
    roll = np.zeros((max(ends, default=0), 128), dtype=np.uint8)
    for t0, t1, m in events:
        roll[t0:t1, m] = 1
    return roll, len(events)


def _parse(limit: int | None) -> tuple[list[str], list[np.ndarray], int, str, float]:
    from music21 import corpus

    cands, version = _candidate_paths()
    start = time.perf_counter()
    paths, rolls, scanned = [], [], 0
    total = len(cands) if limit is None else f"≤{len(cands)}"
    for rel, full in cands:
        if limit is not None and len(paths) >= limit:
            break
        score = corpus.parse(full)
        scanned += 1
        if len(score.parts) == 4:
            paths.append(rel)
            rolls.append(_roll(score)[0])
        if scanned % 25 == 0:
            progress(f"chorales: parsed {scanned}/{total} files, kept {len(paths)} "
                     f"({time.perf_counter() - start:.1f} s)")
    seconds = time.perf_counter() - start
    progress(f"chorales: parsed {scanned} files, kept {len(paths)} four-part chorales in {seconds:.1f} s")
    return paths, rolls, scanned, version, seconds


def _cache_path(version: str, limit: int | None) -> Path:
    tag = "all" if limit is None else f"first{limit}"
    return cache_dir() / f"chorales-v{_CACHE_VERSION}-music21_{version}-q{FRAME_QL:g}-{tag}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None


@functools.lru_cache(maxsize=8)
def _load_cached(cache_root: str, limit: int | None) -> ChoraleData:
    import music21

    version = music21.__version__
    full, own = _cache_path(version, None), _cache_path(version, limit)
    path = full
    z = _read_cache(full)
    if z is None and limit is not None:
        path, z = own, _read_cache(own)
    if z is None:
        path = own
        which = "all of music21's Bach scores" if limit is None else f"music21's Bach scores until {limit} chorales"
        progress(f"chorales: parsing {which} once (all of them usually take 5-10 minutes; progress every 25 files); "
                 f"cached afterwards in {path}")
        paths, rolls, scanned, _, seconds = _parse(limit)
        flat = np.concatenate(rolls, axis=0) if rolls else np.zeros((0, 128), np.uint8)
        z = {
            "paths": np.array(paths, dtype=str),
            "lengths": np.array([r.shape[0] for r in rolls], dtype=np.int64),
            "rolls": np.packbits(flat, axis=1),
            "parse_seconds": np.array(seconds),
            "files_scanned": np.array(scanned),
        }
        buf = io.BytesIO()
        np.savez_compressed(buf, **z)
        try:
            _atomic.write_bytes(path, buf.getvalue(), what="cache")
        except OSError as exc:  # a read-only or full cache: parse again next time
            progress(f"chorales: could not cache the parse ({exc})")
    paths = [str(p) for p in z["paths"]]
    lengths = z["lengths"]
    flat = np.unpackbits(z["rolls"], axis=1, count=128)
    n = len(paths) if limit is None else min(limit, len(paths))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rolls, dropped = [], 0
    for i in range(n):
        r = flat[offsets[i] : offsets[i + 1]]
        dropped += int(r[:, :PITCH_LOW].sum() + r[:, PITCH_HIGH + 1 :].sum())
        rolls.append(np.ascontiguousarray(r[:, PITCH_LOW : PITCH_HIGH + 1]))
    return ChoraleData(paths[:n], rolls, dropped, version, float(z["parse_seconds"]),
                       int(z["files_scanned"]), str(path))


def load_chorales(limit: int | None = None) -> ChoraleData:
    """The parsed chorales (the first ``limit`` in path order; None = all), from the cache
    or parsed (and cached) now. Needs music21."""
    if limit is not None and limit < 1:
        raise ValueError(f"chorales: limit must be ≥ 1 or None, got {limit}")
    require("task 'chorales'", "music21")
    return _load_cached(str(cache_dir()), limit)


def _note_names(frame: Tensor) -> str:
    on = [int(i) + PITCH_LOW for i in torch.nonzero(frame).flatten()]
    return " ".join(f"{_NAMES[m % 12]}{m // 12 - 1}" for m in on) or "-"


def _bernoulli_nll(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-frame NLL (nats) of 0/1 frames ``y`` (F, P) under probabilities ``p`` (F, P)."""
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p)).sum(axis=1)


def _repeat_probs(rolls: list[np.ndarray], q: np.ndarray, a: float) -> np.ndarray:
    parts = []
    for r in rolls:
        prev = np.vstack([np.zeros((1, r.shape[1])), r[:-1]])
        p = (1 - a) * prev + a * q
        p[0] = q
        parts.append(p)
    return np.concatenate(parts, axis=0)


@dataclass
class Chorales(Task):
    """Bach chorales piano-roll next-frame prediction (see the module docstring).

    Options:
        limit: use only the first ``limit`` chorales in corpus-path order (None = all);
            at least 3 are needed for the three splits.
        seed: unused by the data (the split is fixed); kept for the common interface.

    Shapes: ``x`` (T, B, 47) = previous frame (46 pitches) + start unit, ``y`` (T, B, 46)
    0/1 float32, ``lengths`` (B,) int64; output (T, B, 46) logits.
    """

    limit: int | None = None
    seed: int = 0

    name = "chorales"
    input_size = N_PITCHES + 1
    output_size = N_PITCHES

    @classmethod
    def recipe(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """H = 128, Adam 3e-3, 16 chorales per batch, 1,000 steps: beats the independent-
        Bernoulli threshold at the first evaluation (docs/results.md)."""
        return {"hidden_size": 128, "lr": 3e-3, "batch_size": 16, "steps": 1000, "eval_every": 100}

    def __post_init__(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 3):
            raise ValueError(f"chorales: limit must be an int ≥ 3 (train/valid/test) or None, got {self.limit!r}")

    # ------------------------------------------------------------------ data

    @functools.cached_property
    def data(self) -> ChoraleData:
        """The parsed chorales (parsed on first use)."""
        return load_chorales(self.limit)

    @functools.cached_property
    def splits(self) -> dict[str, list[int]]:
        """Indices into ``data.paths`` of each split, in path order."""
        paths = self.data.paths
        n = len(paths)
        n_test = n_valid = max(1, round(0.15 * n))
        if n - n_test - n_valid < 1:
            raise ValueError(f"chorales: {n} chorales are too few for three splits")
        order = [paths.index(p) for p in hash_order(paths, salt="chorales:")]
        return {"train": sorted(order[n_test + n_valid :]), "valid": sorted(order[n_test : n_test + n_valid]),
                "test": sorted(order[:n_test])}

    def describe_data(self) -> dict[str, object]:
        d = self.data
        lengths = [r.shape[0] for r in d.rolls]
        allrolls = np.concatenate(d.rolls, axis=0)
        return {
            "corpus": "music21 bach chorales (four-part MusicXML)",
            "music21": d.music21_version,
            "chorales": len(d.paths),
            "frames": int(sum(lengths)),
            "frame": "quarter note",
            "pitch_range_midi": [PITCH_LOW, PITCH_HIGH],
            "dropped_note_frames": d.dropped_notes,
            "min_max_mean_length": [min(lengths), max(lengths), float(np.mean(lengths))],
            "mean_notes_per_frame": float(allrolls.sum(1).mean()),
            "split_chorales": {s: len(v) for s, v in self.splits.items()},
            "split_frames": {s: int(sum(lengths[i] for i in v)) for s, v in self.splits.items()},
            "test_paths": [d.paths[i] for i in self.splits["test"]],
            "paths_sha256": sha256_hex("\n".join(d.paths)),
            "rolls_sha256": sha256_hex(np.ascontiguousarray(allrolls).tobytes()),
            "repeat_previous_alpha": self._baselines[1],
            "parse_seconds": d.parse_seconds,
            "files_scanned": d.files_scanned,
            "cache_file": d.cache_file,
        }

    # ------------------------------------------------------------------ target, baselines

    @functools.cached_property
    def _baselines(self) -> tuple[dict[str, float], float]:
        train = [self.data.rolls[i].astype(np.float64) for i in self.splits["train"]]
        test = [self.data.rolls[i].astype(np.float64) for i in self.splits["test"]]
        tr, te = np.concatenate(train), np.concatenate(test)
        q = (tr.sum(0) + 1.0) / (tr.shape[0] + 2.0)
        indep = float(_bernoulli_nll(np.broadcast_to(q, te.shape), te).mean())
        grid = np.logspace(-4, 0, 41)
        train_nll = [_bernoulli_nll(_repeat_probs(train, q, a), tr).mean() for a in grid]
        alpha = float(grid[int(np.argmin(train_nll))])
        rep = float(_bernoulli_nll(_repeat_probs(test, q, alpha), te).mean())
        return {"independent_bernoulli": indep, "repeat_previous": rep}, alpha

    @property
    def baselines(self) -> dict[str, float]:
        """Test nll (nats/frame): ``independent_bernoulli``, ``repeat_previous``."""
        return dict(self._baselines[0])

    @property
    def baseline_notes(self) -> dict[str, str]:
        return {"independent_bernoulli": "each pitch on with its training frequency, ignoring the music so far: "
                                         "the threshold",
                "repeat_previous": "mostly the previous frame again, mixed with the pitch frequencies (fitted on "
                                   "the training frames): the stronger baseline"}

    @property
    def target(self) -> Target:
        """nll (min); threshold = the independent-Bernoulli baseline on this test split."""
        return Target(
            metric="nll",
            goal="min",
            threshold=self._baselines[0]["independent_bernoulli"],
            published=(
                "order of magnitude only: LSTM NLL ≈ 8.4-8.7 nats/frame on JSB Chorales "
                "(Boulanger-Lewandowski et al. 2012 data: 382 chorales, quarter-note frames, 88 "
                "pitches, split 229/76/77; Greff et al. 2017 best vanilla ≈ 8.4, Chung et al. 2014 "
                "LSTM 8.67 / GRU 8.54). This corpus differs (music21's four-part "
                "chorales, untransposed, 46 pitches, own 70/15/15 split), so those numbers are "
                "not a threshold; the threshold is this split's independent-Bernoulli baseline "
                "(a sanity floor; repeat_previous is the stronger baseline)."
            ),
        )

    # ------------------------------------------------------------------ batches

    def _batch(self, idx: list[int]) -> Batch:
        rolls = [torch.from_numpy(self.data.rolls[i]).float() for i in idx]
        lengths = torch.tensor([r.shape[0] for r in rolls], dtype=torch.int64)
        t, b = int(lengths.max()), len(rolls)
        x = torch.zeros(t, b, N_PITCHES + 1)
        y = torch.zeros(t, b, N_PITCHES)
        x[0, :, N_PITCHES] = 1.0
        for j, r in enumerate(rolls):
            y[: r.shape[0], j] = r
            x[1 : r.shape[0], j, :N_PITCHES] = r[:-1]
        return Batch(x=x, y=y, lengths=lengths)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Endless epochs; each a permutation of the training chorales drawn from
        ``generator``, in batches of ``batch_size`` (the last one may be smaller)."""
        train = self.splits["train"]
        while True:
            perm = torch.randperm(len(train), generator=generator).tolist()
            for k in range(0, len(perm), batch_size):
                yield self._batch([train[i] for i in perm[k : k + batch_size]])

    def eval_batches(self, split: str = "test", batch_size: int = EVAL_BATCH_SIZE) -> Iterator[Batch]:
        """The split's chorales in path order, ``batch_size`` per batch."""
        check_split(self.name, split, SPLITS)
        idx = self.splits[split]
        for k in range(0, len(idx), batch_size):
            yield self._batch(idx[k : k + batch_size])

    # ------------------------------------------------------------------ loss, metrics

    def _frame_nll(self, output: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
        y = batch.y.to(device=output.device, dtype=output.dtype)
        nll = F.binary_cross_entropy_with_logits(output, y, reduction="none").sum(-1)
        return nll, y, time_mask(batch.lengths, output.shape[0], output.shape[1], output.device)

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        """Sum over pitches of BCE-with-logits, averaged over valid frames."""
        nll, _, mask = self._frame_nll(output, batch)
        return nll.mean() if mask is None else nll[mask].mean()

    def metrics(self, output: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        """``nll``/``loss`` (nats per frame) and ``frame_accuracy`` (ΣTP / Σ(TP+FP+FN))."""
        nll, y, mask = self._frame_nll(output, batch)
        pred = (output > 0).to(y.dtype)
        tp = (pred * y).sum(-1)
        errors = (pred != y).to(y.dtype).sum(-1)
        if mask is not None:
            nll, tp, errors = nll[mask], tp[mask], errors[mask]
        total, n = float(nll.sum()), float(nll.numel())
        tps = float(tp.sum())
        return {"nll": (total, n), "loss": (total, n), "frame_accuracy": (tps, tps + float(errors.sum()))}

    def show(self, output: Tensor, batch: Batch, n: int = 3) -> str:
        """The first frames of up to ``n`` chorales: target notes and predicted notes
        (pitches with probability > 0.5)."""
        lines = []
        lengths = batch.lengths if batch.lengths is not None else [output.shape[0]] * output.shape[1]
        for b in range(min(n, output.shape[1])):
            lines.append(f"chorale {b}:")
            for t in range(min(8, int(lengths[b]))):
                lines.append(f"  t={t:3d} target {_note_names(batch.y[t, b]):<24} "
                             f"predicted {_note_names(output[t, b].detach().cpu() > 0)}")
        return "\n".join(lines)
