// lstmkit fused CPU recurrence: forward and hand-written BPTT for ONE layer, ONE direction —
// the CPU kernel of the lstmkit::recurrence operators (schemas, fake shapes and autograd:
// lstmkit/kernels/ops.py; the order of flags, parameters and buffers: lstmkit_abi.h, generated
// from lstmkit/kernels/abi.py).
//
// Files (one translation unit: this file includes the headers): this one holds the Python
// bindings and the test hooks; entry.h the entry points (dtype handling, lengths, the after-loop
// reductions), step_node.h the prepared step (its autograd node ProjectedRun and PreparedLayer),
// checks.h a step's finite and eager-mode checks; forward.h forward_impl and backward.h
// backward_impl (the time loops), cell_step.h one step's cell forward and BPTT, cell_config.h the
// call's Variant, its decoding (Cfg) and the gradient accumulators' layout, step_weights.h the
// weights a step multiplies by, packed for either pass, mlp_grads.h the deep gates' weight
// gradients, vec_math.h the pointwise pass's vector helpers, gemm.h the packed recurrent GEMM,
// parallel.h the thread region and barrier.
//
// The operator's input projection is computed outside (PyTorch autograd): xg = x W_ih^T + b_ih + b_hh,
// (T, B, R), for every variant except layernorm, where xg is the RAW a = x W_ih^T (no bias,
// no LN) and the kernel applies the input LN, its gain ln_ih_weight and bias = b_ih + b_hh
// (optional) itself; inference without a (T, B, R) xg (forward_infer, a prepared step) computes
// xg_t inside the loop instead (forward.h, InputProjection). The kernel runs the whole time loop
// in C++ inside ONE parallel region (parallel.h; backward with layernorm or deep gates: one region
// per chunk of steps, see backward_impl); per step:
//   forward : phase A  GEMMs   r = h_{t-1} W_hh^T            (B, R)   [+ fgr: s_{t-1} W_gg^T]
//             phase B  pointwise, rows split over threads (layernorm: z = LN(a) g_ih +
//                      LN(r) g_hh + bias, both LNs' stats in one fused pass; gates, c, LN of c, h)
//             [projection: phase C GEMM y_t = m_t W_hr^T, phase D state copy / masking]
//   backward: [projection: dh -> dm = dh W_hr]
//             phase B  pointwise (rows), phase A GEMMs dh_{t-1} = dr W_hh [+ ds = du_S W_gg]
// separated by barriers (parallel.h: spin briefly, then sleep) where the threads split each GEMM's
// panels; where each thread has a register tile of rows or more and the step's weights are small
// (gemm.h, split_by_rows) they split the batch instead, and a thread runs its own rows through
// every phase of every step with no barrier (a row of each phase reads that row alone). The GEMMs are the packed
// kernel of gemm.h (W packed once per call; register tile per CPU capability); the pointwise
// pass uses at::vec::Vectorized (for float on AVX-512 and AVX2 its own inline exp, tanh and the
// sLSTM's log1p, vec_math.h; for double Sleef's, as torch's CPU sigmoid/tanh). No allocation
// inside the time loop. The after-loop reductions (dW_hh, dW_hr, dW_gg)
// are large GEMMs (at::mm) in backward_call (entry.h); layernorm's dW_hh is accumulated chunk by
// chunk inside the loop (its dr_t differs from dXG and is not kept for all T steps).
// bfloat16 / float16 layers compute in float32 (recurrence_forward / recurrence_backward); a
// bfloat16 layer's products take bfloat16 operands on AMX tiles where the CPU has them
// (Cfg::bf16_gemm; gemm.h for the per-step products, reduce_mm for the after-loop ones).
//
// What is saved for backward (forward with save=true): the buffers of abi.BUFFERS, each (T, B, .)
// or empty, with the widths abi.buffer_shapes gives (kept_widths, cell_config.h, is the C++ side,
// checked against it by test_ops.py::test_fake_shapes_equal_real_ones). The caller keeps y, h0,
// c0, the weights and lengths. Layernorm without fgr or deep gates keeps the normalised
// pre-activations instead of the gates, and the backward recomputes the gates from them (the
// same instructions on the same stored values: bit-identical); a projection's o*act(LN(c)) is
// recomputed from G and C, fgr's s_{t-1} read from G.
// Steps t >= len_b: h, c, s carry over, y = 0, G/AH/RH/AS/RS rows = 0, C row = carried c.
#include <torch/extension.h>
#include <algorithm>
#include <vector>
#include "cell_config.h"  // MlpLayout
#include "checks.h"  // first_nonfinite, step_ready
#include "entry.h"  // recurrence_forward, recurrence_backward, forward_infer
#include "gemm.h"  // Packed
#include "lstmkit_abi.h"  // generated from lstmkit/kernels/abi.py: flags, parameter and buffer order
#include "step_node.h"  // forward_step, PreparedLayer, set_messages
#include "vec_math.h"  // ldv, stv, vexp, vtanh, sigm, log_sigmoid

namespace lk {

using namespace lk::abi;

// The ABI this extension was compiled with (a test compares it with lstmkit/kernels/abi.py).
py::dict compiled_abi() {
  py::dict d;
  py::list flags, params, buffers;
  for (const char* n : FLAG_NAMES) flags.append(n);
  for (const char* n : PARAM_NAMES) params.append(n);
  for (const char* n : BUFFER_NAMES) buffers.append(n);
  py::list scalars, gates;
  for (const char* n : SCALAR_NAMES) scalars.append(n);
  for (const char* n : GATE_NAMES) gates.append(n);  // the Gate enum's order (GATE_I, ...)
  d["gates"] = gates;
  py::list slstm_kept, slstm_states;  // the sLSTM's slots of G and of its cell states
  for (const char* n : SLSTM_KEPT_NAMES) slstm_kept.append(n);
  for (const char* n : SLSTM_STATE_NAMES) slstm_states.append(n);
  d["slstm_kept"] = slstm_kept; d["slstm_states"] = slstm_states;
  d["flags"] = flags; d["params"] = params; d["buffers"] = buffers; d["scalars"] = scalars;
  py::list bits, removed;
  for (int k = 0; k < N_FLAGS; ++k) bits.append(FLAG_BITS[k]);
  for (int g = 0; g < N_GATES; ++g) removed.append(GATE_REMOVED[g]);
  d["flag_bits"] = bits;
  py::list implemented;  // the rows the cell step computes (IMPLEMENTED_FLAGS)
  for (int k = 0; k < N_FLAGS; ++k)
    if (FLAG_BITS[k] & IMPLEMENTED_FLAGS) implemented.append(FLAG_NAMES[k]);
  d["implemented"] = implemented;
  py::list no_grad;
  for (int k = 0; k < N_PARAMS; ++k) no_grad.append(PARAM_NO_GRAD[k]);
  d["param_no_grad"] = no_grad;
  d["gate_removed"] = removed;
  d["ln_eps"] = LN_EPS;
  // the constants the cell step names (Cfg): each hard sigmoid's slope, each activation's code
  py::dict slopes, phis;
  slopes["hard_sigmoid"] = SLOPE_HARD_SIGMOID; slopes["hardsigmoid"] = SLOPE_HARDSIGMOID;
  phis["tanh"] = PHI_TANH; phis["relu"] = PHI_RELU; phis["sigmoid"] = PHI_SIGMOID; phis["identity"] = PHI_IDENTITY;
  d["slopes"] = slopes; d["phis"] = phis;
  py::list acc_h, acc_r;  // the backward's reduction vector (AccLayout)
  for (int k = 0; k < N_PARAMS; ++k) { acc_h.append(ACC_H[k]); acc_r.append(ACC_R[k]); }
  d["acc_h"] = acc_h; d["acc_r"] = acc_r; d["acc_size"] = py::make_tuple(ACC_SIZE_H, ACC_SIZE_R);
  d["gemm_tile"] = py::make_tuple(Packed<float>::MR, Packed<float>::NV * Packed<float>::VL);
  return d;
}

// test hook: the vectorised activations on a contiguous tensor (0 exp, 1 tanh, 2 sigmoid, 3 log sigmoid)
at::Tensor act_test(at::Tensor x, int64_t which) {
  x = x.contiguous();
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstmkit_act", [&] {
    using V = Vectorized<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t n = x.numel();
    for (int64_t j = 0; j < n; j += V::size()) {
      const int c = (int)std::min<int64_t>(V::size(), n - j);
      V v = ldv(xp + j, c);
      V r = which == 0   ? vexp<scalar_t>(v)
            : which == 1 ? vtanh<scalar_t>(v)
            : which == 2 ? sigm<scalar_t>(v)
                         : log_sigmoid<scalar_t>(v);
      stv(r, yp + j, c);
    }
  });
  return y;
}

// test hook: an mlp layout as the kernel decodes it (MlpLayout), to compare with abi.decode_mlp:
// (phi, bias, atot, wtot, [(gate, widths, woff, boff, aoff) per deep gate])
py::tuple mlp_layout_test(const std::vector<int64_t>& code, int64_t H) {
  const MlpLayout mlp(code, H);
  py::list gates;
  for (const MlpGate& mg : mlp.gates)
    gates.append(py::make_tuple(mg.g, mg.w, mg.woff, mg.boff, mg.aoff));
  return py::make_tuple(mlp.phi, mlp.bias, mlp.atot, mlp.wtot, gates);
}

// test hook: C (=|+=) A W^T (+ bias) through the per-step GEMM (run_tasks over nthreads): A (M, K)
// with unit column stride, W (N, K) with any strides, C (M, N) contiguous, bias (N,) or empty; W
// packed ahead (uses > 1) or read in place (uses 1: BLAS for fewer than PACK_AT_USE_MIN_ROWS rows,
// packed panel by panel at use from there; AVX-512 builds: BLAS at every row count).
at::Tensor gemm_test(const at::Tensor& A, const at::Tensor& W, const at::Tensor& bias, at::Tensor C, bool acc,
                     int64_t uses, int64_t nthreads) {
  TORCH_CHECK(A.dim() == 2 && W.dim() == 2 && A.size(1) == W.size(1) && A.stride(1) == 1, "gemm_test: shapes");
  TORCH_CHECK(C.is_contiguous() && C.size(0) == A.size(0) && C.size(1) == W.size(0), "gemm_test: C");
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "lstmkit_gemm_test", [&] {
    using T = scalar_t;
    const int M = (int)A.size(0), N = (int)W.size(0), K = (int)W.size(1);
    Packed<T> Wp;
    Wp.init(W.data_ptr<T>(), W.stride(0), W.stride(1), N, K, uses);
    at::Tensor bp;  // the bias padded to whole panels, as the kernel's callers pad it
    if (bias.numel()) {
      bp = at::zeros({std::max<int64_t>((int64_t)Wp.npanels * Packed<T>::NR, N)}, A.options());
      bp.narrow(0, 0, N).copy_(bias);
    }
    GemmTask<T> task{&Wp, M, A.data_ptr<T>(), A.stride(0), C.data_ptr<T>(), N, acc,
                     bp.defined() ? bp.data_ptr<T>() : nullptr};
    parallel_region((int)nthreads, [&](const int tid, const int nth, Barrier& bar) {
      Wp.pack_share(tid, nth);
      bar.wait();
      run_tasks<T>(&task, 1, tid, nth);
    });
  });
  return C;
}

}  // namespace lk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Pure C++ on at::Tensors: the GIL is released, so other Python threads (data loading,
  // a second direction or model) run while the recurrence does.
  m.def("forward", &lk::recurrence_forward, "lstmkit::recurrence on the CPU",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &lk::recurrence_backward, "lstmkit::recurrence_backward on the CPU",
        py::call_guard<py::gil_scoped_release>());
  m.def("forward_infer", &lk::forward_infer, "the forward without gradients, the input projection in the loop",
        py::call_guard<py::gil_scoped_release>());
  // module_local: builds for other capabilities (or versions) may be loaded in the same process
  py::class_<lk::PreparedLayer>(m, "PreparedLayer",
                                "forward_step's arguments kept for a call signature; call(x, h, cells, keep_c, keep_h)",
                                py::module_local())
      .def(py::init([](at::Tensor w_ih, at::Tensor b_ih, at::Tensor b_hh, at::Tensor whh,
                       std::vector<at::Tensor> params, std::vector<at::Tensor> mlp, int64_t flags,
                       std::vector<int64_t> mlp_layout, std::vector<double> scalars, int64_t H,
                       int64_t P, bool frozen, bool widen16, std::vector<std::string> mlp_names) {
        TORCH_CHECK((int64_t)params.size() == lk::N_PARAMS, "lstmkit PreparedLayer: expected ", (int)lk::N_PARAMS,
                    " params");
        lk::PreparedLayer layer{w_ih, b_ih, b_hh, whh, std::move(params), std::move(mlp),
                                {flags, std::move(mlp_layout), std::move(scalars), H, P}, frozen, widen16};
        layer.mlp_names = std::move(mlp_names);
        layer.keep_shapes();
        return layer;
      }), py::arg("w_ih"), py::arg("b_ih"), py::arg("b_hh"), py::arg("whh"), py::arg("params"), py::arg("mlp"),
          py::arg("flags"), py::arg("mlp_layout"), py::arg("scalars"),
          py::arg("H"), py::arg("P"), py::arg("frozen") = false, py::arg("widen16") = false,
          py::arg("mlp_names") = std::vector<std::string>{})
      .def_property_readonly("packed",
                             [](const lk::PreparedLayer& l) { return std::atomic_load(&l.slot->panels) != nullptr; },
                             "a frozen layer: whether its weights are packed (after its first call)")
      .def("share_panels", [](lk::PreparedLayer& l, const lk::PreparedLayer& other) { l.slot = other.slot; },
           py::arg("other"), "take other's packing (a layer of the same weights kept for another signature)")
      .def("__call__", &lk::PreparedLayer::call, py::arg("x"), py::arg("h"), py::arg("cells"),
           py::arg("keep_c") = py::none(), py::arg("keep_h") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("set_messages", &lk::set_messages, "the errors a second-order gradient and a batched backward raise");
  m.def("first_nonfinite", &lk::first_nonfinite, "index of the first tensor with a NaN or inf, -1 if none",
        py::call_guard<py::gil_scoped_release>());
  m.def("step_ready", &lk::step_ready,
        "plain eager CPU mode (no autocast, functorch transform or trace) and, if asked, every tensor finite",
        py::call_guard<py::gil_scoped_release>());
  m.def("bf16_gemm", &lk::bf16_gemm_available,
        "whether bfloat16 layers' per-step products run in bfloat16 on AMX tiles (else in float32)");
  m.def("full_omp_teams", &lk::full_teams,
        "whether OpenMP gives a region every thread torch asks for (no OMP_DYNAMIC, no lower OMP_THREAD_LIMIT)");
  m.def("abi", &lk::compiled_abi, "the variant ABI compiled in (flags, parameter and buffer order)");
  m.def("_act_test", &lk::act_test, "test hook: vectorised exp/tanh/sigmoid/log sigmoid");
  m.def("_mlp_layout_test", &lk::mlp_layout_test, "test hook: an mlp layout as the kernel decodes it");
  m.def("_gemm_test", &lk::gemm_test, "test hook: C (+)= A W^T (+ bias) through the per-step GEMM");
  m.def(
      "_force_split", [](int64_t mode) { lk::split_override().store((int)mode); },
      "test hook: how threads split a step's GEMMs (0 the rule, split_by_rows; 1 by rows; 2 by panels)");
  m.def(
      "_poison_workspaces", [](bool on) { lk::poison_workspaces().store(on); },
      "test hook: fill the workspace parts a call writes before reading with NaN (Carve::take_rows)");
}
