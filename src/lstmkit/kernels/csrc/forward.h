// forward_impl: the time loop of one layer-direction's forward (see recurrence.cpp for the
// phases and what is kept for backward); the cell itself is StepForward (cell_step.h).
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <vector>
#include "cell_config.h"
#include "cell_step.h"
#include "gemm.h"
#include "parallel.h"
#include "step_weights.h"
#include "vec_math.h"

namespace lk {

// Inference without a (T, B, R) xg: per step, phase A also computes xg_t = x_t W_ih^T (+ bias)
// into one (B, ldr) block that the pointwise pass reads (the operator's xg contract, ops.py:
// layernorm takes the raw product, its summed bias is params[P_BIAS]). The (T, B, R) xg of a
// long sequence is written and read once more than the GEMM needs, and fresh memory of that
// size is page-faulted in on every call (forward_step and forward_infer: step_node.h, entry.h).
template <typename T>
struct InputProjection {
  const T* x; int64_t I;          // (T, B, I) contiguous
  const T* w; int64_t sw0, sw1;   // W_ih (R, I) and its strides
  const T* bias;                  // (R,) x W_ih^T's bias, or nullptr
  const T* bias2;                 // (R,) a second bias added to it (b_hh), or nullptr
};

// A frozen layer's weights (lstmkit.freeze), packed once into the panels that forward_impl packs
// anew on every call: W_hh (heads: its blocks) and W_ih (R, I) for the projection in the loop.
// A step's GEMMs then read panels instead of packing 2 MiB of weights (H = 256) per call.
template <typename T>
struct FrozenPanels {
  at::Tensor whh, w_ih;  // the compute-dtype weights packed (kept alive with the panels)
  Packed<T> W;
  std::vector<Packed<T>> Wh;
  Packed<T> Wih;
  FrozenPanels(const at::Tensor& whh_, const at::Tensor& w_ih_, const Cfg& cf) : whh(whh_), w_ih(w_ih_) {
    constexpr int64_t many = 2;  // packed panels, never BLAS in place
    pack_recurrent<T>(whh, cf, /*transposed=*/false, many, W, Wh);
    Wih.init(w_ih.data_ptr<T>(), w_ih.stride(0), w_ih.stride(1), (int)cf.R, (int)w_ih.size(1), many, cf.bf16_gemm);
    W.pack_share(0, 1);
    for (auto& w : Wh) w.pack_share(0, 1);
    Wih.pack_share(0, 1);
  }
};

// c0_scratch: c0 is this call's own (made for it, read by nobody after it), so c_n may be it.
// Returns {Y, h_n, c_n, then the buffers in abi.BUFFERS order} (undefined for each one not kept;
// without buffers_out, Y, h_n and c_n alone). params: the operator's params list (abi.PARAMS order, compute dtype).
// xg_low: a bfloat16 / float16 layer's (T, B, R) xg in its own dtype (xg then an empty (T, B, 0)
// tensor giving the sizes): each thread widens its rows of step t into a (B, ldr) block just before
// the cell reads them, instead of a float32 copy of the whole (T, B, R) written and read back.
template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& xg, const at::Tensor& whh, const at::Tensor& h0,
                                     const at::Tensor& c0, const std::vector<int64_t>& len,
                                     const std::vector<at::Tensor>& params, const Cfg& cf, const MlpLayout& mlp,
                                     const MlpWeights<T>& mw, bool save, int nthreads, bool buffers_out = true,
                                     const InputProjection<T>* proj_in = nullptr, const at::Tensor& xg_low = {},
                                     const FrozenPanels<T>* frozen = nullptr, bool c0_scratch = false) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  const int64_t Tn = xg.size(0), B = xg.size(1), R = cf.R, H = cf.H, Hout = cf.Hout, P = cf.P;
  const bool lstm = !cf.rnn;
  auto opt = xg.options();
  at::Tensor Y = at::empty({Tn, B, Hout}, opt);
  std::vector<at::Tensor> buf(N_BUFFERS);  // what the backward reads (kept_widths), each (T, B, width)
  if (save) {
    const std::vector<int64_t> widths = kept_widths(cf, mlp);
    for (int k = 0; k < N_BUFFERS; ++k)
      if (widths[k] > 0) buf[k] = at::empty({Tn, B, widths[k]}, opt);
  }
  auto kept = [&](int k) -> T* { return buf[k].defined() ? buf[k].data_ptr<T>() : nullptr; };
  const int64_t ldh = pad_ld(Hout, VL), ldr = pad_ld(R, VL), lds = pad_ld(std::max<int64_t>(cf.nS * H, 1), VL),
                ldm = pad_ld(H, VL), ldscratch = pad_ld(H, VL);
  // (B, S·H) c [, n, m], updated in place step by step: c0 itself where the caller made it for this
  // call (c0_scratch), else a copy
  at::Tensor cs = !lstm ? at::Tensor() : c0_scratch && c0.is_contiguous() ? c0 : c0.contiguous().clone();

  StepWeights<T> W(cf, mlp, mw, whh, params, Tn, /*transposed=*/false, /*with_recurrent=*/!frozen);
  // the recurrent weights' panels: this call's, or a frozen layer's packed once (with proj_in)
  const Packed<T>& Wrec = frozen ? frozen->W : W.recurrent;
  const std::vector<Packed<T>>& Wseg = frozen ? frozen->Wh : W.heads;
  const CellParams<T> prm(cf, params);
  // inference: the input projection in the loop (xg_t into xws), W_ih packed like W_hh
  Packed<T> Wih;
  const Packed<T>& Win = frozen ? frozen->Wih : Wih;
  if (proj_in && !frozen) Wih.init(proj_in->w, proj_in->sw0, proj_in->sw1, (int)R, (int)proj_in->I, Tn, cf.bf16_gemm);
  const bool widen = xg_low.defined() && !proj_in;  // xg_t's rows widened into xws, step by step

  // the call's workspaces: one allocation (Carve; zeroed but where a GEMM writes before the cell reads)
  Carve<T> ws;
  T *hsp, *rwp, *xwp = nullptr, *biasp = nullptr, *ssp = nullptr, *fwp = nullptr, *mwp = nullptr,
    *scratchp = nullptr, *voutp = nullptr, *actsp = nullptr;
  ws.take(hsp, B * ldh);                                 // h, (B, H_out)
  ws.take_rows(rwp, B, R, ldr);                          // r, (B, R): phase A's GEMMs write it
  if (proj_in || widen) ws.take_rows(xwp, B, R, ldr);    // xg_t, (B, R): the projection, or widened
  if (proj_in && proj_in->bias)  // the projection's bias, padded as the GEMM reads it
    ws.take(biasp, Win.bias_length());
  if (cf.fgr) { ws.take(ssp, B * lds); ws.take(fwp, B * lds); }  // fgr: s and s W_gg^T, (B, nS·H)
  if (P > 0) ws.take(mwp, B * ldm);                      // o ⊙ act(c), (B, H)
  if (cf.zoneout) ws.take(scratchp, nthreads * ldscratch);
  const bool acts_own = mlp.any() && !buf[B_MLP].defined();
  if (mlp.any()) {  // deep gates: each layer's output (B, vtot); a_j (B, atot) per step when not kept
    ws.take(voutp, B * mlp.vtot);
    if (acts_own) ws.take(actsp, B * mlp.atot);
  }
  const at::Tensor workspace = ws.allocate(opt);
  if (mlp.any() && !acts_own) actsp = kept(B_MLP);
  {
    const at::Tensor h0c = h0.contiguous();  // (B, H_out), the compute dtype
    TORCH_INTERNAL_ASSERT(h0c.scalar_type() == Y.scalar_type() && h0c.numel() == B * Hout);
    const T* h0p = h0c.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) std::copy(h0p + b * Hout, h0p + (b + 1) * Hout, hsp + b * ldh);
  }
  if (biasp)
    for (int64_t n = 0; n < R; ++n) biasp[n] = proj_in->bias[n] + (proj_in->bias2 ? proj_in->bias2[n] : T(0));
  StepForward<T> step{cf, prm, B, xwp ? xwp : xg.data_ptr<T>(), rwp, ldr, fwp, lds, ssp,
                            lstm ? cs.data_ptr<T>() : nullptr, hsp, ldh, mwp, ldm, Y.data_ptr<T>(),
                            kept(B_G), kept(B_C), kept(B_CN), kept(B_RH), kept(B_RS), kept(B_AH), kept(B_AS),
                            scratchp, ldscratch, mlp, mw, actsp, acts_own, voutp};

  step.xg_ts = xwp ? 0 : B * R;
  step.xg_bs = xwp ? ldr : R;
  // widen row (t, b) of xg_low into row b of xws (the caller's thread owns row b in phase B)
  auto widen_row = [&](int64_t t, int64_t b) {
    T* dst = xwp + b * ldr;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(xg_low.scalar_type(), "lstmkit_widen", [&] {
      const scalar_t* src = xg_low.data_ptr<scalar_t>() + (t * B + b) * R;
      for (int64_t j = 0; j < R; ++j) dst[j] = static_cast<T>(src[j]);
    });
  };

  std::vector<GemmTask<T>> phaseA;  // r = h W_hh^T (heads: one GEMM per head and gate) [, s W_gg^T] [, xg_t]
  if (cf.heads == 1) phaseA.push_back(GemmTask<T>{&Wrec, (int)B, hsp, ldh, rwp, ldr, false});
  for (size_t s = 0; s < Wseg.size(); ++s) {
    const HeadSeg& sg = cf.hseg[s];
    phaseA.push_back(GemmTask<T>{&Wseg[s], (int)B, hsp + sg.head * cf.Dh, ldh, rwp + sg.canon, ldr, false});
  }
  if (cf.fgr) phaseA.push_back(GemmTask<T>{&W.gg, (int)B, ssp, lds, fwp, lds, false});
  const int iA = (int)phaseA.size();  // the input projection's task (its A moves with t)
  if (proj_in)
    phaseA.push_back(GemmTask<T>{&Win, (int)B, proj_in->x, proj_in->I, xwp, ldr, false, biasp});
  const int nA = (int)phaseA.size();
  const bool by_rows = split_by_rows<T>(B, nthreads, phaseA, W.mlp, P > 0 ? &W.hr : nullptr);

  parallel_region(nthreads, [&](const int tid, const int nth, Barrier& bar) {
    // absent ones (a frozen layer's W_hh and W_ih: packed already) have no panels here
    W.pack_share(tid, nth);
    Wih.pack_share(tid, nth);
    std::vector<GemmTask<T>> tasks(phaseA);  // this thread's copy (the input projection's A moves with t)
    int64_t b0, b1;
    split_range(B, tid, nth, b0, b1);
    // row mode: every panel of this thread's rows, and no barrier in the loop; else a share of the panels
    if (by_rows)
      for (auto& g : tasks) g = rows_of(g, b0, b1);
    const int gtid = by_rows ? 0 : tid, gnth = by_rows ? 1 : nth;
    bar.wait();
    for (int64_t t = 0; t < Tn; ++t) {
      if (proj_in) tasks[iA].A = proj_in->x + (t * B + (by_rows ? b0 : 0)) * proj_in->I;
      run_tasks<T>(tasks.data(), nA, gtid, gnth);  // phase A: r = h_{t-1} W_hh^T [, s_{t-1} W_gg^T] [, xg_t]
      if (!by_rows) bar.wait();
      for (int64_t b = b0; b < b1; ++b) {  // phase B: the cell, row by row
        if (widen && t < len[b]) widen_row(t, b);
        if (t >= len[b]) step.padded_row(t, b);
        else if (!lstm) step.rnn_row(t, b);
        else {
          step.pre_row(t, b);
          if (!mlp.any()) step.lstm_row(t, b, tid);
        }
      }
      if (mlp.any() && b1 > b0) {  // deep gates: this thread's rows through their MLP layers — a row's
        for (int d = 1; d <= mlp.depth; ++d) {  // layers read that row only, so no thread waits here
          GemmTask<T> tasks[4];  // one per deep gate this deep (v_d = a_d W_d^T, rows b0..b1)
          int nt = 0;
          for (size_t k = 0; k < mlp.gates.size(); ++k) {
            const MlpGate& mg = mlp.gates[k];
            if (mg.m >= d)  // a gate's last layer adds its bias in the GEMM (mlp_row: the hidden layers')
              tasks[nt++] = GemmTask<T>{&W.layer(mlp, k, d - 1), (int)(b1 - b0), step.act_row(t, b0) + mg.aoff[d - 1],
                                        mlp.atot, step.vout + b0 * mlp.vtot + mg.voff[d - 1], mlp.vtot, false,
                                        d == mg.m ? W.last_layer_bias(k) : nullptr};
          }
          run_tasks<T>(tasks, nt, 0, 1);  // every panel, this thread's rows
          for (int64_t b = b0; b < b1; ++b) {  // the last depth's rows go straight on into the cell
            if (t >= len[b]) continue;
            if (d < mlp.depth) step.mlp_row(t, b, d);
            if (d == mlp.depth) step.lstm_row(t, b, tid);
          }
        }
      }
      if (!by_rows) bar.wait();
      if (P > 0) {  // phase C: y_t = m W_hr^T; phase D: zoneout, the state (padded rows: 0)
        GemmTask<T> pc{&W.hr, (int)B, mwp, ldm, step.Y + t * B * P, P, false};
        if (by_rows) pc = rows_of(pc, b0, b1);
        run_tasks<T>(&pc, 1, gtid, gnth);
        if (!by_rows) bar.wait();
        for (int64_t b = b0; b < b1; ++b) step.project_row(t, b, t < len[b]);
        if (!by_rows) bar.wait();
      }
    }
  });
  at::Tensor hn = at::empty({B, Hout}, opt);
  T* hnp = hn.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) std::copy(hsp + b * ldh, hsp + b * ldh + Hout, hnp + b * Hout);
  // the RNN's c_n: an empty tensor of its own (outputs of an operator must not alias each other);
  // a buffer not kept: undefined (the operator's entry, recurrence_forward, makes it an empty tensor)
  std::vector<at::Tensor> out = {Y, hn, lstm ? cs : at::empty({0}, opt)};
  if (!buffers_out) return out;  // one_step: nothing kept, nothing to return
  out.insert(out.end(), buf.begin(), buf.end());
  return out;
}

}  // namespace lk
