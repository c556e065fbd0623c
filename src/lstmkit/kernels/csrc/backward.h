// backward_impl: the time loop of one layer-direction's BPTT (see recurrence.cpp for the
// phases); the cell's own backward is StepBackward (cell_step.h).
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <vector>
#include "cell_config.h"
#include "cell_step.h"
#include "gemm.h"
#include "mlp_grads.h"
#include "parallel.h"
#include "step_weights.h"
#include "vec_math.h"

namespace lk {

// Returns dXG (T,B,R) (layernorm: the gradient w.r.t. the RAW a = x W_ih^T, through the
// input LN), dWhh (R,H_out) (layernorm only, written into dwhh_out where that is defined — with
// `add` added to its values, as dMLP to dmlp_out's; other variants: undefined, the wrapper computes
// it from dXG), dHP (T,B,P) and M (T,B,H)
// (projection: the gradient w.r.t. the projected h~_t, and o*act(LN(c)) for dW_hr), dh0, dc0, acc (the per-parameter reductions, AccLayout),
// dZS (T,B,nS*H) (fgr with layernorm or deep gates: the gradient w.r.t. the sigmoid gates' u, for dW_gg),
// dMLP (the deep gates' flat weights' gradient: dW_j = Σ_t dv_jᵀ a_j, db_j = Σ_t dv_j, summed chunk
// by chunk of steps while the chunk's dv_j rows are in cache: MlpGradSums), and for a 16-bit layer
// (`low`) dXG again in that dtype; what the variant has not (dWhh, dHP, M, dc0, dZS, dMLP, the
// 16-bit dXG): undefined.
// layernorm: dr_t (the gradient w.r.t. the raw r_t) is kept for a chunk of Tc steps only;
// after each chunk dW_hh += dr_chunk^T h_prev_chunk (at::addmm_, outside the OpenMP region).
// Zoneout: the carried dL/dh_t, dL/dc_t are w.r.t. the zoned states; d_h·dL/dh_t goes straight
// to h_{t-1} (dHZ, added to the GEMM's dh_{t-1} where it is read), d_c·dL/dc_t to c_{t-1}.
// dY may have any strides (an expanded gradient such as that of y.sum() is not copied).
template <typename T>
std::vector<at::Tensor> backward_impl(const std::vector<at::Tensor>& buffers, const at::Tensor& Y,
                                      const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& whh,
                                      const std::vector<int64_t>& len, const std::vector<at::Tensor>& params,
                                      const at::Tensor& dY, const at::Tensor& dhn, const at::Tensor& dcn,
                                      const at::Tensor& dwhh_out, const at::Tensor& dmlp_out, bool add,
                                      const Cfg& cf, const MlpLayout& mlp,
                                      const MlpWeights<T>& mw,
                                      int nthreads, at::ScalarType low = at::ScalarType::Undefined) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  const int64_t Tn = Y.size(0), B = Y.size(1), R = cf.R, H = cf.H, Hout = cf.Hout, P = cf.P;
  const bool lstm = !cf.rnn;
  const bool regate = cf.ln && !cf.fgr && !mlp.any();  // gates recomputed from a_hat, r_hat (G not kept)
  auto opt = Y.options();
  at::Tensor dXG = at::empty({Tn, B, R}, opt);
  // a 16-bit layer's dxg in its own dtype, each step's rows narrowed by the thread that made them
  // (while they are in its cache) rather than the whole (T, B, R) converted after the loop
  at::Tensor dXGlow = low != at::ScalarType::Undefined ? at::empty({Tn, B, R}, opt.dtype(low)) : at::Tensor();
  at::Tensor dHP = P > 0 ? at::empty({Tn, B, P}, opt) : at::Tensor();
  at::Tensor Mo = P > 0 ? at::empty({Tn, B, H}, opt) : at::Tensor();
  at::Tensor dZS = ((cf.ln || mlp.any()) && cf.fgr) ? at::empty({Tn, B, cf.nS * H}, opt) : at::Tensor();
  const int64_t ldr = pad_ld(R, VL), lds = pad_ld(std::max<int64_t>(cf.nS * H, 1), VL),
                ldp = pad_ld(std::max<int64_t>(P, 1), VL);
  // layernorm: dW_hh accumulated chunk by chunk (about 512 rows of dr at a time); deep gates: the
  // MLPs' dW_j, db_j likewise from a chunk of dV rows, which stays in cache between the loop that
  // writes it and the products that read it (kept for all T·B rows, dV had cost a write and two
  // reads from memory as large as dXG: 26 MB at (64, 100, 256, 256)). Deep gates' chunks are
  // about 128 rows a thread: measured (gate_hidden=(32,), training, (B, T, I, H) from (8, 50, 128,
  // 128) to (128, 100, 256, 256), an AVX-512 Xeon with 2 MiB L2 a core), one thread 2-6 % faster
  // than at 512 rows (MKL's dW_j products 107 -> 127 GFLOP/s at (64, 100, 256, 256)); two threads
  // at 256 rows level with 512 (-1 to +1 %), at 128 up to 6 % slower. Layernorm's per-chunk
  // products are ATen calls: 512 rows (128: 2 % slower).
  const int64_t chunk_rows = mlp.any() ? 128 * std::max(nthreads, 1) : 512;
  const int64_t Tc = (cf.ln || mlp.any())
                         ? std::max<int64_t>(1, std::min<int64_t>(Tn, (chunk_rows + B - 1) / std::max<int64_t>(B, 1)))
                         : std::max<int64_t>(Tn, 1);
  // rows padded to ldr: the chunk rows of step t are also that step's GEMM input (dh = dr W_hh)
  at::Tensor dRc = cf.ln ? at::zeros({Tc * B, ldr}, opt) : at::Tensor();
  at::Tensor dWhh = dwhh_out;  // layernorm: accumulate_dwhh's sum (the first chunk's product writes it: no zero fill)
  bool dwhh_written = add && dwhh_out.defined();  // add: the sum goes on from dwhh_out's values
  at::Tensor dcs = lstm ? dcn.clone() : at::Tensor();
  at::Tensor dV;
  // deep gates: dV's rows padded (ldV), so that one layer's columns, which each chunk's reductions
  // read over its rows, do not start at a multiple of 4 KiB apart (vtot = 4·256: MKL's product of
  // (6400, 256) of them with the activations 3.6 -> 2.1 ms on AVX2, alone)
  const int64_t ldV = mlp.any() ? pad_ld(mlp.vtot, VL) : 0;
  if (mlp.any()) dV = at::empty({Tc, B, ldV}, opt);  // the chunk's rows: step t's at (t − t0)·B
  const AccLayout al{H, R};
  const int64_t NACC = al.size();
  at::Tensor acc = at::zeros({nthreads, NACC}, opt);
  // per thread: LN-c row (H), gathered dy row (H_out), zoneout's dh row (H_out), recomputed gates (R)
  const int64_t ldtmp = pad_ld(H, VL) + 2 * pad_ld(Hout, VL) + (regate ? pad_ld(R, VL) : 0);
  // the call's workspaces: one zeroed allocation (Carve)
  Carve<T> ws;
  T *dHp, *dHZp = nullptr, *dRwp = nullptr, *dAp = nullptr, *dSp = nullptr, *dUSp = nullptr, *dHPwp = nullptr,
    *dMop = nullptr, *rowtmpp;
  ws.take(dHp, B * Hout);                                 // GEMM output: dr_t W_hh, (B, H_out)
  if (cf.zoneout) ws.take(dHZp, B * Hout);                // zoneout: d_h dL/dh_t
  if (!cf.ln) ws.take(dRwp, B * ldr);                     // GEMM input, (B, R) padded (layernorm: dRc's rows)
  if (mlp.any()) ws.take(dAp, B * mlp.atot);              // deep gates: dL/da, (B, atot)
  if (cf.fgr) { ws.take(dSp, B * cf.nS * H); ws.take(dUSp, B * lds); }  // fgr: ds, du_S
  if (P > 0) { ws.take(dHPwp, B * ldp); ws.take(dMop, B * H); }          // projection: dy rows, dL/dm
  ws.take(rowtmpp, nthreads * ldtmp);
  const at::Tensor workspace = ws.allocate(opt);

  // dh = dr W_hh (heads: a head's dh columns = the sum over its gates of dr's segment columns times
  // the block, one K-split group), ds = du_S W_gg, dm = dy W_hr, dA = dV W_j
  StepWeights<T> Wt(cf, mlp, mw, whh, params, Tn, /*transposed=*/true);
  auto ptr = [](const at::Tensor& t) -> T* { return (t.defined() && t.numel() > 0) ? t.data_ptr<T>() : nullptr; };
  const CellParams<T> prm(cf, params);
  const T* dYp = dY.data_ptr<T>();
  const int64_t dys0 = dY.stride(0), dys1 = dY.stride(1), dys2 = dY.stride(2);
  const T* dhnp = dhn.data_ptr<T>();
  T* dRcp = ptr(dRc);
  T* dHPp = ptr(dHP);
  T* accp = acc.data_ptr<T>();
  const StepBackward<T> step_proto{cf, prm, al, B, regate ? nullptr : ptr(buffers[B_G]), ptr(buffers[B_C]),
                                   ptr(buffers[B_CN]), Y.data_ptr<T>(), lstm ? c0.data_ptr<T>() : nullptr,
                                   ptr(buffers[B_RH]), ptr(buffers[B_RS]), ptr(buffers[B_AH]), ptr(buffers[B_AS]),
                                   dXG.data_ptr<T>(), lstm ? dcs.data_ptr<T>() : nullptr, dSp, dUSp, lds, ptr(dZS),
                                   ptr(Mo), mlp, ptr(buffers[B_MLP]), ptr(dV), ldV, dAp};

  std::vector<GemmTask<T>> phaseA;  // dh = dr W_hh (heads: per head, its gates' segments) [, ds = du_S W_gg]
  std::vector<int64_t> dr_col;       // the dh tasks' first column of dr (their A moves with t under layernorm)
  if (cf.heads == 1) {
    phaseA.push_back(GemmTask<T>{&Wt.recurrent, (int)B, dRwp, ldr, dHp, Hout, false});
    dr_col.push_back(0);
  }
  for (size_t s = 0; s < Wt.heads.size(); ++s) {
    const HeadSeg& sg = cf.hseg[s];
    const bool head_begins = s == 0 || cf.hseg[s - 1].head != sg.head;
    const bool head_goes_on = s + 1 < Wt.heads.size() && cf.hseg[s + 1].head == sg.head;
    GemmTask<T> task{&Wt.heads[s], (int)B, dRwp + sg.canon, ldr, dHp + sg.head * cf.Dh, Hout, !head_begins};
    task.more = head_goes_on;
    phaseA.push_back(task);
    dr_col.push_back(sg.canon);
  }
  if (cf.fgr) phaseA.push_back(GemmTask<T>{&Wt.gg, (int)B, dUSp, lds, dSp, cf.nS * H, false});
  const int nA = (int)phaseA.size();

  // deep gates: dW_j, db_j summed chunk by chunk (MlpGradSums)
  MlpGradSums<T> dmlp(mlp, B, Tc, dV, ldV, buffers[B_MLP], dmlp_out, add, opt);

  const bool by_rows = split_by_rows<T>(B, nthreads, phaseA, Wt.mlp, P > 0 ? &Wt.hr : nullptr);

  bool packed = false;
  for (int64_t t1 = Tn; t1 > 0 || (Tn == 0 && !packed); t1 -= Tc) {
    const int64_t t0 = std::max<int64_t>(0, t1 - Tc);
    StepBackward<T> step = step_proto;
    step.dv_row0 = t0 * B;  // deep gates: dV holds this chunk's rows
  parallel_region(nthreads, [&](const int tid, const int nth, Barrier& bar) {
    if (!packed) {
      Wt.pack_share(tid, nth);
    }
    std::vector<GemmTask<T>> tasks(phaseA);  // this thread's copy (layernorm's A moves with t)
    int64_t b0, b1;
    split_range(B, tid, nth, b0, b1);
    // row mode: every panel of this thread's rows, and no barrier in the loop; else a share of the panels
    if (by_rows)
      for (auto& g : tasks) g = rows_of(g, b0, b1);
    const int gtid = by_rows ? 0 : tid, gnth = by_rows ? 1 : nth;
    T* A = accp + tid * NACC;  // this thread's accumulators (AccLayout)
    T* tmp = rowtmpp + tid * ldtmp;
    T* dybuf = tmp + pad_ld(H, VL);
    T* dhbuf = dybuf + pad_ld(Hout, VL);
    T* gbuf = regate ? dhbuf + pad_ld(Hout, VL) : nullptr;
    auto dy_row = [&](int64_t t, int64_t b) -> const T* {  // row (t, b) of dY, gathered if strided
      const T* p = dYp + t * dys0 + b * dys1;
      if (dys2 == 1) return p;
      if (dys2 == 0) std::fill(dybuf, dybuf + Hout, *p);  // broadcast along H (y.sum()'s gradient)
      else
        for (int64_t j = 0; j < Hout; ++j) dybuf[j] = p[j * dys2];
      return dybuf;
    };
    // dL/dh_t of a valid row = dy_t + what flows back from step t+1 (h_n's gradient at its last
    // step); zoneout: split into d_h (straight to h_{t-1}, into dHZ) and 1 − d_h (into out).
    auto total_dh = [&](int64_t t, int64_t b, T* out) {
      const bool carry_in = t + 1 < len[b];
      const T* carry = carry_in ? dHp + b * Hout : dhnp + b * Hout;
      const T* carry2 = carry_in && dHZp ? dHZp + b * Hout : nullptr;
      const T* dy = dy_row(t, b);
      const T* kh = prm.keep_h ? prm.keep_h + (t * B + b) * Hout : nullptr;
      for (int64_t j = 0; j < Hout; j += VL) {
        const int n = (int)std::min<int64_t>(VL, Hout - j);
        V d = ldv(dy + j, n) + ldv(carry + j, n);
        if (carry2) d = d + ldv(carry2 + j, n);
        if (dHZp) {
          const V dz = keep_of(kh, prm.zh, j, n) * d;
          stv(dz, dHZp + b * Hout + j, n);
          d = d - dz;
        }
        stv(d, out + j, n);
      }
    };
    bar.wait();
    for (int64_t t = t1 - 1; t >= t0; --t) {
      if (P > 0) {  // dh~ (the projected output's gradient) -> dm = dh~ W_hr
        for (int64_t b = b0; b < b1; ++b) {
          T* w = dHPwp + b * ldp;
          T* d = dHPp + (t * B + b) * P;
          if (t < len[b]) {
            total_dh(t, b, w);
            std::copy(w, w + P, d);
          } else {
            std::fill(w, w + P, T(0)); std::fill(d, d + P, T(0));
          }
        }
        if (!by_rows) bar.wait();
        GemmTask<T> pc{&Wt.hr, (int)B, dHPwp, ldp, dMop, H, false};
        if (by_rows) pc = rows_of(pc, b0, b1);
        run_tasks<T>(&pc, 1, gtid, gnth);
        if (!by_rows) bar.wait();
      }
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t tb = t * B + b;
        T* dxr = step.dXG + tb * R;
        T* drc = dRcp ? dRcp + ((t - t0) * B + b) * ldr : nullptr;
        T* dwr = drc ? drc : dRwp + b * ldr;  // GEMM input row
        if (t >= len[b]) {
          std::fill(dxr, dxr + R, T(0));
          std::fill(dwr, dwr + R, T(0));
          if (step.dZS) std::fill(step.dZS + tb * cf.nS * H, step.dZS + (tb + 1) * cf.nS * H, T(0));
          if (dUSp) std::fill(dUSp + b * lds, dUSp + b * lds + cf.nS * H, T(0));
          if (step.Mo) std::fill(step.Mo + tb * H, step.Mo + tb * H + H, T(0));
          if (step.dV) std::fill(step.dv_row(tb), step.dv_row(tb) + mlp.vtot, T(0));
          continue;
        }
        const bool carry_in = t + 1 < len[b];
        const T* dhc = carry_in ? dHp + b * Hout : dhnp + b * Hout;
        if (!lstm) {
          step.rnn_row(tb, dy_row(t, b), dhc, dwr);
          continue;
        }
        const T *dh = dhbuf, *dh2 = nullptr;
        if (P > 0) dh = dMop + b * H;
        else if (cf.zoneout) total_dh(t, b, dhbuf);
        else { dh = dy_row(t, b); dh2 = dhc; }
        const T* dsr = (cf.fgr && carry_in) ? dSp + b * cf.nS * H : nullptr;
        step.lstm_row(t, b, dh, dh2, dsr, A, tmp, gbuf);
        if (mlp.any()) continue;  // first the MLPs' backward, below
        if (cf.ln) step.layernorm_row(tb, dwr, A);
        else std::copy(dxr, dxr + R, dwr);
      }
      if (mlp.any() && lstm && b1 > b0) {  // deep gates: from each gate's dL/du back through its MLP to
        for (int d = mlp.depth; d >= 1; --d) {  // dL/dz_k, this thread's rows (a row reads only itself)
          GemmTask<T> tasks[4];  // dA_d = dV_d W_d, one per deep gate this deep (rows b0..b1)
          int nt = 0;
          for (size_t k = 0; k < mlp.gates.size(); ++k) {
            const MlpGate& mg = mlp.gates[k];
            if (mg.m >= d)
              tasks[nt++] = GemmTask<T>{&Wt.layer(mlp, k, d - 1), (int)(b1 - b0),
                                        step.dv_row(t * B + b0) + mg.voff[d - 1], ldV,
                                        step.dA + b0 * mlp.atot + mg.aoff[d - 1], mlp.atot, false};
          }
          run_tasks<T>(tasks, nt, 0, 1);  // every panel, this thread's rows
          for (int64_t b = b0; b < b1; ++b) {
            if (t >= len[b]) continue;
            step.mlp_back_row(t, b, d);
            if (d > 1) continue;
            // depth 1 done: dz complete in this row, on to the dh GEMM's input (through the LN backward)
            const int64_t tb = t * B + b;
            T* dxr = step.dXG + tb * R;
            T* dwr = dRcp ? dRcp + ((t - t0) * B + b) * ldr : dRwp + b * ldr;
            if (cf.ln) step.layernorm_row(tb, dwr, A);
            else std::copy(dxr, dxr + R, dwr);
          }
        }
      }
      if (dXGlow.defined()) {  // this thread's rows of step t are final: narrowed to the layer's dtype
        AT_DISPATCH_REDUCED_FLOATING_TYPES(low, "lstmkit_narrow", [&] {
          scalar_t* lo = dXGlow.data_ptr<scalar_t>() + (t * B + b0) * R;
          const T* hi = step.dXG + (t * B + b0) * R;
          for (int64_t j = 0; j < (b1 - b0) * R; ++j) lo[j] = static_cast<scalar_t>(hi[j]);
        });
      }
      if (!by_rows) bar.wait();
      if (dRcp)  // layernorm: the dh tasks read this step's chunk rows
        for (size_t k = 0; k < dr_col.size(); ++k)
          tasks[k].A = dRcp + ((t - t0) * B + (by_rows ? b0 : 0)) * ldr + dr_col[k];
      run_tasks<T>(tasks.data(), nA, gtid, gnth);
      if (!by_rows) bar.wait();
    }
    if (dmlp.in_region) {  // once the chunk's dV rows are complete, every thread's columns
      if (by_rows) bar.wait();
      dmlp.columns(t0, t1, tid, nth);
    }
  });
    packed = true;
    if (cf.ln && t1 > t0) {  // dW_hh += dr_t^T h_{t-1} over this chunk (h_{-1} = h0, then y)
      at::Tensor d = dRc.narrow(0, 0, (t1 - t0) * B).narrow(1, 0, R);
      if (t0 == 0) {
        accumulate_dwhh(dWhh, !dwhh_written, d.narrow(0, 0, B), h0, cf);
        if (t1 > 1) accumulate_dwhh(dWhh, false, d.narrow(0, B, (t1 - 1) * B), Y.narrow(0, 0, t1 - 1).reshape({-1, Hout}), cf);
      } else {
        accumulate_dwhh(dWhh, !dwhh_written, d, Y.narrow(0, t0 - 1, t1 - t0).reshape({-1, Hout}), cf);
      }
      dwhh_written = true;
    }
    dmlp.after_chunk(t0, t1);
    if (Tn == 0) break;
  }
  at::Tensor dh0 = at::empty({B, Hout}, opt);
  T* dh0p = dh0.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    const T* src = len[b] > 0 ? dHp + b * Hout : dhnp + b * Hout;
    std::copy(src, src + Hout, dh0p + b * Hout);
    if (dHZp && len[b] > 0)
      for (int64_t j = 0; j < Hout; ++j) dh0p[b * Hout + j] += dHZp[b * Hout + j];
  }
  at::Tensor accs = acc.sum(0);
  if (cf.ln && !dwhh_written) {  // no steps
    if (dWhh.defined()) dWhh.zero_();
    else dWhh = at::zeros({R, cf.heads == 1 ? Hout : cf.Dh}, opt);
  }
  // what the variant has not: undefined (backward_call reads only what it has)
  const at::Tensor none;
  return {dXG, cf.ln ? dWhh : none, P > 0 ? dHP : none, P > 0 ? Mo : none, dh0, lstm ? dcs : none, accs, dZS,
          dmlp.result(), dXGlow};
}

}  // namespace lk
