// The variant as the kernel sees it: Cfg (the flag word decoded, gate column offsets),
// CellParams (the cell's own parameters and zoneout's masks as raw pointers, read from the
// operator's params list by the generated ABI's indices) and AccLayout (where each
// parameter's gradient sits in the backward's per-thread accumulators).
#pragma once
#include <torch/extension.h>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>
#include "gemm.h"  // blas_gemm
#include "lstmkit_abi.h"  // generated from lstmkit/kernels/abi.py

namespace lk {

using namespace lk::abi;

// Deep gates: each is an MLP over [x, h] whose first layer is the gate's rows of W_ih/W_hh
// (width n_1) and whose further layers are W_j (n_{j+1} x n_j) with biases, phi between layers
// (never after the last, whose width is H). Decoded from the operator's int list `mlp`
// (lstmkit.kernels.abi.mlp_layout): [phi, has_bias, n_deep, then per deep gate: gate (0..3 in
// i, f, g, o order), m, n_1 .. n_m]. The weights: one flat tensor, gate by gate and layer by
// layer, W_j then b_j, or those tensors themselves (MlpWeights).
struct MlpGate {
  int g = -1, m = 0;
  std::vector<int64_t> w;     // n_1 .. n_m, H (m + 1 widths)
  std::vector<int64_t> woff;  // flat offset of W_j (n_{j+1} x n_j), j = 1..m
  std::vector<int64_t> boff;  // flat offset of b_j (n_{j+1}), -1 without biases
  std::vector<int64_t> aoff;  // column of a_j = phi(input of layer j) (width n_j) in a step's activations row
  std::vector<int64_t> voff;  // column of layer j's output (width n_{j+1}) in a step's outputs row
};
struct MlpLayout {
  int phi = PHI_TANH, depth = 0;  // phi: PHI_* (lstmkit_abi.h)
  bool bias = false;
  std::vector<MlpGate> gates;
  int of_gate[N_GATES] = {-1, -1, -1, -1};  // index into gates, by gate (Gate: GATE_I, ...)
  int64_t atot = 0, vtot = 0, wtot = 0;  // widths of the activations and outputs rows; flat weights
  MlpLayout(const std::vector<int64_t>& code, int64_t H) {
    if (code.empty()) return;
    TORCH_CHECK(code.size() >= 3, "lstmkit::recurrence: a damaged mlp layout");
    phi = (int)code[0]; bias = code[1] != 0;
    const int n = (int)code[2];
    size_t pos = 3;
    for (int k = 0; k < n; ++k) {
      TORCH_CHECK(pos + 2 <= code.size(), "lstmkit::recurrence: a damaged mlp layout");
      MlpGate mg;
      mg.g = (int)code[pos]; mg.m = (int)code[pos + 1]; pos += 2;
      TORCH_CHECK(mg.g >= 0 && mg.g < 4 && mg.m >= 1 && pos + mg.m <= code.size(),
                  "lstmkit::recurrence: a damaged mlp layout");
      for (int j = 0; j < mg.m; ++j) mg.w.push_back(code[pos + j]);
      pos += mg.m;
      mg.w.push_back(H);
      for (int j = 0; j < mg.m; ++j) {
        mg.woff.push_back(wtot); wtot += mg.w[j + 1] * mg.w[j];
        mg.boff.push_back(bias ? wtot : -1); if (bias) wtot += mg.w[j + 1];
        mg.aoff.push_back(atot); atot += mg.w[j];
        mg.voff.push_back(vtot); vtot += mg.w[j + 1];
      }
      depth = std::max(depth, mg.m);
      of_gate[mg.g] = (int)gates.size();
      gates.push_back(mg);
    }
  }
  bool any() const { return !gates.empty(); }
};

// Where the deep gates' W_j (n_{j+1} x n_j, row-major) and b_j are, per gate k (MlpLayout::gates'
// order) and layer j at [k * depth + j]: in the operator's flat mlp param (`flat`, at MlpLayout's
// offsets), or in each layer's own tensors (`each`, contiguous, in the flat param's order: W_j then
// b_j, gate by gate) — a prepared step's, so that no flat copy is made per call. b: nullptr
// without biases. Both in the compute dtype T.
template <typename T>
struct MlpWeights {
  std::vector<const T*> w, b;
  MlpWeights(const MlpLayout& mlp, const at::Tensor& flat, const std::vector<at::Tensor>& each) {
    if (!mlp.any()) return;
    w.assign(mlp.gates.size() * mlp.depth, nullptr);
    b.assign(mlp.gates.size() * mlp.depth, nullptr);
    const bool from_flat = each.empty();
    TORCH_CHECK(!from_flat || flat.numel() == mlp.wtot, "lstmkit::recurrence: the mlp param must have ", mlp.wtot,
                " entries (the deep gates' layers, flat)");
    size_t i = 0;  // the next of `each`
    auto next = [&](at::IntArrayRef sizes) -> const T* {
      TORCH_CHECK(i < each.size() && each[i].sizes() == sizes && each[i].is_contiguous(),
                  "lstmkit::recurrence: deep-gate tensor ", i, " must be ", sizes, " (the mlp layout), got ",
                  i < each.size() ? each[i].sizes() : at::IntArrayRef());
      return each[i++].data_ptr<T>();
    };
    for (size_t k = 0; k < mlp.gates.size(); ++k) {
      const MlpGate& mg = mlp.gates[k];
      for (int j = 0; j < mg.m; ++j) {
        const size_t at = k * mlp.depth + j;
        if (from_flat) {
          w[at] = flat.data_ptr<T>() + mg.woff[j];
          if (mg.boff[j] >= 0) b[at] = flat.data_ptr<T>() + mg.boff[j];
        } else {
          w[at] = next({mg.w[j + 1], mg.w[j]});
          if (mlp.bias) b[at] = next({mg.w[j + 1]});
        }
      }
    }
    TORCH_CHECK(from_flat || i == each.size(), "lstmkit::recurrence: more deep-gate tensors than the mlp layout has");
  }
};

// Heads (block-diagonal recurrent weights): each gate's rows of W_hh are k blocks, block j reading
// only the j-th H_out/k entries of h. One segment per head and gate, read in W_hh's canonical rows
// (no permuted copy): the forward runs a GEMM per segment (r's segment columns = h's head columns
// times the block), the backward adds the segments of a head into its dh columns (a GEMM split over
// K) and accumulates dW_hh block by block (accumulate_dwhh).
struct HeadSeg {
  int64_t canon, head, len;  // first canonical row of W_hh (column of r), the head, rows
};

// A call's cell as the operators' non-tensor arguments give it (ops.py's schema, in its order): the
// variant's flag word, the deep gates' layout code, the scalars (abi.SCALARS, indexed by the
// generated Scalar enum: S_CLIP, ...), the cell size H and the projection size P. MlpLayout and
// Cfg decode it.
struct Variant {
  int64_t flags = 0;
  std::vector<int64_t> mlp_layout;
  std::vector<double> scalars;  // (N_SCALARS,)
  int64_t H = 0, P = 0;
  MlpLayout layout() const { return MlpLayout(mlp_layout, H); }
};

// The variant table's rows whose step and BPTT cell_step.h computes, each by its flag (the kernel's
// claim: a row the table gains is refused by Cfg, not run as the plain cell, until its step is
// written and it is added here; the extension reports this set, which test_ops.py compares with the
// rows the CPU kernel row says it implements).
constexpr int64_t IMPLEMENTED_FLAGS = F_PEEPHOLE | F_CIFG | F_FGR | F_LAYERNORM | F_NIG | F_NFG | F_NOG | F_NIAF |
                                      F_CAND_ACT_RELU | F_NOAF | F_OUT_ACT_RELU | F_GATE_ACT_HARD_SIGMOID |
                                      F_GATE_ACT_HARDSIGMOID | F_CLIP | F_ZONEOUT | F_SLSTM | F_FORGET_ACT_EXP |
                                      F_N_CLAMP | F_RNN | F_RNN_RELU;

struct Cfg {
  bool rnn, relu, has_i, has_f, has_o, cifg, peep, fgr, ln, clip, zoneout;
  bool plain;                     // an LSTM cell of sigmoid gates i, f, o and tanh activations, without cifg,
                                  // peepholes, fgr, layernorm, clip, zoneout or a projection (deep gates allowed)
  bool gate_hard;                 // the gates use clamp(slope u + 1/2, 0, 1) instead of sigma
  bool slstm, fexp, nclamp;       // the sLSTM; its exponential forget gate; its normaliser floor n >= 1
  int64_t S, SH, GW;              // cell states per row (1: c; sLSTM 3: c, n, m; RNN 0), their width S·H,
                                  // the width of a row of the gate buffer G (G·H; sLSTM: its SlstmKept slots, 6H)
  double gate_slope;
  int cand_act, out_act;          // PHI_TANH, PHI_IDENTITY or PHI_RELU (lstmkit_abi.h's codes)
  double clipv, zc, zh;           // the operator's scalars (abi.SCALARS)
  int64_t H, P, Hout, R, G, nS;
  int64_t oi, of, og, oo;  // column offsets in R (-1 absent)
  int64_t si, sf, so;      // column offsets in s (nS*H) (-1 absent)
  int64_t cw[N_GATES], co[N_GATES];    // width and offset in R of the k-th computed gate's columns (deep: n_1)
  int64_t zoff[N_GATES], aoff[N_GATES];  // per gate (Gate): its columns in R (-1 absent), and in the gate
                             // activations G (T, B, G·H): slot·H (deep gates' u is H wide too)
  Cfg(const Variant& v, const MlpLayout& mlp) {
    const int64_t flags = v.flags;
    TORCH_CHECK(!(flags & ~IMPLEMENTED_FLAGS), "lstmkit::recurrence: the variant word ", flags, " has flags this ",
                "kernel does not compute (bits ", flags & ~IMPLEMENTED_FLAGS, "; see IMPLEMENTED_FLAGS)");
    rnn = flags & F_RNN; relu = flags & F_RNN_RELU;
    // which gates are computed, and where: the variant table's removal masks (lstmkit_abi.h)
    bool present[N_GATES];
    for (int g = 0; g < N_GATES; ++g) present[g] = !(flags & GATE_REMOVED[g]);
    has_i = present[GATE_I]; has_f = present[GATE_F]; has_o = present[GATE_O];
    cifg = flags & F_CIFG;
    peep = flags & F_PEEPHOLE; fgr = flags & F_FGR; ln = flags & F_LAYERNORM;
    clip = flags & F_CLIP; zoneout = flags & F_ZONEOUT;
    gate_hard = flags & (F_GATE_ACT_HARD_SIGMOID | F_GATE_ACT_HARDSIGMOID);
    gate_slope = (flags & F_GATE_ACT_HARDSIGMOID) ? SLOPE_HARDSIGMOID : SLOPE_HARD_SIGMOID;
    cand_act = (flags & F_NIAF) ? PHI_IDENTITY : (flags & F_CAND_ACT_RELU) ? PHI_RELU : PHI_TANH;
    out_act = (flags & F_NOAF) ? PHI_IDENTITY : (flags & F_OUT_ACT_RELU) ? PHI_RELU : PHI_TANH;
    TORCH_CHECK((int64_t)v.scalars.size() == N_SCALARS, "lstmkit: expected ", (int)N_SCALARS, " scalars (",
                SCALAR_NAMES[0], ", ...), got ", v.scalars.size());
    clipv = v.scalars[S_CLIP]; zc = v.scalars[S_ZONEOUT_C]; zh = v.scalars[S_ZONEOUT_H];
    H = v.H; P = rnn ? 0 : v.P; Hout = P > 0 ? P : H;
    int64_t off[N_GATES], soff[N_GATES], k = 0, s = 0, col = 0;
    for (int g = 0; g < N_GATES; ++g) {
      soff[g] = (present[g] && g != GATE_G && !rnn) ? H * s++ : -1;  // the sigmoid gates i, f, o (fgr's s)
      off[g] = -1;
      if (!present[g]) continue;
      const int d = mlp.of_gate[g];
      off[g] = col;
      co[k] = col; cw[k] = d >= 0 ? mlp.gates[d].w[0] : H;
      col += cw[k++];
    }
    oi = off[GATE_I]; of = off[GATE_F]; og = off[GATE_G]; oo = off[GATE_O];
    for (int g = 0, slot = 0; g < N_GATES; ++g) { zoff[g] = off[g]; aoff[g] = present[g] ? H * slot++ : -1; }
    si = soff[GATE_I]; sf = soff[GATE_F]; so = soff[GATE_O];
    G = k; R = col; nS = s;
    slstm = flags & F_SLSTM; fexp = flags & F_FORGET_ACT_EXP; nclamp = flags & F_N_CLAMP;
    plain = flags == 0 && P == 0;  // no row of the variant table changes an equation, no projection
    S = rnn ? 0 : slstm ? N_SLSTM_STATES : 1;
    SH = S * H;
    GW = slstm ? N_SLSTM_KEPTS * H : G * H;
  }

  // the per-step products in bfloat16 on AMX (gemm.h): a bfloat16 layer where the CPU has the unit
  bool bf16_gemm = false;
  int64_t heads = 1, Dh = 0;  // heads: k; Dh = H_out / k, the width of a head of h
  std::vector<HeadSeg> hseg;  // heads > 1: head by head, gate by gate (see HeadSeg)
  // The heads of a call, from the stored recurrent weights' width (R, H_out/k).
  void set_heads(int64_t whh_cols) {
    TORCH_CHECK(whh_cols > 0 && Hout % whh_cols == 0, "lstmkit::recurrence: w_hh has ", whh_cols,
                " columns, which is not H_out/k for any number of heads k (H_out = ", Hout, ")");
    heads = Hout / whh_cols; Dh = whh_cols;
    hseg.clear();
    if (heads == 1) return;
    for (int64_t j = 0; j < heads; ++j)
      for (int64_t q = 0; q < G; ++q) {
        TORCH_CHECK(cw[q] % heads == 0, "lstmkit::recurrence: a gate's ", cw[q], " rows do not split into ",
                    heads, " heads");
        const int64_t n = cw[q] / heads;
        hseg.push_back({co[q] + j * n, j, n});
      }
  }
};

// A reduction over steps and rows, a^T b (float32 or float64 result): on a bfloat16 layer with the
// AMX unit (cf.bf16_gemm) its operands are rounded to bfloat16, as the per-step products' are.
inline at::Tensor reduce_mm(const at::Tensor& at_, const at::Tensor& b, const Cfg& cf) {
  if (!cf.bf16_gemm) return at::mm(at_, b);
  return at::mm(at_.to(at::kBFloat16), b.to(at::kBFloat16)).to(at::kFloat);
}
// Whether a size or stride fits BLAS's int (T·B rows of a long sequence may not: ATen's products take those).
inline bool fits_int(int64_t n) { return n <= std::numeric_limits<int>::max(); }

// accumulate_dwhh's heads case by BLAS: each segment's rows of acc (len, Dh), row-major, (=|+=)
// d_seg^T hprev_head, i.e. column-major acc_seg^T = hprev_head^T d_seg. False (nothing written)
// where this torch carries no BLAS.
template <typename T>
inline bool dwhh_segments_blas(at::Tensor& acc, bool first, const at::Tensor& d, const at::Tensor& hprev,
                               const Cfg& cf) {
  const int N = (int)d.size(0), Dh = (int)cf.Dh;
  T* c = acc.data_ptr<T>();
  const T *dp = d.data_ptr<T>(), *hp = hprev.data_ptr<T>();
  for (const HeadSeg& sg : cf.hseg)
    if (!blas_gemm<T>('N', 'T', Dh, (int)sg.len, N, hp + sg.head * Dh, (int)hprev.stride(0), dp + sg.canon,
                      (int)d.stride(0), !first, c + sg.canon * Dh, Dh))
      return false;
  return true;
}

// dW_hh, accumulated over parts of the sequence: acc = d^T hprev (`first`) or acc += d^T hprev
// (later parts) for d (N, R) the gradients of r and hprev (N, H_out) the h_{t-1} they multiplied;
// acc (R, H_out), with heads (R, Dh): each segment's rows times its head's Dh columns of hprev,
// written in place (canonical rows). The first term writes acc (a caller's buffer) or, acc
// undefined, allocates it: a weight-sized buffer is neither zero-filled nor added to when one
// product is the whole sum.
inline void accumulate_dwhh(at::Tensor& acc, bool first, const at::Tensor& d, const at::Tensor& hprev,
                            const Cfg& cf) {
  auto add = [&](at::Tensor out, const at::Tensor& dt, const at::Tensor& h) {  // out (+)= dt h
    if (cf.bf16_gemm) {
      if (first) out.copy_(reduce_mm(dt, h, cf));
      else out.add_(reduce_mm(dt, h, cf));
    } else if (first) {
      at::mm_out(out, dt, h);
    } else {
      out.addmm_(dt, h);  // one GEMM with beta = 1
    }
  };
  if (cf.heads == 1) {
    if (first && !acc.defined()) acc = reduce_mm(d.t(), hprev, cf);
    else add(acc, d.t(), hprev);
    return;
  }
  if (!acc.defined()) acc = at::empty({cf.R, cf.Dh}, hprev.options());  // every row is some segment's
  // one BLAS call a segment on the operands in place where torch carries it: at one step per call
  // the views and dispatch of the ATen calls below cost more than the products
  // (row strides checked, not only "contiguous": a one-row tensor may carry any stride there, which
  // BLAS would refuse as a leading dimension)
  const bool plain = !cf.bf16_gemm && d.size(0) > 0 && d.stride(1) == 1 && hprev.stride(1) == 1 &&
                     d.stride(0) >= d.size(1) && hprev.stride(0) >= hprev.size(1) && acc.is_contiguous() &&
                     d.scalar_type() == acc.scalar_type() && hprev.scalar_type() == acc.scalar_type() &&
                     fits_int(d.size(0)) && fits_int(d.stride(0)) && fits_int(hprev.stride(0));  // BLAS's int sizes
  if (plain && acc.scalar_type() == at::kFloat && dwhh_segments_blas<float>(acc, first, d, hprev, cf)) return;
  if (plain && acc.scalar_type() == at::kDouble && dwhh_segments_blas<double>(acc, first, d, hprev, cf)) return;
  for (const HeadSeg& sg : cf.hseg)
    add(acc.narrow(0, sg.canon, sg.len), d.narrow(1, sg.canon, sg.len).t(), hprev.narrow(1, sg.head * cf.Dh, cf.Dh));
}

// What the forward keeps for the backward, by buffer (abi.BUFFERS order): each kept one is
// (T, B, width), 0 where not kept. abi.buffer_shapes writes the same rule for the Python side
// (tests/test_ops.py test_fake_shapes_equal_real_ones compares the operator's buffers with it);
// forward_impl allocates them so and backward_call checks that it was given them.
inline std::vector<int64_t> kept_widths(const Cfg& cf, const MlpLayout& mlp) {
  std::vector<int64_t> w(N_BUFFERS, 0);
  if (cf.rnn) return w;  // the RNN keeps its output alone
  if (!cf.ln || cf.fgr || mlp.any()) w[B_G] = cf.GW;  // layernorm alone recomputes the gates
  if (mlp.any()) w[B_MLP] = mlp.atot;
  w[B_C] = cf.SH;
  if (cf.zoneout) w[B_CN] = cf.H;
  if (cf.ln) { w[B_RH] = cf.R; w[B_RS] = cf.G; w[B_AH] = cf.R; w[B_AS] = cf.G; }
  return w;
}

// The per-parameter reductions of the backward (summed over steps and rows), one vector per
// thread: where each parameter's gradient sits in it, from the generated ACC_H / ACC_R
// (lstmkit_abi.h: abi.ACCUMULATED). The cell's backward accumulates into these slices and
// recurrence_backward reads them out.
struct AccLayout {
  int64_t H, R;
  int64_t of(int p) const { return ACC_H[p] * H + ACC_R[p] * R; }  // p: a Param that is summed here
  int64_t peephole(int k) const { return of(k == 0 ? P_PEEPHOLE_I : k == 1 ? P_PEEPHOLE_F : P_PEEPHOLE_O); }
  int64_t ln_c_weight() const { return of(P_LN_C_WEIGHT); }  // H each
  int64_t ln_c_bias() const { return of(P_LN_C_BIAS); }
  int64_t ln_hh_weight() const { return of(P_LN_HH_WEIGHT); }  // R each
  int64_t ln_ih_weight() const { return of(P_LN_IH_WEIGHT); }
  int64_t bias() const { return of(P_BIAS); }
  int64_t size() const { return ACC_SIZE_H * H + ACC_SIZE_R * R; }
};

// What the kernel reads of params[k] (abi.PARAMS order) for this variant through a raw pointer:
// the tensor's sizes, or none (empty) where it reads nothing. `optional`: an empty tensor is
// allowed too — a layer without biases (layernorm's summed bias), zoneout at evaluation (its masks;
// T, B: the call's steps and rows). The deep gates' `mlp` is MlpWeights's to check.
struct ParamUse {
  int64_t sizes[3] = {0, 0, 0};
  int ndim = 0;  // 0: not read
  bool optional = false;
  bool read() const { return ndim > 0; }
  at::IntArrayRef shape() const { return at::IntArrayRef(sizes, ndim); }
};
inline ParamUse param_use(const Cfg& cf, int k, int64_t T, int64_t B) {
  const int64_t H = cf.H, R = cf.R, nSH = cf.nS * cf.H;
  const bool lstm = !cf.rnn;
  auto use = [](bool read, std::initializer_list<int64_t> sizes, bool optional = false) {
    ParamUse u;
    if (!read) return u;
    for (int64_t n : sizes) u.sizes[u.ndim++] = n;
    u.optional = optional;
    return u;
  };
  switch (k) {
    case P_PEEPHOLE_I: return use(cf.peep && cf.has_i, {H});
    case P_PEEPHOLE_F: return use(cf.peep && cf.has_f, {H});
    case P_PEEPHOLE_O: return use(cf.peep && cf.has_o, {H});
    case P_WEIGHT_GG: return use(cf.fgr, {nSH, nSH});
    case P_LN_HH_WEIGHT:
    case P_LN_IH_WEIGHT: return use(cf.ln, {R});
    case P_LN_C_WEIGHT:
    case P_LN_C_BIAS: return use(cf.ln && lstm, {H});
    case P_WEIGHT_HR: return use(cf.P > 0, {cf.P, H});
    case P_BIAS: return use(cf.ln, {R}, true);
    case P_KEEP_C: return use(cf.zoneout, {T, B, H}, true);
    case P_KEEP_H: return use(cf.zoneout, {T, B, cf.Hout}, true);
    default: return {};
  }
}

// Every parameter the variant reads has exactly the sizes it reads (param_use), and W_hh its R
// rows: checked before anything is allocated, so that a tensor of another shape is refused by its
// name instead of read past its end. (A module checks its parameters by name before it calls the
// kernel; this is the operator's own contract, for every road into it.)
inline void check_params(const Cfg& cf, const at::Tensor& whh, const std::vector<at::Tensor>& params, int64_t T,
                         int64_t B) {
  // the per-step products take a step's rows as BLAS's and the micro-kernel's int (GemmTask::M)
  TORCH_CHECK(B <= std::numeric_limits<int>::max(), "lstmkit::recurrence: a batch of ", B,
              " rows; the fused CPU kernel takes at most 2^31 - 1 (backend=\"reference\" takes more)");
  TORCH_CHECK(whh.dim() == 2 && whh.size(0) == cf.R, "lstmkit::recurrence: w_hh must be (R = ", cf.R,
              ", H_out / heads), got ", whh.sizes());
  for (int k = 0; k < N_PARAMS; ++k) {
    const ParamUse use = param_use(cf, k, T, B);
    if (!use.read()) continue;
    const at::Tensor& t = params[k];
    const bool empty = !t.defined() || t.numel() == 0;
    TORCH_CHECK((use.optional && empty) || (!empty && t.sizes() == use.shape()),
                "lstmkit::recurrence: the param ", PARAM_NAMES[k], " must be ", use.shape(),
                use.optional ? " or empty" : "", " for this variant, got ",
                t.defined() ? t.sizes() : at::IntArrayRef());
  }
}

// The cell's own parameters, as raw pointers read from the operator's params list by the ABI's
// indices (P_*), nullptr where the variant has none (param_use; check_params has checked their
// sizes); the same for forward and backward.
template <typename T>
struct CellParams {
  const T *pi, *pf, *po;  // peephole weights (H each)
  const T *gln, *glnih;   // layernorm gains of r = h W_hh^T and of a = x W_ih^T (R each)
  const T* biasp;         // layernorm: the bias added after both norms (R)
  const T *cw, *cb;       // layernorm of c: gain and bias (H each)
  const T *keep_c, *keep_h;  // zoneout's training masks (T, B, H) and (T, B, H_out); nullptr: evaluation
  T clipv;                // clip: |c| bound
  T zc, zh;               // zoneout at evaluation: the probabilities (the masks' expectation)
  T slope;                // the hard sigmoid's slope

  CellParams(const Cfg& cf, const std::vector<at::Tensor>& p) {
    auto ptr = [&](int k) -> const T* {
      return (param_use(cf, k, 0, 0).read() && p[k].defined() && p[k].numel() > 0) ? p[k].data_ptr<T>() : nullptr;
    };
    pi = ptr(P_PEEPHOLE_I);
    pf = ptr(P_PEEPHOLE_F);
    po = ptr(P_PEEPHOLE_O);
    gln = ptr(P_LN_HH_WEIGHT);
    glnih = ptr(P_LN_IH_WEIGHT);
    biasp = ptr(P_BIAS);
    cw = ptr(P_LN_C_WEIGHT);
    cb = ptr(P_LN_C_BIAS);
    keep_c = ptr(P_KEEP_C);
    keep_h = ptr(P_KEEP_H);
    clipv = (T)cf.clipv; zc = (T)cf.zc; zh = (T)cf.zh; slope = (T)cf.gate_slope;
  }
};

}  // namespace lk
