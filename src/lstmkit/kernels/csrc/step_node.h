// The prepared step: one step (or a short run) of a layer as ONE call — LSTMCell and layer.step,
// with gradients as one autograd node (ProjectedRun), without as forward_infer — and the prepared
// layer that holds a call signature's constant arguments (PreparedLayer; its Python side is
// PreparedStep in lstmkit/kernels/fused.py).
#pragma once
#include <torch/extension.h>
#include <ATen/record_function.h>  // RECORD_FUNCTION
#include <c10/util/strides.h>  // contiguous_strides
#include <torch/csrc/autograd/graph_task.h>  // get_current_graph_task_id
#include <torch/csrc/autograd/node.h>  // get_current_node
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>
#include "entry.h"  // projected_forward, backward_call, Frozen

namespace lk {

using namespace lk::abi;

// ------------------------------------------------------------------ one step with gradients
// A step (or a short run) with gradients, for LSTMCell and layer.step in training: the input
// projection and the recurrence as ONE autograd node built here, so a step costs one Python
// call, not the operator road's Python autograd.Function and its Python backward (about 70 us
// a step at B = 1, H = 32; the whole step takes less). Taken by PreparedStep's layers
// (PreparedLayer; lstmkit/kernels/fused.py) for plain eager tensors only; compile, export, functorch and
// autocast take the operator. Same gradient: dxg from recurrence_backward, then the
// projection's dx = dxg W_ih, dW_ih = dxg^T x, db_ih = db_hh = sum dxg (layernorm: the summed
// bias's gradient from the kernel).

inline std::string no_double_backward = "lstmkit: the fused kernels' backward is not differentiable";
inline std::string no_batched_backward = "lstmkit: the fused kernels' backward takes no batched gradients";

// Set once at load from lstmkit/kernels/ops.py (the messages the operator road raises).
inline void set_messages(const std::string& double_backward, const std::string& batched_backward) {
  no_double_backward = double_backward;
  no_batched_backward = batched_backward;
}

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
// gradient autograd did not materialise) are zeros; anything else (a negative view, a ZeroTensor)
// is copied through a view.
// Called where no autograd graph is built (inside the node, or without gradients).
inline at::Tensor join_cells(const std::vector<at::Tensor>& parts, const at::TensorOptions& like) {
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
    } else if (c.is_contiguous() && !c.is_neg() && !c._is_zerotensor() && c.sizes() == first->sizes() &&
               c.scalar_type() == joined.scalar_type() && c.device().is_cpu()) {
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
inline std::vector<at::Tensor> split_cells(const at::Tensor& joined, int64_t S, bool copy) {
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

// The weight gradients of one backward pass, summed in place. Autograd adds the gradients that
// a pass's step nodes return for a weight in its input buffer before the weight's own node
// (AccumulateGrad, or whatever made the weight) reads the sum: at one step per call that is a
// fresh weight-sized product written, then added, on every step — at B = 1 most of a step. Here
// the first node of a pass to run returns fresh gradients (dW_ih, dW_hh, and the deep gates'
// tensors') and keeps weak references to them; each later node of the same pass adds its products
// into them (GEMMs with beta = 1) and returns no gradient for those weights. Sound while each kept
// gradient is exactly autograd's buffer, which is checked on every use: the same graph task (a
// later, nested or other thread's backward starts afresh), each kept gradient alive and held by
// one other reference (the buffer: where autograd could not add some other node's gradient of the
// weight into it in place it replaced it, and the kept one died), the same weights (compared by
// identity only), and nothing kept from a node with post hooks (which could hold on to it).
struct GradCarry : torch::CustomClassHolder {
  std::mutex mutex;
  int task = -1;
  std::vector<const c10::TensorImpl*> weights;  // identity only
  std::vector<c10::weak_intrusive_ptr<c10::TensorImpl>> grads;  // weights[k]'s gradient

  // The gradients a node of graph task `now` adds its gradients of `w` into, or none (the node
  // returns fresh ones).
  std::optional<std::vector<at::Tensor>> take(int now, const std::vector<at::Tensor>& w) {
    std::lock_guard<std::mutex> guard(mutex);
    if (now < 0 || now != task || w.size() != weights.size()) return std::nullopt;
    for (size_t k = 0; k < w.size(); ++k)
      if (w[k].unsafeGetTensorImpl() != weights[k]) return std::nullopt;
    std::vector<at::Tensor> held;
    for (const auto& g : grads) {
      auto p = g.lock();
      if (!p || p.use_count() != 2) return std::nullopt;  // ours and the buffer's
      held.emplace_back(std::move(p));
    }
    return held;
  }
  // Fresh gradients `g` of weights `w` returned by a node of graph task `now` (nothing kept from
  // a node with post hooks).
  void keep(int now, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& g) {
    const auto node = torch::autograd::get_current_node();
    const bool hooked = !node || !node->post_hooks().empty();
    std::lock_guard<std::mutex> guard(mutex);
    task = hooked ? -1 : now;
    weights.clear();
    grads.clear();
    for (const auto& t : w) weights.push_back(t.unsafeGetTensorImpl());
    for (const auto& t : g) grads.emplace_back(t.getIntrusivePtr());
  }
};

// What a ProjectedRun node's backward needs besides tensors, kept as one capsule in saved_data
// (one allocation per call, where an IValue per field cost one each).
struct NodeFacts : torch::CustomClassHolder {
  Variant v;
  StepAxes axes;
  int64_t S;       // the cell states given (the sLSTM's 3 joined in the node)
  bool widen16;    // a 16-bit layer's dX and dW_ih in float32 (fused.py's SIXTEEN_BIT_UNITS)
  c10::intrusive_ptr<GradCarry> carry;  // the prepared layer's, or null
  NodeFacts(const Variant& v_, const StepAxes& axes_, int64_t S_, bool widen16_, c10::intrusive_ptr<GradCarry> carry_)
      : v(v_), axes(axes_), S(S_), widen16(widen16_), carry(std::move(carry_)) {}
};

struct ProjectedRun : public torch::autograd::Function<ProjectedRun> {
  // x (T, B, I) or one step's (B, I), w_ih (R, I), b_ih / b_hh (R,) | (0,), whh, h0 (B, H_out) or a
  // one-layer stack's (1, B, H_out), cells: the S cell states (B, H) each (S = 1: also (1, B, H), or
  // the RNN's (0,)), joined here (no cat / split nodes around the node), params in abi.PARAMS
  // order (mlp's slot empty when mlp_in, the deep gates' tensors, is given: read in place, and the
  // kernel's flat gradient handed back to each), carry: the prepared layer's GradCarry (null: every
  // node returns its weight gradients) -> y (T, B, H_out) or (B, H_out), h_n as h0, then the S cell
  // states as given (StepAxes; S > 1: fresh (B, H) tensors)
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w_ih, const at::Tensor& b_ih,
      const at::Tensor& b_hh, const at::Tensor& whh, const at::Tensor& h0_in, at::TensorList cells,
      at::TensorList params_in, at::TensorList mlp_in, const Variant& v, const c10::intrusive_ptr<GradCarry>& carry,
      bool widen16) {
    const StepAxes axes{x_in.dim() == 2, h0_in.dim() == 3};
    // a whole run (a prepared LSTM.forward): the projection apart, as the general path computes it;
    // a step's (LSTMCell, layer.step) inside the loop
    const bool run = x_in.dim() == 3;
    const int64_t S = (int64_t)cells.size();
    // (B, S*H) | (0,) or (1, B, H): one state is saved as given (autograd checks its version)
    const at::Tensor c0_in = S == 1 ? cells[0] : join_cells(cells.vec(), x_in.options());
    std::vector<at::Tensor> params(params_in.begin(), params_in.end());
    const std::vector<at::Tensor> mlp(mlp_in.begin(), mlp_in.end());
    auto [y, h_n, c_n, buffers] = projected_forward(axes.run(x_in), w_ih, b_ih, b_hh, whh, axes.state(h0_in),
                                                    axes.state(c0_in), at::Tensor(), params, v, true, mlp, nullptr, run);
    TORCH_CHECK((int64_t)buffers.size() == N_BUFFERS, "lstmkit forward_step: expected ", (int)N_BUFFERS, " buffers");
    const at::Tensor y_out = axes.y_out(y);
    // the inputs and the output y as given (their versions checked by autograd), then params,
    // buffers, the deep gates' tensors
    std::vector<at::Tensor> saved{x_in, w_ih, b_ih, whh, h0_in, c0_in, y_out};
    saved.insert(saved.end(), params.begin(), params.end());
    saved.insert(saved.end(), buffers.begin(), buffers.end());
    saved.insert(saved.end(), mlp.begin(), mlp.end());
    // one made under torch.inference_mode() (a state or a frozen weight of a call whose other
    // parameters train), which autograd refuses to save: a copy of its values (ops.saveable)
    for (auto& t : saved)
      if (t.defined() && t.is_inference()) t = t.clone();
    ctx->save_for_backward(saved);
    ctx->saved_data["node"] = c10::IValue::make_capsule(c10::make_intrusive<NodeFacts>(v, axes, S, widen16, carry));
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
    const auto facts = c10::static_intrusive_pointer_cast<NodeFacts>(ctx->saved_data["node"].toCapsule());
    const StepAxes axes = facts->axes;
    const Variant& v = facts->v;
    const int64_t S = facts->S;
    const at::Tensor &w_ih = saved[1], &b_ih = saved[2], &whh = saved[3];
    const at::Tensor x = axes.run(saved[0]), h0 = axes.state(saved[4]), c0 = axes.state(saved[5]),
                     y = axes.run(saved[6]);  // (T, B, I), (B, H_out), (B, S*H) | (0,), (T, B, H_out)
    const std::vector<at::Tensor> params(saved.begin() + 7, saved.begin() + 7 + N_PARAMS);
    const std::vector<at::Tensor> buffers(saved.begin() + 7 + N_PARAMS, saved.begin() + 7 + N_PARAMS + N_BUFFERS);
    const std::vector<at::Tensor> mlp_own(saved.begin() + 7 + N_PARAMS + N_BUFFERS, saved.end());
    const bool ln = v.flags & F_LAYERNORM;
    const bool higher = at::GradMode::is_enabled();  // create_graph=True
    // batched incoming gradients (vmap over this backward, autograd.grad(is_grads_batched=True)):
    // the kernel reads plain memory
    const c10::DispatchKeySet batched({c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched});
    for (const auto& g : grads) TORCH_CHECK(!g.defined() || !g.key_set().has_any(batched), no_batched_backward);
    auto given = [&](size_t k) {  // dy (T, B, H_out), dh_n (B, H_out), dc_n (B, S*H), or empty
      if (k == 2 && S > 1) {  // the S states' gradients joined (undefined ones: zeros)
        const std::vector<at::Tensor> parts(grads.begin() + 2, grads.begin() + 2 + S);
        bool any = false;
        for (const auto& g : parts) any = any || g.defined();
        return any ? join_cells(parts, y.options()) : at::Tensor();
      }
      if (!grads[k].defined()) return at::Tensor();  // backward_call: zero
      return k == 0 ? axes.run(grads[k]) : axes.state(grads[k]);
    };
    const size_t M = mlp_own.size();
    // x, w_ih, b_ih, b_hh, whh, h0, the S cell states, params, the deep gates' tensors, then 3
    // non-tensor arguments (the variant, carry, widen16)
    const int64_t PAR = 6 + S;  // where params start in `out`
    torch::autograd::variable_list out(PAR + N_PARAMS + M + 3);
    {
      at::NoGradGuard no_grad;
      const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
      // dW_ih (R, I) and dW_hh (R, ·) — and the deep gates' tensors' gradients, where every one is
      // wanted in the same dtype — when both are wanted and are computed in their own dtype: added
      // into the pass's gradients (GradCarry: none returned for those weights), or written fresh,
      // dW_ih and dW_hh in one allocation — two weight-sized buffers freed at once are what lets
      // malloc give the heap's top back to the system, page-faulting it in again on the next call.
      at::Tensor dwih_out, dwhh_out, dmlp_out;
      bool into_pass = false;  // adding into the pass's gradients
      const at::ScalarType wt = whh.scalar_type();
      const c10::intrusive_ptr<GradCarry>& carry = facts->carry;
      const int task = torch::autograd::get_current_graph_task_id();
      const bool pair = ctx->needs_input_grad(1) && ctx->needs_input_grad(4) && w_ih.scalar_type() == wt &&
                        x.scalar_type() == wt && y.scalar_type() == wt && (wt == at::kFloat || wt == at::kDouble);
      bool with_mlp = pair && M > 0;  // the deep gates' gradients carried too
      for (size_t j = 0; j < M; ++j)
        with_mlp = with_mlp && ctx->needs_input_grad(PAR + N_PARAMS + j) && mlp_own[j].scalar_type() == wt;
      std::vector<at::Tensor> carried{w_ih, whh};  // the weights whose gradients the pass holds
      if (with_mlp) carried.insert(carried.end(), mlp_own.begin(), mlp_own.end());
      if (pair) {
        if (auto held = carry && !higher ? carry->take(task, carried) : std::nullopt) {
          dwih_out = (*held)[0];
          dwhh_out = (*held)[1];
          if (with_mlp) {  // the deep gates' tensors' gradients: views in order of one flat buffer
            int64_t wtot = 0;
            for (const auto& t : mlp_own) wtot += t.numel();
            dmlp_out = (*held)[2].as_strided({wtot}, {1}, (*held)[2].storage_offset());
          }
          into_pass = true;
        } else {
          // dW_hh on a 64-byte line, as a tensor of its own starts: MKL's results depend on the
          // output's alignment, bits included, and the general path's dW_hh is a tensor of its own
          const int64_t line = 64 / whh.element_size(), off = (w_ih.numel() + line - 1) / line * line;
          const at::Tensor flat = at::empty({off + whh.numel()}, whh.options());
          dwih_out = flat.narrow(0, 0, w_ih.numel()).view(w_ih.sizes());
          dwhh_out = flat.narrow(0, off, whh.numel()).view(whh.sizes());
        }
      }
      auto [dxg, dwhh, dh0, dc0, dparams] = backward_call(
          given(0), given(1), given(2), y, h0, c0, whh, at::Tensor(), params, buffers, v, mlp_own, dwhh_out,
          /*views=*/true, /*add=*/into_pass, dmlp_out);
      const at::Tensor dxg2 = dxg.reshape({T * B, dxg.size(2)});  // (T*B, R)
      // a 16-bit layer on a CPU without units for its dtype (widen16, from the caller: fused.py's
      // SIXTEEN_BIT_UNITS): dX and dW_ih in float32, rounded to the dtype once, as the input
      // projection of the general path; torch's 16-bit GEMM widens in software there
      const bool widen = facts->widen16;
      auto wide = [&](const at::Tensor& t) { return widen ? t.to(at::kFloat) : t; };
      if (ctx->needs_input_grad(0))  // as x came: (T, B, I) | (B, I)
        out[0] = wide(dxg2).mm(wide(w_ih)).to(saved[0].scalar_type()).view(saved[0].sizes());
      if (into_pass) dwih_out.addmm_(dxg2.t(), x.reshape({T * B, I}));  // out[1], out[4]: none
      else if (dwih_out.defined()) out[1] = at::mm_out(dwih_out, dxg2.t(), x.reshape({T * B, I}));
      else if (ctx->needs_input_grad(1)) out[1] = wide(dxg2).t().mm(wide(x.reshape({T * B, I}))).to(w_ih.scalar_type());
      if (b_ih.numel()) {
        const at::Tensor db = ln ? dparams[P_BIAS] : dxg2.sum(0);  // (R,)
        out[2] = db;
        out[3] = db;
      }
      if (!into_pass) out[4] = dwhh;
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
      if (M > 0 && !(into_pass && with_mlp)) {  // the flat gradient back to each deep-gate tensor, in order, in its shape
        int64_t off = dparams[P_MLP].storage_offset();  // (one contiguous view each: as_strided, not narrow then view)
        for (size_t j = 0; j < M; ++j) {
          const auto sizes_j = mlp_own[j].sizes();
          out[PAR + N_PARAMS + j] = dparams[P_MLP].as_strided(sizes_j, c10::contiguous_strides(sizes_j), off);
          off += mlp_own[j].numel();
        }
      }
      if (pair && !into_pass && carry && !higher) {
        std::vector<at::Tensor> fresh{out[1], out[4]};
        if (with_mlp)
          for (size_t j = 0; j < M; ++j) fresh.push_back(out[PAR + N_PARAMS + j]);
        carry->keep(task, carried, fresh);
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
inline std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_step(
    const at::Tensor& x_in, const at::Tensor& w_ih, const at::Tensor& b_ih, const at::Tensor& b_hh,
    const at::Tensor& whh, const at::Tensor& h0_in, const std::vector<at::Tensor>& cells,
    std::vector<at::Tensor> params, const std::vector<at::Tensor>& mlp, const Variant& v,
    const Frozen* frozen = nullptr, const c10::intrusive_ptr<GradCarry>& carry = {}, bool widen16 = false) {
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
                                   at::TensorList(mlp), v, carry, widen16);
    return {out[0], out[1], std::vector<at::Tensor>(out.begin() + 2, out.end())};
  }
  const StepAxes axes{x_in.dim() == 2, h0_in.dim() == 3};
  // (N, S·H); S states joined: this call's own, which the kernel updates in place (c0_scratch)
  const at::Tensor c0 = S == 1 ? axes.state(cells[0]) : join_cells(cells, x_in.options());
  auto [y, h_n, c_n, buffers] = projected_forward(axes.run(x_in), w_ih, b_ih, b_hh, whh, axes.state(h0_in), c0,
                                                  at::Tensor(), params, v, false, mlp, frozen, false, S > 1);
  // inference: the S states as views of the kernel's one (N, S·H) tensor
  return {axes.y_out(y), axes.state_out(h_n),
          S == 1 ? std::vector<at::Tensor>{axes.state_out(c_n)} : split_cells(c_n, S, false)};
}

// A frozen layer's packed weights (lstmkit.freeze), held where every call signature kept for the
// layer finds them: packed once per layer, not once per signature.
struct PanelSlot {
  std::shared_ptr<const Frozen> panels;
};

// A prepared layer (PreparedStep, lstmkit/kernels/fused.py): forward_step's arguments that stay the
// same from call to call — the layer's parameters (the module's own tensors, read in place on every
// call, so that in-place updates are seen) and its variant — held here once per call signature, so
// that a call converts its few tensors rather than some thirty arguments.
struct PreparedLayer {
  at::Tensor w_ih, b_ih, b_hh, whh;
  std::vector<at::Tensor> params, mlp;  // params: abi.PARAMS order, zoneout's slots empty; mlp: forward_step's
  Variant variant;
  bool frozen = false;  // lstmkit.freeze: W_hh and W_ih packed once for inference (frozen_panels)
  bool widen16 = false;  // a 16-bit layer without 16-bit units: its backward's dX, dW_ih in float32 (ProjectedRun)
  c10::intrusive_ptr<GradCarry> carry = c10::make_intrusive<GradCarry>();  // its steps' weight gradients in a pass
  // the packing (atomic_load / atomic_store on its panels: calls run GIL-free), one per layer of a
  // module: the layers kept for its other call signatures share it (share_panels)
  std::shared_ptr<PanelSlot> slot = std::make_shared<PanelSlot>();
  std::vector<std::vector<int64_t>> shapes;  // the tensors' shapes when kept (keep_shapes)
  std::vector<std::string> mlp_names;  // mlp's names (abi.mlp_names), for messages

  // A frozen layer's panels, packed again when W_ih or W_hh changed since (WeightStamp).
  std::shared_ptr<const Frozen> frozen_panels() const {
    auto cur = std::atomic_load(&slot->panels);
    if (cur && cur->ih.same(w_ih) && cur->hh.same(whh)) return cur;
    const at::ScalarType ct = compute_type(w_ih.scalar_type());
    const MlpLayout mlp_ = variant.layout();
    Cfg cf(variant, mlp_);
    cf.set_heads(whh.size(1));
    cf.bf16_gemm = bf16_products(w_ih.scalar_type());
    auto fresh = std::make_shared<Frozen>(Frozen{ct, WeightStamp(w_ih), WeightStamp(whh), nullptr});
    AT_DISPATCH_FLOATING_TYPES(ct, "lstmkit_freeze", [&] {
      fresh->panels = std::make_shared<FrozenPanels<scalar_t>>(to_compute(whh, ct).contiguous(),
                                                               to_compute(w_ih, ct).contiguous(), cf);
    });
    std::shared_ptr<const Frozen> done = fresh;
    std::atomic_store(&slot->panels, done);
    return done;
  }

  // Every parameter in x's dtype and of the shape it had when this signature was kept: one given
  // another through .data since (the module's identity check cannot see that) is refused as the
  // general path refuses it.
  void check_tensors(const at::Tensor& x) const {
    const at::ScalarType want = x.scalar_type();
    auto torch_name = [](at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); };
    size_t k_shape = 0;
    auto check = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK_TYPE(!t.defined() || t.numel() == 0 || t.scalar_type() == want, "parameter ", name, ": ",
                       torch_name(t.scalar_type()), ", but the layer computes in ", torch_name(want),
                       " (changed through .data?); convert the module as a whole, e.g. module.to(",
                       torch_name(want), ")");
      const std::vector<int64_t>& kept = shapes[k_shape++];
      TORCH_CHECK_VALUE(!t.defined() || t.sizes() == c10::IntArrayRef(kept), "parameter ", name,
                        ": this layer's cell reads shape ", python_shape(kept), ", got ", python_shape(t.sizes()),
                        " (changed through .data?)");
    };
    check(w_ih, "weight_ih"); check(whh, "weight_hh"); check(b_ih, "bias_ih"); check(b_hh, "bias_hh");
    for (int k = 0; k < N_PARAMS; ++k) check(params[k], PARAM_NAMES[k]);
    for (size_t j = 0; j < mlp.size(); ++j) check(mlp[j], j < mlp_names.size() ? mlp_names[j].c_str() : "of a deep gate");
  }

  // The shapes check_tensors compares with, in its order (an undefined tensor: none).
  void keep_shapes() {
    shapes.clear();
    auto keep = [&](const at::Tensor& t) { shapes.push_back(t.defined() ? t.sizes().vec() : std::vector<int64_t>{}); };
    keep(w_ih); keep(whh); keep(b_ih); keep(b_hh);
    for (const auto& t : params) keep(t);
    for (const auto& t : mlp) keep(t);
  }

  // (4,) or (4, 3), as Python writes a shape
  static std::string python_shape(c10::IntArrayRef sizes) {
    std::string out = "(";
    for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
    return out + (sizes.size() == 1 ? ",)" : ")");
  }

  // x (N, I) or (T, N, I); h (N, H_out) or a one-layer stack's (1, N, H_out); cells: the S cell
  // states, (N, H) each (one state: also a one-layer stack's (1, N, H)); keep_c / keep_h: zoneout's
  // masks of this call (training), or None. Returns y, h_n, then the S cell states.
  std::vector<at::Tensor> call(const at::Tensor& x, const at::Tensor& h, const std::vector<at::Tensor>& cells,
                               const std::optional<at::Tensor>& keep_c,
                               const std::optional<at::Tensor>& keep_h) const {
    // a call of its own in torch.profiler's tables (the general path's runs through the dispatcher,
    // which records its operators; this one calls the kernels directly): free while no profiler runs
    RECORD_FUNCTION("lstmkit::prepared_step", std::vector<c10::IValue>({x}));
    check_tensors(x);
    std::vector<at::Tensor> p = params;
    if (keep_c.has_value()) p[P_KEEP_C] = *keep_c;
    if (keep_h.has_value()) p[P_KEEP_H] = *keep_h;
    // (weights made under torch.inference_mode() have no version counter: read as unfrozen)
    const bool countable = !w_ih.is_inference() && !whh.is_inference();
    const std::shared_ptr<const Frozen> fz = frozen && countable ? frozen_panels() : nullptr;
    auto [y, h_n, c_n] = forward_step(x, w_ih, b_ih, b_hh, whh, h, cells, std::move(p), mlp, variant, fz.get(), carry,
                                      widen16);
    std::vector<at::Tensor> out{y, h_n};
    out.insert(out.end(), c_n.begin(), c_n.end());
    return out;
  }
};

}  // namespace lk
