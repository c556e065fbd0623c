// The weights a time step's products read, packed once per call, for the forward's products
// (C = A Wᵀ: each W as stored) and for the backward's (C = A W: each W read transposed) alike.
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <vector>
#include "cell_config.h"
#include "gemm.h"

namespace lk {

// W (rows, cols) with strides (s0, s1) packed for C = A Wᵀ, or with `transposed` for C = A W.
// uses: how many GEMMs read it (Packed::init).
template <typename T>
void pack_for(Packed<T>& p, const T* w, int64_t s0, int64_t s1, int64_t rows, int64_t cols, bool transposed,
              int64_t uses, bool bf16) {
  if (transposed) p.init(w, s1, s0, (int)cols, (int)rows, uses, bf16);
  else p.init(w, s0, s1, (int)rows, (int)cols, uses, bf16);
}

// The recurrent weights W_hh (R, H_out) as one matrix, or with heads one block per head and gate
// (cf.hseg), read in its canonical rows: head j's rows of a gate times h's j-th Dh columns, straight
// into r's canonical columns (the backward: a head's dh columns from its gates' dr segments).
template <typename T>
void pack_recurrent(const at::Tensor& whh, const Cfg& cf, bool transposed, int64_t uses, Packed<T>& W,
                    std::vector<Packed<T>>& Wh) {
  const T* w = whh.data_ptr<T>();
  if (cf.heads == 1) {
    pack_for(W, w, whh.stride(0), whh.stride(1), cf.R, cf.Hout, transposed, uses, cf.bf16_gemm);
    return;
  }
  Wh.resize(cf.hseg.size());
  for (size_t s = 0; s < cf.hseg.size(); ++s)
    pack_for(Wh[s], w + cf.hseg[s].canon * whh.stride(0), whh.stride(0), whh.stride(1), cf.hseg[s].len, cf.Dh,
             transposed, uses, cf.bf16_gemm);
}

// A call's step weights: W_hh (`recurrent`; heads: `heads`, see pack_recurrent), fgr's W_gg (nS·H,
// nS·H), the projection's W_hr (P, H), every deep gate's W_j (n_{j+1}, n_j) at mlp[k·depth + j].
// One absent from the variant has no panels. Each thread packs its share (pack_share) inside the
// parallel region, before the loop. The forward's (not `transposed`) also keeps each deep gate's
// last bias padded to whole panels (`last_bias`), so that the last layer's GEMM adds it as it
// stores its tile, instead of a separate pass that read and wrote the (B, 4·H) output once more
// (gate_hidden=(32,) inference at (B, T, I, H) = (64, 100, 256, 256), one thread: 10.88 -> 10.34 ms).
template <typename T>
struct StepWeights {
  Packed<T> recurrent, gg, hr;
  std::vector<Packed<T>> heads, mlp;
  std::vector<std::vector<T>> last_bias;  // deep gate k's last bias, padded; empty: none (or backward)

  // with_recurrent false: W_hh's panels come from elsewhere (a frozen layer's FrozenPanels)
  StepWeights(const Cfg& cf, const MlpLayout& layout, const MlpWeights<T>& mw, const at::Tensor& whh,
              const std::vector<at::Tensor>& params, int64_t uses, bool transposed, bool with_recurrent = true) {
    if (with_recurrent) pack_recurrent<T>(whh, cf, transposed, uses, recurrent, heads);
    if (cf.fgr) {
      const at::Tensor& wgg = params[P_WEIGHT_GG];
      pack_for(gg, wgg.data_ptr<T>(), wgg.stride(0), wgg.stride(1), cf.nS * cf.H, cf.nS * cf.H, transposed, uses,
               cf.bf16_gemm);
    }
    if (cf.P > 0) {
      const at::Tensor& whr = params[P_WEIGHT_HR];
      pack_for(hr, whr.data_ptr<T>(), whr.stride(0), whr.stride(1), cf.P, cf.H, transposed, uses, cf.bf16_gemm);
    }
    mlp.resize(layout.gates.size() * std::max(layout.depth, 1));
    for (size_t k = 0; k < layout.gates.size(); ++k)
      for (int j = 0; j < layout.gates[k].m; ++j) {
        const MlpGate& mg = layout.gates[k];  // W_j row-major (n_{j+1}, n_j)
        pack_for(mlp[k * layout.depth + j], mw.w[k * layout.depth + j], mg.w[j], 1, mg.w[j + 1], mg.w[j], transposed,
                 uses, cf.bf16_gemm);
      }
    if (transposed) return;
    last_bias.resize(layout.gates.size());
    for (size_t k = 0; k < layout.gates.size(); ++k) {
      const int j = layout.gates[k].m - 1;
      const T* b = mw.b[k * layout.depth + j];
      if (!b) continue;
      const Packed<T>& w = layer(layout, k, j);
      last_bias[k].assign((size_t)w.bias_length(), T(0));
      std::copy(b, b + w.N, last_bias[k].begin());
    }
  }

  // Gate k's last bias padded to whole panels, or nullptr (none, or the backward's weights).
  const T* last_layer_bias(size_t k) const {
    return k < last_bias.size() && !last_bias[k].empty() ? last_bias[k].data() : nullptr;
  }

  // Gate k's layer j (0-based), packed.
  const Packed<T>& layer(const MlpLayout& layout, size_t k, int j) const { return mlp[k * layout.depth + j]; }

  // This thread's share of every packing (absent weights have none).
  void pack_share(int tid, int nth) {
    recurrent.pack_share(tid, nth); gg.pack_share(tid, nth); hr.pack_share(tid, nth);
    for (auto& w : heads) w.pack_share(tid, nth);
    for (auto& w : mlp) w.pack_share(tid, nth);
  }
};

}  // namespace lk
