"""Helpers shared by the synthetic tasks (:mod:`lstmkit.app.tasks.synthetic`).

* :func:`derive_seed` / :func:`generator_for`: the seed of a fixed evaluation set,
  derived from a task's ``seed``, its name and the split, so that every split is fixed
  and independent of the trainer's generator (which draws the training data).
* :class:`SampledTask`: the train/eval plumbing of tasks whose sequences are sampled
  i.i.d. (adding, temporal order, copy).
* :func:`last_step`: the output at each sequence's last valid step.
* :class:`MarkedPairTask`: the answer-at-the-last-step scoring of the (value, marker)
  sequences (adding, multiplication).
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmkit.app.tasks.base import EVAL_BATCH_SIZE, SPLITS, Batch, Task, check_batch_size, check_split

__all__ = ["MarkedPairTask", "SampledTask", "derive_seed", "generator_for", "last_step"]

def derive_seed(seed: int, *tags: str) -> int:
    """A 63-bit seed derived from ``seed`` and ``tags`` (stable across runs and platforms).

    Example: ``derive_seed(0, "adding", "test")``. Different tags give unrelated seeds.
    """
    text = ":".join([str(int(seed)), *tags]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def generator_for(seed: int, *tags: str) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`derive_seed` ``(seed, *tags)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


def last_step(output: Tensor, lengths: Tensor | None) -> Tensor:
    """The output at each sequence's last valid step.

    Args:
        output: (T, B, F) model outputs.
        lengths: (B,) valid lengths, or None when every sequence has T steps.

    Returns:
        (B, F): ``output[lengths[b] - 1, b]``.
    """
    if lengths is None:
        return output[-1]
    if lengths.shape != (output.shape[1],):
        raise ValueError(f"lengths must be ({output.shape[1]},); got {tuple(lengths.shape)}")
    if int(lengths.min()) < 1 or int(lengths.max()) > output.shape[0]:
        raise ValueError(f"lengths must lie in [1, {output.shape[0]}]")
    idx = (lengths.to(output.device) - 1).long()
    return output[idx, torch.arange(output.shape[1], device=output.device)]


class SampledTask(Task):
    """Base of tasks whose sequences are i.i.d. samples.

    A subclass (a dataclass with fields ``seed`` and ``eval_size``) implements
    :meth:`_sample` (raw data, batch dimension first, drawn only from the generator it is
    given) and :meth:`_encode` (raw data -> :class:`Batch`). Training batches are fresh
    samples from the trainer's generator, one :meth:`_sample` call per batch, so the
    batches depend only on the generator's state (reproducible; the trainer resumes by
    replaying the draws). Each evaluation split is one sample of ``eval_size`` sequences
    from :func:`generator_for` ``(seed, name, split)``, made once, cached, and cut into
    batches in order; its content does not depend on ``batch_size``.
    """

    splits: ClassVar[tuple[str, ...]] = SPLITS
    seed: int
    eval_size: int

    @abstractmethod
    def _sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Draw ``n`` sequences; every tensor of the result has the batch dimension first."""

    @abstractmethod
    def _encode(self, raw: dict[str, Tensor]) -> Batch:
        """Turn raw samples (as from :meth:`_sample`, possibly sliced) into a Batch."""

    def eval_raw(self, split: str = "test") -> dict[str, Tensor]:
        """The raw samples of the fixed ``split`` (batch dimension first); cached."""
        check_split(self.name, split, self.splits)
        cache: dict[str, dict[str, Tensor]] = self.__dict__.setdefault("_eval_cache", {})
        if split not in cache:
            cache[split] = self._sample(self.eval_size, generator_for(self.seed, self.name, split))
        return cache[split]

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Endless fresh batches of ``batch_size`` sequences drawn from ``generator``.

        Arguments are checked at the call, not at the first ``next``.
        """
        check_batch_size(self.name, batch_size)

        def batches() -> Iterator[Batch]:
            while True:
                yield self._encode(self._sample(batch_size, generator))

        return batches()

    def eval_batches(self, split: str = "test", batch_size: int = EVAL_BATCH_SIZE) -> Iterator[Batch]:
        """The fixed ``eval_size`` sequences of ``split``, in batches of ``batch_size``."""
        check_batch_size(self.name, batch_size)
        raw = self.eval_raw(split)
        return (self._encode({k: v[s:s + batch_size] for k, v in raw.items()})
                for s in range(0, self.eval_size, batch_size))


class MarkedPairTask(SampledTask):
    """Base of the tasks over (value, marker) pairs whose answer is one number.

    ``x`` (T, B, 2): per step a value and a marker (1 on the marked steps); ``y`` (B,) the
    target; the model's single output (output_size 1) at each sequence's last valid step is
    the answer. Loss and ``mse``: the squared error there; ``accuracy``: the fraction of
    answers within :attr:`tolerance`. A subclass sets :attr:`tolerance` and says how
    :meth:`show` writes the marked values (:meth:`_terms`).
    """

    #: |error| below which an answer counts as correct.
    tolerance: ClassVar[float]

    @property
    def _lengths_vary(self) -> bool:
        """Whether a batch carries its sequences' lengths (False: every one is T long)."""
        return True

    @staticmethod
    def _pairs_1997(n: int, length: int, signed: bool, generator: torch.Generator,
                    marked_first: float) -> dict[str, Tensor]:
        """``n`` sequences of Hochreiter & Schmidhuber 1997's adding and multiplication problems
        (§5.4, §5.5): length uniform in ``[T, T + T//10]``; values U[-1, 1] (``signed``) or
        U[0, 1], zero on the padding; one of the first 10 pairs marked (X1), then one of the
        first ``T//2 - 1`` pairs not yet marked (X2); markers 1 there, -1 on the first and last
        pair, else 0; a marked first pair's value set to ``marked_first`` (the paper's rare case:
        0 for the sum, §5.4; 1.0 for the product, §5.5 — each the operation's neutral value).

        Returns ``values`` and ``markers`` (n, T + T//10), ``lengths`` (n,) and the marked
        positions ``i1``, ``i2`` (n,).
        """
        t, g = length, generator
        rows = torch.arange(n)
        t_max = t + t // 10
        lengths = t + torch.randint(0, t // 10 + 1, (n,), generator=g)
        values = torch.rand(n, t_max, generator=g)
        if signed:
            values = values * 2 - 1
        i1 = torch.randint(0, 10, (n,), generator=g)
        r = torch.randint(0, t // 2 - 2, (n,), generator=g)  # one of the T//2 - 2 others
        i2 = r + (r >= i1).long()
        values = values * (torch.arange(t_max)[None, :] < lengths[:, None])
        values[:, 0] = torch.where((i1 == 0) | (i2 == 0), marked_first, values[:, 0])
        markers = torch.zeros(n, t_max)
        markers[:, 0] = -1
        markers[rows, lengths - 1] = -1
        markers[rows, i1] = 1
        markers[rows, i2] = 1
        return {"values": values, "markers": markers, "lengths": lengths, "i1": i1, "i2": i2}

    def _encode(self, raw: dict[str, Tensor]) -> Batch:
        t = int(raw["lengths"].max())
        x = torch.stack([raw["values"][:, :t], raw["markers"][:, :t]], -1).transpose(0, 1)  # (T, B, 2)
        lengths = raw["lengths"].clone() if self._lengths_vary else None
        return Batch(x.contiguous(), raw["target"].clone(), lengths, y_batch_dim=0)

    def _terms(self, values: list[tuple[int, float]]) -> str:
        """The marked steps' ``(t, value)`` pairs as :meth:`show` writes them."""
        return "marked " + ", ".join(f"t={t}: {v:+.3f}" for t, v in values)

    def _pred(self, output: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(B,) answers at the last valid step and (B,) targets, on the output's device."""
        return last_step(output, batch.lengths)[:, 0], batch.y.to(output.device, output.dtype)

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        pred, y = self._pred(output, batch)
        return F.mse_loss(pred, y)

    def metrics(self, output: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        pred, y = self._pred(output.detach(), batch)
        err = pred - y
        n = float(y.numel())
        sq = float((err * err).sum())
        return {"mse": (sq, n), "accuracy": (float((err.abs() < self.tolerance).sum()), n), "loss": (sq, n)}

    def show(self, output: Tensor, batch: Batch, n: int = 3) -> str:
        pred, y = self._pred(output.detach(), batch)
        lines = []
        for b in range(min(n, y.numel())):
            steps = output.shape[0] if batch.lengths is None else int(batch.lengths[b])
            marked = (batch.x[:steps, b, 1] == 1).nonzero().flatten().tolist()
            terms = self._terms([(i, float(batch.x[i, b, 0])) for i in marked])
            err = float(pred[b] - y[b])
            lines.append(f"T={steps}, {terms}: target {float(y[b]):.4f}, output {float(pred[b]):.4f} "
                         f"({'ok' if abs(err) < self.tolerance else 'wrong'}, err {err:+.4f})")
        return "\n".join(lines)
