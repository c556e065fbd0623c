// The CPU entry points of the lstmkit::recurrence operators and of the prepared step's node:
// dtype handling (16-bit layers compute in float32), lengths, the arguments' shape checks, then
// forward_impl (forward.h) or backward_impl (backward.h), and the backward's after-loop
// reductions (dW_hh, dW_hr, dW_gg: large GEMMs over all T·B rows). What the kernel computes and
// keeps for backward, per variant: recurrence.cpp's opening comment.
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <memory>
#include <tuple>
#include <vector>
#include "backward.h"  // backward_impl
#include "cell_config.h"  // Cfg, AccLayout, MlpLayout, accumulate_dwhh, reduce_mm
#include "forward.h"  // forward_impl, FrozenPanels
#include "gemm.h"  // bf16_products
#include "lstmkit_abi.h"  // generated from lstmkit/kernels/abi.py: flags, parameter and buffer order

namespace lk {

using namespace lk::abi;

inline std::vector<int64_t> lengths_vec(const at::Tensor& lengths, int64_t B, int64_t Tn) {
  std::vector<int64_t> len(B, Tn);
  if (lengths.defined() && lengths.numel() > 0) {
    TORCH_CHECK(lengths.numel() == B, "lstmkit recurrence: lengths must have B entries");
    auto l = lengths.resolve_neg().to(at::kLong).contiguous();  // (a negative view: its values, not its memory)
    const int64_t* lp = l.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) len[b] = std::max<int64_t>(0, std::min<int64_t>(lp[b], Tn));
  }
  return len;
}

// bfloat16 / float16 layers: parameters, inputs and outputs stay in their dtype; the recurrence
// computes in float32 (GEMM accumulation, gates, cell state) and keeps its buffers in float32.
inline at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}
// An absent parameter's placeholder, an empty 1-D tensor, is left as it is; a state, input or
// output without rows (B = 0: (0, H), (T, 0, I)) is converted as any other.
inline bool placeholder(const at::Tensor& t) { return t.numel() == 0 && t.dim() <= 1; }
// A tensor as the kernels read it: in the compute dtype, without torch's lazy negation bit (a
// negative view, e.g. x.conj().imag or _neg_view(), is its memory negated: read raw, its values
// would come out with the opposite sign), and with memory (torch's ZeroTensor, e.g. the gradient
// that sgn()'s backward passes, has none: zeros of its own).
inline at::Tensor to_compute(const at::Tensor& t, at::ScalarType ct) {
  if (!t.defined() || placeholder(t) || !t.is_floating_point()) return t;
  if (t._is_zerotensor()) return at::zeros(t.sizes(), t.options().dtype(ct));
  const at::Tensor plain = t.is_neg() ? t.resolve_neg() : t;
  return plain.scalar_type() != ct ? plain.to(ct) : plain;
}
inline at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dt) {
  return (t.defined() && !placeholder(t) && t.scalar_type() != dt) ? t.to(dt) : t;
}
inline std::vector<at::Tensor> to_compute(const std::vector<at::Tensor>& ts, at::ScalarType ct) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(to_compute(t, ct).contiguous());
  return out;
}

// The backward's tensors against the forward's call (T steps, B rows): each gradient given is
// shaped as its output, h0 / c0 as the forward took them, and every buffer the forward keeps for
// this variant (kept_widths) is there — one made without save=True is refused, not read.
inline void check_backward_inputs(const Cfg& cf, const MlpLayout& mlp, int64_t Tn, int64_t B, const at::Tensor& dy,
                                  const at::Tensor& dhn, const at::Tensor& dcn, const at::Tensor& h0,
                                  const at::Tensor& c0, const std::vector<at::Tensor>& buffers) {
  auto shaped = [](const at::Tensor& t, std::initializer_list<int64_t> want) {
    return t.sizes().equals(want);
  };
  auto given = [](const at::Tensor& t) { return t.defined() && t.numel() > 0; };
  const char* op = "lstmkit::recurrence_backward: ";
  TORCH_CHECK(!given(dy) || shaped(dy, {Tn, B, cf.Hout}), op, "dy must be (T, B, H_out) = (", Tn, ", ", B, ", ",
              cf.Hout, "), got ", dy.sizes());
  TORCH_CHECK(!given(dhn) || shaped(dhn, {B, cf.Hout}), op, "dh_n must be (B, H_out) = (", B, ", ", cf.Hout,
              "), got ", dhn.sizes());
  TORCH_CHECK(cf.rnn || !given(dcn) || shaped(dcn, {B, cf.SH}), op, "dc_n must be (B, S·H) = (", B, ", ", cf.SH,
              "), got ", dcn.sizes());
  TORCH_CHECK(shaped(h0, {B, cf.Hout}), op, "h0 must be (B, H_out) = (", B, ", ", cf.Hout, "), got ", h0.sizes());
  TORCH_CHECK(cf.rnn || !given(c0) || shaped(c0, {B, cf.SH}), op, "c0 must be (B, S·H) = (", B, ", ", cf.SH,
              "), got ", c0.sizes());
  const std::vector<int64_t> widths = kept_widths(cf, mlp);
  for (int k = 0; k < N_BUFFERS; ++k)
    TORCH_CHECK(widths[k] == 0 || (buffers[k].defined() && shaped(buffers[k], {Tn, B, widths[k]})), op,
                "buffer ", BUFFER_NAMES[k], " must be (T, B, ", widths[k], ") = what the forward keeps with save=True, "
                "got ", buffers[k].defined() ? buffers[k].sizes() : at::IntArrayRef{});
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

// The input projected inside the loop (inference: forward_impl's InputProjection reads it), as
// given: x (T, B, I), W_ih (R, I), the biases b_ih and b_hh (R,), each undefined or empty if none.
struct LoopInput {
  at::Tensor x, w_ih, bias, bias2;
};

// The forward. loop.x defined: inference with the input projection in the loop (xg_in is ignored;
// xg_t = x_t W_ih^T + bias + bias2); without buffers_out it returns no buffers.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_call(
    const at::Tensor& xg_in, const at::Tensor& whh_in, const at::Tensor& h0_in, const at::Tensor& c0_in,
    const at::Tensor& lengths, const std::vector<at::Tensor>& params_in, const Variant& v, bool save,
    bool buffers_out, const LoopInput& loop = {}, const std::vector<at::Tensor>& mlp_each = {},
    const Frozen* frozen = nullptr, bool c0_scratch = false) {
  const MlpLayout mlp = v.layout();
  Cfg cf(v, mlp);
  TORCH_CHECK((int64_t)params_in.size() == N_PARAMS, "lstmkit::recurrence: expected ", (int)N_PARAMS,
              " params, got ", params_in.size());
  const at::Tensor &x_in = loop.x, &w_ih_in = loop.w_ih, &bias_in = loop.bias, &bias2_in = loop.bias2;
  const bool in_loop = x_in.defined();
  TORCH_CHECK(in_loop || (xg_in.dim() == 3 && xg_in.size(2) == cf.R),
              "lstmkit::recurrence: xg must be (T, B, R=", cf.R, ")");
  TORCH_CHECK(!in_loop || (x_in.dim() == 3 && w_ih_in.dim() == 2 && w_ih_in.size(0) == cf.R &&
                           w_ih_in.size(1) == x_in.size(2)), "lstmkit forward_infer: x (T, B, I), W_ih (R=", cf.R,
              ", I)");
  const at::Tensor& sized = in_loop ? x_in : xg_in;  // (T, B, ·)
  check_params(cf, whh_in, params_in, sized.size(0), sized.size(1));
  TORCH_CHECK(h0_in.dim() == 2 && h0_in.size(0) == sized.size(1) && h0_in.size(1) == cf.Hout,
              "lstmkit::recurrence: h0 must be (B = ", sized.size(1), ", H_out = ", cf.Hout, "), got ",
              h0_in.sizes());
  for (const at::Tensor* b : {&bias_in, &bias2_in})
    TORCH_CHECK(!in_loop || !b->defined() || b->numel() == 0 || (b->dim() == 1 && b->size(0) == cf.R),
                "lstmkit forward_infer: a bias must be (R = ", cf.R, "), got ", b->sizes());
  const at::ScalarType io = sized.scalar_type(), ct = compute_type(io);
  const auto params = to_compute(params_in, ct);
  const auto mlp_own = to_compute(mlp_each, ct);  // the deep gates' own tensors (else params[P_MLP], flat)
  const at::Tensor x = in_loop ? to_compute(x_in, ct).contiguous() : at::Tensor();
  const at::Tensor w_ih = in_loop ? to_compute(w_ih_in, ct) : at::Tensor();
  const at::Tensor bias = in_loop && bias_in.defined() && bias_in.numel() ? to_compute(bias_in, ct).contiguous()
                                                                           : at::Tensor();
  const at::Tensor bias2 = in_loop && bias2_in.defined() && bias2_in.numel() ? to_compute(bias2_in, ct).contiguous()
                                                                              : at::Tensor();
  // with the projection in the loop, or a 16-bit xg (widened row by row in the loop: xg_low), xg is
  // an empty (T, B, 0) tensor carrying the sizes and options
  const at::Tensor xg_low = !in_loop && ct != io ? xg_in.resolve_neg().contiguous() : at::Tensor();
  const at::Tensor xg = in_loop ? at::empty({x.size(0), x.size(1), 0}, x.options())
                        : xg_low.defined() ? at::empty({xg_in.size(0), xg_in.size(1), 0}, xg_in.options().dtype(ct))
                                           : to_compute(xg_in, ct).contiguous();
  const at::Tensor whh = to_compute(whh_in, ct);
  const at::Tensor h0 = to_compute(h0_in, ct).contiguous();
  at::Tensor c0 = to_compute(c0_in, ct);
  const int64_t Tn = xg.size(0), B = xg.size(1);
  cf.set_heads(whh.size(1));
  if (!cf.rnn && c0.numel() == 0) c0 = at::zeros({B, cf.SH}, xg.options());
  // the kernel may update c0 in place where the caller says it is scratch, or where it was made here
  // (zeros, or a 16-bit state widened)
  c0_scratch = c0_scratch || !c0.is_same(c0_in);
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
      out = forward_impl<scalar_t>(xg, whh, h0, c0, len, params, cf, mlp, mw, save, nt, buffers_out, &pin, {}, fp,
                                   c0_scratch);
    } else {
      out = forward_impl<scalar_t>(xg, whh, h0, c0, len, params, cf, mlp, mw, save, nt, buffers_out, nullptr, xg_low,
                                   nullptr, c0_scratch);
    }
  });
  // out = {Y, h_n, c_n, then the buffers in abi.BUFFERS order}
  std::vector<at::Tensor> buffers(out.begin() + 3, out.end());
  return {to_dtype(out[0], io), to_dtype(out[1], io), to_dtype(out[2], io), buffers};
}

// lstmkit::recurrence (CPU): see lstmkit/kernels/ops.py for the schema and the contract.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> recurrence_forward(
    const at::Tensor& xg, const at::Tensor& whh, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& lengths, const std::vector<at::Tensor>& params, int64_t flags,
    const std::vector<int64_t>& mlp_layout, const std::vector<double>& scalars, int64_t H, int64_t P,
    bool save) {
  auto out = forward_call(xg, whh, h0, c0, lengths, params, {flags, mlp_layout, scalars, H, P},
                          save, true);
  // the buffers not kept: empty tensors, one each (an operator's outputs are defined and do not alias)
  for (auto& b : std::get<3>(out))
    if (!b.defined()) b = at::empty({0}, std::get<0>(out).options());
  return out;
}

// The backward; mlp_each as forward_call's (the deep gates' own tensors, params[P_MLP] then empty);
// dwhh_out: where dW_hh is written ((R, H_out), or with heads (R, Dh), in whh's dtype, which must
// be the compute type), dmlp_out where the deep gates' flat gradient is (mlp.wtot,), either
// undefined: allocated; with `add` the gradients are added to their values, else overwrite them.
// views: the small parameters' gradients (peephole, layer norm) may be views of the kernel's one
// accumulator — for the autograd node; the operator copies them out, as its outputs must not alias
// each other.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> backward_call(
    const at::Tensor& dy_in, const at::Tensor& dhn_in, const at::Tensor& dcn_in, const at::Tensor& y_in,
    const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& whh_in, const at::Tensor& lengths,
    const std::vector<at::Tensor>& params_in, const std::vector<at::Tensor>& buffers, const Variant& v,
    const std::vector<at::Tensor>& mlp_each, const at::Tensor& dwhh_out = at::Tensor(), bool views = false,
    bool add = false, const at::Tensor& dmlp_out = at::Tensor()) {
  // a backward run inside an autocast region: autocast must not recast its products (at::mm into a
  // float32 gradient, the dtypes set by the forward)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const MlpLayout mlp = v.layout();
  Cfg cf(v, mlp);
  const int64_t H = cf.H, P = cf.P;
  TORCH_CHECK((int64_t)params_in.size() == N_PARAMS && (int64_t)buffers.size() == N_BUFFERS,
              "lstmkit::recurrence_backward: expected ", (int)N_PARAMS, " params and ", (int)N_BUFFERS, " buffers");
  TORCH_CHECK(y_in.dim() == 3 && y_in.size(2) == cf.Hout, "lstmkit::recurrence_backward: y must be (T, B, H_out = ",
              cf.Hout, "), got ", y_in.sizes());
  check_params(cf, whh_in, params_in, y_in.size(0), y_in.size(1));
  check_backward_inputs(cf, mlp, y_in.size(0), y_in.size(1), dy_in, dhn_in, dcn_in, h0_in, c0_in, buffers);
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
  // an undefined or empty gradient: zero
  auto given = [](const at::Tensor& g) { return g.defined() && g.numel() > 0; };
  at::Tensor dy = given(dy_in) ? to_compute(dy_in, ct) : at::zeros({1}, opt).expand({Tn, B, Hout});
  at::Tensor dhn = given(dhn_in) ? to_compute(dhn_in, ct) : at::zeros({B, Hout}, opt);
  at::Tensor dcn = !lstm ? at::Tensor() : given(dcn_in) ? to_compute(dcn_in, ct) : at::zeros({B, cf.SH}, opt);
  const auto len = lengths_vec(lengths, B, Tn);
  const int nt = choose_threads(B * R * cf.Dh, B);
  std::vector<at::Tensor> bufs;
  for (const auto& b : buffers) bufs.push_back(b.defined() ? b.contiguous() : b);  // undefined: not kept
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(ct, "lstmkit_bwd", [&] {
    const MlpWeights<scalar_t> mw(mlp, params[P_MLP], mlp_own);
    out = backward_impl<scalar_t>(bufs, y, h0, c0.contiguous(), whh, len, params, dy, dhn.contiguous(),
                                  lstm ? dcn.contiguous() : dcn, dwhh_out, dmlp_out, add, cf, mlp, mw, nt,
                                  io != ct ? io : at::ScalarType::Undefined);
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
    accumulate_dwhh(dwhh, !add, dXG[0], h0, cf);
    if (Tn > 1)
      accumulate_dwhh(dwhh, false, dXGr.narrow(0, 1, Tn - 1).reshape({-1, R}),
                      yr.narrow(0, 0, Tn - 1).reshape({-1, Hout}), cf);
  }
  // a parameter the variant has not: an empty tensor of its own for the operator (its outputs are
  // defined and do not alias), undefined for the autograd node (`views`)
  std::vector<at::Tensor> dparams(N_PARAMS);
  if (!views)
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
        const at::Tensor dus = out[7].defined() ? out[7].narrow(0, 1, Tn - 1).reshape({-1, nS}) : gather(dXG, 1, cf.zoff);
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
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> recurrence_backward(
    const at::Tensor& dy_in, const at::Tensor& dhn_in, const at::Tensor& dcn_in, const at::Tensor& y_in,
    const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& whh_in, const at::Tensor& lengths,
    const std::vector<at::Tensor>& params_in, const std::vector<at::Tensor>& buffers, int64_t flags,
    const std::vector<int64_t>& mlp_layout, const std::vector<double>& scalars, int64_t H, int64_t P) {
  return backward_call(dy_in, dhn_in, dcn_in, y_in, h0_in, c0_in, whh_in, lengths, params_in, buffers,
                       {flags, mlp_layout, scalars, H, P}, {});
}

// The forward with the input projection, for forward_infer and ProjectedRun (with `save`: the
// buffers too). Inside the loop: the projection's bias b_ih + b_hh is summed by the kernel (no extra
// op per call). With `apart` (a whole run with gradients, a prepared LSTM.forward: PreparedStep,
// fused.py) before it, op for op as the general path computes it (cell.input_projection with
// F.linear, i.e. at::linear, x W_ih^T + (b_ih + b_hh)), then the operator's forward on that xg —
// so that a prepared call computes what the general path does, bit for bit (ProjectedRun's
// backward mirrors its autograd). Layernorm adds the summed bias after the norm either way: set
// here as params[P_BIAS], and its projection is the raw product.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> projected_forward(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& b_ih, const at::Tensor& b_hh,
    const at::Tensor& whh, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& lengths,
    std::vector<at::Tensor>& params, const Variant& v, bool save, const std::vector<at::Tensor>& mlp_each = {},
    const Frozen* frozen = nullptr, bool apart = false, bool c0_scratch = false) {
  TORCH_CHECK((int64_t)params.size() == N_PARAMS, "lstmkit: expected ", (int)N_PARAMS, " params");
  at::Tensor bias = b_ih.numel() ? b_ih : at::Tensor(), bias2 = b_hh.numel() ? b_hh : at::Tensor();
  if ((v.flags & F_LAYERNORM) && bias.defined()) {
    params[P_BIAS] = b_ih + b_hh;  // (R,)
    bias = bias2 = at::Tensor();
  }
  if (apart) {
    TORCH_CHECK(x.dim() == 3 && !frozen, "lstmkit: the projection apart takes a run's x (T, B, I)");
    const int64_t T = x.size(0), B = x.size(1);
    const at::Tensor x2d = x.reshape({T * B, x.size(2)});
    const at::Tensor xg = bias.defined() ? at::linear(x2d, w_ih, bias + bias2) : at::linear(x2d, w_ih);  // (T·B, R)
    return forward_call(xg.view({T, B, w_ih.size(0)}), whh, h0, c0, lengths, params, v, save, save, {}, mlp_each);
  }
  return forward_call(at::Tensor(), whh, h0, c0, lengths, params, v, save, save, {x, w_ih, bias, bias2}, mlp_each,
                      frozen, c0_scratch);
}

// Inference (nothing needs a gradient): the input projection and the recurrence in one call, the
// projection inside the loop (forward_impl's InputProjection), for a whole sequence or one step
// (LSTMCell, layer.step, streaming). Taken by FusedCPUKernel.run (lstmkit/kernels/fused.py); the
// projection is the operator's contract for xg (lstmkit/kernels/ops.py): x W_ih^T + b_ih + b_hh,
// or for layernorm the raw x W_ih^T with the summed bias as params[P_BIAS]; tests/test_step.py
// and tests/test_kernels.py check every variant against the reference kernel. x (T, B, I),
// h0 (B, H_out), c0 (B, H) | (0,); returns y (T, B, H_out), h_n and c_n (B, H) | (0,).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_infer(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& b_ih, const at::Tensor& b_hh,
    const at::Tensor& whh, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& lengths,
    std::vector<at::Tensor> params, int64_t flags, const std::vector<int64_t>& mlp_layout,
    const std::vector<double>& scalars, int64_t H, int64_t P) {
  auto out = projected_forward(x, w_ih, b_ih, b_hh, whh, h0, c0, lengths, params,
                               {flags, mlp_layout, scalars, H, P}, false);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

}  // namespace lk
