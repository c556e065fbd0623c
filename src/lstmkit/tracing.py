"""Look inside a run: every gate at every step (:func:`trace`) and the gradient that
flows back along the cell state (:func:`gradient_flow`).

:func:`trace` asks the layer's own kernel to record what it computes (the fused CPU
kernel keeps the per-step activations it needs for its backward anyway; no second pass
over the sequence, no Python re-run). :func:`gradient_flow` measures ``‖∂L/∂c_t‖`` and
``‖∂L/∂h_t‖`` for every step: the vanishing gradient of the plain RNN and the constant
error carousel of the LSTM, as numbers.

Conventions shared by both:

* time-major: every per-step tensor is ``(T, B, ·)`` in natural time order, also for
  ``batch_first`` layers and for the reverse direction (whose kernel runs backwards in
  time; its steps are put back in the order of the input);
* unbatched 2-D input gives ``(T, ·)`` (the batch dimension dropped, as torch does);
* variable lengths (``lengths=`` or a ``PackedSequence``): the steps past a sequence's
  end are not steps of that sequence. :func:`trace` reports them as **NaN** (and
  :attr:`Trace.valid` says which steps are real); :func:`gradient_flow` gives them a
  gradient of **zero**, so a norm at step ``t`` sums over the sequences still running.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lstmkit import kernels
from lstmkit._prepared import call_hooked
from lstmkit._validate import check_int
from lstmkit.checks import check_input_size, check_lengths, check_packed_sequence
from lstmkit.kernels.base import TRACE_KEYS, KernelOut, hidden_keys
from lstmkit.kernels.reference import ReferenceKernel
from lstmkit.layout import GATE_NAMES, GATES
from lstmkit.loop import reverse_within_lengths
from lstmkit.nn import LSTM, RNN
from lstmkit.spec import CellSpec
from lstmkit.variants import STATES, state_row

__all__ = ["Trace", "DirectionTrace", "trace", "GradientFlow", "DirectionFlow", "gradient_flow",
           "recurrent_layer", "NAMES"]

#: Human names of everything a trace holds, by key.
NAMES: dict[str, str] = {**dict(zip(GATES, GATE_NAMES)), "c": "cell state", "n": "normaliser", "m": "stabiliser",
                         "h": "hidden state"}


def recurrent_layer(model: nn.Module) -> LSTM | RNN:
    """The lstmkit LSTM/RNN inside ``model``: the model itself, or its ``.rnn`` — a model with
    a head holds its layer there, and its ``forward(x, state[, lengths])`` returns the head's
    output first (as the training application's model does).

    Raises:
        TypeError: ``model`` is neither.
    """
    if isinstance(model, (LSTM, RNN)):
        return model
    inner = getattr(model, "rnn", None)
    if isinstance(inner, (LSTM, RNN)):
        return inner
    raise TypeError(
        "model: expected an lstmkit LSTM or RNN, or a module with one as its .rnn "
        f"(a model with a head), got {type(model).__name__}"
    )


# ----------------------------------------------------------------------------- trace


@dataclass(frozen=True, eq=False)
class DirectionTrace(Mapping[str, Tensor]):
    """The per-step activations of one layer and direction: a read-only mapping.

    Keys are those of ``TRACE_KEYS`` (``i, f, g, o, c, n, m, h``: the sLSTM adds its states
    ``n``, ``m``) that this variant has; each value is ``(T, B, H)`` (``h`` is ``(T, B, P)``
    with a projection), or ``(T, H)`` for unbatched input. Deep gates add their MLPs' hidden
    activations, ``"f.1"`` ``(T, B, n_1)`` for the forget gate's first hidden layer and so on.
    A gate the variant does not have is not a key: ``absent`` maps it to the reason
    (``"absent: f ≡ 1 (nfg)"``); asking for it raises a KeyError saying so. cifg's forget
    gate ``f = 1 − i`` is present (it is computed, from ``i``).

    Attributes:
        layer, direction: where in the stack (direction 1 = reverse, in natural time order).
        tensors: key -> tensor (the mapping's content).
        absent: key -> why it is absent.
    """

    layer: int
    direction: int
    tensors: dict[str, Tensor]
    absent: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Tensor:
        if key in self.tensors:
            return self.tensors[key]
        if key in self.absent:
            raise KeyError(f"{key!r} ({NAMES[key]}): {self.absent[key]}")
        raise KeyError(f"{key!r}: not a key of this trace; expected one of {list(self.tensors)}")

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def gates(self) -> tuple[str, ...]:
        """The gate letters present, in order ``i, f, g, o``."""
        return tuple(k for k in GATES if k in self.tensors)


@dataclass(frozen=True, eq=False)
class Trace:
    """What a layer computed at every step, for every layer and direction.

    Attributes:
        spec: the cell variant.
        layers: ``layers[layer][direction]`` -> :class:`DirectionTrace`.
        output: the layer's output, time-major ``(T, B, D·H_out)`` (``(T, D·H_out)`` unbatched).
        h_n, c_n: final states as the layer returns them (``c_n`` None for the RNN).
        valid: ``(T, B)`` bool, True where step ``t`` is a step of sequence ``b``
            (``(T,)`` unbatched); values elsewhere are NaN.
        kernel: the registry name of the kernel that recorded the trace.
        batched: False for unbatched 2-D input.
        runs_on: the kernel the layer runs this input on outside a trace (without gradients);
            it differs from ``kernel`` where that one keeps no per-step gates (torch's own LSTM:
            oneDNN on the CPU, cuDNN on a GPU), and then ``note`` says so.
    """

    spec: CellSpec
    layers: list[list[DirectionTrace]]
    output: Tensor
    h_n: Tensor
    c_n: Tensor | None
    valid: Tensor
    kernel: str
    batched: bool = True
    runs_on: str = ""

    names = NAMES

    @property
    def note(self) -> str:
        """Where the trace was recorded, if not on the kernel the layer runs on."""
        if not self.runs_on or self.runs_on == self.kernel:
            return ""
        return (f"recorded on the {self.kernel!r} kernel: the layer runs on {self.runs_on!r}, which keeps no "
                f"per-step gates (the same equations; values agree to the kernels' rounding)")

    @property
    def gates(self) -> tuple[str, ...]:
        """Gate letters present in this variant (``("g",)`` for the plain RNN)."""
        return self.layers[0][0].gates

    @property
    def absent(self) -> dict[str, str]:
        """Keys absent in this variant, with the reason."""
        return dict(self.layers[0][0].absent)

    @property
    def num_steps(self) -> int:
        """``T``."""
        return int(self.valid.shape[0])

    def __getitem__(self, layer: int) -> list[DirectionTrace]:
        check_int("layer", layer, 0, len(self.layers) - 1)
        return _Directions(self.layers[layer])


class _Directions(list):  # type: ignore[type-arg]
    """One layer's directions, ``[forward]`` or ``[forward, reverse]``: an index out of range is
    refused by name, as ``layer`` is."""

    def __getitem__(self, direction: Any) -> Any:
        if not isinstance(direction, slice):
            check_int("direction", direction, 0, len(self) - 1)
        return super().__getitem__(direction)


def _absent_notes(layer: LSTM | RNN, index: int, direction: int, present: set[str]) -> dict[str, str]:
    from lstmkit.gates import gate_views

    views = gate_views(layer, index, direction)
    notes = {k: views[NAMES[k]].note for k in GATES if k not in present}
    if "c" not in present:
        notes["c"] = "absent: the plain RNN has no cell state"
    for k in STATES[1:]:  # the states a row adds
        row = state_row(k)
        if k not in present and row is not None:
            notes[k] = f"absent: only a cell with {row.word!r} has a {NAMES[k]} ({k})"
    return notes


def _check_x(layer: LSTM | RNN, x: Any, lengths: Any) -> Tensor | None:
    """Validate ``x`` and ``lengths``; returns lengths as (B,) int64 on the CPU (None if not given).

    ``lengths`` goes through :func:`lstmkit.checks.check_lengths`, the layer's own check: the
    same rule and the same messages as ``layer(x, lengths=...)``."""
    if isinstance(x, PackedSequence):
        if lengths is not None:
            check_lengths(lengths, x, layer.batch_first)  # refuses it: a PackedSequence has its own
        check_packed_sequence(x, "x")
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor or a PackedSequence, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected a 2-D (T, {layer.input_size}) unbatched or 3-D batched tensor, "
                         f"got {x.dim()}-D of shape {tuple(x.shape)}")
    check_input_size(x, "x", layer.input_size)
    if lengths is None:
        return None
    return check_lengths(lengths, x, layer.batch_first)


def _prepare(layer: LSTM | RNN, x: Tensor | PackedSequence, lengths: Any
             ) -> tuple[Tensor | PackedSequence, Tensor | None, int, int, bool]:
    """(input for the layer, lengths in caller order or None, T, B, batched)."""
    lens = _check_x(layer, x, lengths)
    if isinstance(x, PackedSequence):
        lens_packed = pad_packed_sequence(x)[1]  # caller order
        T, B = int(lens_packed.max()), int(lens_packed.shape[0])
        return x, lens_packed, T, B, True
    batched = x.dim() == 3
    if not batched:
        return x, None, x.shape[0], 1, False
    T, B = (x.shape[1], x.shape[0]) if layer.batch_first else (x.shape[0], x.shape[1])
    if lens is not None and bool((lens < T).any()):
        packed = pack_padded_sequence(x, lens, batch_first=layer.batch_first, enforce_sorted=False)
        return packed, lens, T, B, True
    return x, None, T, B, True


def _valid_mask(lengths: Tensor | None, T: int, B: int) -> Tensor:
    if lengths is None:
        return torch.ones(T, B, dtype=torch.bool)
    return torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)  # (T, B)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Dropout off for a measurement; the module's mode is restored afterwards."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def trace(model: nn.Module, x: Tensor | PackedSequence, hx: Any = None,
          lengths: Sequence[int] | Tensor | None = None) -> Trace:
    """Run ``model`` once and return every gate, ``c`` and ``h`` at every step.

    The kernel the layer runs on records what it computes (``record=True``); on the
    fused CPU kernel that is the activations it keeps for its backward anyway. Runs
    under ``torch.no_grad()`` with dropout off (the module's mode is restored).

    The layer's hooks run around the recorded call as around ``layer(x, hx[, lengths])``:
    its forward pre-hooks (and torch's global ones) first, with ``(x, hx)`` (``(x, hx,
    lengths)`` when given) as the arguments — pruning (``torch.nn.utils.prune``) and the
    hook-based ``torch.nn.utils.weight_norm`` compute the weights the call reads there, so the
    trace computes with the weights ``layer(x)`` would — and a replacement they return is what
    is traced. Its forward hooks then see ``(output, (h_n, c_n))`` (the RNN's ``(output, h_n)``;
    the sLSTM's ``c_n`` without ``n`` and ``m``, which are in the records; ``output`` padded and
    shaped as ``x`` with ``lengths``), for their side effects only: a value a forward hook returns
    does not change the trace, which holds what the kernel computed (its ``output`` is the last
    layer's recorded ``h``).

    Args:
        model: an lstmkit ``LSTM`` or ``RNN``, or a model with a head (its ``.rnn`` is traced;
            :func:`recurrent_layer`).
        x: the layer's input: ``(T, B, I)``, ``(B, T, I)`` if ``batch_first``, ``(T, I)``
            unbatched, or a ``PackedSequence``.
        hx: initial state as the layer takes it (``(h_0, c_0)`` for the LSTM, ``h_0`` for the RNN).
        lengths: ``(B,)`` valid lengths of a padded batch (not with a PackedSequence).

    Returns:
        A :class:`Trace`: ``trace.layers[l][d]["f"]`` is ``(T, B, H)``, time-major and in
        natural time order for both directions; steps past a sequence's length are NaN.

    Raises:
        TypeError: ``model`` is not an lstmkit layer (or a model holding one), or ``x`` is
            not a tensor.
        ValueError: wrong input size or rank, bad ``lengths`` (message names the argument,
            the expected and the actual value); ``hx`` errors come from the layer.
    """
    layer = recurrent_layer(model)
    _check_x(layer, x, lengths)  # bad input is refused before any hook or kernel runs
    run: dict[str, Any] = {}

    def recorded(x: Any, hx: Any = None, lengths: Any = None) -> tuple[Any, Any]:
        """The recorded call, its arguments and result in ``forward``'s form (as the hooks see them)."""
        inp, lens, T, B, batched = _prepare(layer, x, lengths)  # (again: a pre-hook may replace the input)
        output, h_n, c_n, records = layer.forward_recorded(inp, hx)
        if isinstance(output, PackedSequence) and not isinstance(x, PackedSequence):  # packed here for lengths=
            output = pad_packed_sequence(output, batch_first=layer.batch_first, total_length=T)[0]
        run.update(output=output, h_n=h_n, c_n=c_n, records=records, lens=lens, T=T, B=B, batched=batched)
        return output, (h_n if c_n is None else (h_n, c_n))

    args = (x, hx) if lengths is None else (x, hx, lengths)
    with torch.no_grad(), _eval_mode(layer):
        call_hooked(layer, recorded, *args)  # what a forward hook returns is not the trace (see above)
    output, h_n, c_n, records = run["output"], run["h_n"], run["c_n"], run["records"]
    lens, T, B, batched = run["lens"], run["T"], run["B"], run["batched"]
    if isinstance(output, PackedSequence):
        output = pad_packed_sequence(output, total_length=T)[0]
    elif batched and layer.batch_first:
        output = output.transpose(0, 1)
    valid = _valid_mask(lens, T, B)
    pad = None if lens is None else ~valid.unsqueeze(-1)  # (T, B, 1)
    layers: list[list[DirectionTrace]] = []
    for index, directions in enumerate(records):
        row = []
        for d, rec in enumerate(directions):
            values: dict[str, Tensor] = {}
            for key in (*TRACE_KEYS, *hidden_keys(layer.spec)):
                if key not in rec:
                    continue
                v = rec[key].detach()  # (T', B, ·): a packed input's records end at its longest sequence
                if v.shape[0] < T:
                    v = torch.cat([v, v.new_full((T - v.shape[0], *v.shape[1:]), float("nan"))])
                if pad is not None:
                    v = v.masked_fill(pad.to(v.device), float("nan"))
                values[key] = v if batched else v.squeeze(1)
            row.append(DirectionTrace(index, d, values, _absent_notes(layer, index, d, set(values))))
        layers.append(row)
    where = (layer.spec, layer.weight_ih_l0.device, layer.weight_ih_l0.dtype, layer.backend)
    # the row this input runs on without a record (and without gradients, as traced)
    call = kernels.Workload(kind=layer.spec.kind, steps=T, batch=B, hidden=layer.hidden_size,
                            dtype=layer.weight_ih_l0.dtype, gradient=False, lengths=lens is not None,
                            projection=layer.proj_size > 0)
    name, runs_on = kernels.select(*where, record=True).name, kernels.select(*where, workload=call).name
    return Trace(layer.spec, layers, output.detach(), h_n.detach(),
                 None if c_n is None else c_n.detach(), valid if batched else valid[:, 0], name, batched, runs_on)


# ----------------------------------------------------------------------------- gradient flow


@dataclass(frozen=True, eq=False)
class DirectionFlow:
    """The gradient of the loss along one layer and direction's states.

    Attributes:
        grad_h: ``(T, B, H_out)`` ``∂L/∂h_t``, the total derivative of the loss with respect
            to the hidden state of step t (through the output of step t and every later step).
        grad_c: ``(T, B, H)`` ``∂L/∂c_t`` likewise (through ``h_t`` and ``c_{t+1}``); None
            for the plain RNN, which has no cell state.
        dh_norm, dc_norm: ``(T,)`` their norms over batch and units (Frobenius); dc None for the RNN.
        f_mean: ``(T,)`` mean of the forget factor ``f_t`` over batch and units
            (``∂c_t/∂c_{t−1} = f_t`` in the vanilla cell): 1 for nfg (``f ≡ 1``),
            ``1 − i_t`` for cifg; None for the RNN.
    """

    layer: int
    direction: int
    grad_h: Tensor
    grad_c: Tensor | None
    f_mean: Tensor | None

    @property
    def dh_norm(self) -> Tensor:
        return self.grad_h.flatten(1).norm(dim=1)

    @property
    def dc_norm(self) -> Tensor | None:
        return None if self.grad_c is None else self.grad_c.flatten(1).norm(dim=1)

    def norm(self) -> Tensor:
        """``dc_norm`` where there is a cell state, else ``dh_norm`` (the RNN): the
        quantity that shows vanishing or carried gradients."""
        n = self.dc_norm
        return self.dh_norm if n is None else n


@dataclass(frozen=True, eq=False)
class GradientFlow:
    """Per-step gradient norms of every layer and direction (see :class:`DirectionFlow`).

    Attributes:
        spec: the cell variant.
        loss: the value of the loss.
        layers: ``layers[layer][direction]`` -> :class:`DirectionFlow`, natural time order.
        valid: ``(T, B)`` bool; padded steps have zero gradient.
    """

    spec: CellSpec
    loss: float
    layers: list[list[DirectionFlow]]
    valid: Tensor

    def __getitem__(self, layer: int) -> list[DirectionFlow]:
        check_int("layer", layer, 0, len(self.layers) - 1)
        return _Directions(self.layers[layer])

    def summary(self, layer: int = 0, direction: int = 0) -> dict[str, Any]:
        """``‖∂L/∂c_t‖`` (``h`` for the RNN) at t = 1, T/2, T (1-based) and first/last.

        Returns:
            ``{"quantity": "c" or "h", "T": T, "t1": …, "t_mid": …, "t_last": …,
            "ratio_first_last": …, "f_mean": mean of f over all steps or None}``; the ratio is
            None where no gradient reaches the last step's state (zoneout's ``c_T``: ``h_T``
            reads the cell before zoneout, and only a next step would read ``c_T``).
        """
        check_int("layer", layer, 0, len(self.layers) - 1)
        check_int("direction", direction, 0, len(self.layers[layer]) - 1)
        rec = self.layers[layer][direction]
        n = rec.norm().double()
        T = int(n.shape[0])
        first, mid, last = float(n[0]), float(n[max(T // 2 - 1, 0)]), float(n[-1])
        return {"quantity": "h" if rec.grad_c is None else "c", "T": T, "t1": first, "t_mid": mid,
                "t_last": last, "ratio_first_last": first / last if last else None,
                "f_mean": None if rec.f_mean is None else float(rec.f_mean.mean())}


class _ProbeKernel(ReferenceKernel):
    """The reference recurrence (:func:`lstmkit.cell.step`, step by step) that keeps every
    step's ``h_t`` and ``c_t`` graph nodes, so ``torch.autograd.grad`` can be asked for the
    loss's gradient with respect to each of them. Never registered: the layer is pointed at
    an instance for one measurement."""

    name = "_gradient_probe"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def run(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
            params: dict[str, Tensor], spec: CellSpec, hidden_size: int,
            record: bool = False, keep: tuple[Tensor, Tensor] | None = None) -> KernelOut:
        # Leaves for the initial state: every step's state is then a node of the graph,
        # even when neither the parameters nor the input require gradients.
        h0 = h0.detach().requires_grad_()
        c0 = None if c0 is None else c0.detach().requires_grad_()
        y, h, c, rec = self.loop(x, lengths, h0, c0, params, spec, hidden_size, record=True, keep=keep)
        fs = None
        if spec.is_lstm:  # nfg: f ≡ 1
            fs = [f.detach() for f in rec["f"]] if rec["f"] else [torch.ones_like(c_t) for c_t in rec["c"]]
        self.calls.append({"h": rec["h"], "c": rec["c"] if spec.is_lstm else None, "f": fs, "lengths": lengths})
        return KernelOut(y, h, c, None)


@contextlib.contextmanager
def _probing(layer: LSTM | RNN) -> Iterator[_ProbeKernel]:
    """Run ``layer`` on a fresh, unregistered probe kernel for the duration of the block;
    the layer's ``backend`` is restored afterwards, whatever happens. (A layer shared with
    another thread would run on the probe meanwhile: measure on a copy in that case.)"""
    probe = _ProbeKernel()
    previous = layer.backend
    layer.backend = probe  # type: ignore[assignment]  # a Kernel instance, as kernels.select takes it
    try:
        yield probe
    finally:
        layer.backend = previous


def _model_output(model: nn.Module, layer: LSTM | RNN, x: Tensor | PackedSequence, hx: Any,
                  lens: Tensor | None, T: int) -> Any:
    """The model's output as ``loss_fn`` gets it (first element of what ``model`` returns)."""
    if model is not layer:  # a model with a head: forward(x, state[, lengths]) (recurrent_layer)
        if isinstance(x, PackedSequence):
            raise TypeError("x: a model with a head takes a padded tensor and lengths=, not a PackedSequence")
        out = model(x, hx, lens) if lens is not None else model(x, hx)
    else:
        inp: Tensor | PackedSequence = x
        if lens is not None and not isinstance(x, PackedSequence):
            inp = pack_padded_sequence(x, lens, batch_first=layer.batch_first, enforce_sorted=False)
        out = model(inp, hx)
        if isinstance(out[0], PackedSequence) and not isinstance(x, PackedSequence):
            padded = pad_packed_sequence(out[0], batch_first=layer.batch_first, total_length=T)[0]
            out = (padded, *out[1:])
    return out[0] if isinstance(out, tuple) else out


def gradient_flow(model: nn.Module, x: Tensor | PackedSequence, loss_fn: Callable[[Any], Tensor],
                  hx: Any = None, lengths: Sequence[int] | Tensor | None = None) -> GradientFlow:
    """``‖∂L/∂c_t‖``, ``‖∂L/∂h_t‖`` and the mean forget gate at every step.

    ``∂L/∂h_t`` and ``∂L/∂c_t`` are total derivatives with respect to the state of step t
    (through everything that depends on it: the output of step t, and every later step).
    They are computed exactly, by autograd: the model runs its normal forward, with its
    recurrent layer on the reference equations (:func:`lstmkit.cell.step`, step by step,
    as ``backend="reference"``) keeping each step's ``h_t`` and ``c_t`` node, and
    ``torch.autograd.grad(L, [h_1 … h_T, c_1 … c_T])`` gives the gradients. Nothing is
    accumulated in the parameters' ``.grad``; dropout is off during the measurement.

    Args:
        model: an lstmkit ``LSTM``/``RNN`` (``loss_fn`` gets its ``output``), or a
            model with a head (:func:`recurrent_layer`; ``loss_fn`` gets the head's output
            ``(T, B, output_size)``).
        x: input as the model takes it (``(T, B, I)``, batch_first, unbatched, or a
            PackedSequence for a bare layer).
        loss_fn: ``output -> scalar tensor``, e.g. ``lambda out: task.loss(out, batch)``.
        hx: initial state (as the model takes it).
        lengths: ``(B,)`` valid lengths of a padded batch.

    Returns:
        A :class:`GradientFlow`; ``flow.layers[l][d].dc_norm`` is ``(T,)`` in natural time
        order (the reverse direction included); padded steps have zero gradient.

    Raises:
        TypeError: ``model`` holds no lstmkit layer, ``loss_fn`` is not callable.
        ValueError: bad input (named, with expected and actual), or ``loss_fn`` does not
            return a scalar tensor.
    """
    layer = recurrent_layer(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable output -> scalar loss, got {type(loss_fn).__name__}")
    _, lens, T, B, batched = _prepare(layer, x, lengths)
    if isinstance(x, PackedSequence):
        lens_run = None  # the layer unpacks it itself
    else:
        lens_run = lens
    with _eval_mode(model), torch.enable_grad(), _probing(layer) as probe:
        output = _model_output(model, layer, x, hx, lens_run, T)
        loss = loss_fn(output)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn: expected a scalar (0-dim) tensor, got {what}")
        if not loss.requires_grad:
            raise ValueError("loss_fn: the loss does not depend on the model's output (no gradient)")
        nodes = [n for call in probe.calls for n in itertools.chain(call["h"], call["c"] or [])]
        grads = torch.autograd.grad(loss, nodes, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError("loss_fn: the loss does not depend on the model's output (no gradient reaches it)")
    D = layer.num_directions
    it = iter(grads)
    layers: list[list[DirectionFlow]] = []
    for index in range(layer.num_layers):
        row = []
        for d in range(D):
            call = probe.calls[index * D + d]
            gh = _stack(call["h"], [next(it) for _ in call["h"]])
            gc = None if call["c"] is None else _stack(call["c"], [next(it) for _ in call["c"]])
            if gc is not None:  # the cell states side by side (the sLSTM's c, n, m): ∂L/∂c_t
                gc = gc[..., :layer.hidden_size]
            fm = None
            if call["f"] is not None:
                f = torch.stack(call["f"])  # (T, B, H)
                if d == 1:
                    f = reverse_within_lengths(f, call["lengths"])
                fm = _masked_mean(f, call["lengths"])
            if d == 1:  # the kernel ran backwards in time: put the steps back in input order
                gh = reverse_within_lengths(gh, call["lengths"])
                gc = None if gc is None else reverse_within_lengths(gc, call["lengths"])
            # a packed run records max(lengths) steps: the rest of T are padding (gradient 0, no f)
            gh = _pad_steps(gh, T, 0.0)
            gc = None if gc is None else _pad_steps(gc, T, 0.0)
            fm = None if fm is None else _pad_steps(fm, T, float("nan"))
            if not batched:
                gh = gh.squeeze(1)
                gc = None if gc is None else gc.squeeze(1)
            row.append(DirectionFlow(index, d, gh, gc, fm))
        layers.append(row)
    valid = _valid_mask(lens, T, B)
    return GradientFlow(layer.spec, float(loss.detach()), layers, valid if batched else valid[:, 0])


def _pad_steps(v: Tensor, T: int, value: float) -> Tensor:
    """``v`` (T', ...) with its first dimension filled up to T with ``value``."""
    if v.shape[0] >= T:
        return v
    return torch.cat([v, v.new_full((T - v.shape[0], *v.shape[1:]), value)])


def _stack(nodes: list[Tensor], grads: list[Tensor | None]) -> Tensor:
    """(T, B, ·) gradients; a node the loss does not reach has gradient zero."""
    return torch.stack([torch.zeros_like(n) if g is None else g for n, g in zip(nodes, grads)]).detach()


def _masked_mean(v: Tensor, lengths: Tensor | None) -> Tensor:
    """(T,) mean over batch and units of (T, B, H), over the valid steps only (NaN if none)."""
    if lengths is None:
        return v.mean(dim=(1, 2))
    valid = _valid_mask(lengths, v.shape[0], v.shape[1]).to(v.device).unsqueeze(-1)  # (T, B, 1)
    total = (v * valid).sum(dim=(1, 2))
    count = valid.sum(dim=(1, 2)) * v.shape[2]
    return total / count
