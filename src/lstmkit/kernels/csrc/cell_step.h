// The cell of one step, for one batch row: the pointwise part of docs/cell.md's "One step",
// forward (StepForward) and backward (StepBackward). The time loops (forward.h, backward.h)
// own the GEMMs, the barriers, the projection and the chunking; they call these between their
// GEMM phases, each thread on its own rows. Shapes: R = Σ n_k gate columns (G·H without deep
// gates), H cells, H_out
// outputs; a "row" is one batch entry b of one step t (tb = t·B + b).
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include "cell_config.h"
#include "vec_math.h"

namespace lk {

// ---------------------------------------------------------------------------- activations

// A gate i, f or o: sigma(u), or (hard: Cfg::gate_hard) the hard sigmoid clamp(slope u + 1/2, 0, 1);
// and dL/du from dL/da and the gate's value a (the hard sigmoid's slope strictly inside (0, 1), else 0).
template <typename T>
static inline Vectorized<T> gate_act(bool hard, T slope, const Vectorized<T>& u) {
  using V = Vectorized<T>;
  if (!hard) return sigm(u);
  // slope·u rounded, then + 1/2 (the build contracts nothing): as the reference rounds it, so that
  // the kinks land where its do — one fused multiply-add gives 2.8e-17 at u = −3 in float64 (1/6
  // rounds down), inside the ramp, whose derivative is then the slope instead of 0
  return at::vec::clamp(V(slope) * u + V(T(0.5)), V(T(0)), V(T(1)));
}
template <typename T>
static inline Vectorized<T> gate_grad(bool hard, T slope, const Vectorized<T>& d, const Vectorized<T>& a) {
  using V = Vectorized<T>;
  const V one(T(1)), zero(T(0));
  if (!hard) return d * a * (one - a);
  return V::blendv(zero, d * V(slope), (a > zero) & (a < one));
}

// An activation by its code (PHI_*, lstmkit_abi.h: a deep gate's between layers, the candidate's
// and the output's), and its derivative from its output. Always inlined: an out-of-line call per
// vector took ~1 % of a one-step layernorm call (B = 32, H = 256, AVX-512).
template <typename T>
LK_INLINE static inline Vectorized<T> phi(int kind, const Vectorized<T>& v) {
  if (kind == PHI_TANH) return vtanh<T>(v);
  if (kind == PHI_RELU) return at::vec::maximum(v, Vectorized<T>(T(0)));
  if (kind == PHI_SIGMOID) return sigm(v);
  return v;
}
template <typename T>
LK_INLINE static inline Vectorized<T> phi_grad(int kind, const Vectorized<T>& d, const Vectorized<T>& a) {
  using V = Vectorized<T>;
  if (kind == PHI_TANH) return d * (V(T(1)) - a * a);
  if (kind == PHI_RELU) return V::blendv(V(T(0)), d, a > V(T(0)));
  if (kind == PHI_SIGMOID) return d * a * (V(T(1)) - a);
  return d;
}

// zoneout's keep probability of one row's entries j..j+n: the training mask, or z at evaluation
template <typename T>
static inline Vectorized<T> keep_of(const T* mask_row, T z, int64_t j, int n) {
  return mask_row ? ldv(mask_row + j, n) : Vectorized<T>(z);
}

// The sLSTM's pieces, shared by forward and backward (the backward recomputes the stabiliser's
// comparison and the normaliser's floor with the same instructions on the same stored values).
// log sigma(x) = min(x, 0) - log1p(exp(-|x|)).
template <typename T>
LK_INLINE static inline Vectorized<T> log_sigmoid(const Vectorized<T>& x) {
  using V = Vectorized<T>;
  return at::vec::minimum(x, V(T(0))) - log1p_unit<T>(vexp<T>(V(T(0)) - x.abs()));
}
// kept = log f + m_{t-1}: what the forget gate keeps, on the previous step's scale (log f = f~ or log sigma(f~)).
template <typename T>
static inline Vectorized<T> slstm_kept(const Cfg& cf, const Vectorized<T>& uf, const Vectorized<T>& mp) {
  return (cf.fexp ? uf : log_sigmoid<T>(uf)) + mp;
}
// m_t = max(kept, i~), or i~ where the cell was empty (n_{t-1} = 0).
template <typename T>
static inline Vectorized<T> slstm_stabiliser(const Vectorized<T>& ui, const Vectorized<T>& kept, const Vectorized<T>& np) {
  using V = Vectorized<T>;
  return V::blendv(at::vec::maximum(kept, ui), ui, np == V(T(0)));
}
// f' = exp(kept - m_t), or 0 where the cell was empty (n_{t-1} = 0: nothing to keep; exp(kept - i~)
// is unbounded there, and inf times the empty cell's 0 would be NaN).
template <typename T>
static inline Vectorized<T> slstm_forget(const Vectorized<T>& kept, const Vectorized<T>& m, const Vectorized<T>& np) {
  using V = Vectorized<T>;
  return V::blendv(vexp<T>(kept - m), V(T(0)), np == V(T(0)));
}
// n_t before its floor: f' n_{t-1} + i'; with n_clamp, max(that, 1).
template <typename T>
static inline Vectorized<T> slstm_n_raw(const Vectorized<T>& fv, const Vectorized<T>& np, const Vectorized<T>& iv) {
  return fv * np + iv;
}
template <typename T>
static inline Vectorized<T> slstm_normaliser(const Cfg& cf, const Vectorized<T>& fv, const Vectorized<T>& np,
                                             const Vectorized<T>& iv) {
  const Vectorized<T> raw = slstm_n_raw<T>(fv, np, iv);
  return cf.nclamp ? at::vec::maximum(raw, Vectorized<T>(T(1))) : raw;
}

// ---------------------------------------------------------------------------- forward

template <typename T>
struct StepForward {
  const Cfg& cf;
  const CellParams<T>& prm;
  int64_t B;
  const T* xg;               // (T, B, R) input pre-activations (layernorm: the raw x W_ih^T)
  T* r; int64_t ldr;         // (B, ldr) r = h_{t-1} W_hh^T (layernorm: replaced by z here)
  const T* fw; int64_t lds;  // fgr: (B, lds) s_{t-1} W_gg^T
  T* s;                      // fgr: (B, lds) the sigmoid gates' state
  T* c;                      // (B, H) the cell state, updated in place
  T* h; int64_t ldh;         // (B, ldh) the hidden state (no projection: written here)
  T* m; int64_t ldm;         // projection: (B, ldm) o ⊙ act(c), the W_hr GEMM's input
  T* Y;                      // (T, B, H_out) outputs
  T *G, *C, *CN, *RH, *RS, *AH, *AS;  // kept buffers, nullptr when not kept
  T* scratch; int64_t ldscratch;      // per thread: zoneout's copy of c_{t-1} (H)
  const MlpLayout& mlp;               // deep gates (none: mlp.any() is false)
  const MlpWeights<T>& mw;            // their layers' weights and biases
  T* acts; bool acts_per_step;        // a_j of every deep gate: (T, B, atot) kept, or (B, atot) per step
  T* vout;                            // (B, vtot) each layer's output; the last one is the gate's u (H)

  // xg's strides: (B·R, R) for a (T, B, R) xg; (0, ldr) when the projection runs in the loop
  // (forward_impl with an InputProjection: one (B, ldr) row block, rewritten every step)
  int64_t xg_ts = 0, xg_bs = 0;

  T* act_row(int64_t t, int64_t b) const { return acts + ((acts_per_step ? 0 : t * B) + b) * mlp.atot; }
  const T* xg_row(int64_t t, int64_t b) const { return xg + t * xg_ts + b * xg_bs; }

  // Before any deep gate's MLP: layernorm's z = LN(a) g_ih + LN(r) g_hh (+ bias) per gate chunk
  // (written over r; a_hat, r_hat, 1/std kept), and each deep gate's a_1 = phi(z_k).
  void pre_row(int64_t t, int64_t b) const {
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t R = cf.R, tb = t * B + b;
    T* rr = r + b * ldr;
    const T* xr = xg_row(t, b);
    if (cf.ln) {
      for (int64_t k = 0; k < cf.G; ++k) {
        const int64_t o = cf.co[k], w = cf.cw[k];
        const T* ach = xr + o;
        T* rch = rr + o;
        T ma, ra, mr, rs;
        row_stats2(ach, rch, w, ma, ra, mr, rs);
        T* ah = AH ? AH + tb * R + o : nullptr;
        T* rh = RH ? RH + tb * R + o : nullptr;
        if (AH) { AS[tb * cf.G + k] = ra; RS[tb * cf.G + k] = rs; }
        const V vma(ma), vra(ra), vmr(mr), vrs(rs);
        for (int64_t j = 0; j < w; j += VL) {
          const int n = (int)std::min<int64_t>(VL, w - j);
          const V ahat = (ldv(ach + j, n) - vma) * vra;
          const V rhat = (ldv(rch + j, n) - vmr) * vrs;
          if (ah) { stv(ahat, ah + j, n); stv(rhat, rh + j, n); }
          stv(ln_z(ahat, rhat, prm.glnih, prm.gln, prm.biasp, o + j, n), rch + j, n);
        }
      }
    }
    if (!mlp.any()) return;
    T* ar = act_row(t, b);
    for (const MlpGate& mg : mlp.gates) {  // a_1 = phi(z_k), z_k the gate's n_1 columns
      const int64_t o = cf.zoff[mg.g], w = mg.w[0];
      for (int64_t j = 0; j < w; j += VL) {
        const int n = (int)std::min<int64_t>(VL, w - j);
        const V zv = cf.ln ? ldv(rr + o + j, n) : ldv(xr + o + j, n) + ldv(rr + o + j, n);
        stv(phi<T>(mlp.phi, zv), ar + mg.aoff[0] + j, n);
      }
    }
  }

  // After the GEMMs of MLP layer `depth` (1-based): a hidden layer's output plus bias becomes the
  // next layer's input a = phi(·). A gate's last layer is its u, left in vout by its GEMM with the
  // bias added there (StepWeights::last_bias): nothing to do here.
  void mlp_row(int64_t t, int64_t b, int depth) const {
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const T* vr = vout + b * mlp.vtot;
    T* ar = act_row(t, b);
    for (size_t k = 0; k < mlp.gates.size(); ++k) {
      const MlpGate& mg = mlp.gates[k];
      if (mg.m <= depth) continue;  // no layer this deep, or its last
      const int j0 = depth - 1;
      const int64_t w = mg.w[depth];
      const T* v = vr + mg.voff[j0];
      const T* bias = mw.b[k * mlp.depth + j0];
      for (int64_t j = 0; j < w; j += VL) {
        const int n = (int)std::min<int64_t>(VL, w - j);
        V x = ldv(v + j, n);
        if (bias) x = x + ldv(bias + j, n);
        stv(phi<T>(mlp.phi, x), ar + mg.aoff[depth] + j, n);
      }
    }
  }

  // One valid step of one row of the sLSTM (docs/cell.md, "The sLSTM"): the state c, n, m of the
  // row updated in place; G keeps i', f', z = tanh(z~), o, and the pre-activations i~, f~ (the
  // backward recomputes the stabiliser's comparison from them, bit for bit); C the new c, n, m.
  void slstm_row(int64_t t, int64_t b) const {
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t H = cf.H, tb = t * B + b;
    const T* rr = r + b * ldr;
    const T* xr = xg_row(t, b);
    T* st = c + b * cf.SH;  // c | n | m
    T* gr = G ? G + tb * cf.GW : nullptr;
    T* hr = h + b * ldh;
    T* yr = Y + tb * H;
    for (int64_t j = 0; j < H; j += VL) {
      const int n = (int)std::min<int64_t>(VL, H - j);
      auto u = [&](int g) { return ldv(xr + cf.zoff[g] + j, n) + ldv(rr + cf.zoff[g] + j, n); };
      const V ui = u(GATE_I), uf = u(GATE_F), uz = u(GATE_G), uo = u(GATE_O);
      const V cp = ldv(st + SS_C * H + j, n), np = ldv(st + SS_N * H + j, n), mp = ldv(st + SS_M * H + j, n);
      const V kept = slstm_kept(cf, uf, mp);
      const V m = slstm_stabiliser(ui, kept, np);
      const V iv = vexp<T>(ui - m), fv = slstm_forget<T>(kept, m, np);
      const V z = vtanh<T>(uz), o = sigm<T>(uo);
      const V cn = fv * cp + iv * z;
      const V nn = slstm_normaliser(cf, fv, np, iv);
      const V hv = o * (cn / nn);
      stv(cn, st + SS_C * H + j, n); stv(nn, st + SS_N * H + j, n); stv(m, st + SS_M * H + j, n);
      stv(hv, hr + j, n); stv(hv, yr + j, n);
      if (gr) {
        stv(iv, gr + SK_I * H + j, n); stv(fv, gr + SK_F * H + j, n); stv(z, gr + SK_G * H + j, n);
        stv(o, gr + SK_O * H + j, n); stv(ui, gr + SK_I_RAW * H + j, n); stv(uf, gr + SK_F_RAW * H + j, n);
      }
    }
    if (C) std::copy(st, st + cf.SH, C + tb * cf.SH);
  }

  // One valid step of one row of the LSTM (after pre_row and, with deep gates, the MLPs).
  void lstm_row(int64_t t, int64_t b, int tid) const {
    if (cf.slstm) slstm_row(t, b);
    else if (cf.plain) lstm_row_impl<true>(t, b, tid);
    else lstm_row_impl<false>(t, b, tid);
  }
  // Plain: the cell's options that Cfg::plain rules out are folded to constants at compile time
  // (the same code: fewer tests per vector, and the activations' constants stay in registers).
  // perf on AVX2 (Zen 1), B = 64, H = 256, inference: this pass's samples 18 % fewer for vanilla, 21 %
  // for gate_hidden=(32,).
  template <bool Plain>
  void lstm_row_impl(int64_t t, int64_t b, int tid) const {
    const bool has_i = Plain || cf.has_i, has_f = Plain || cf.has_f, has_o = Plain || cf.has_o;
    const bool cifg = !Plain && cf.cifg, clip = !Plain && cf.clip, zoneout = !Plain && cf.zoneout;
    const bool hard = !Plain && cf.gate_hard;
    const bool ln = !Plain && cf.ln, fgr = !Plain && cf.fgr;
    const int cand_act = Plain ? PHI_TANH : cf.cand_act, out_act = Plain ? PHI_TANH : cf.out_act;
    const int64_t P = Plain ? 0 : cf.P;
    const T *pi = Plain ? nullptr : prm.pi, *pf = Plain ? nullptr : prm.pf, *po = Plain ? nullptr : prm.po;
    const T* cw = Plain ? nullptr : prm.cw;  // layernorm of c
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t R = cf.R, H = cf.H, Hout = cf.Hout, tb = t * B + b;
    T* yr = Y + tb * Hout;
    const T* rr = r + b * ldr;
    const T* xr = xg_row(t, b);
    T* gr = G ? G + tb * cf.G * H : nullptr;  // gate activations (G·H), kept only when asked for
    T* cr = c + b * H;
    // where gate g's pre-activation u comes from: z = xg + r at its columns, the LN z (in r),
    // or, for a deep gate, its MLP's last output
    const T* u_deep[N_GATES] = {};
    for (const MlpGate& mg : mlp.gates) u_deep[mg.g] = vout + b * mlp.vtot + mg.voff[mg.m - 1];
    auto pre = [&](int g, int64_t j, int n) LK_INLINE -> V {
      if (u_deep[g]) return ldv(u_deep[g] + j, n);
      const int64_t off = cf.zoff[g];
      if (ln) return ldv(rr + off + j, n);
      return ldv(xr + off + j, n) + ldv(rr + off + j, n);
    };
    const T* fr = fgr ? fw + b * lds : nullptr;
    T* sr = fgr ? s + b * lds : nullptr;
    T* cprev = zoneout ? scratch + tid * ldscratch : nullptr;
    if (cprev) std::copy(cr, cr + H, cprev);
    // a gate i, f or o (g = GATE_I, GATE_F, GATE_O; soff its place in fgr's s): act(u [+ p ⊙ c] [+ fgr's input]),
    // kept in G and in fgr's s
    auto gate = [&](int g, int64_t soff, const T* peep, const V& cv, int64_t j, int n) LK_INLINE -> V {
      V u = pre(g, j, n);
      if (peep) u = at::vec::fmadd(ldv(peep + j, n), cv, u);
      if (fr) u = u + ldv(fr + soff + j, n);
      const V a = gate_act(hard, prm.slope, u);
      if (gr) stv(a, gr + cf.aoff[g] + j, n);
      if (sr) stv(a, sr + soff + j, n);
      return a;
    };
    const V one(T(1));
    // i, f, g -> the new cell state c~ (in place)
    for (int64_t j = 0; j < H; j += VL) {
      const int n = (int)std::min<int64_t>(VL, H - j);
      const V cp = ldv(cr + j, n);
      V i = one, f = one;
      if (has_i) i = gate(GATE_I, cf.si, pi, cp, j, n);
      if (has_f) f = gate(GATE_F, cf.sf, pf, cp, j, n);
      else if (cifg) f = one - i;
      const V g = phi(cand_act, pre(GATE_G, j, n));
      if (gr) stv(g, gr + cf.aoff[GATE_G] + j, n);
      V cn = at::vec::fmadd(f, cp, i * g);
      if (clip) cn = at::vec::clamp(cn, V(-prm.clipv), V(prm.clipv));
      stv(cn, cr + j, n);
    }
    if (CN) std::copy(cr, cr + H, CN + tb * H);
    T cmean = 0, crstd = 1;
    if (cw) row_stats(cr, H, cmean, crstd);
    T* hout = P > 0 ? m + b * ldm : h + b * ldh;
    const T* kh = zoneout && prm.keep_h ? prm.keep_h + tb * Hout : nullptr;
    // o, h~ (no projection: zoneout mixes in h_{t-1}, still in hout, here)
    for (int64_t j = 0; j < H; j += VL) {
      const int n = (int)std::min<int64_t>(VL, H - j);
      const V cv = ldv(cr + j, n);
      V o = one;
      if (has_o) o = gate(GATE_O, cf.so, po, cv, j, n);
      V mv = cv;
      if (cw) mv = at::vec::fmadd((cv - V(cmean)) * V(crstd), ldv(cw + j, n), ldv(prm.cb + j, n));
      V hv = o * phi(out_act, mv);
      if (zoneout && P == 0) hv = at::vec::fmadd(keep_of(kh, prm.zh, j, n), ldv(hout + j, n) - hv, hv);
      stv(hv, hout + j, n);
      if (P == 0) stv(hv, yr + j, n);
    }
    if (zoneout) {  // c_t = c~ + d_c (c_{t-1} − c~)
      const T* kc = prm.keep_c ? prm.keep_c + tb * H : nullptr;
      for (int64_t j = 0; j < H; j += VL) {
        const int n = (int)std::min<int64_t>(VL, H - j);
        const V cn = ldv(cr + j, n);
        stv(at::vec::fmadd(keep_of(kc, prm.zc, j, n), ldv(cprev + j, n) - cn, cn), cr + j, n);
      }
    }
    if (C) std::copy(cr, cr + H, C + tb * H);
  }

  // One valid step of one row of the plain RNN.
  void rnn_row(int64_t t, int64_t b) const {
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t H = cf.H, tb = t * B + b;
    T* hr = h + b * ldh;
    T* yr = Y + tb * H;
    const T* xr = xg_row(t, b);
    const T* rr = r + b * ldr;
    for (int64_t j = 0; j < H; j += VL) {
      const int n = (int)std::min<int64_t>(VL, H - j);
      const V u = ldv(xr + j, n) + ldv(rr + j, n);
      const V hv = cf.relu ? at::vec::maximum(u, V(T(0))) : vtanh<T>(u);
      stv(hv, hr + j, n); stv(hv, yr + j, n);
    }
  }

  // A step past the row's length: the state carries over, the output is 0, kept rows are 0
  // (the cell state rows hold the carried c).
  void padded_row(int64_t t, int64_t b) const {
    const int64_t R = cf.R, H = cf.H, tb = t * B + b;
    if (cf.P == 0) std::fill(Y + tb * cf.Hout, Y + (tb + 1) * cf.Hout, T(0));
    if (cf.rnn) return;
    const T* cr = c + b * cf.SH;
    if (G) std::fill(G + tb * cf.GW, G + (tb + 1) * cf.GW, T(0));
    if (mlp.any() && !acts_per_step) std::fill(act_row(t, b), act_row(t, b) + mlp.atot, T(0));
    if (C) std::copy(cr, cr + cf.SH, C + tb * cf.SH);
    if (CN) std::copy(cr, cr + H, CN + tb * H);
    if (RH) {
      std::fill(RH + tb * R, RH + tb * R + R, T(0)); std::fill(RS + tb * cf.G, RS + tb * cf.G + cf.G, T(0));
      std::fill(AH + tb * R, AH + tb * R + R, T(0)); std::fill(AS + tb * cf.G, AS + tb * cf.G + cf.G, T(0));
    }
  }

  // Projection, after the W_hr GEMM wrote h~ = m W_hr^T into Y's row: zoneout, then the state.
  void project_row(int64_t t, int64_t b, bool valid) const {
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t P = cf.P, tb = t * B + b;
    T* yr = Y + tb * P;
    T* hr = h + b * ldh;
    if (!valid) { std::fill(yr, yr + P, T(0)); return; }
    if (cf.zoneout) {
      const T* kh = prm.keep_h ? prm.keep_h + tb * P : nullptr;
      for (int64_t j = 0; j < P; j += VL) {
        const int n = (int)std::min<int64_t>(VL, P - j);
        const V hv = ldv(yr + j, n);
        stv(at::vec::fmadd(keep_of(kh, prm.zh, j, n), ldv(hr + j, n) - hv, hv), yr + j, n);
      }
    }
    std::copy(yr, yr + P, hr);
  }
};

// ---------------------------------------------------------------------------- backward

template <typename T>
struct StepBackward {
  const Cfg& cf;
  const CellParams<T>& prm;
  AccLayout al;
  int64_t B;
  const T *G, *C, *CN, *Y, *c0;        // kept buffers, outputs, c_0
  const T *RH, *RS, *AH, *AS;          // layernorm's kept statistics
  T* dXG;                              // (T, B, R) dL/dxg (layernorm: dL/d raw a, after the LN backward)
  T* dc; T* dS; T* dUS; int64_t lds;   // (B, H) carried dL/dc_t; fgr: carried dL/ds_t, this step's dL/du_S
  T* dZS;                              // layernorm + fgr: (T, B, nS·H) dL/du_S of every step
  T* Mo;                               // projection: (T, B, H) o ⊙ act(m), for dW_hr
  const MlpLayout& mlp;                // deep gates (none: mlp.any() is false)
  const T* acts;                       // (T, B, atot) the forward's a_j of every deep gate
  T* dV; int64_t ldV;                  // (Tc, B, vtot) dL/d(each layer's output), row stride ldV; the last: dL/du
  T* dA;                               // (B, atot) the GEMMs' dL/da_j of this step
  int64_t dv_row0 = 0;                 // dV holds a chunk of steps: row tb = t·B + b at tb − dv_row0

  T* dv_row(int64_t tb) const { return dV + (tb - dv_row0) * ldV; }

  // The gate activations of row (t, b) recomputed from layernorm's a_hat, r_hat (G not kept),
  // into gbuf: the same instructions on the same values as the forward (bit-identical).
  void regate(int64_t tb, const T* cpr, const T* cr, T* gbuf) const {
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t R = cf.R, H = cf.H;
    const T* ah = AH + tb * R;
    const T* rh = RH + tb * R;
    auto z = [&](int64_t o, int n) { return ln_z(ldv(ah + o, n), ldv(rh + o, n), prm.glnih, prm.gln, prm.biasp, o, n); };
    for (int64_t j = 0; j < H; j += VL) {
      const int n = (int)std::min<int64_t>(VL, H - j);
      const V cp = ldv(cpr + j, n);
      if (cf.has_i) {
        V u = z(cf.oi + j, n);
        if (prm.pi) u = at::vec::fmadd(ldv(prm.pi + j, n), cp, u);
        stv(gate_act(cf.gate_hard, prm.slope, u), gbuf + cf.aoff[GATE_I] + j, n);
      }
      if (cf.has_f) {
        V u = z(cf.of + j, n);
        if (prm.pf) u = at::vec::fmadd(ldv(prm.pf + j, n), cp, u);
        stv(gate_act(cf.gate_hard, prm.slope, u), gbuf + cf.aoff[GATE_F] + j, n);
      }
      stv(phi(cf.cand_act, z(cf.og + j, n)), gbuf + cf.aoff[GATE_G] + j, n);
      if (cf.has_o) {
        V u = z(cf.oo + j, n);
        if (prm.po) u = at::vec::fmadd(ldv(prm.po + j, n), ldv(cr + j, n), u);
        stv(gate_act(cf.gate_hard, prm.slope, u), gbuf + cf.aoff[GATE_O] + j, n);
      }
    }
  }

  // One valid step of one row of the sLSTM's BPTT. dh (+ dh2): dL/dh_t; the carried dc row holds
  // dL/d(c_t, n_t, m_t) and becomes dL/d(c_{t-1}, n_{t-1}, m_{t-1}). The stabiliser's max is
  // differentiated as it is computed (as autograd does in xLSTM's and FlashRNN's PyTorch cells):
  // dL/dm_t goes to the larger of i~ and kept (half to each at a tie; all to i~ where the cell was
  // empty), besides what m_t gets from i' = exp(i~ - m_t) and f' = exp(kept - m_t).
  void slstm_row(int64_t t, int64_t b, const T* dh, const T* dh2) const {
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t R = cf.R, H = cf.H, SH = cf.SH, tb = t * B + b;
    T* dxr = dXG + tb * R;
    const T* gr = G + tb * cf.GW;                            // i', f', z, o, i~, f~ (SlstmKept)
    const T* sr = C + tb * SH;                               // c_t, n_t, m_t (SlstmState)
    const T* sp = t > 0 ? C + (tb - B) * SH : c0 + b * SH;  // c_{t-1}, n_{t-1}, m_{t-1}
    T* ds = dc + b * SH;
    const V one(T(1)), zero(T(0)), half(T(0.5));
    for (int64_t j = 0; j < H; j += VL) {
      const int n = (int)std::min<int64_t>(VL, H - j);
      const V dhv = dh2 ? ldv(dh + j, n) + ldv(dh2 + j, n) : ldv(dh + j, n);
      const V iv = ldv(gr + SK_I * H + j, n), fv = ldv(gr + SK_F * H + j, n), z = ldv(gr + SK_G * H + j, n),
              o = ldv(gr + SK_O * H + j, n);
      const V ui = ldv(gr + SK_I_RAW * H + j, n), uf = ldv(gr + SK_F_RAW * H + j, n);
      const V cn = ldv(sr + SS_C * H + j, n), nn = ldv(sr + SS_N * H + j, n);
      const V cp = ldv(sp + SS_C * H + j, n), np = ldv(sp + SS_N * H + j, n), mp = ldv(sp + SS_M * H + j, n);
      // h = o (c / n)
      const V ratio = cn / nn;
      V dcv = ldv(ds + SS_C * H + j, n) + dhv * o / nn;
      V dnv = ldv(ds + SS_N * H + j, n) - dhv * o * ratio / nn;
      const V duo = dhv * ratio * o * (one - o);
      if (cf.nclamp) dnv = V::blendv(zero, dnv, slstm_n_raw<T>(fv, np, iv) >= one);  // the floor holds n: 0
      // c_t = f' c + i' z, n_t = f' n + i'
      const V di = dcv * z + dnv, df = dcv * cp + dnv * np;
      const V duz = dcv * iv * (one - z * z);
      // i' = exp(i~ - m_t), f' = exp(kept - m_t) (0 where empty), m_t = max(kept, i~) (i~ where empty)
      const V dm = ldv(ds + SS_M * H + j, n) - di * iv - df * fv;
      const V kept = slstm_kept<T>(cf, uf, mp);
      V to_i = V::blendv(V::blendv(zero, half, ui == kept), one, ui > kept);
      to_i = V::blendv(to_i, one, np == zero);
      const V dui = di * iv + dm * to_i;
      const V dkept = df * fv + dm * (one - to_i);
      const V duf = cf.fexp ? dkept : dkept * (one - sigm<T>(uf));
      stv(dui, dxr + cf.zoff[GATE_I] + j, n); stv(duf, dxr + cf.zoff[GATE_F] + j, n);
      stv(duz, dxr + cf.zoff[GATE_G] + j, n); stv(duo, dxr + cf.zoff[GATE_O] + j, n);
      stv(dcv * fv, ds + SS_C * H + j, n); stv(dnv * fv, ds + SS_N * H + j, n); stv(dkept, ds + SS_M * H + j, n);
    }
  }

  // One valid step of one row of the LSTM. dh (+ dh2 if given): (H) dL/dh~, the gradient at the
  // cell's own output (after zoneout's split; with projection: dL/dm); dsr: fgr's carried
  // dL/ds_t or nullptr. Writes each gate's dL/du to dXG's row (a deep gate's: to dV, for its
  // MLP's backward), fgr's to the dUS row; updates the carried dc to dL/dc_{t-1}; accumulates the
  // cell's parameter gradients into A (AccLayout). tmp: H scratch of this thread (the LN-c
  // backward's row); gbuf: the regated gates' row (layernorm without G). The sLSTM: slstm_row.
  void lstm_row(int64_t t, int64_t b, const T* dh, const T* dh2, const T* dsr, T* A, T* tmp, T* gbuf) const {
    if (cf.slstm) slstm_row(t, b, dh, dh2);
    else if (cf.plain) lstm_row_impl<true>(t, b, dh, dh2, dsr, A, tmp, gbuf);
    else lstm_row_impl<false>(t, b, dh, dh2, dsr, A, tmp, gbuf);
  }
  // Plain: as StepForward::lstm_row_impl, Cfg::plain's options folded at compile time. perf on AVX2
  // (Zen 1), B = 32, T = 100, I = H = 64, training: this pass's samples (with its caller's) 25 % fewer.
  template <bool Plain>
  void lstm_row_impl(int64_t t, int64_t b, const T* dh, const T* dh2, const T* dsr, T* A, T* tmp, T* gbuf) const {
    const bool has_i = Plain || cf.has_i, has_f = Plain || cf.has_f, has_o = Plain || cf.has_o;
    const bool cifg = !Plain && cf.cifg, clip = !Plain && cf.clip, zoneout = !Plain && cf.zoneout;
    const bool hard = !Plain && cf.gate_hard;
    const int cand_act = Plain ? PHI_TANH : cf.cand_act, out_act = Plain ? PHI_TANH : cf.out_act;
    const T *pi = Plain ? nullptr : prm.pi, *pf = Plain ? nullptr : prm.pf, *po = Plain ? nullptr : prm.po;
    const T* cw = Plain ? nullptr : prm.cw;  // layernorm of c
    if (Plain) dsr = nullptr;  // fgr's
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t R = cf.R, H = cf.H, tb = t * B + b;
    T* dxr = dXG + tb * R;
    const T* cr = CN ? CN + tb * H : C + tb * H;  // the cell's c~ (before zoneout)
    const T* cpr = t > 0 ? C + (tb - B) * H : c0 + b * H;  // the state it read
    const V one(T(1)), zero(T(0));
    const T* gr = G ? G + tb * cf.G * H : gbuf;
    if (!G) regate(tb, cpr, cr, gbuf);
    // where gate g's dL/du goes: its columns of dXG, or a deep gate's MLP output gradient
    T* du_to[N_GATES];
    for (int g = 0; g < N_GATES; ++g) du_to[g] = cf.zoff[g] >= 0 ? dxr + cf.zoff[g] : nullptr;
    for (const MlpGate& mg : mlp.gates) du_to[mg.g] = dv_row(tb) + mg.voff[mg.m - 1];
    T* dcr = dc + b * H;
    T* dus = !Plain && cf.fgr ? dUS + b * lds : nullptr;
    T* dchat = tmp;
    T* A_pi = A + al.peephole(0); T* A_pf = A + al.peephole(1); T* A_po = A + al.peephole(2);
    T* A_cw = A + al.ln_c_weight(); T* A_cb = A + al.ln_c_bias();
    T cmean = 0, crstd = 1;
    if (cw) row_stats(cr, H, cmean, crstd);
    T s1 = 0, s2 = 0;  // LN-c backward sums: mean(dchat), mean(dchat·chat)
    // o, dm  (h~ = o ⊙ act(m), m = c~ or LN(c~))
    {
      V a1(T(0)), a2(T(0));
      for (int64_t j = 0; j < H; j += VL) {
        const int n = (int)std::min<int64_t>(VL, H - j);
        const V cv = ldv(cr + j, n);
        const V dhv = dh2 ? ldv(dh + j, n) + ldv(dh2 + j, n) : ldv(dh + j, n);
        V chat, mv = cv;
        if (cw) { chat = (cv - V(cmean)) * V(crstd); mv = at::vec::fmadd(chat, ldv(cw + j, n), ldv(prm.cb + j, n)); }
        const V tm = phi(out_act, mv);
        V o = one;
        if (has_o) {
          o = ldv(gr + cf.aoff[GATE_O] + j, n);
          V dO = dhv * tm;
          if (dsr) dO = dO + ldv(dsr + cf.so + j, n);
          const V du = gate_grad(hard, prm.slope, dO, o);
          stv(du, du_to[GATE_O] + j, n);
          if (dus) stv(du, dus + cf.so + j, n);
          if (po) stv(at::vec::fmadd(du, cv, ldv(A_po + j, n)), A_po + j, n);
        }
        if (Mo) stv(o * tm, Mo + tb * H + j, n);
        const V dm = phi_grad(out_act, dhv * o, tm);
        if (cw) {
          stv(at::vec::fmadd(dm, chat, ldv(A_cw + j, n)), A_cw + j, n);
          stv(ldv(A_cb + j, n) + dm, A_cb + j, n);
          V dch = dm * ldv(cw + j, n);
          if (n < VL) { dch = V::set(zero, dch, n); chat = V::set(zero, chat, n); }
          a1 = a1 + dch; a2 = at::vec::fmadd(dch, chat, a2);
          stv(dch, dchat + j, n);
        } else {
          stv(dm, dchat + j, n);
        }
      }
      if (cw) { s1 = hsum(a1) / T(H); s2 = hsum(a2) / T(H); }
    }
    // dc~ -> i, f, g, c_{t-1}  (zoneout: dL/dc_t splits into (1 − d_c) to c~ and d_c to c_{t-1})
    const T* kc = zoneout && prm.keep_c ? prm.keep_c + tb * H : nullptr;
    for (int64_t j = 0; j < H; j += VL) {
      const int n = (int)std::min<int64_t>(VL, H - j);
      const V cv = ldv(cr + j, n), cp = ldv(cpr + j, n);
      const V dcarried = ldv(dcr + j, n);
      V dcp(T(0));
      V dcn = dcarried;
      if (zoneout) {
        const V d = keep_of(kc, prm.zc, j, n);
        dcp = d * dcarried;
        dcn = dcarried - dcp;
      }
      if (cw) {
        const V chat = (cv - V(cmean)) * V(crstd);
        dcn = dcn + V(crstd) * (ldv(dchat + j, n) - V(s1) - chat * V(s2));
      } else {
        dcn = dcn + ldv(dchat + j, n);
      }
      if (po) dcn = at::vec::fmadd(ldv(du_to[GATE_O] + j, n), ldv(po + j, n), dcn);
      const V i = has_i ? ldv(gr + cf.aoff[GATE_I] + j, n) : one;
      const V g = ldv(gr + cf.aoff[GATE_G] + j, n);
      V f = one;
      if (has_f) f = ldv(gr + cf.aoff[GATE_F] + j, n);
      else if (cifg) f = one - i;
      // the clip passes the gradient where |c~| <= clip before it (torch.clamp's rule, the boundary
      // included): c~ recomputed from the kept gates as the forward computed it (the kept c_t is
      // after the clip, where exactly clip and clipped to clip look alike)
      if (clip) dcn = V::blendv(zero, dcn, at::vec::fmadd(f, cp, i * g).abs() <= V(prm.clipv));
      dcp = at::vec::fmadd(dcn, f, dcp);
      stv(phi_grad(cand_act, dcn * i, g), du_to[GATE_G] + j, n);
      const V df = dcn * cp;
      if (has_f) {
        V d = df;
        if (dsr) d = d + ldv(dsr + cf.sf + j, n);
        const V du = gate_grad(hard, prm.slope, d, f);
        stv(du, du_to[GATE_F] + j, n);
        if (dus) stv(du, dus + cf.sf + j, n);
        if (pf) { dcp = at::vec::fmadd(du, ldv(pf + j, n), dcp); stv(at::vec::fmadd(du, cp, ldv(A_pf + j, n)), A_pf + j, n); }
      }
      if (has_i) {
        V d = dcn * g;
        if (cifg) d = d - df;
        if (dsr) d = d + ldv(dsr + cf.si + j, n);
        const V du = gate_grad(hard, prm.slope, d, i);
        stv(du, du_to[GATE_I] + j, n);
        if (dus) stv(du, dus + cf.si + j, n);
        if (pi) { dcp = at::vec::fmadd(du, ldv(pi + j, n), dcp); stv(at::vec::fmadd(du, cp, ldv(A_pi + j, n)), A_pi + j, n); }
      }
      stv(dcp, dcr + j, n);
    }
    if (dZS) std::copy(dus, dus + cf.nS * H, dZS + tb * cf.nS * H);
  }

  // After the GEMMs dA = dV_depth W_depth of MLP layer `depth` (1-based, from the last down):
  // dL/d(its input's pre-activation) = dA ⊙ phi'(a_depth): the previous layer's output gradient
  // (into dV), or, at depth 1, the gate's dL/dz_k (into its n_1 columns of dXG).
  void mlp_back_row(int64_t t, int64_t b, int depth) const {
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t tb = t * B + b;
    const T* ar = acts + tb * mlp.atot;
    const T* da = dA + b * mlp.atot;
    for (const MlpGate& mg : mlp.gates) {
      if (mg.m < depth) continue;
      const int j0 = depth - 1;
      const int64_t w = mg.w[j0];
      T* out = depth > 1 ? dv_row(tb) + mg.voff[j0 - 1] : dXG + tb * cf.R + cf.zoff[mg.g];
      for (int64_t j = 0; j < w; j += VL) {
        const int n = (int)std::min<int64_t>(VL, w - j);
        stv(phi_grad<T>(mlp.phi, ldv(da + mg.aoff[j0] + j, n), ldv(ar + mg.aoff[j0] + j, n)), out + j, n);
      }
    }
  }

  // layernorm: dz (in dXG's row) -> both LN backwards, per gate chunk:
  //   dr = rs (g_hh dz − mean(g_hh dz) − r_hat mean(g_hh dz r_hat))  -> dwr (the dh GEMM's input)
  //   da = ra (g_ih dz − mean(g_ih dz) − a_hat mean(g_ih dz a_hat))  -> dXG's row (over dz)
  void layernorm_row(int64_t tb, T* dwr, T* A) const {
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t R = cf.R;
    T* dxr = dXG + tb * R;
    for (int64_t k = 0; k < cf.G; ++k) {
      const int64_t o = cf.co[k], w = cf.cw[k];
      T* dz = dxr + o;
      const T* ah = AH + tb * R + o;
      const T* rh = RH + tb * R + o;
      const T* gi = prm.glnih + o;
      const T* gh = prm.gln + o;
      T* aih = A + al.ln_ih_weight() + o;
      T* ahh = A + al.ln_hh_weight() + o;
      T* abi = A + al.bias() + o;
      const T ra = AS[tb * cf.G + k], rs = RS[tb * cf.G + k];
      V sa1(T(0)), sa2(T(0)), sr1(T(0)), sr2(T(0));
      for (int64_t j = 0; j < w; j += VL) {  // tails: the loads zero-fill, so the sums stay exact
        const int n = (int)std::min<int64_t>(VL, w - j);
        const V d = ldv(dz + j, n), av = ldv(ah + j, n), rv = ldv(rh + j, n);
        stv(at::vec::fmadd(d, av, ldv(aih + j, n)), aih + j, n);
        stv(at::vec::fmadd(d, rv, ldv(ahh + j, n)), ahh + j, n);
        if (prm.biasp) stv(ldv(abi + j, n) + d, abi + j, n);
        const V dai = d * ldv(gi + j, n), drh = d * ldv(gh + j, n);
        sa1 = sa1 + dai; sa2 = at::vec::fmadd(dai, av, sa2);
        sr1 = sr1 + drh; sr2 = at::vec::fmadd(drh, rv, sr2);
      }
      const V ma1(hsum(sa1) / T(w)), ma2(hsum(sa2) / T(w)), mr1(hsum(sr1) / T(w)), mr2(hsum(sr2) / T(w));
      const V vra(ra), vrs(rs);
      T* dwk = dwr + o;
      for (int64_t j = 0; j < w; j += VL) {
        const int n = (int)std::min<int64_t>(VL, w - j);
        const V d = ldv(dz + j, n);
        stv(vrs * (d * ldv(gh + j, n) - mr1 - ldv(rh + j, n) * mr2), dwk + j, n);
        stv(vra * (d * ldv(gi + j, n) - ma1 - ldv(ah + j, n) * ma2), dz + j, n);
      }
    }
  }

  // One valid step of one row of the plain RNN: dL/du = (dh + dh2) φ'(u), from the output y.
  void rnn_row(int64_t tb, const T* dh, const T* dh2, T* dwr) const {
    using V = Vectorized<T>;
    constexpr int VL = V::size();
    const int64_t H = cf.H;
    T* dxr = dXG + tb * H;
    const T* y = Y + tb * H;
    for (int64_t j = 0; j < H; j += VL) {
      const int n = (int)std::min<int64_t>(VL, H - j);
      const V dhv = ldv(dh + j, n) + ldv(dh2 + j, n), yv = ldv(y + j, n);
      const V du = cf.relu ? V::blendv(V(T(0)), dhv, yv > V(T(0))) : dhv * (V(T(1)) - yv * yv);
      stv(du, dxr + j, n); stv(du, dwr + j, n);
    }
  }
};

}  // namespace lk
