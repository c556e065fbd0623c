"""The ``torch`` kernel row: torch's own recurrent operators (``aten::lstm``, ``aten::rnn_tanh``,
``aten::rnn_relu``) for the cells torch computes — cuDNN on a GPU, oneDNN on the CPU.

For the vanilla LSTM (any initial biases: they are stored values), its projection and the
plain RNN, torch's fused kernels are the speed to beat: on CUDA this row is chosen by default
(:func:`lstmkit.kernels.select`); on the CPU for the vanilla LSTM's calls where oneDNN measured
faster than the fused kernel (:data:`ONEDNN_FASTER`); elsewhere only when ``backend="torch"``
asks for it. It is an
aten operator, so ``torch.compile``, ``torch.export`` and autocast see what they see for
``torch.nn.LSTM``; autograd differentiates it (cuDNN's own backward). Variable lengths go
through a ``PackedSequence``, as ``nn.LSTM`` takes them. It cannot record per-step gates: a
trace of such a layer runs the next row that can (:attr:`Kernel.records`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstmkit.kernels import cpu_ext
from lstmkit.kernels.base import Kernel, KernelOut, Workload
from lstmkit.kernels.machine import cpu_vendor
from lstmkit.spec import CellSpec

__all__ = [
    "TorchKernel", "ONEDNN_FASTER", "ONEDNN_MEASURED_AT", "ONEDNN_MEASURED_ON", "onednn_faster", "operator_weights",
]

#: Where torch's LSTM operator (oneDNN) runs a vanilla CPU layer faster than the fused kernel:
#: (dtype, with gradient) -> (least batch B, least B·H, least hidden size H, greatest H), for
#: sequences of at least :data:`ONEDNN_MIN_STEPS` steps without lengths or projection; bfloat16
#: only where oneDNN runs it on AMX tiles. Fused ÷ oneDNN, one process, the two alternating, T = 20-200.
#: float32 (``benchmarks/results/avx512_xeon/onednn_choice_{1t,2t}.md`` and two runs before them, an
#: AVX-512 Xeon, one and two threads, 11 rounds): inference 1.04-1.26 at B >= 32 with H = 256-512
#: and B·H >= 16384, 0.97-1.15 at (B, H) = (32, 256) (three of four runs above 1); the fused kernel
#: faster or level at B <= 16 (0.23-1.07; one exception, B = 4, H = 256 with two threads 1.09-1.20,
#: 0.72-0.84 with one), at H <= 128 (0.79-1.04) and at H = 1,024 (0.87-0.99). Training: the fused
#: kernel 0.75-1.05 wherever B >= 16 or H != 256 (0.85-1.05 at B = 32, H = 64-128, where an earlier
#: version of it measured 1.04-1.13 and this table sent those calls to oneDNN); 0.88-1.13 at B = 4-8,
#: H = 256, which the table does not describe (it has no greatest batch). bfloat16 (the AVX-512
#: Xeon with AMX, ``benchmarks/results/onednn_choice_{1t,2t}.md``): inference 1.01-2.7 from
#: B·H = 1024 up to H = 512, 0.85-0.91 at H = 1024; training 1.08-1.67 at B = 32, H = 64-128
#: (1.06-1.10 at H = 512 and 0.99-1.04 at B = 64, H = 256: ties), the fused kernel 0.68-0.72 at
#: B = 4 and 0.70-0.81 at H = 1024.
ONEDNN_FASTER: dict[tuple[torch.dtype, bool], tuple[int, int, int, int]] = {
    (torch.float32, False): (32, 0, 256, 512),
    (torch.bfloat16, False): (4, 1024, 64, 512),
    (torch.bfloat16, True): (32, 0, 64, 128),
}
ONEDNN_MIN_STEPS = 50
#: The CPU vendor :data:`ONEDNN_FASTER` was measured on (Intel Xeons, with AVX-512 and held to
#: AVX2). On an AMD EPYC (Zen, AVX2; ``benchmarks/results/avx2_epyc/onednn_choice_{1t,2t}.md``)
#: the fused kernel measured as fast or faster at every one of the table's cells — float32
#: inference 0.84-0.99, training 0.99-1.05 (ties) — so on a CPU of another vendor it keeps them.
#: A CPU whose vendor is not known (no ``vendor_id`` in ``/proc/cpuinfo``) follows the table.
ONEDNN_MEASURED_ON = "GenuineIntel"
#: torch's CPU capability the table holds at. On the AVX-512 Xeon with every library held to AVX2
#: (``ATEN_CPU_CAPABILITY=avx2``, oneDNN and MKL likewise; ``avx512_xeon/onednn_choice_avx2_1t.md``
#: and a run before it) the fused kernel measured as fast or faster at every shape, 0.75-1.01
#: (0.93-1.00 at the table's float32 cells), so at a lower capability it keeps every call.
ONEDNN_MEASURED_AT = "AVX512"


def _onednn_amx() -> bool:
    """Whether oneDNN may run bfloat16 on AMX tiles here: the CPU has them and oneDNN's ISA
    (``ONEDNN_MAX_CPU_ISA`` lowers it) includes bfloat16 (held to AVX2, its bfloat16 RNN measured
    1.4-7.7x slower than the fused kernel)."""
    return torch.cpu._is_amx_tile_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _capability() -> str:
    """torch's CPU capability in this process (``ATEN_CPU_CAPABILITY`` lowers it)."""
    return torch.backends.cpu.get_cpu_capability()


def onednn_faster(workload: Workload) -> bool:
    """Whether :data:`ONEDNN_FASTER` says oneDNN runs this vanilla LSTM call on the CPU faster
    (on a CPU of the vendor it was measured on, :data:`ONEDNN_MEASURED_ON`, at the capability it
    was measured at, :data:`ONEDNN_MEASURED_AT`)."""
    if workload.kind != "lstm" or workload.lengths or workload.projection or workload.steps < ONEDNN_MIN_STEPS:
        return False  # packed input leaves oneDNN's fast path; the RNN, projection, short runs: not measured faster
    bounds = ONEDNN_FASTER.get((workload.dtype, workload.gradient))
    if bounds is None:
        return False
    if cpu_vendor() not in (None, ONEDNN_MEASURED_ON):  # measured on Intel's CPUs only
        return False
    if _capability() != ONEDNN_MEASURED_AT:  # held to AVX2, the fused kernel measured as fast
        return False
    least_batch, least_work, least_hidden, most_hidden = bounds
    if not (workload.batch >= least_batch and workload.batch * workload.hidden >= least_work
            and least_hidden <= workload.hidden <= most_hidden):
        return False
    if not torch._C._get_mkldnn_enabled():  # torch.backends.mkldnn.flags(enabled=False): aten's own loop
        return False
    if not cpu_ext.full_omp_teams():  # OMP_DYNAMIC, a lower OMP_THREAD_LIMIT: oneDNN's results are wrong
        return False
    return workload.dtype != torch.bfloat16 or _onednn_amx()


def operator_weights(params: list[list[dict[str, Tensor]]]) -> list[Tensor]:
    """``params[layer][direction]`` in the order torch's LSTM / RNN operator takes them (and cuDNN's
    flat weight buffer holds them): per layer, per direction, w_ih, w_hh[, b_ih, b_hh][, w_hr]."""
    weights = []
    for layer in params:
        for p in layer:
            weights += [p["weight_ih"], p["weight_hh"]]
            if "bias_ih" in p:
                weights += [p["bias_ih"], p["bias_hh"]]
            if "weight_hr" in p:
                weights.append(p["weight_hr"])
    return weights


class TorchKernel(Kernel):
    """torch's LSTM / RNN operator for one layer-direction (cuDNN on CUDA, oneDNN on the CPU)."""

    name = "torch"
    devices = ("cpu", "cuda")
    records = False

    def refuses(self, spec: CellSpec) -> str | None:
        if spec.is_lstm and not spec.is_vanilla:
            return (f"torch's LSTM computes the vanilla cell (with projection) only, not {spec.name!r}; the "
                    f"'cpu_fused' and 'triton' rows compute every variant")
        return None

    def automatic(self, device: torch.device, workload: Workload | None = None) -> bool:
        if device.type == "cuda":
            return True  # cuDNN
        # on the CPU the fused kernel is the default, oneDNN where measured faster (select asks
        # this row only for specs it computes: the vanilla LSTM, the plain RNN)
        return device.type == "cpu" and workload is not None and onednn_faster(workload)

    def unsupported(self, spec: CellSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        return self.refuses_or_dtype(spec, dtype)

    def run(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
            params: dict[str, Tensor], spec: CellSpec, hidden_size: int,
            record: bool = False, keep: tuple[Tensor, Tensor] | None = None) -> KernelOut:
        if record:
            raise ValueError("record: torch's LSTM operator keeps no per-step gates (a trace runs another kernel)")
        y, h_n, c_n = self._call(x, lengths, h0.unsqueeze(0), None if c0 is None else c0.unsqueeze(0),
                                 [[params]], spec)
        return KernelOut(y, h_n.squeeze(0), None if c_n is None else c_n.squeeze(0), None)

    def run_layers(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
                   params: list[list[dict[str, Tensor]]], spec: CellSpec, hidden_size: int,
                   dropout: float, training: bool) -> tuple[Tensor, Tensor, Tensor | None] | None:
        if dropout > 0.0 and training:
            return None  # the operator's dropout draws its own masks: layer by layer, as every row
        return self._call(x, lengths, h0, c0, params, spec)

    def _call(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
              params: list[list[dict[str, Tensor]]], spec: CellSpec) -> tuple[Tensor, Tensor, Tensor | None]:
        """One operator call over ``params[layer][direction]``: x (T, B, I), h0 (L·D, B, H_out),
        c0 (L·D, B, H) or None -> y (T, B, D·H_out), h_n, c_n shaped as h0, c0."""
        bias = "bias_ih" in params[0][0]
        weights = operator_weights(params)
        packed = None
        if lengths is not None:  # x (T, B, I) -> the PackedSequence nn.LSTM takes; states in its order
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            order = packed.sorted_indices.to(x.device)
            h0 = h0.index_select(1, order)
            c0 = None if c0 is None else c0.index_select(1, order)
        hx = (h0, c0) if spec.is_lstm else h0
        op = torch._VF.lstm if spec.is_lstm else (torch._VF.rnn_tanh if spec.nonlinearity == "tanh"
                                                  else torch._VF.rnn_relu)
        # train: cuDNN keeps what its backward needs only in training mode (dropout is 0 here, so
        # the flag changes nothing else): on whenever a gradient can flow, whatever module.training says
        states = (h0,) if c0 is None else (h0, c0)
        train = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *states, *weights))
        layers, bidirectional = len(params), len(params[0]) == 2
        if packed is None:
            out = op(x, hx, weights, bias, layers, 0.0, train, bidirectional, False)  # (input, hx, params, ...)
        else:
            out = op(packed.data, packed.batch_sizes, hx, weights, bias, layers, 0.0, train, bidirectional)
        y, h_n = out[0], out[1]
        c_n = out[2] if spec.is_lstm else None
        if packed is not None:
            unsort = packed.unsorted_indices.to(x.device)
            y, _ = pad_packed_sequence(type(packed)(y, packed.batch_sizes, packed.sorted_indices,
                                                    packed.unsorted_indices), total_length=x.shape[0])
            h_n = h_n.index_select(1, unsort)
            c_n = None if c_n is None else c_n.index_select(1, unsort)
        return y, h_n, c_n
