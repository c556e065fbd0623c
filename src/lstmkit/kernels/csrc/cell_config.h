// The variant as the kernel sees it: Cfg (the flag word decoded, gate column offsets),
// CellParams (the cell's own parameters and zoneout's masks as raw pointers, read from the
// operator's params list by the generated ABI's indices) and AccLayout (where each
// parameter's gradient sits in the backward's per-thread accumulators).
#pragma once
#include <torch/extension.h>
#include <cstdint>
#include <vector>
#include "lstmkit_abi.h"  // generated from lstmkit/kernels/abi.py

namespace lk {

using namespace lk::abi;

struct Cfg {
  bool rnn, relu, has_i, has_f, has_o, cifg, peep, fgr, ln, clip, zoneout;
  bool gate_hard;                 // the gates use clamp(slope u + 1/2, 0, 1) instead of sigma
  double gate_slope;
  int cand_act, out_act;          // ACT_TANH, ACT_IDENTITY or ACT_RELU
  double clipv, zc, zh;           // the operator's scalars (abi.SCALARS)
  int64_t H, P, Hout, R, G, nS;
  int64_t oi, of, og, oo;  // column offsets in R (-1 absent)
  int64_t si, sf, so;      // column offsets in s (nS*H) (-1 absent)
  static constexpr int ACT_TANH = 0, ACT_IDENTITY = 1, ACT_RELU = 2;

  Cfg(int64_t flags, double clip_, double zc_, double zh_, int64_t H_, int64_t P_) {
    rnn = flags & F_RNN; relu = flags & F_RNN_RELU;
    // which gates are computed, and where: the variant table's removal masks (lstmkit_abi.h)
    bool present[4];
    for (int g = 0; g < 4; ++g) present[g] = !(flags & GATE_REMOVED[g]);
    has_i = present[0]; has_f = present[1]; has_o = present[3];
    cifg = flags & F_CIFG;
    peep = flags & F_PEEPHOLE; fgr = flags & F_FGR; ln = flags & F_LAYERNORM;
    clip = flags & F_CLIP; zoneout = flags & F_ZONEOUT;
    gate_hard = flags & (F_GATE_ACT_HARD_SIGMOID | F_GATE_ACT_HARDSIGMOID);
    gate_slope = (flags & F_GATE_ACT_HARDSIGMOID) ? SLOPE_HARDSIGMOID : SLOPE_HARD_SIGMOID;
    cand_act = (flags & F_NIAF) ? ACT_IDENTITY : (flags & F_CAND_ACT_RELU) ? ACT_RELU : ACT_TANH;
    out_act = (flags & F_NOAF) ? ACT_IDENTITY : (flags & F_OUT_ACT_RELU) ? ACT_RELU : ACT_TANH;
    clipv = clip_; zc = zc_; zh = zh_;
    H = H_; P = rnn ? 0 : P_; Hout = P > 0 ? P : H;
    int64_t off[4], soff[4], k = 0, s = 0;
    for (int g = 0; g < 4; ++g) {
      off[g] = present[g] ? H * k++ : -1;
      soff[g] = (present[g] && g != 2 && !rnn) ? H * s++ : -1;  // the sigmoid gates i, f, o (fgr's s)
    }
    oi = off[0]; of = off[1]; og = off[2]; oo = off[3];
    si = soff[0]; sf = soff[1]; so = soff[3];
    G = k; R = G * H; nS = s;
  }
};

// The per-parameter reductions of the backward (summed over steps and rows), one vector per
// thread: where each parameter's gradient sits in it. Written here once; the cell's backward
// accumulates into these slices and recurrence_backward reads them out.
struct AccLayout {
  int64_t H, R;
  int64_t peephole(int k) const { return k * H; }  // k = 0, 1, 2: i, f, o (H each)
  int64_t ln_c_weight() const { return 3 * H; }
  int64_t ln_c_bias() const { return 4 * H; }
  int64_t ln_hh_weight() const { return 5 * H; }  // R each from here on
  int64_t ln_ih_weight() const { return 5 * H + R; }
  int64_t bias() const { return 5 * H + 2 * R; }
  int64_t size() const { return 5 * H + 3 * R; }
};

// The cell's own parameters, as raw pointers read from the operator's params list by the ABI's
// indices (P_*), nullptr where the variant has none; the same for forward and backward.
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
    auto ptr = [&](int k, bool wanted) -> const T* {
      return (wanted && p[k].defined() && p[k].numel() > 0) ? p[k].data_ptr<T>() : nullptr;
    };
    pi = ptr(P_PEEPHOLE_I, cf.peep && cf.has_i);
    pf = ptr(P_PEEPHOLE_F, cf.peep && cf.has_f);
    po = ptr(P_PEEPHOLE_O, cf.peep && cf.has_o);
    gln = ptr(P_LN_HH_WEIGHT, cf.ln);
    glnih = ptr(P_LN_IH_WEIGHT, cf.ln);
    biasp = ptr(P_BIAS, cf.ln);
    cw = ptr(P_LN_C_WEIGHT, cf.ln && !cf.rnn);
    cb = ptr(P_LN_C_BIAS, cf.ln && !cf.rnn);
    keep_c = ptr(P_KEEP_C, cf.zoneout);
    keep_h = ptr(P_KEEP_H, cf.zoneout);
    clipv = (T)cf.clipv; zc = (T)cf.zc; zh = (T)cf.zh; slope = (T)cf.gate_slope;
  }
};

}  // namespace lk
