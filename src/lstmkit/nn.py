"""``LSTM``, ``RNN`` and ``LSTMCell`` modules with ``torch.nn``'s signatures plus ``cell=``.

A vanilla :class:`LSTM` has exactly ``torch.nn.LSTM``'s parameters (names, shapes,
initialisation) and forward contract, so ``layer.load_state_dict(nn_lstm.state_dict())``
works unchanged. ``cell=`` picks any variant (:mod:`lstmkit.spec`); the extra parameters
a variant brings are listed in ``docs/cell.md``.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lstmkit import _initial as initial
from lstmkit import cell as cell_eqs
from lstmkit import kernels
from lstmkit._prepared import PreparedModule, call_hooked, parameters_now, prepared_road
from lstmkit._validate import check_bool, check_int
from lstmkit.checks import (
    NONFINITE_INPUT,
    check_backend,
    check_clip,
    check_dense,
    check_device,
    check_dtype,
    check_finite_all,
    check_init_values,
    check_input_size,
    check_lengths,
    check_memory,
    check_module_input,
    check_packed_sequence,
    check_parameters,
    input_dtype_ok,
    plain_values,
)
from lstmkit.gates import gate_views
from lstmkit.kernels.fused import FusedCPUKernel, PreparedStep, in_loop_projection
from lstmkit.kernels.torch_native import TorchKernel, operator_weights
from lstmkit.layout import suffix
from lstmkit.loop import StackOut, run_stack
from lstmkit.spec import INIT_FIELDS, CellSpec, check_heads, layer_param_shapes, resolve, spec_choices
from lstmkit.variants import cell_states

__all__ = ["LSTM", "RNN", "LSTMCell"]

#: ``(h, c)``; the sLSTM's ``(h, c, n, m)`` (:func:`lstmkit.variants.cell_states`).
State = tuple[Tensor, ...]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


_NO_TORCHSCRIPT = (
    "lstmkit: {what} is not supported: TorchScript cannot follow the cell variants or the fused "
    "operator. Use torch.export.export(model, args), torch.compile(model), or "
    "torch.onnx.export(model, args) (the default, dynamo-based exporter), which all trace lstmkit layers")

_NO_FX = (
    "lstmkit: torch.fx.symbolic_trace cannot trace through an lstmkit layer (its forward checks and "
    "branches on its arguments' values and shapes, which fx's proxies do not have); fx keeps "
    "torch.nn's own modules whole as leaves but not others. Trace with a tracer that keeps lstmkit's "
    "as leaves too — class Tracer(torch.fx.Tracer): def is_leaf_module(self, m, name): return "
    "isinstance(m, (lstmkit.LSTM, lstmkit.RNN, lstmkit.LSTMCell)) or super().is_leaf_module(m, name) — "
    "then torch.fx.GraphModule(model, Tracer().trace(model)); or use torch.export.export, which traces "
    "lstmkit layers")


_NO_FX_STEP = (
    "lstmkit: torch.fx.symbolic_trace cannot trace through an lstmkit layer's step() (it checks and "
    "branches on its arguments, and a leaf module keeps only its forward whole); call the step from "
    "the forward of a small module of your own and keep that module as a leaf of your fx Tracer, or "
    "use torch.export.export, which traces it")


def _refuse_fx(*args: Any, message: str = _NO_FX) -> None:
    """TypeError (``message``) where a call's argument is a torch.fx proxy (symbolic_trace)."""
    if any(isinstance(a, torch.fx.Proxy) for a in args):
        raise TypeError(message)


#: Why one step at a time cannot run fgr (its previous gate activations are state that
#: ``(h, c)`` does not carry; a whole-sequence call starts them at 0).
_FGR_STEP = ("fgr keeps the previous gate activations as extra state, which (h, c) cannot carry; "
             "run lstmkit.LSTM over the whole sequence instead")


class _Recurrent(PreparedModule):
    """Shared machinery of :class:`LSTM` and :class:`RNN`: parameters, checks, packing.

    Not used directly; its two leaves fix the cell kind and the state type.
    """

    spec: CellSpec

    def __init__(self, spec: CellSpec, input_size: int, hidden_size: int, num_layers: int,
                 bias: bool, batch_first: bool, dropout: float, bidirectional: bool,
                 proj_size: int, device: Any, dtype: Any, backend: str | None,
                 check_finite: bool) -> None:
        super().__init__()
        check_int("input_size", input_size, 1)
        check_int("hidden_size", hidden_size, 1)
        check_int("num_layers", num_layers, 1)
        check_int("proj_size", proj_size, 0)
        for name, flag in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional),
                           ("check_finite", check_finite)):
            check_bool(name, flag)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) \
                or not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1], got {dropout!r}")
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size: expected a value smaller than hidden_size ({hidden_size}), got {proj_size}"
            )
        if proj_size and not spec.is_lstm:
            raise ValueError("proj_size: only LSTM layers have a projection, not the plain RNN")
        if proj_size and spec.slstm:
            raise ValueError("proj_size: the sLSTM has no projection in lstmkit (h_t = o ⊙ c_t / n_t is its output)")
        check_heads(spec, hidden_size, proj_size)
        init = [f"{name}={getattr(spec, name)}" for name in INIT_FIELDS if getattr(spec, name) is not None]
        if init and not bias:
            raise ValueError(
                f"cell: {', '.join(init)} {'needs' if len(init) == 1 else 'need'} biases, but the "
                f"layer has bias=False"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                f"expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}", stacklevel=3)
        self.spec = spec
        self._state_names = cell_states(spec)  # the cell's states after h (kept: compile traces no cache)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = proj_size
        self.backend = backend
        self.check_finite = check_finite
        self._prepared = PreparedStep(spec, hidden_size, proj_size)  # the step of a signature seen before
        device = check_device(device)
        check_dtype(dtype)
        check_init_values(spec, dtype)
        check_memory(spec, input_size, hidden_size, num_layers, bidirectional, proj_size, bias, device, dtype)
        factory = {"device": device, "dtype": dtype}
        num_dirs = 2 if bidirectional else 1
        self._param_names: list[list[dict[str, str]]] = []
        self._param_shapes: dict[str, tuple[int, ...]] = {}  # full name -> the shape the cell reads
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else self.output_size * num_dirs
            names = []
            for direction in range(num_dirs):
                shapes = layer_param_shapes(spec, layer_input, hidden_size, proj_size, bias)
                mapping = {}
                for base, shape in shapes.items():
                    full = base + suffix(layer, direction)
                    setattr(self, full, nn.Parameter(torch.empty(shape, **factory)))
                    self._param_shapes[full] = tuple(shape)
                    mapping[base] = full
                names.append(mapping)
            self._param_names.append(names)
        self.reset_parameters()
        self.flatten_parameters()

    # ---------------------------------------------------------------- parameters

    @property
    def output_size(self) -> int:
        """``H_out``: the size of ``h`` (``proj_size`` if set, else ``hidden_size``)."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    @property
    def num_directions(self) -> int:
        """2 if bidirectional else 1."""
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """torch's initialisation: U(−1/√H, 1/√H) everywhere; see docs/cell.md for extras."""
        layers = [names for layer in self._param_names for names in layer]  # per layer-direction
        initial.reset_parameters(self, layers, self.spec, self.hidden_size)

    def layer_params(self, layer: int = 0, direction: int = 0) -> dict[str, Tensor]:
        """The parameters of one layer and direction, keyed by name without suffix."""
        self._check_layer_direction(layer, direction)
        return {base: getattr(self, full) for base, full in self._param_names[layer][direction].items()}

    def _check_layer_direction(self, layer: int, direction: int) -> None:
        check_int("layer", layer, 0, self.num_layers - 1)
        check_int("direction", direction, 0, self.num_directions - 1)

    def flatten_parameters(self) -> None:
        """On CUDA, for the cells torch's own operator computes (the ``torch`` kernel row, cuDNN:
        vanilla, with or without projection, and the plain RNN), the parameters become views into
        one buffer in cuDNN's layout, as ``torch.nn.LSTM``'s do, so that cuDNN need not copy them into
        one on every call (and torch does not warn that it must); elsewhere a no-op. Runs when the
        module is built or moved (``.to``, ``.cuda``, ``.half``); call it after replacing a parameter."""
        if TorchKernel().refuses(self.spec) is not None or not torch._use_cudnn_rnn_flatten_weight():
            return
        weights = operator_weights(self._all_params())
        first = weights[0]
        if any(not isinstance(w, Tensor) or w.dtype != first.dtype or not w.is_cuda
               or not torch.backends.cudnn.is_acceptable(w) for w in weights):
            return
        if len({w.data_ptr() for w in weights}) != len(weights):  # aliased parameters: cuDNN copies
            return
        import torch.backends.cudnn.rnn as cudnn_rnn

        mode = "LSTM" if self.spec.is_lstm else f"RNN_{self.spec.nonlinearity.upper()}"
        per_layer_direction = len(weights) // (self.num_layers * self.num_directions)  # w_ih, w_hh[, b][, w_hr]
        with torch.cuda.device_of(first), torch.no_grad():
            torch._cudnn_rnn_flatten_weight(weights, per_layer_direction, self.input_size,
                                            cudnn_rnn.get_cudnn_mode(mode), self.hidden_size, self.proj_size,
                                            self.num_layers, False, self.bidirectional)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``.half`` …), then :meth:`flatten_parameters`."""
        out = super()._apply(fn, recurse)
        self.flatten_parameters()
        return out

    @property
    def _flat_weights_names(self) -> list[str]:
        """Every parameter's name, layer by layer and direction by direction, as ``torch.nn.LSTM``'s."""
        return [full for layer in self._param_names for names in layer for full in names.values()]

    @property
    def _flat_weights(self) -> list[Tensor]:
        """The parameters in the order of :attr:`_flat_weights_names`, as ``torch.nn.LSTM``'s."""
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """Parameters per layer-direction, in registration order, as ``torch.nn.LSTM``'s."""
        return [[getattr(self, full) for full in names.values()]
                for layer in self._param_names for names in layer]

    def _all_params(self) -> list[list[dict[str, Tensor]]]:
        """``[layer][direction]`` -> the parameters by name without suffix, as a call reads them
        (:func:`lstmkit._prepared.parameters_now`)."""
        p = parameters_now(self, self._param_shapes)
        return [[{base: p[full] for base, full in names.items()} for names in layer] for layer in self._param_names]

    def gates(self, layer: int = 0, direction: int = 0) -> dict[str, Any]:
        """Each gate as the textbook writes it: ``W`` (H × (I + H)) over ``[x_t, h_{t-1}]``.

        Returns:
            ``{"input": GateView, "forget": …, "candidate": …, "output": …}``, also indexed by
            the gates' letters ``"i"``, ``"f"``, ``"g"``, ``"o"``; see
            :class:`lstmkit.gates.GateView` (absent gates say so and why).
        """
        self._check_layer_direction(layer, direction)
        return gate_views(self, layer, direction, self._param_names[layer][direction])

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.spec.is_lstm and self.spec != CellSpec():  # torch's repr for a vanilla layer, extras when set
            s += f", cell={self.spec.name!r}"
        elif not self.spec.is_lstm and self.spec.nonlinearity != "tanh":
            s += f", nonlinearity={self.spec.nonlinearity!r}"
        if not self.spec.is_lstm and self.spec.heads != 1:
            s += f", heads={self.spec.heads}"
        if self.backend:
            s += f", backend={self.backend!r}"
        return s

    # ---------------------------------------------------------------- forward

    def _run(self, input: Tensor | PackedSequence, hx: Any, record: bool = False, lengths: Any = None
             ) -> tuple[Tensor | PackedSequence, Tensor, Tensor | None, StackOut]:
        """Validate, pack/unpack and run. Returns output, h_n, c_n and the raw stack result."""
        if torch.jit.is_tracing():
            raise RuntimeError(_NO_TORCHSCRIPT.format(what="torch.jit.trace (and torch.onnx.export(dynamo=False))"))
        _refuse_fx(input, hx, lengths)
        params = parameters_now(self, self._param_shapes)
        check_parameters(params, self._param_shapes)
        check_clip(self.spec, next(iter(params.values())).dtype)  # (a layer converted since it was built)
        packed = isinstance(input, PackedSequence)
        if lengths is not None:
            lengths = check_lengths(lengths, input, self.batch_first)
        if packed:
            check_packed_sequence(input)
            x, lengths = pad_packed_sequence(input)  # (T, B, I) in the caller's batch order
            self._check_input_tensor(x, "input (PackedSequence data)")
            if bool((lengths == 0).any()):
                raise ValueError("input: a sequence in the PackedSequence has length 0")
            batched = True
        elif isinstance(input, Tensor):
            self._check_input_tensor(input, "input")
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"input: expected a 2-D (L, {self.input_size}) unbatched or 3-D batched tensor, "
                    f"got {input.dim()}-D of shape {_shape(input)}"
                )
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)  # (T, B, I)
        else:
            raise TypeError(
                f"input: expected a Tensor or a PackedSequence, got {type(input).__name__}"
            )
        T = x.shape[0]  # (a batch of none, B = 0, runs as nn.LSTM runs it: empty results)
        if T == 0:
            raise ValueError(f"input: expected a sequence length L >= 1, got L = 0 (shape {_shape(input)})")  # as given
        h0, c0 = self._initial_state(hx, x, batched)
        if lengths is not None and not torch.compiler.is_compiling() and bool((plain_values(lengths) == T).all()):
            lengths = None  # every sequence whole (eager: a branch on the values; under vmap: of every member)
        if lengths is not None and not packed:
            # the padding past each length is never read: zeroed, so that neither the finiteness check nor
            # the input projection's weight gradient (dW_ih = dXGᵀ X, 0 · NaN) sees what it holds
            past_end = torch.arange(T, device=x.device)[:, None] >= lengths.to(x.device)[None, :]  # (T, B)
            x = x.masked_fill(past_end[..., None], 0)  # (T, B, I)
        if self.check_finite:
            checks = [(x, NONFINITE_INPUT)]
            if hx is not None:
                checks.append((h0, "hx: h_0 contains NaN or inf"))
                if c0 is not None:  # the cell states side by side (the sLSTM: c_0, n_0, m_0)
                    names = " or ".join(f"{k}_0" for k in self._state_names)
                    checks.append((c0, f"hx: {names} contains NaN or inf"))
            check_finite_all(checks)
        out = run_stack(x, lengths, h0, c0, self._all_params(), self.spec, self.hidden_size,
                        dropout=self.dropout, training=self.training, backend=self.backend,
                        record=record)
        y, h_n, c_n = out.y, out.h_n, out.c_n
        if packed:
            if input.sorted_indices is not None:
                y = y.index_select(1, input.sorted_indices)  # into packing order
            data = pack_padded_sequence(y, lengths_for_pack(input), enforce_sorted=True).data
            result: Tensor | PackedSequence = PackedSequence(
                data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        elif batched:
            result = y.transpose(0, 1) if self.batch_first else y
        else:
            result = y.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        return result, h_n, c_n, out

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(_NO_TORCHSCRIPT.format(what="torch.jit.script"))

    def forward_recorded(self, input: Tensor | PackedSequence, hx: Any = None
                         ) -> tuple[Tensor | PackedSequence, Tensor, Tensor | None, list[list[dict[str, Tensor]]]]:
        """Run once in record mode (what :func:`lstmkit.trace` uses): the kernel keeps each
        step's activations.

        Returns:
            ``output, h_n, c_n`` as :meth:`forward` (``c_n`` None for the RNN; the sLSTM's ``n``
            and ``m`` are in its records), and the records: ``records[layer][direction][key]`` is
            ``(T, B, ·)`` for the keys of :data:`lstmkit.kernels.TRACE_KEYS` the variant has.
        """
        output, h_n, c_n, out = self._run(input, hx, record=True)
        assert out.traces is not None
        return output, h_n, None if c_n is None else self._cell_states(c_n)[0], out.traces

    def _step(self, input: Tensor, hx: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """One time step of the whole stack (what :meth:`LSTM.step` and :meth:`RNN.step` run):
        ``input`` (N, I) or unbatched (I,); returns output (N, H_out) or (H_out,), h_n, c_n."""
        _refuse_fx(input, hx, message=_NO_FX_STEP)
        if self.bidirectional:
            raise ValueError("step: a bidirectional layer reads each sequence from its end too, so it cannot "
                             "run one step at a time; call the layer on the whole sequence")
        if self.spec.fgr:
            raise ValueError(f"step: {_FGR_STEP}")
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"input: step takes one time step, a 2-D (N, {self.input_size}) batched or 1-D "
                             f"({self.input_size},) unbatched tensor, got {input.dim()}-D of shape {_shape(input)}")
        check_input_size(input, "input", self.input_size)  # (the shape given, not the step's (1, N, I) below)
        batched = input.dim() == 2
        x = input.unsqueeze(1 if batched and self.batch_first else 0)  # one step: (1, N, I), (N, 1, I) or (1, I)
        output, h_n, c_n, _ = self._run(x, hx)
        assert isinstance(output, Tensor)
        return output.squeeze(1 if batched and self.batch_first else 0), h_n, c_n

    def _check_input_tensor(self, x: Tensor, what: str) -> None:
        check_module_input(x, what, (2, 3), f"a 2-D (L, {self.input_size}) unbatched or 3-D batched tensor",
                           self.weight_ih_l0, "layer", self.input_size)

    def _state_shapes(self, batch: int, batched: bool) -> list[tuple[str, tuple[int, ...]]]:
        lead = self.num_layers * self.num_directions
        shapes = [("h_0", (lead, batch, self.output_size))]
        shapes += [(f"{name}_0", (lead, batch, self.hidden_size)) for name in self._state_names]
        if not batched:
            shapes = [(n, (s[0], s[2])) for n, s in shapes]
        return shapes

    def _initial_state(self, hx: Any, x: Tensor, batched: bool) -> tuple[Tensor, Tensor | None]:
        """``h_0`` (L·D, B, H_out) and the cell states side by side (L·D, B, S·H) (None for the RNN),
        checked; zeros where ``hx`` is None."""
        B = x.shape[1]  # 1 for an unbatched input (x is (T, 1, I) here)
        if hx is None:  # (L·D, B, H_out) and (L·D, B, S·H)
            lead, cells = self.num_layers * self.num_directions, len(self._state_names)
            h0 = x.new_zeros((lead, B, self.output_size))
            return h0, (x.new_zeros((lead, B, cells * self.hidden_size)) if cells else None)
        shapes = self._state_shapes(B, batched)
        if self.spec.is_lstm:
            if not (isinstance(hx, (tuple, list)) and len(hx) == len(shapes)):
                names = ", ".join(n for n, _ in shapes)
                raise TypeError(
                    f"hx: expected a tuple ({names}) of {len(shapes)} tensors, got {type(hx).__name__}"
                    + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else "")
                )
            states = list(hx)
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"hx: expected a tensor h_0, got {type(hx).__name__}")
            states = [hx]
        out = []
        for (name, shape), t in zip(shapes, states):
            if not isinstance(t, Tensor):
                raise TypeError(f"hx: {name} must be a tensor, got {type(t).__name__}")
            check_dense(t, f"hx: {name}")
            if not (input_dtype_ok(x, t) or input_dtype_ok(t, x)):  # (autocast: float32 or its dtype)
                raise TypeError(f"hx: {name} has dtype {t.dtype}, expected {x.dtype} like the input")
            if t.device != x.device:
                raise ValueError(f"hx: {name} is on device {t.device}, expected {x.device} like the input")
            if _shape(t) != shape:
                what = "batched" if batched else "unbatched 2-D"
                hint = ""
                if batched and t.dim() == 3 and t.shape[1] != B:
                    hint = f"; its batch size {t.shape[1]} does not match the input's {B}"
                raise ValueError(
                    f"hx: {name} for {what} input must have shape {shape} "
                    f"(num_layers*num_directions, {'batch, ' if batched else ''}size), "
                    f"got {_shape(t)}{hint}"
                )
            out.append(t if batched else t.unsqueeze(1))
        return out[0], (torch.cat(out[1:], dim=-1) if len(out) > 1 else None)

    def _cell_states(self, cells: Tensor) -> tuple[Tensor, ...]:
        """The cell states side by side (…, S·H) as a tuple ``(c, n, m)`` (``(c,)`` for the LSTM)."""
        if cells.shape[-1] == self.hidden_size:  # one state: the tensor itself (a split is a view and an autograd node)
            return (cells,)
        return _apart(cells, self.hidden_size)


def _apart(cells: Tensor, H: int) -> tuple[Tensor, ...]:
    """The cell states side by side (…, S·H) as S tensors (…, H) of their own, as the prepared
    steps return them: a split's parts are views that autograd forbids changing in place
    (``split_with_sizes``: the operator itself, without Tensor.split's Python)."""
    return tuple(part.clone() for part in cells.split_with_sizes([H] * (cells.shape[-1] // H), -1))


def _with_heads(spec: CellSpec, heads: Any) -> CellSpec:
    """``spec`` with the layer's ``heads=`` argument (None: the spec's own)."""
    if heads is None:
        return spec
    check_int("heads", heads, 1)
    if spec.heads not in (1, heads):
        raise ValueError(f"heads: the cell says heads={spec.heads} and the layer heads={heads}; give it once")
    return spec.replace(heads=int(heads))


def lengths_for_pack(packed: PackedSequence) -> Tensor:
    """Sequence lengths of a PackedSequence in its sorted (packing) order, (B,) int64."""
    bs = packed.batch_sizes  # (T,) number of sequences still running at each step
    B = int(bs[0])
    return (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)


class LSTM(_Recurrent):
    """A multi-layer LSTM with ``torch.nn.LSTM``'s signature, plus ``cell=`` for variants.

    Args:
        input_size: ``I``, features of ``x``.
        hidden_size: ``H``, number of cells per layer and direction.
        num_layers, bias, batch_first, dropout, bidirectional, proj_size, device, dtype:
            as ``torch.nn.LSTM``.
        cell: a preset name (``"peephole"``, ``"cifg+layernorm"``, …) or a :class:`CellSpec`.
        heads: ``k`` heads: block-diagonal recurrent weights, each gate's ``W_hh`` k blocks of
            ``n_k/k × H_out/k`` (n_k: the gate's rows, H unless it is deep) (the same as
            ``cell="…+heads=k"``); None keeps the cell's (1).
        backend: force a kernel by registry name (``"reference"``, …); None picks the
            fastest that supports the variant.
        check_finite: raise on NaN/inf in the input or initial state (one cheap pass).

    Shapes (``D`` = 2 if bidirectional, ``H_out`` = proj_size or hidden_size):
        input (L, N, I), (N, L, I) with batch_first, (L, I) unbatched, or a PackedSequence;
        h_0 (D·num_layers, N, H_out), c_0 (D·num_layers, N, H);
        output (L, N, D·H_out) and (h_n, c_n) shaped like (h_0, c_0).
        The sLSTM (``cell="slstm"``) has two more cell states, its normaliser ``n`` and
        stabiliser ``m``, each (D·num_layers, N, H): ``hx = (h_0, c_0, n_0, m_0)`` (zeros when
        None) and ``output, (h_n, c_n, n_n, m_n)``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: Any = None, dtype: Any = None, *,
                 cell: str | CellSpec = "vanilla", heads: int | None = None, backend: str | None = None,
                 check_finite: bool = True) -> None:
        spec = _with_heads(resolve(cell), heads)
        if not spec.is_lstm:
            raise ValueError("cell: lstmkit.LSTM takes LSTM variants; use lstmkit.RNN for the plain RNN")
        super().__init__(spec, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype, backend, check_finite)

    def forward(self, input: Tensor | PackedSequence, hx: State | None = None,
                lengths: Tensor | list[int] | None = None) -> tuple[Tensor | PackedSequence, State]:
        """Run the LSTM; returns ``output, (h_n, c_n)`` exactly as ``torch.nn.LSTM`` (the sLSTM:
        ``output, (h_n, c_n, n_n, m_n)``).

        ``lengths`` (N,) with a padded batched ``input`` runs variable lengths without packing:
        as a PackedSequence of those lengths would (each sequence's h_n, c_n at its own last
        step; reversed within its length for the backward direction), with ``output`` padded
        with zeros past each length, shaped as the input.
        """
        # eager runs over a padded batch: what the general path derives, kept per call signature
        # (PreparedStep) — without gradients where that path ran forward_infer on every layer, with
        # them where it ran the operator on every layer (the compiled node projects as it did)
        run = lengths is None and not self.bidirectional and type(input) is Tensor and input.dim() == 3 \
            and prepared_road(self)
        if run:
            grad = torch.is_grad_enabled()
            x = input.transpose(0, 1) if self.batch_first else input  # (T, N, I)
            version = self._call_version()
            fast = self._prepared.run(x, hx, self._parameters, self.training, version,  # type: ignore[arg-type]
                                      self.check_finite, True, self.dropout, grad)
            if fast is not None:
                y, h_n, cells = fast  # (T, N, H_out), (L, N, H_out), S × (L, N, H)
                return (y.transpose(0, 1) if self.batch_first else y), (h_n, *cells)
        output, h_n, c_n, out = self._run(input, hx, lengths=lengths)
        assert c_n is not None
        if run and isinstance(out.kernel, FusedCPUKernel):
            layers = [self.layer_params(layer) for layer in range(self.num_layers)]
            if grad or all(in_loop_projection(x, p["weight_ih"]) for p in layers):  # (T, N) decide it for every layer
                self._prepared.remember(self._prepared.signature(x, hx, self.training, version, grad), layers,
                                        self._parameters, grad_run=grad)  # type: ignore[arg-type]
        return output, (h_n, *self._cell_states(c_n))

    def step(self, input: Tensor, hx: State | None = None) -> tuple[Tensor, State]:
        """One time step of the whole stack, for decoders, policies and streams:
        ``output, (h_n, c_n) = layer.step(x_t, (h, c))`` is ``layer(x_t[None], (h, c))`` without
        the time axis, on the same kernel (any variant but fgr, every layer, projection, dropout;
        the sLSTM steps ``(h, c, n, m)``).

        Shapes: ``input`` (N, I) (also with ``batch_first``) or unbatched (I,); ``hx`` as
        :meth:`forward`'s, (L, N, H_out) and (L, N, H) (unbatched: (L, H_out), (L, H)), None for
        zeros; returns ``output`` (N, H_out) (unbatched: (H_out,)) and the new state, shaped as ``hx``.
        A bidirectional layer cannot step (it reads each sequence from its end too). The module's
        forward hooks run around a step as around a call (pruning's and the hook-based weight
        normalisation's weights are computed there), with ``(input, hx)`` as the arguments.
        """
        return call_hooked(self, self._step_once, input, hx)

    def _step_once(self, input: Tensor, hx: State | None = None) -> tuple[Tensor, State]:
        version = self._call_version()
        eager = prepared_road(self)
        fast = self._prepared.run(input, hx, self._parameters, self.training, version,  # type: ignore[arg-type]
                                  self.check_finite, True, self.dropout) if eager else None
        if fast is not None:
            output, h_n, cells = fast  # (N, H_out), (L, N, H_out), S × (L, N, H)
            return output, (h_n, *cells)
        output, h_n, c_n = self._step(input, hx)
        assert c_n is not None
        if eager and input.dim() == 2 and not self.bidirectional \
                and isinstance(kernels.select(self.spec, input.device, input.dtype, self.backend), FusedCPUKernel):
            self._prepared.remember(self._prepared.signature(input, hx, self.training, version),
                                    [self.layer_params(layer) for layer in range(self.num_layers)],
                                    self._parameters)  # type: ignore[arg-type]
        return output, (h_n, *self._cell_states(c_n))


class RNN(_Recurrent):
    """The plain Elman RNN, ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``.

    Same signature, parameters and contract as ``torch.nn.RNN``; there for comparison.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device: Any = None,
                 dtype: Any = None, *, heads: int | None = None, backend: str | None = None,
                 check_finite: bool = True) -> None:
        choices = spec_choices("nonlinearity")
        if nonlinearity not in choices:
            raise ValueError(f"nonlinearity: expected one of {list(choices)}, got {nonlinearity!r}")
        spec = _with_heads(CellSpec(kind="rnn", nonlinearity=nonlinearity), heads)
        self.nonlinearity = nonlinearity
        super().__init__(spec, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend, check_finite)

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None,
                lengths: Tensor | list[int] | None = None) -> tuple[Tensor | PackedSequence, Tensor]:
        """Run the RNN; returns ``output, h_n`` exactly as ``torch.nn.RNN`` (``lengths`` as
        :meth:`LSTM.forward`)."""
        output, h_n, _, _ = self._run(input, hx, lengths=lengths)
        return output, h_n

    def step(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One time step of the whole stack, as :meth:`LSTM.step` (the state is ``h`` alone):
        ``input`` (N, I) or (I,), ``hx`` (L, N, H) or (L, H); returns output (N, H) and h_n."""
        return call_hooked(self, self._step_once, input, hx)

    def _step_once(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        output, h_n, _ = self._step(input, hx)
        return output, h_n


class LSTMCell(PreparedModule):
    """One LSTM step with ``torch.nn.LSTMCell``'s signature, plus ``cell=``.

    Parameters are named as torch's (``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh``) plus the variant's extras without a layer suffix. A step runs on the same
    kernel rows as :class:`LSTM` (a sequence of length 1: the fused kernel for every variant
    but fgr, whose extra state ``(h, c)`` cannot carry).

    Args:
        backend: force a kernel by registry name (``"reference"``, …), as :class:`LSTM`.
        check_finite: raise on NaN/inf in the input or the state (one cheap pass), as LSTM.

    Shapes: input (N, I) or (I,); hx (h, c) each (N, H) or (H,); returns (h', c'). The sLSTM
    (``cell="slstm"``): hx (h, c, n, m), returns (h', c', n', m').
    """

    # A cell reads as one layer and direction without projection (gates, describe)
    num_layers = 1
    num_directions = 1
    proj_size = 0

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device: Any = None,
                 dtype: Any = None, *, cell: str | CellSpec = "vanilla", backend: str | None = None,
                 check_finite: bool = True) -> None:
        super().__init__()
        check_bool("check_finite", check_finite)
        spec = resolve(cell)
        if not spec.is_lstm:
            raise ValueError("cell: LSTMCell takes LSTM variants, not the plain RNN")
        if spec.fgr:
            raise ValueError(f"cell: {_FGR_STEP}")
        check_backend(backend, spec)
        # One layer, one direction: reuse the layer's parameter machinery and checks.
        self._layer = _Recurrent(spec, input_size, hidden_size, 1, bias, False, 0.0, False, 0,
                                 device, dtype, None, True)
        self._param_shapes: dict[str, tuple[int, ...]] = {}  # name -> the shape the cell reads
        for base, full in self._layer._param_names[0][0].items():
            self.register_parameter(base, getattr(self._layer, full))
            self._param_shapes[base] = self._layer._param_shapes[full]
        del self._layer
        self.spec = spec
        self._state_names = cell_states(spec)  # the cell's states after h
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.backend = backend
        self.check_finite = check_finite
        self._prepared = PreparedStep(spec, hidden_size)  # the step of a signature seen before

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def layer_params(self, layer: int = 0, direction: int = 0) -> dict[str, Tensor]:
        """The parameters by name (a cell's carry no suffix); layer and direction 0 only."""
        check_int("layer", layer, 0, 0)
        check_int("direction", direction, 0, 0)
        return {base: getattr(self, base) for base in self._param_shapes}

    def gates(self, layer: int = 0, direction: int = 0) -> dict[str, Any]:
        """Each gate as the textbook writes it, as :meth:`LSTM.gates` (layer and direction 0)."""
        return gate_views(self, layer, direction, {base: base for base in self._param_shapes})

    def reset_parameters(self) -> None:
        """The layers' initialisation (:meth:`LSTM.reset_parameters`), as ``torch.nn.LSTMCell``'s;
        e.g. after ``to_empty`` of a cell made on the meta device."""
        initial.reset_parameters(self, [{base: base for base in self._param_shapes}], self.spec, self.hidden_size)

    def extra_repr(self) -> str:
        """As ``torch.nn.LSTMCell``'s, plus the variant and a forced kernel where set."""
        s = f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")
        if self.spec != CellSpec():
            s += f", cell={self.spec.name!r}"
        return s + (f", backend={self.backend!r}" if self.backend else "")

    def _check_input(self, input: Tensor) -> None:
        _refuse_fx(input)
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
        check_module_input(input, "input", (1, 2), f"a 1-D ({self.input_size},) or 2-D (N, {self.input_size}) tensor",
                           self.weight_ih, "cell", self.input_size)

    def _check_state(self, hx: Any, x: Tensor, batched: bool) -> tuple[Tensor, Tensor]:
        """``h`` (N, H) and the cell states side by side (N, S·H) (zeros for None), checked against the
        input ``x`` (N, I)."""
        shape = (x.shape[0], self.hidden_size)
        names = ("h", *self._state_names)
        if hx is None:
            return x.new_zeros(shape), x.new_zeros((x.shape[0], (len(names) - 1) * self.hidden_size))
        if not (isinstance(hx, (tuple, list)) and len(hx) == len(names) and all(isinstance(t, Tensor) for t in hx)):
            raise TypeError(f"hx: expected a tuple ({', '.join(names)}) of {len(names)} tensors")
        want = shape if batched else (self.hidden_size,)
        for name, t in zip(names, hx):
            check_dense(t, f"hx: {name}")
            if _shape(t) != want:
                raise ValueError(f"hx: {name} must have shape {want}, got {_shape(t)}")
            if not (input_dtype_ok(x, t) or input_dtype_ok(t, x)) or t.device != x.device:
                raise TypeError(f"hx: {name} has dtype {t.dtype} on {t.device}, expected {x.dtype} on {x.device}")
        states = list(hx) if batched else [t.unsqueeze(0) for t in hx]
        return states[0], states[1] if len(states) == 2 else torch.cat(states[1:], dim=-1)

    def forward(self, input: Tensor, hx: State | None = None) -> State:
        """One step: ``(h', c') = cell(x, (h, c))`` (the sLSTM: ``(h', c', n', m')``)."""
        version = self._call_version()
        eager = prepared_road(self)
        fast = self._prepared.run(input, hx, self._parameters, self.training, version,  # type: ignore[arg-type]
                                  self.check_finite, False) if eager else None
        if fast is not None:
            _, h_n, cells = fast  # (N, H_out), S × (N, H)
            return (h_n, *cells)
        if torch.jit.is_tracing():
            raise RuntimeError(_NO_TORCHSCRIPT.format(what="torch.jit.trace (and torch.onnx.export(dynamo=False))"))
        params = parameters_now(self, self._param_shapes)
        check_parameters(params, self._param_shapes)
        check_clip(self.spec, next(iter(params.values())).dtype)  # (a cell converted since it was built)
        self._check_input(input)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)  # (N, I)
        h, c = self._check_state(hx, x, batched)  # (N, H), the cell states side by side (N, S·H)
        if self.check_finite:
            checks = [(x, NONFINITE_INPUT)]
            if hx is not None:
                checks += [(t, f"hx: {name} contains NaN or inf")
                           for name, t in zip(("h", *self._state_names), hx)]
            check_finite_all(checks)
        keep = None
        if self.training and self.spec.has_zoneout:  # this step's masks, (1, N, H) each
            keep = cell_eqs.zoneout_masks(self.spec, (1, *c.shape), (1, *h.shape), x)
        params = dict(params)
        device = x.device.type
        autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
        if autocast and params["weight_ih"].dtype == torch.float32:
            # as torch.nn.LSTMCell under autocast: the step in float32, its states float32 (a loop of steps
            # carries c unrounded; a whole sequence, LSTM, runs in the autocast dtype as nn.LSTM does)
            x, h, c = x.float(), h.float(), c.float()
            with torch.autocast(device, enabled=False):
                kernel = kernels.select(self.spec, x.device, x.dtype, self.backend)
                out = kernel.run(x.unsqueeze(0), None, h, c, params, self.spec, self.hidden_size, keep=keep)
        else:
            kernel = kernels.select(self.spec, x.device, x.dtype, self.backend)
            out = kernel.run(x.unsqueeze(0), None, h, c, params, self.spec, self.hidden_size, keep=keep)
        if eager and isinstance(kernel, FusedCPUKernel):
            self._prepared.remember(self._prepared.signature(input, hx, self.training, version), [params],
                                    params)  # type: ignore[arg-type]
        assert out.c_n is not None
        new = self._new_state(out.h_n, out.c_n)
        return new if batched else tuple(t.squeeze(0) for t in new)

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(_NO_TORCHSCRIPT.format(what="torch.jit.script"))

    def _new_state(self, h: Tensor, cells: Tensor) -> State:
        """``(h', c')`` (the sLSTM: ``(h', c', n', m')``) from ``h'`` and the cell states side by side
        (N, S·H)."""
        return (h, cells) if cells.shape[-1] == self.hidden_size else (h, *_apart(cells, self.hidden_size))
