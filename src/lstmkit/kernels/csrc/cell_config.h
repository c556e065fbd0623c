// The variant as the kernel sees it: Cfg (flags decoded, column offsets), AccLayout (where
// each parameter's gradient sits in the backward's per-thread accumulators) and CellParams
// (the cell's own parameters as raw pointers).
#pragma once
#include <torch/extension.h>
#include <cstdint>
#include "lstmkit_abi.h"  // generated from lstmkit/kernels/abi.py

namespace lk {

using namespace lk::abi;

struct Cfg {
  bool rnn, relu, has_i, has_f, has_o, cifg, peep, fgr, ln, niaf, noaf, clip;
  double clipv;
  int64_t H, P, Hout, R, G, nS;
  int64_t oi, of, og, oo;  // column offsets in R (-1 absent)
  int64_t si, sf, so;      // column offsets in s (nS*H) (-1 absent)
  Cfg(int64_t flags, double clip_, int64_t H_, int64_t P_) {
    rnn = flags & F_RNN; relu = flags & F_RNN_RELU;
    // which gates are computed, and where: the variant table's removal masks (lstmkit_abi.h)
    const bool present[4] = {!(flags & GATE_REMOVED[0]), !(flags & GATE_REMOVED[1]), !(flags & GATE_REMOVED[2]),
                             !(flags & GATE_REMOVED[3])};
    has_i = present[0]; has_f = present[1]; has_o = present[3];
    cifg = flags & F_CIFG;
    peep = flags & F_PEEPHOLE; fgr = flags & F_FGR;
    ln = flags & F_LAYERNORM; niaf = flags & F_NIAF; noaf = flags & F_NOAF;
    clip = flags & F_CLIP; clipv = clip_;
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
// thread: where each parameter's gradient sits in it. Written here once; backward_impl
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

// The cell's own parameters as raw pointers, nullptr where the variant has none; read the
// same way by forward_impl and backward_impl.
template <typename T>
struct CellParams {
  const T *pi, *pf, *po;  // peephole weights (H each)
  const T *gln, *glnih;   // layernorm gains of r = h W_hh^T and of a = x W_ih^T (R each)
  const T* biasp;         // layernorm: the bias added after both norms (R)
  const T *cw, *cb;       // layernorm of c: gain and bias (H each)
  T clipv;                // clip: |c| bound
  CellParams(const Cfg& cf, const at::Tensor& p_i, const at::Tensor& p_f, const at::Tensor& p_o,
             const at::Tensor& lnhh_w, const at::Tensor& lnih_w, const at::Tensor& bias,
             const at::Tensor& lnc_w, const at::Tensor& lnc_b) {
    pi = cf.peep && cf.has_i ? p_i.data_ptr<T>() : nullptr;
    pf = cf.peep && cf.has_f ? p_f.data_ptr<T>() : nullptr;
    po = cf.peep && cf.has_o ? p_o.data_ptr<T>() : nullptr;
    gln = cf.ln ? lnhh_w.data_ptr<T>() : nullptr;
    glnih = cf.ln ? lnih_w.data_ptr<T>() : nullptr;
    biasp = (cf.ln && bias.defined() && bias.numel() > 0) ? bias.data_ptr<T>() : nullptr;
    cw = (cf.ln && !cf.rnn) ? lnc_w.data_ptr<T>() : nullptr;
    cb = (cf.ln && !cf.rnn) ? lnc_b.data_ptr<T>() : nullptr;
    clipv = (T)cf.clipv;
  }
};

}  // namespace lk
