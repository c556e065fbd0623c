// lstmkit fused CPU recurrence: forward and hand-written BPTT for ONE layer, ONE direction —
// the CPU kernel of the lstmkit::recurrence operators (schemas, fake shapes and autograd:
// lstmkit/kernels/ops.py; the order of flags, parameters and buffers: lstmkit_abi.h, generated
// from lstmkit/kernels/abi.py).
//
// Files: this one holds the entry points (dtype handling, lengths, the after-loop reductions),
// the autograd node of a prepared step (ProjectedRun: projection and recurrence, at its end) and
// the Python bindings; forward.h forward_impl, backward.h backward_impl, cell_config.h
// the decoded variant and the gradient accumulators' layout, vec_math.h the pointwise pass's
// vector helpers, gemm.h the packed recurrent GEMM, parallel.h the thread region and barrier.
//
// The input projection is computed outside (PyTorch autograd): xg = x W_ih^T + b_ih + b_hh,
// (T, B, R), for every variant except layernorm, where xg is the RAW a = x W_ih^T (no bias,
// no LN) and the kernel applies the input LN, its gain ln_ih_weight and bias = b_ih + b_hh
// (optional) itself. This file runs the whole time loop in C++ inside ONE parallel region
// (parallel.h; layernorm backward: one region per chunk of steps, see backward_impl); per step:
//   forward : phase A  GEMMs   r = h_{t-1} W_hh^T            (B, R)   [+ fgr: s_{t-1} W_gg^T]
//             phase B  pointwise, rows split over threads (layernorm: z = LN(a) g_ih +
//                      LN(r) g_hh + bias, both LNs' stats in one fused pass; gates, c, LN of c, h)
//             [projection: phase C GEMM y_t = m_t W_hr^T, phase D state copy / masking]
//   backward: [projection: dh -> dm = dh W_hr]
//             phase B  pointwise (rows), phase A GEMMs dh_{t-1} = dr W_hh [+ ds = du_S W_gg]
// separated by barriers (parallel.h: spin briefly, then sleep). The GEMMs are the packed
// kernel of gemm.h (W packed once per call; register tile per CPU capability); the pointwise
// pass uses at::vec::Vectorized (Sleef exp/tanh, the same functions torch's CPU sigmoid/tanh
// use). No allocation inside the time loop. The after-loop reductions (dW_hh, dW_hr, dW_gg)
// are large GEMMs (at::mm) in recurrence_backward; layernorm's dW_hh is accumulated chunk by
// chunk inside the loop (its dr_t differs from dXG and is not kept for all T steps).
// bfloat16 / float16 layers compute in float32 (recurrence_forward / recurrence_backward); a
// bfloat16 layer's products take bfloat16 operands on AMX tiles where the CPU has them
// (Cfg::bf16_gemm; gemm.h for the per-step products, reduce_mm for the after-loop ones).
//
// What is saved for backward (forward with save=true), all (T, B, .):
//   every LSTM variant : G (T,B,R) gate activations of the computed gates, in order i,f,g,o
//                        (these are the "trace" i, f, g, o), C (T,B,H) the (clipped) c_t,
//                        (the caller keeps y, h0, c0, the weights and lengths for backward).
//   layernorm          : G is NOT saved (without fgr); instead
//                        AH (T,B,R) the normalised a-hat of the input LN, AS (T,B,G) its 1/std
//                        per gate chunk, RH (T,B,R) the normalised r-hat of the recurrent LN,
//                        RS (T,B,G) its 1/std.
//                        Backward recomputes the gate activations from a-hat, r-hat (the same
//                        instructions on the same stored values: bit-identical), and the LN of
//                        c from C. The raw a is not kept (the caller may free it).
//                        layernorm + fgr saves G as well (s_{t-1} is read from it).
//   projection         : nothing more (o*tanh(LN(c)) is recomputed from G and C in backward).
//   fgr                : nothing more (s_{t-1} is read from G).
//   rnn                : y only.
// Steps t >= len_b: h, c, s carry over, y = 0, G/AH/RH/AS/RS rows = 0, C row = carried c.
#include <torch/extension.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/strides.h>  // contiguous_strides
#include <torch/csrc/jit/frontend/tracer.h>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#include "backward.h"  // backward_impl
#include "cell_config.h"  // Cfg, AccLayout
#include "forward.h"  // forward_impl
#include "gemm.h"
#include "lstmkit_abi.h"  // generated from lstmkit/kernels/abi.py: flags, parameter and buffer order
#include "vec_math.h"

namespace lk {

using namespace lk::abi;

static std::vector<int64_t> lengths_vec(const at::Tensor& lengths, int64_t B, int64_t Tn) {
  std::vector<int64_t> len(B, Tn);
  if (lengths.defined() && lengths.numel() > 0) {
    TORCH_CHECK(lengths.numel() == B, "lstmkit recurrence: lengths must have B entries");
    auto l = lengths.to(at::kLong).contiguous();
    const int64_t* lp = l.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) len[b] = std::max<int64_t>(0, std::min<int64_t>(lp[b], Tn));
  }
  return len;
}

// bfloat16 / float16 layers: parameters, inputs and outputs stay in their dtype; the recurrence
// computes in float32 (GEMM accumulation, gates, cell state) and keeps its buffers in float32.
static at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}
static at::Tensor to_compute(const at::Tensor& t, at::ScalarType ct) {
  return (t.defined() && t.numel() > 0 && t.is_floating_point() && t.scalar_type() != ct) ? t.to(ct) : t;
}
static at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dt) {
  return (t.defined() && t.numel() > 0 && t.scalar_type() != dt) ? t.to(dt) : t;
}
static std::vector<at::Tensor> to_compute(const std::vector<at::Tensor>& ts, at::ScalarType ct) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(to_compute(t, ct).contiguous());
  return out;
}

// What a weight was when it was packed: its storage (held, so that no later allocation can take
// its address), offset, sizes, strides, dtype and version counter. Anything else later — an
// in-place change that torch counts (an optimizer, load_state_dict, copy_ under no_grad), or a new
// tensor set through .data (module.half() then .float()) — means the panels are stale.
struct WeightStamp {
  c10::Storage storage;
  int64_t offset, version;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  explicit WeightStamp(const at::Tensor& t)
      : storage(t.storage()), offset(t.storage_offset()), version(t._version()), sizes(t.sizes().vec()),
        strides(t.strides().vec()), dtype(t.scalar_type()) {}
  bool same(const at::Tensor& t) const {
    return t.storage().unsafeGetStorageImpl() == storage.unsafeGetStorageImpl() && t.storage_offset() == offset &&
           t._version() == version && t.sizes() == at::IntArrayRef(sizes) &&
           t.strides() == at::IntArrayRef(strides) && t.scalar_type() == dtype;
  }
};

// A frozen layer's packed weights (FrozenPanels, forward.h) in the compute dtype `type`, and what
// W_ih and W_hh were when packed (a change to either: packed again).
struct Frozen {
  at::ScalarType type;
  WeightStamp ih, hh;
  std::shared_ptr<void> panels;  // FrozenPanels<type's C++ type>
  template <typename T>
  const FrozenPanels<T>* get(at::ScalarType ct) const {
    return type == ct ? static_cast<const FrozenPanels<T>*>(panels.get()) : nullptr;
  }
};

// The forward. x_in defined: inference with the input projection in the loop (forward_impl's
// InputProjection; xg_in is ignored, w_ih and bias give xg_t = x_t W_ih^T + bias); without
// buffers_out it returns no buffers.
static std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_call(
    const at::Tensor& xg_in, const at::Tensor& whh_in, const at::Tensor& h0_in, const at::Tensor& c0_in,
    const at::Tensor& lengths, const std::vector<at::Tensor>& params_in, int64_t flags,
    const std::vector<int64_t>& mlp_layout, double clip, double zoneout_c, double zoneout_h, int64_t H, int64_t P,
    bool save, bool buffers_out, const at::Tensor& x_in = {}, const at::Tensor& w_ih_in = {},
    const at::Tensor& bias_in = {}, const at::Tensor& bias2_in = {}, const std::vector<at::Tensor>& mlp_each = {},
    const Frozen* frozen = nullptr) {
  const MlpLayout mlp(mlp_layout, H);
  Cfg cf(flags, clip, zoneout_c, zoneout_h, H, P, mlp);
  TORCH_CHECK((int64_t)params_in.size() == N_PARAMS, "lstmkit::recurrence: expected ", (int)N_PARAMS,
              " params, got ", params_in.size());
  const bool in_loop = x_in.defined();
  TORCH_CHECK(in_loop || (xg_in.dim() == 3 && xg_in.size(2) == cf.R),
              "lstmkit::recurrence: xg must be (T, B, R=", cf.R, ")");
  TORCH_CHECK(!in_loop || (x_in.dim() == 3 && w_ih_in.dim() == 2 && w_ih_in.size(0) == cf.R &&
                           w_ih_in.size(1) == x_in.size(2)), "lstmkit forward_infer: x (T, B, I), W_ih (R=", cf.R,
              ", I)");
  const at::ScalarType io = (in_loop ? x_in : xg_in).scalar_type(), ct = compute_type(io);
  const auto params = to_compute(params_in, ct);
  const auto mlp_own = to_compute(mlp_each, ct);  // the deep gates' own tensors (else params[P_MLP], flat)
  if (cf.ln) {
    TORCH_CHECK(params[P_LN_IH_WEIGHT].numel() == cf.R, "lstmkit::recurrence: layernorm needs ln_ih_weight (R=", cf.R, ")");
    TORCH_CHECK(params[P_BIAS].numel() == 0 || params[P_BIAS].numel() == cf.R,
                "lstmkit::recurrence: bias must be (R=", cf.R, ") or empty");
  }
  const at::Tensor x = in_loop ? to_compute(x_in, ct).contiguous() : at::Tensor();
  const at::Tensor w_ih = in_loop ? to_compute(w_ih_in, ct) : at::Tensor();
  const at::Tensor bias = in_loop && bias_in.defined() && bias_in.numel() ? to_compute(bias_in, ct).contiguous()
                                                                           : at::Tensor();
  const at::Tensor bias2 = in_loop && bias2_in.defined() && bias2_in.numel() ? to_compute(bias2_in, ct).contiguous()
                                                                              : at::Tensor();
  // with the projection in the loop, or a 16-bit xg (widened row by row in the loop: xg_low), xg is
  // an empty (T, B, 0) tensor carrying the sizes and options
  const at::Tensor xg_low = !in_loop && ct != io ? xg_in.contiguous() : at::Tensor();
  const at::Tensor xg = in_loop ? at::empty({x.size(0), x.size(1), 0}, x.options())
                        : xg_low.defined() ? at::empty({xg_in.size(0), xg_in.size(1), 0}, xg_in.options().dtype(ct))
                                           : to_compute(xg_in, ct).contiguous();
  const at::Tensor whh = to_compute(whh_in, ct);
  const at::Tensor h0 = to_compute(h0_in, ct).contiguous();
  at::Tensor c0 = to_compute(c0_in, ct);
  const int64_t Tn = xg.size(0), B = xg.size(1);
  cf.set_heads(whh.size(1));
  if (!cf.rnn && c0.numel() == 0) c0 = at::zeros({B, cf.SH}, xg.options());
  TORCH_CHECK(cf.rnn || (c0.dim() == 2 && c0.size(0) == B && c0.size(1) == cf.SH),
              "lstmkit::recurrence: c0 must be (B, ", cf.SH, "): the cell's ", cf.S, " states side by side");
  cf.bf16_gemm = bf16_products(io);
  const auto len = lengths_vec(lengths, B, Tn);
  const int64_t work = B * cf.R * (cf.Dh + (in_loop ? x.size(2) : 0));  // per step (heads: Dh = H_out/k)
  const int nt = choose_threads(work, B);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(ct, "lstmkit_fwd", [&] {
    const MlpWeights<scalar_t> mw(mlp, params[P_MLP], mlp_own);
    if (in_loop) {
      const InputProjection<scalar_t> pin{x.data_ptr<scalar_t>(), x.size(2), w_ih.data_ptr<scalar_t>(), w_ih.stride(0),
                                          w_ih.stride(1), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                                          bias2.defined() ? bias2.data_ptr<scalar_t>() : nullptr};
      const FrozenPanels<scalar_t>* fp = frozen ? frozen->get<scalar_t>(ct) : nullptr;
      out = forward_impl<scalar_t>(xg, whh, h0, c0, len, params, cf, mlp, mw, save, nt, buffers_out, &pin, {}, fp);
    } else {
      out = forward_impl<scalar_t>(xg, whh, h0, c0, len, params, cf, mlp, mw, save, nt, buffers_out, nullptr, xg_low);
    }
  });
  // out = {Y, h_n, c_n, then the buffers in abi.BUFFERS order}
  std::vector<at::Tensor> buffers(out.begin() + 3, out.end());
  return {to_dtype(out[0], io), to_dtype(out[1], io), to_dtype(out[2], io), buffers};
}

// lstmkit::recurrence (CPU): see lstmkit/kernels/ops.py for the schema and the contract.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> recurrence_forward(
    const at::Tensor& xg, const at::Tensor& whh, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& lengths, const std::vector<at::Tensor>& params, int64_t flags,
    const std::vector<int64_t>& mlp_layout, double clip, double zoneout_c, double zoneout_h, int64_t H, int64_t P,
    bool save) {
  return forward_call(xg, whh, h0, c0, lengths, params, flags, mlp_layout, clip, zoneout_c, zoneout_h, H, P, save,
                      true);
}

// The backward; mlp_each as forward_call's (the deep gates' own tensors, params[P_MLP] then empty);
// dwhh_out: where dW_hh is written ((R, H_out), or with heads (R, Dh), in whh's dtype, which must
// be the compute type), or undefined: allocated. views: the small parameters' gradients (peephole,
// layer norm) may be views of the kernel's one accumulator — for the autograd node; the operator
// copies them out, as its outputs must not alias each other.
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> backward_call(
    const at::Tensor& dy_in, const at::Tensor& dhn_in, const at::Tensor& dcn_in, const at::Tensor& y_in,
    const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& whh_in, const at::Tensor& lengths,
    const std::vector<at::Tensor>& params_in, const std::vector<at::Tensor>& buffers, int64_t flags,
    const std::vector<int64_t>& mlp_layout, double clip, double zoneout_c, double zoneout_h, int64_t H, int64_t P,
    const std::vector<at::Tensor>& mlp_each, const at::Tensor& dwhh_out = at::Tensor(), bool views = false) {
  const MlpLayout mlp(mlp_layout, H);
  Cfg cf(flags, clip, zoneout_c, zoneout_h, H, P, mlp);
  TORCH_CHECK((int64_t)params_in.size() == N_PARAMS && (int64_t)buffers.size() == N_BUFFERS,
              "lstmkit::recurrence_backward: expected ", (int)N_PARAMS, " params and ", (int)N_BUFFERS, " buffers");
  const at::ScalarType io = y_in.scalar_type(), ct = compute_type(io);
  const auto params = to_compute(params_in, ct);
  const auto mlp_own = to_compute(mlp_each, ct);
  const at::Tensor y = to_compute(y_in, ct).contiguous(), h0 = to_compute(h0_in, ct).contiguous();
  const at::Tensor whh = to_compute(whh_in, ct);
  const int64_t Tn = y.size(0), B = y.size(1), R = cf.R, Hout = cf.Hout;
  cf.set_heads(whh.size(1));
  cf.bf16_gemm = bf16_products(io);
  const bool lstm = !cf.rnn;
  const auto opt = y.options();
  at::Tensor c0 = to_compute(c0_in, ct);
  if (lstm && c0.numel() == 0) c0 = at::zeros({B, cf.SH}, opt);
  at::Tensor dy = dy_in.numel() ? to_compute(dy_in, ct) : at::zeros({1}, opt).expand({Tn, B, Hout});
  at::Tensor dhn = dhn_in.numel() ? to_compute(dhn_in, ct) : at::zeros({B, Hout}, opt);
  at::Tensor dcn = !lstm ? at::empty({0}, opt) : dcn_in.numel() ? to_compute(dcn_in, ct) : at::zeros({B, cf.SH}, opt);
  const auto len = lengths_vec(lengths, B, Tn);
  const int nt = choose_threads(B * R * cf.Dh, B);
  std::vector<at::Tensor> bufs;
  for (const auto& b : buffers) bufs.push_back(b.contiguous());
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(ct, "lstmkit_bwd", [&] {
    const MlpWeights<scalar_t> mw(mlp, params[P_MLP], mlp_own);
    out = backward_impl<scalar_t>(bufs, y, h0, c0.contiguous(), whh, len, params, dy, dhn.contiguous(),
                                  dcn.contiguous(), dwhh_out, cf, mlp, mw, nt, io != ct ? io : at::ScalarType::Undefined);
  });
  // out = {dXG, dWhh (layernorm), dHP, Mo, dh0, dc0, acc, dZS, dmlp, dXG in a 16-bit layer's dtype}
  const at::Tensor& dXG = out[0];
  // the returned dxg, and on the AMX path also the dW_hh product's operand: rounded once
  const at::Tensor dxg_io = io != ct ? out[9] : dXG;
  const at::Tensor dXGr = cf.bf16_gemm ? dxg_io : dXG;
  const at::Tensor yr = cf.bf16_gemm ? y_in.contiguous() : y;
  at::Tensor dwhh = dwhh_out;
  if (cf.ln) {  // accumulated in the kernel from the gradient w.r.t. r_t = h_{t-1} W_hh^T
    dwhh = out[1];
  } else {  // dW_hh = sum_t dxg_t^T h_{t-1}; h_{t-1} = h0 at t = 0, else y_{t-1} (0 on padded steps)
    accumulate_dwhh(dwhh, true, dXG[0], h0, cf);
    if (Tn > 1)
      accumulate_dwhh(dwhh, false, dXGr.narrow(0, 1, Tn - 1).reshape({-1, R}),
                      yr.narrow(0, 0, Tn - 1).reshape({-1, Hout}), cf);
  }
  std::vector<at::Tensor> dparams(N_PARAMS);
  for (auto& d : dparams) d = at::empty({0}, opt);
  if (lstm) {
    if (mlp.any()) dparams[P_MLP] = out[8];  // the deep gates' flat weights
    const at::Tensor& acc = out[6];  // AccLayout, summed over threads
    const AccLayout al{H, R};
    auto slot = [&](int64_t off, int64_t n) {  // (n,) at off: a contiguous view, or its copy
      at::Tensor v = acc.as_strided({n}, {1}, acc.storage_offset() + off);
      return views ? v : v.clone();
    };
    if (cf.peep) {
      if (cf.has_i) dparams[P_PEEPHOLE_I] = slot(al.peephole(0), H);
      if (cf.has_f) dparams[P_PEEPHOLE_F] = slot(al.peephole(1), H);
      if (cf.has_o) dparams[P_PEEPHOLE_O] = slot(al.peephole(2), H);
    }
    if (cf.ln) {
      dparams[P_LN_C_WEIGHT] = slot(al.ln_c_weight(), H);
      dparams[P_LN_C_BIAS] = slot(al.ln_c_bias(), H);
      dparams[P_LN_HH_WEIGHT] = slot(al.ln_hh_weight(), R);
      dparams[P_LN_IH_WEIGHT] = slot(al.ln_ih_weight(), R);
      if (params[P_BIAS].numel()) dparams[P_BIAS] = slot(al.bias(), R);
    }
    if (P > 0) dparams[P_WEIGHT_HR] = reduce_mm(out[2].reshape({-1, P}).t(), out[3].reshape({-1, H}), cf);
    if (cf.fgr) {  // dW_gg = sum_t du_S,t^T s_{t-1}, the sigmoid gates i, f, o in order
      const int64_t nS = cf.nS * H;
      if (Tn > 1) {
        auto gather = [&](const at::Tensor& t, int64_t t0, const int64_t* off) {  // (T-1, B, nS) from column blocks
          std::vector<at::Tensor> parts;
          for (int g : {0, 1, 3}) if (off[g] >= 0) parts.push_back(t.narrow(0, t0, Tn - 1).narrow(2, off[g], H));
          return at::cat(parts, -1).reshape({-1, nS});
        };
        const at::Tensor dus = out[7].numel() ? out[7].narrow(0, 1, Tn - 1).reshape({-1, nS}) : gather(dXG, 1, cf.zoff);
        dparams[P_WEIGHT_GG] = reduce_mm(dus.t(), gather(buffers[B_G], 0, cf.aoff), cf);
      } else {
        dparams[P_WEIGHT_GG] = at::zeros({nS, nS}, opt);
      }
    }
  }
  for (int k = 0; k < N_PARAMS; ++k) dparams[k] = to_dtype(dparams[k], params_in[k].scalar_type());
  at::Tensor dc0 = lstm ? to_dtype(out[5], c0_in.numel() ? c0_in.scalar_type() : io) : at::empty({0}, y_in.options());
  return {dxg_io, to_dtype(dwhh, whh_in.scalar_type()), to_dtype(out[4], h0_in.scalar_type()), dc0,
          dparams};
}

// lstmkit::recurrence_backward (CPU). Empty dy / dh_n / dc_n mean zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> recurrence_backward(
    const at::Tensor& dy_in, const at::Tensor& dhn_in, const at::Tensor& dcn_in, const at::Tensor& y_in,
    const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& whh_in, const at::Tensor& lengths,
    const std::vector<at::Tensor>& params_in, const std::vector<at::Tensor>& buffers, int64_t flags,
    const std::vector<int64_t>& mlp_layout, double clip, double zoneout_c, double zoneout_h, int64_t H, int64_t P) {
  return backward_call(dy_in, dhn_in, dcn_in, y_in, h0_in, c0_in, whh_in, lengths, params_in, buffers, flags,
                       mlp_layout, clip, zoneout_c, zoneout_h, H, P, {});
}

// The ABI this extension was compiled with (a test compares it with lstmkit/kernels/abi.py).
py::dict compiled_abi() {
  py::dict d;
  py::list flags, params, buffers;
  for (const char* n : FLAG_NAMES) flags.append(n);
  for (const char* n : PARAM_NAMES) params.append(n);
  for (const char* n : BUFFER_NAMES) buffers.append(n);
  d["flags"] = flags; d["params"] = params; d["buffers"] = buffers;
  py::list bits, removed;
  for (int k = 0; k < N_FLAGS; ++k) bits.append(FLAG_BITS[k]);
  for (int g = 0; g < 4; ++g) removed.append(GATE_REMOVED[g]);
  d["flag_bits"] = bits;
  py::list no_grad;
  for (int k = 0; k < N_PARAMS; ++k) no_grad.append(PARAM_NO_GRAD[k]);
  d["param_no_grad"] = no_grad;
  d["gate_removed"] = removed;
  d["ln_eps"] = LN_EPS;
  d["gemm_tile"] = py::make_tuple(Packed<float>::MR, Packed<float>::NV * Packed<float>::VL);
  return d;
}

// The index of the first tensor that holds a NaN or an infinity (-1: none): the finite checks of
// a call's input and state in one call (lstmkit/nn.py), floating CPU tensors of any layout.
// v - v is 0 for a finite v and NaN otherwise; the lanes' sums stay 0 until one is not.
template <typename scalar_t>
static bool all_finite(const scalar_t* p, int64_t n) {
  bool bad = false;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    using V = Vectorized<scalar_t>;
    constexpr int64_t W = V::size();
    V acc0(scalar_t(0)), acc1(scalar_t(0)), acc2(scalar_t(0)), acc3(scalar_t(0));  // v - v: 0, or NaN
    int64_t j = 0;                                                              // for a NaN or inf
    for (; j + 4 * W <= n; j += 4 * W) {  // four chains: the adds' latency, not one chain, bounds it
      const V v0 = V::loadu(p + j), v1 = V::loadu(p + j + W), v2 = V::loadu(p + j + 2 * W),
              v3 = V::loadu(p + j + 3 * W);
      acc0 = acc0 + (v0 - v0); acc1 = acc1 + (v1 - v1); acc2 = acc2 + (v2 - v2); acc3 = acc3 + (v3 - v3);
    }
    for (; j + W <= n; j += W) {
      const V v = V::loadu(p + j);
      acc0 = acc0 + (v - v);
    }
    const V acc = (acc0 + acc1) + (acc2 + acc3);
    scalar_t lanes[V::size()];
    acc.store(lanes);
    for (int k = 0; k < V::size(); ++k) bad = bad || !std::isfinite(lanes[k]);
    for (; j < n; ++j) bad = bad || !std::isfinite(p[j]);
  } else {  // bfloat16 / float16: non-finite iff every exponent bit is set (a loop that vectorises)
    constexpr uint16_t e = std::is_same_v<scalar_t, at::BFloat16> ? 0x7F80 : 0x7C00;
    const uint16_t* u = reinterpret_cast<const uint16_t*>(p);
    for (int64_t j0 = 0; j0 < n && !bad; j0 += 4096) {
      uint16_t any = 0;
      const int64_t j1 = std::min<int64_t>(n, j0 + 4096);
      for (int64_t j = j0; j < j1; ++j) any |= (uint16_t)(((u[j] & e) == e) ? 1 : 0);
      bad = any != 0;
    }
  }
  return !bad;
}

int64_t first_nonfinite(const std::vector<at::Tensor>& tensors) {
  // a large tensor is split among torch's threads: reading it from memory, not the adds, bounds the
  // check, and each core brings its own share of the bandwidth (one thread below the grain)
  constexpr int64_t kGrain = 1 << 17;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor t = tensors[i].contiguous();
    const int64_t n = t.numel();
    std::atomic<bool> bad{false};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "lstmkit_finite", [&] {
      const scalar_t* p = t.data_ptr<scalar_t>();
      if (n <= kGrain) {  // a step's input and state: no thread pool to ask
        if (!all_finite(p, n)) bad.store(true, std::memory_order_relaxed);
        return;
      }
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        if (!all_finite(p + begin, end - begin)) bad.store(true, std::memory_order_relaxed);
      });
    });
    if (bad.load()) return (int64_t)i;
  }
  return -1;
}

// A prepared step's checks in one call (lstmkit/kernels/fused.py, PreparedStep.run): true when
// this thread runs plain eager CPU code — no autocast on the CPU, no functorch transform, no
// TorchScript trace (torch.is_autocast_enabled("cpu"), torch._C._functorch.peek_interpreter_stack(),
// torch.jit.is_tracing(): each would make the operator road behave otherwise) — and, with
// check_finite, no NaN or inf in `tensors` (first_nonfinite). Dynamo's tracing is Python's to see.
// A functorch transform is active exactly while its front dispatch key is in this thread's
// included set (functorch adds it with the first interpreter it pushes, removes it with the last).
bool step_ready(const std::vector<at::Tensor>& tensors, bool check_finite) {
  if (at::autocast::is_autocast_enabled(at::kCPU) ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      torch::jit::tracer::isTracing())
    return false;
  return !check_finite || first_nonfinite(tensors) == -1;
}

// test hook: the vectorised activations on a contiguous tensor (0 exp, 1 tanh, 2 sigmoid)
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
      V r = which == 0 ? vexp<scalar_t>(v) : which == 1 ? vtanh<scalar_t>(v) : sigm<scalar_t>(v);
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

// The forward with the input projection in the loop, for forward_infer and ProjectedRun (with
// `save`: the buffers too). The projection's bias b_ih + b_hh is summed by the kernel (no extra op
// per call); layernorm adds the summed bias after the norm: set here as params[P_BIAS].
static std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> projected_forward(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& b_ih, const at::Tensor& b_hh,
    const at::Tensor& whh, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& lengths,
    std::vector<at::Tensor>& params, int64_t flags, const std::vector<int64_t>& mlp_layout, double clip,
    double zoneout_c, double zoneout_h, int64_t H, int64_t P, bool save, const std::vector<at::Tensor>& mlp_each = {},
    const Frozen* frozen = nullptr) {
  TORCH_CHECK((int64_t)params.size() == N_PARAMS, "lstmkit: expected ", (int)N_PARAMS, " params");
  at::Tensor bias = b_ih.numel() ? b_ih : at::Tensor(), bias2 = b_hh.numel() ? b_hh : at::Tensor();
  if ((flags & F_LAYERNORM) && bias.defined()) {
    params[P_BIAS] = b_ih + b_hh;  // (R,)
    bias = bias2 = at::Tensor();
  }
  return forward_call(at::Tensor(), whh, h0, c0, lengths, params, flags, mlp_layout, clip, zoneout_c, zoneout_h, H,
                      P, save, save, x, w_ih, bias, bias2, mlp_each, frozen);
}

// Inference (nothing needs a gradient): the input projection and the recurrence in one call, the
// projection inside the loop (forward_impl's InputProjection), for a whole sequence or one step
// (LSTMCell, layer.step, streaming). Taken by FusedCPUKernel.run (lstmkit/kernels/fused.py); the
// projection is the operator's contract for xg (lstmkit/kernels/ops.py): x W_ih^T + b_ih + b_hh,
// or for layernorm the raw x W_ih^T with the summed bias as params[P_BIAS]; tests/test_step.py
// and tests/test_kernels.py check every variant against the reference kernel. x (T, B, I),
// h0 (B, H_out), c0 (B, H) | (0,); returns y (T, B, H_out), h_n and c_n (B, H) | (0,).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_infer(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& b_ih, const at::Tensor& b_hh,
    const at::Tensor& whh, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& lengths,
    std::vector<at::Tensor> params, int64_t flags, const std::vector<int64_t>& mlp_layout, double clip,
    double zoneout_c, double zoneout_h, int64_t H, int64_t P) {
  auto out = projected_forward(x, w_ih, b_ih, b_hh, whh, h0, c0, lengths, params, flags, mlp_layout, clip,
                               zoneout_c, zoneout_h, H, P, false);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

// ------------------------------------------------------------------ one step with gradients
// A step (or a short run) with gradients, for LSTMCell and layer.step in training: the input
// projection and the recurrence as ONE autograd node built here, so a step costs one Python
// call, not the operator road's Python autograd.Function and its Python backward (about 70 us
// a step at B = 1, H = 32; the whole step takes less). Taken by PreparedStep's layers
// (PreparedLayer; lstmkit/kernels/fused.py) for plain eager tensors only; compile, export, functorch and
// autocast take the operator. Same gradient: dxg from recurrence_backward, then the
// projection's dx = dxg W_ih, dW_ih = dxg^T x, db_ih = db_hh = sum dxg (layernorm: the summed
// bias's gradient from the kernel).

static std::string no_double_backward = "lstmkit: the fused kernels' backward is not differentiable";

// Set once at load from lstmkit/kernels/ops.py (the message the operator road raises).
void set_no_double_backward(const std::string& message) { no_double_backward = message; }

// Gradients computed under create_graph=True pass through this node: identity forward, and a
// second-order gradient through it raises (the operator road's DelayedError). `anchors` are the
// saved inputs that require grad, connecting it to the graph such a gradient would traverse.
struct NotTwiceDifferentiable : public torch::autograd::Function<NotTwiceDifferentiable> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext*, at::TensorList grads,
                                                at::TensorList anchors) {
    return torch::autograd::variable_list(grads.begin(), grads.end());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list) {
    TORCH_CHECK(false, no_double_backward);
  }
};

// The S cell states (N, H) each, side by side as the kernel reads them: (N, S·H). Contiguous
// parts of one dtype on the CPU are copied row block by row block into one allocation (at::cat's
// dispatch and checks cost more than these copies at a step's sizes); undefined parts (a
// gradient autograd did not materialise) are zeros; anything else is copied through a view.
// Called where no autograd graph is built (inside the node, or without gradients).
static at::Tensor join_cells(const std::vector<at::Tensor>& parts, const at::TensorOptions& like) {
  const at::Tensor* first = nullptr;
  for (const auto& c : parts) if (c.defined()) { first = &c; break; }
  TORCH_CHECK(first && first->dim() == 2, "lstmkit: cell states must be (N, H)");
  const int64_t N = first->size(0), Hc = first->size(1), S = (int64_t)parts.size();
  at::Tensor joined = at::empty({N, S * Hc}, like.dtype(first->scalar_type()));
  const size_t row = (size_t)Hc * joined.element_size();
  char* dst = static_cast<char*>(joined.data_ptr());
  for (int64_t k = 0; k < S; ++k) {
    const at::Tensor& c = parts[k];
    if (!c.defined()) {
      for (int64_t n = 0; n < N; ++n) std::memset(dst + (n * S + k) * row, 0, row);
    } else if (c.is_contiguous() && c.sizes() == first->sizes() && c.scalar_type() == joined.scalar_type() &&
               c.device().is_cpu()) {
      const char* src = static_cast<const char*>(c.data_ptr());
      for (int64_t n = 0; n < N; ++n) std::memcpy(dst + (n * S + k) * row, src + n * row, row);
    } else {
      joined.narrow(1, k * Hc, Hc).copy_(c);
    }
  }
  return joined;
}

// (N, S·H) -> the S cell states (N, H): views (copy false), or fresh tensors (copy true: what a
// node returns, so that in-place changes of a returned state stay allowed).
static std::vector<at::Tensor> split_cells(const at::Tensor& joined, int64_t S, bool copy) {
  std::vector<at::Tensor> out;
  const int64_t N = joined.size(0), Hc = joined.size(1) / S;
  for (int64_t k = 0; k < S; ++k) {
    at::Tensor part = joined.as_strided({N, Hc}, joined.strides(), joined.storage_offset() + k * Hc * joined.stride(1));
    out.push_back(copy ? part.clone(at::MemoryFormat::Contiguous) : part);
  }
  return out;
}

// A step's and a one-layer stack's axes (forward_step, both ways): x (N, I) is one step of (1, N, I), and y
// comes back (N, H_out); a state (1, N, ·) is read as (N, ·), and h_n, c_n come back (1, N, ·).
// Added and dropped inside the node — views outside it would add autograd nodes on every step
// (a select's backward allocates and fills zeros). Outputs are _unsafe_view: the kernel's fresh
// tensors reshaped, not views in autograd's sense, so that in place changes to them are allowed.
struct StepAxes {
  bool one_step, layered;
  at::Tensor run(const at::Tensor& x) const { return one_step ? x.unsqueeze(0) : x; }       // (T, N, I)
  at::Tensor state(const at::Tensor& s) const { return layered && s.dim() == 3 ? s.select(0, 0) : s; }  // (N, ·)
  at::Tensor y_out(const at::Tensor& y) const {                                              // (T, N, ·) -> caller's
    return one_step ? at::_unsafe_view(y, {y.size(1), y.size(2)}) : y;
  }
  at::Tensor state_out(const at::Tensor& s) const {                                          // (N, ·) -> caller's
    return layered && s.dim() == 2 ? at::_unsafe_view(s, {1, s.size(0), s.size(1)}) : s;
  }
  at::Tensor state_grad(const at::Tensor& g) const { return layered && g.dim() == 2 ? g.unsqueeze(0) : g; }
};

struct ProjectedRun : public torch::autograd::Function<ProjectedRun> {
  // x (T, B, I) or one step's (B, I), w_ih (R, I), b_ih / b_hh (R,) | (0,), whh, h0 (B, H_out) or a
  // one-layer stack's (1, B, H_out), cells: the S cell states (B, H) each (S = 1: also (1, B, H), or
  // the RNN's (0,)), joined here (no cat / split nodes around the node), params in abi.PARAMS
  // order (mlp's slot empty when mlp_in, the deep gates' tensors, is given: read in place, and the
  // kernel's flat gradient handed back to each) -> y (T, B, H_out) or (B, H_out), h_n as h0, then
  // the S cell states as given (StepAxes; S > 1: fresh (B, H) tensors)
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w_ih, const at::Tensor& b_ih,
      const at::Tensor& b_hh, const at::Tensor& whh, const at::Tensor& h0_in, at::TensorList cells,
      at::TensorList params_in, at::TensorList mlp_in, int64_t flags, const std::vector<int64_t>& mlp_layout,
      double clip, double zoneout_c, double zoneout_h, int64_t H, int64_t P) {
    const StepAxes axes{x_in.dim() == 2, h0_in.dim() == 3};
    const int64_t S = (int64_t)cells.size();
    // (B, S*H) | (0,) or (1, B, H): one state is saved as given (autograd checks its version)
    const at::Tensor c0_in = S == 1 ? cells[0] : join_cells(cells.vec(), x_in.options());
    std::vector<at::Tensor> params(params_in.begin(), params_in.end());
    const std::vector<at::Tensor> mlp(mlp_in.begin(), mlp_in.end());
    auto [y, h_n, c_n, buffers] = projected_forward(axes.run(x_in), w_ih, b_ih, b_hh, whh, axes.state(h0_in),
                                                    axes.state(c0_in), at::Tensor(), params, flags, mlp_layout, clip,
                                                    zoneout_c, zoneout_h, H, P, true, mlp);
    TORCH_CHECK((int64_t)buffers.size() == N_BUFFERS, "lstmkit forward_step: expected ", (int)N_BUFFERS, " buffers");
    const at::Tensor y_out = axes.y_out(y);
    // the inputs and the output y as given (their versions checked by autograd), then params,
    // buffers, the deep gates' tensors
    std::vector<at::Tensor> saved{x_in, w_ih, b_ih, whh, h0_in, c0_in, y_out};
    saved.insert(saved.end(), params.begin(), params.end());
    saved.insert(saved.end(), buffers.begin(), buffers.end());
    saved.insert(saved.end(), mlp.begin(), mlp.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["flags"] = flags;
    ctx->saved_data["mlp"] = mlp_layout;
    ctx->saved_data["scalars"] = std::vector<double>{clip, zoneout_c, zoneout_h};
    ctx->saved_data["sizes"] = std::vector<int64_t>{H, P};
    ctx->saved_data["axes"] = std::vector<bool>{axes.one_step, axes.layered};
    ctx->saved_data["states"] = S;
    ctx->set_materialize_grads(false);
    torch::autograd::variable_list out{y_out, axes.state_out(h_n)};
    if (S == 1) out.push_back(axes.state_out(c_n));
    else for (auto& c : split_cells(c_n, S, true)) out.push_back(c);
    return out;
  }

  // grads: dy, dh_n, dc_n (undefined: zero) -> one gradient per forward argument
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto axes_saved = ctx->saved_data["axes"].toBoolList();
    const StepAxes axes{axes_saved.get(0), axes_saved.get(1)};
    const at::Tensor &w_ih = saved[1], &b_ih = saved[2], &whh = saved[3];
    const at::Tensor x = axes.run(saved[0]), h0 = axes.state(saved[4]), c0 = axes.state(saved[5]),
                     y = axes.run(saved[6]);  // (T, B, I), (B, H_out), (B, S*H) | (0,), (T, B, H_out)
    const std::vector<at::Tensor> params(saved.begin() + 7, saved.begin() + 7 + N_PARAMS);
    const std::vector<at::Tensor> buffers(saved.begin() + 7 + N_PARAMS, saved.begin() + 7 + N_PARAMS + N_BUFFERS);
    const std::vector<at::Tensor> mlp_own(saved.begin() + 7 + N_PARAMS + N_BUFFERS, saved.end());
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const auto mlp = ctx->saved_data["mlp"].toIntVector();
    const auto sc = ctx->saved_data["scalars"].toDoubleVector();
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const bool ln = flags & F_LAYERNORM;
    const bool higher = at::GradMode::is_enabled();  // create_graph=True
    const int64_t S = ctx->saved_data["states"].toInt();
    auto given = [&](size_t k) {  // dy (T, B, H_out), dh_n (B, H_out), dc_n (B, S*H), or empty
      if (k == 2 && S > 1) {  // the S states' gradients joined (undefined ones: zeros)
        const std::vector<at::Tensor> parts(grads.begin() + 2, grads.begin() + 2 + S);
        bool any = false;
        for (const auto& g : parts) any = any || g.defined();
        return any ? join_cells(parts, y.options()) : at::empty({0}, y.options());
      }
      if (!grads[k].defined()) return at::empty({0}, y.options());
      return k == 0 ? axes.run(grads[k]) : axes.state(grads[k]);
    };
    const size_t M = mlp_own.size();
    // x, w_ih, b_ih, b_hh, whh, h0, the S cell states, params, the deep gates' tensors, then 7
    // non-tensor arguments
    const int64_t PAR = 6 + S;  // where params start in `out`
    torch::autograd::variable_list out(PAR + N_PARAMS + M + 7);
    {
      at::NoGradGuard no_grad;
      const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
      // dW_ih (R, I) and dW_hh (R, ·) in one allocation when both are wanted and are computed in
      // their own dtype: one step per call frees them together after autograd has added them to
      // .grad, and two fresh weight-sized buffers freed at once are what lets malloc give the
      // heap's top back to the system, page-faulting it in again on the next step.
      at::Tensor dwih_out, dwhh_out;
      const at::ScalarType wt = whh.scalar_type();
      if (ctx->needs_input_grad(1) && ctx->needs_input_grad(4) && w_ih.scalar_type() == wt &&
          x.scalar_type() == wt && y.scalar_type() == wt && (wt == at::kFloat || wt == at::kDouble)) {
        const at::Tensor flat = at::empty({w_ih.numel() + whh.numel()}, whh.options());
        dwih_out = flat.narrow(0, 0, w_ih.numel()).view(w_ih.sizes());
        dwhh_out = flat.narrow(0, w_ih.numel(), whh.numel()).view(whh.sizes());
      }
      auto [dxg, dwhh, dh0, dc0, dparams] = backward_call(
          given(0), given(1), given(2), y, h0, c0, whh, at::Tensor(), params, buffers, flags, mlp, sc[0], sc[1],
          sc[2], sizes[0], sizes[1], mlp_own, dwhh_out, /*views=*/true);
      const at::Tensor dxg2 = dxg.reshape({T * B, dxg.size(2)});  // (T*B, R)
      if (ctx->needs_input_grad(0)) out[0] = dxg2.mm(w_ih).view(saved[0].sizes());  // as x came: (T, B, I) | (B, I)
      if (dwih_out.defined()) out[1] = at::mm_out(dwih_out, dxg2.t(), x.reshape({T * B, I}));
      else if (ctx->needs_input_grad(1)) out[1] = dxg2.t().mm(x.reshape({T * B, I}));
      if (b_ih.numel()) {
        const at::Tensor db = ln ? dparams[P_BIAS] : dxg2.sum(0);  // (R,)
        out[2] = db;
        out[3] = db;
      }
      out[4] = dwhh;
      out[5] = axes.state_grad(dh0);
      if (c0.numel()) {
        if (S == 1) {
          out[6] = axes.state_grad(dc0);
        } else {
          const auto parts = split_cells(dc0, S, false);
          for (int64_t k = 0; k < S; ++k) out[6 + k] = parts[k];
        }
      }
      for (int k = 0; k < N_PARAMS; ++k)
        if (params[k].numel() && !PARAM_NO_GRAD[k] && !(ln && k == P_BIAS) && !(M && k == P_MLP))
          out[PAR + k] = dparams[k];
      int64_t off = 0;  // the flat gradient back to each deep-gate tensor, in order, in its shape
      for (size_t j = 0; j < M; ++j) {  // (one contiguous view each: as_strided, not narrow then view)
        const auto sizes_j = mlp_own[j].sizes();
        out[PAR + N_PARAMS + j] = dparams[P_MLP].as_strided(sizes_j, c10::contiguous_strides(sizes_j), off);
        off += mlp_own[j].numel();
      }
    }
    if (!higher) return out;
    std::vector<at::Tensor> defined, anchors;
    for (const auto& g : out) if (g.defined()) defined.push_back(g);
    for (const auto& t : saved) if (t.defined() && t.requires_grad()) anchors.push_back(t);
    for (const auto& g : grads) if (g.defined() && g.requires_grad()) anchors.push_back(g);
    if (anchors.empty()) return out;
    // (autograd counts a list's tensors as inputs only when passed as at::TensorList)
    auto wrapped = NotTwiceDifferentiable::apply(at::TensorList(defined), at::TensorList(anchors));
    size_t j = 0;
    for (auto& g : out) if (g.defined()) g = wrapped[j++];
    return out;
  }
};

// One step (or run) for PreparedLayer below: with gradients wanted (grad mode on and any input requires
// grad) the autograd node above, else forward_infer. Arguments and results as forward_infer's, but
// for `mlp`: the deep gates' tensors in abi.mlp_names order (empty without), params[P_MLP] empty;
// x may be one step's (N, I), then y is (N, H_out); the S cell states come as a list, (N, H) each
// (one state: also a one-layer stack's (1, N, ·), then h0 is too, and h_n and c_n come back so: the
// axes added and dropped here, not by Python calls around it) and go back as one.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_step(
    const at::Tensor& x_in, const at::Tensor& w_ih, const at::Tensor& b_ih, const at::Tensor& b_hh,
    const at::Tensor& whh, const at::Tensor& h0_in, const std::vector<at::Tensor>& cells,
    std::vector<at::Tensor> params, const std::vector<at::Tensor>& mlp, int64_t flags,
    const std::vector<int64_t>& mlp_layout, double clip, double zoneout_c, double zoneout_h, int64_t H, int64_t P,
    const Frozen* frozen = nullptr) {
  TORCH_CHECK((int64_t)params.size() == N_PARAMS, "lstmkit forward_step: expected ", (int)N_PARAMS, " params");
  TORCH_CHECK(!cells.empty(), "lstmkit prepared step: no cell state");
  const int64_t S = (int64_t)cells.size();
  bool grad = false;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor* t : {&x_in, &w_ih, &b_ih, &b_hh, &whh, &h0_in}) grad = grad || t->requires_grad();
    for (const auto& t : cells) grad = grad || t.requires_grad();
    for (const auto& t : params) grad = grad || t.requires_grad();
    for (const auto& t : mlp) grad = grad || t.requires_grad();
  }
  if (grad) {  // the node adds and drops the step's and the stack's axes, and joins the states, itself
    auto out = ProjectedRun::apply(x_in, w_ih, b_ih, b_hh, whh, h0_in, at::TensorList(cells), at::TensorList(params),
                                   at::TensorList(mlp), flags, mlp_layout, clip, zoneout_c, zoneout_h, H, P);
    return {out[0], out[1], std::vector<at::Tensor>(out.begin() + 2, out.end())};
  }
  const StepAxes axes{x_in.dim() == 2, h0_in.dim() == 3};
  const at::Tensor c0 = S == 1 ? axes.state(cells[0]) : join_cells(cells, x_in.options());  // (N, S·H)
  auto [y, h_n, c_n, buffers] = projected_forward(axes.run(x_in), w_ih, b_ih, b_hh, whh, axes.state(h0_in), c0,
                                                  at::Tensor(), params, flags, mlp_layout, clip, zoneout_c, zoneout_h,
                                                  H, P, false, mlp, frozen);
  // inference: the S states as views of the kernel's one (N, S·H) tensor
  return {axes.y_out(y), axes.state_out(h_n),
          S == 1 ? std::vector<at::Tensor>{axes.state_out(c_n)} : split_cells(c_n, S, false)};
}

// A prepared layer (PreparedStep, lstmkit/kernels/fused.py): forward_step's arguments that stay the
// same from call to call — the layer's parameters (the module's own tensors, read in place on every
// call, so that in-place updates are seen), flags, mlp layout, scalars — held here once per call
// signature, so that a call converts its few tensors rather than some thirty arguments.
struct PreparedLayer {
  at::Tensor w_ih, b_ih, b_hh, whh;
  std::vector<at::Tensor> params, mlp;  // params: abi.PARAMS order, zoneout's slots empty; mlp: forward_step's
  int64_t flags;
  std::vector<int64_t> mlp_layout;
  double clip, zoneout_c, zoneout_h;
  int64_t H, P;
  bool frozen = false;  // lstmkit.freeze: W_hh and W_ih packed once for inference (frozen_panels)
  mutable std::shared_ptr<const Frozen> panels;  // the packing (atomic_load / atomic_store: calls run GIL-free)

  // A frozen layer's panels, packed again when W_ih or W_hh changed since (WeightStamp).
  std::shared_ptr<const Frozen> frozen_panels() const {
    auto cur = std::atomic_load(&panels);
    if (cur && cur->ih.same(w_ih) && cur->hh.same(whh)) return cur;
    const at::ScalarType ct = compute_type(w_ih.scalar_type());
    const MlpLayout mlp_(mlp_layout, H);
    Cfg cf(flags, clip, zoneout_c, zoneout_h, H, P, mlp_);
    cf.set_heads(whh.size(1));
    cf.bf16_gemm = bf16_products(w_ih.scalar_type());
    auto fresh = std::make_shared<Frozen>(Frozen{ct, WeightStamp(w_ih), WeightStamp(whh), nullptr});
    AT_DISPATCH_FLOATING_TYPES(ct, "lstmkit_freeze", [&] {
      fresh->panels = std::make_shared<FrozenPanels<scalar_t>>(to_compute(whh, ct).contiguous(),
                                                               to_compute(w_ih, ct).contiguous(), cf);
    });
    std::shared_ptr<const Frozen> done = fresh;
    std::atomic_store(&panels, done);
    return done;
  }

  // x (N, I) or (T, N, I); h (N, H_out) or a one-layer stack's (1, N, H_out); cells: the S cell
  // states, (N, H) each (one state: also a one-layer stack's (1, N, H)); keep_c / keep_h: zoneout's
  // masks of this call (training), or None. Returns y, h_n, then the S cell states.
  std::vector<at::Tensor> call(const at::Tensor& x, const at::Tensor& h, const std::vector<at::Tensor>& cells,
                               const std::optional<at::Tensor>& keep_c,
                               const std::optional<at::Tensor>& keep_h) const {
    std::vector<at::Tensor> p = params;
    if (keep_c.has_value()) p[P_KEEP_C] = *keep_c;
    if (keep_h.has_value()) p[P_KEEP_H] = *keep_h;
    // (weights made under torch.inference_mode() have no version counter: read as unfrozen)
    const bool countable = !w_ih.is_inference() && !whh.is_inference();
    const std::shared_ptr<const Frozen> fz = frozen && countable ? frozen_panels() : nullptr;
    auto [y, h_n, c_n] = forward_step(x, w_ih, b_ih, b_hh, whh, h, cells, std::move(p), mlp, flags, mlp_layout, clip,
                                      zoneout_c, zoneout_h, H, P, fz.get());
    std::vector<at::Tensor> out{y, h_n};
    out.insert(out.end(), c_n.begin(), c_n.end());
    return out;
  }
};

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
                       std::vector<int64_t> mlp_layout, double clip, double zoneout_c, double zoneout_h, int64_t H,
                       int64_t P, bool frozen) {
        TORCH_CHECK((int64_t)params.size() == lk::N_PARAMS, "lstmkit PreparedLayer: expected ", (int)lk::N_PARAMS,
                    " params");
        return lk::PreparedLayer{w_ih, b_ih, b_hh, whh, std::move(params), std::move(mlp), flags,
                                 std::move(mlp_layout), clip, zoneout_c, zoneout_h, H, P, frozen};
      }), py::arg("w_ih"), py::arg("b_ih"), py::arg("b_hh"), py::arg("whh"), py::arg("params"), py::arg("mlp"),
          py::arg("flags"), py::arg("mlp_layout"), py::arg("clip"), py::arg("zoneout_c"), py::arg("zoneout_h"),
          py::arg("H"), py::arg("P"), py::arg("frozen") = false)
      .def_property_readonly("packed", [](const lk::PreparedLayer& l) { return std::atomic_load(&l.panels) != nullptr; },
                             "a frozen layer: whether its weights are packed (after its first call)")
      .def("__call__", &lk::PreparedLayer::call, py::arg("x"), py::arg("h"), py::arg("cells"),
           py::arg("keep_c") = py::none(), py::arg("keep_h") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("set_no_double_backward", &lk::set_no_double_backward, "the error a second-order gradient raises");
  m.def("first_nonfinite", &lk::first_nonfinite, "index of the first tensor with a NaN or inf, -1 if none",
        py::call_guard<py::gil_scoped_release>());
  m.def("step_ready", &lk::step_ready,
        "plain eager CPU mode (no autocast, functorch transform or trace) and, if asked, every tensor finite",
        py::call_guard<py::gil_scoped_release>());
  m.def("bf16_gemm", &lk::bf16_gemm_available,
        "whether bfloat16 layers' per-step products run in bfloat16 on AMX tiles (else in float32)");
  m.def("abi", &lk::compiled_abi, "the variant ABI compiled in (flags, parameter and buffer order)");
  m.def("_act_test", &lk::act_test, "test hook: vectorised exp/tanh/sigmoid");
  m.def("_mlp_layout_test", &lk::mlp_layout_test, "test hook: an mlp layout as the kernel decodes it");
}
