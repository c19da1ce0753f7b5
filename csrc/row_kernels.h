// The two primitives for one row of logits z[0..V): statistics (pass 1) and the gradient (pass 2).
//
// Transform: x = k * v(z) with v(z) = z, k = logit_scale / temperature (no softcap), or
// v(z) = tanh(logit_scale * z / c), k = c / temperature (softcap c). Both are increasing in z, so the
// row maximum of x is k * v(max z): the max sweep reads raw z and never evaluates tanh.
//
// Frame. Sums are taken on d = x - k vmax, vmax = v(running max of z):
//   s = sum e^d,  t = sum e^d d,  (q = sum e^{2d}),
//   lse = k vmax + log s, mean_x = E_p[x] = k vmax + t/s, entropy H = log s - t/s,
//   logp = d_y - log s, log sum p^2 = log q - 2 log s.
// d = (v - vmax) k: v - vmax is exact for every element that matters (Sterbenz), so d has one
// rounding even at |z| = 1e4, where a rounded x = k z would be off by ~5e-4. When the running max
// grows, the sums move to the new frame: delta = (vmax - vmax') k <= 0, s' = e^delta s,
// t' = e^delta (t + s delta), q' = e^{2 delta} q. k is used rounded to float in d (a relative 6e-8
// change of scale) and in double for the frame term k vmax of lse and mean_x.
//
// Gradient (p = e^{x - lse}, x - E = x - mean_x):
//   dL/dx_j = g_lp (1[j=y] - p_j) - g_H p_j (x_j - E)
//   dL/dz_j = dL/dx_j * dx/dz,  dx/dz = logit_scale / temperature * (1 - tanh^2) (softcap) or
//   logit_scale / temperature.
// Pass 2 takes the float64 lse and mean_x of pass 1 apart on a float frame (see row_grad), so it
// needs no second reduction over the row and keeps p exact at |z| = 1e4.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "simd.h"

namespace fastrl {

struct Transform {
  float k_hi = 1.0f;  // k rounded to float; d below is formed with it
  double k = 1.0;     // k = logit_scale / temperature, or c / temperature under softcap
  float softcap_in = 0.0f;  // logit_scale / c
  float dxdz = 1.0f;        // logit_scale / temperature
};

// Sums of one row on the frame vmax = v(max z): d = (v - vmax) k, which is exact up to one rounding
// (v - vmax is exact for the elements that matter), so it keeps full precision at |z| = 1e4.
// `ties` counts the elements at the frame (d = 0, e^d = 1 exactly); s and q hold the sums without them.
// A peaked row then never adds tiny terms to an fp32 accumulator holding 1, which would lose ~1e-6 of
// log s and log sum p^2 through rounding.
struct RowSums {
  float vmax = 0.0f;
  double s = 0.0;  // sum e^d over d != 0 (total: s + ties)
  double t = 0.0;
  double q = 0.0;  // sum e^{2d} over d != 0 (total: q + ties)
  double ties = 0.0;
  double total_s() const { return s + ties; }
  double total_q() const { return q + ties; }
};

constexpr int64_t kBlock = 2048;  // elements per block: read twice (max, then exp) from L1
// Pass 2 asks for the logits this many elements ahead of the sweep (8 KiB in float32): measured at
// 4096 x 32000 fp32 in place, 60 -> 48 ms (256 ahead: 56 ms, 1024: 48 ms).
constexpr int64_t kGradPrefetch = 2048;
// Logits below this are treated as -inf: keeps d finite, so e^d d = 0 instead of 0 * -inf = NaN.
constexpr float kLowClamp = -1e30f;

template <class S, bool SOFTCAP>
inline typename S::V transform_v(typename S::V z, const Transform& tr) {
  if constexpr (SOFTCAP) {
    return fast_tanh<S>(S::mul(z, S::set1(tr.softcap_in)));
  } else {
    return z;
  }
}

template <class S, bool SOFTCAP>
inline typename S::V clamped_v(typename S::V z, const Transform& tr) {
  return transform_v<S, SOFTCAP>(S::max(S::set1(kLowClamp), z), tr);  // operand order keeps NaN
}

template <class S, bool SOFTCAP>
inline float scalar_v(float z, const Transform& tr) {
  return S::lane0(clamped_v<S, SOFTCAP>(S::set1(z), tr));  // bit-identical to the same element in a sweep
}

// `next`: the row processed after this one (or nullptr); its start is prefetched during the last block.
template <class S, bool SOFTCAP, bool WITH_Q, class T>
RowSums row_sums(const T* z, int64_t V_, const Transform& tr, const T* next = nullptr) {
  using V = typename S::V;
  constexpr int W = S::W;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const V zero = S::set1(0.0f);
  const V one = S::set1(1.0f);
  const V k = S::set1(tr.k_hi);
  float zmax = neg_inf;
  RowSums row;
  for (int64_t b0 = 0; b0 < V_; b0 += kBlock) {
    const int64_t b1 = std::min(V_, b0 + kBlock);
    const int64_t full = b0 + (b1 - b0) / W * W;
    const T* ahead = (b1 < V_ || next == nullptr) ? z + b1 : next;  // what the max sweep reads next
    V mx = S::set1(neg_inf);
    for (int64_t j = b0; j < full; j += W) mx = S::max(mx, S::load(z + j));
    if (full < b1) mx = S::max(mx, S::load_partial(z + full, b1 - full, neg_inf));
    float block_max = S::hmax(mx);
    // Under softcap a -inf logit is the finite -c: a block of them has a frame and adds to the sums. The
    // clamp makes it compare above the initial -inf (std::max keeps a NaN block_max NaN).
    if constexpr (SOFTCAP) block_max = std::max(block_max, kLowClamp);
    if (block_max > zmax) {
      const float new_vmax = scalar_v<S, SOFTCAP>(block_max, tr);
      if (zmax != neg_inf) {
        // Move the row's sums to the new frame (in double): delta = (old - new frame) k <= 0.
        const double delta = static_cast<double>(row.vmax - new_vmax) * tr.k_hi;
        const double e = std::exp(delta);
        row.t = e * (row.t + row.total_s() * delta);
        row.s = e * row.total_s();
        row.q = e * e * row.total_q();
        row.ties = 0.0;
      }
      zmax = block_max;
      row.vmax = new_vmax;
    }
    if (zmax == neg_inf) continue;  // all -inf so far: nothing to add, no frame yet
    const V vm = S::set1(row.vmax);
    // Four independent accumulator sets keep several exp chains in flight; fp32 within a block only.
    V sa[4] = {zero, zero, zero, zero}, ta[4] = {zero, zero, zero, zero}, qa[4] = {zero, zero, zero, zero};
    V ties = zero;
    auto accumulate = [&](V d, V e, int i) {
      const V at_frame = S::keep(S::eq(d, zero), one);
      sa[i] = S::add(sa[i], S::sub(e, at_frame));
      ta[i] = S::fma(e, d, ta[i]);
      if constexpr (WITH_Q) qa[i] = S::add(qa[i], S::fma(e, e, S::sub(zero, at_frame)));
      ties = S::add(ties, at_frame);
    };
    auto shifted_of = [&](V zv) { return S::mul(S::sub(clamped_v<S, SOFTCAP>(zv, tr), vm), k); };
    int64_t j = b0;
    for (; j + 4 * W <= full; j += 4 * W) {
      for (int u = 0; u < 4; ++u) {
        // The same place of the next block, for its max sweep: memory latency hides behind this
        // block's exp work instead of stalling that sweep (no fault past the row's end).
        __builtin_prefetch(ahead + (j - b0) + u * W, 0, 3);
        const V d = shifted_of(S::load(z + j + u * W));
        accumulate(d, fast_exp_upto88<S>(d), u);
      }
    }
    for (; j < full; j += W) {
      const V d = shifted_of(S::load(z + j));
      accumulate(d, fast_exp_upto88<S>(d), 0);
    }
    if (full < b1) {
      // Lanes past the row get d = -1e30: e = 0, not at the frame, e d = 0.
      const V d = S::blend(S::first_lanes(b1 - full), shifted_of(S::load_partial(z + full, b1 - full, 0.0f)),
                           S::set1(kLowClamp));
      accumulate(d, fast_exp_upto88<S>(d), 1);
    }
    row.s += static_cast<double>(S::hsum(S::add(S::add(sa[0], sa[1]), S::add(sa[2], sa[3]))));
    row.t += static_cast<double>(S::hsum(S::add(S::add(ta[0], ta[1]), S::add(ta[2], ta[3]))));
    if constexpr (WITH_Q) row.q += static_cast<double>(S::hsum(S::add(S::add(qa[0], qa[1]), S::add(qa[2], qa[3]))));
    row.ties += static_cast<double>(S::hsum(ties));
  }
  return row;
}

struct RowStatsOut {
  float logp, entropy;
  double lse, mean_x;
  float log_sum_p2;
};

template <class S, bool SOFTCAP, bool WITH_Q, class T>
RowStatsOut row_stats(const T* z, int64_t V_, int64_t y, const Transform& tr, const T* next = nullptr) {
  const RowSums r = row_sums<S, SOFTCAP, WITH_Q>(z, V_, tr, next);
  const double log_s = std::log(r.total_s());
  const double mean_d = r.t / r.total_s();
  const double frame = tr.k * static_cast<double>(r.vmax);
  const float v_y = scalar_v<S, SOFTCAP>(static_cast<float>(z[y]), tr);
  const double d_y = static_cast<float>((v_y - r.vmax) * tr.k_hi);  // as in the sweep
  RowStatsOut o;
  o.logp = static_cast<float>(d_y - log_s);
  // A target at a -inf logit (a masked vocabulary entry) has probability 0: logp = -inf, not the
  // clamped frame's -1e30. Under softcap a -inf logit is the finite -c.
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  if (!SOFTCAP && static_cast<float>(z[y]) == neg_inf) o.logp = neg_inf;
  o.entropy = static_cast<float>(log_s - mean_d);
  o.lse = frame + log_s;
  o.mean_x = frame + mean_d;
  o.log_sum_p2 = WITH_Q ? static_cast<float>(std::log(r.total_q()) - 2.0 * log_s) : 0.0f;
  return o;
}

// Zero gradient rows of ignored tokens. Such a row is never read, so its cache lines are written with
// non-temporal stores where the build has them: an ordinary store first reads each line from memory
// (write-allocate), doubling the traffic of a row that carries no information.
//
// The rows are queued and written a few lines at a time from inside the sweeps of the kept rows
// (`step`), not one after the other: a kept row's sweep is compute-bound and leaves memory bandwidth
// idle, which the zero lines then use, where writing a whole zero row would stall the thread on the
// write bandwidth alone (4096 x 32000 fp32 in place, 40% of the rows ignored: the zero rows cost
// ~17 ms written in a row, the measured note is in bench/results/cpu_pass_structure.md). `drain`
// writes what is left; the owner then issues store_fence() before the results are used.
class ZeroRows {
 public:
  static constexpr int64_t kLine = 64;
  static constexpr int64_t kLinesPerStep = 2;  // 128 B of zeros per 2W elements swept: measured best of 1, 2, 4, 8

  // Queues the bytes [begin, end); the unaligned head and tail are written at once.
  void push(char* begin, char* end) {
    char* a = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(begin) + kLine - 1) & ~uintptr_t{kLine - 1});
    char* b = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(end) & ~uintptr_t{kLine - 1});
    if (a >= b) {
      std::fill(begin, end, char{0});  // all-zero bits are 0.0 in every float format
      return;
    }
    std::fill(begin, a, char{0});
    std::fill(b, end, char{0});
    if (cur_ == end_) {
      cur_ = a;
      end_ = b;
    } else {
      pending_[count_++] = {a, b};
      if (count_ == kMaxPending) drain();
    }
  }

  // Writes up to kLinesPerStep zero lines of the queue.
  inline void step() {
    if (cur_ == end_) return;
    for (int64_t k = 0; k < kLinesPerStep && cur_ < end_; ++k, cur_ += kLine) stream_line(cur_);
    if (cur_ == end_) next();
  }

  void drain() {
    while (cur_ != end_) {
      for (; cur_ < end_; cur_ += kLine) stream_line(cur_);
      next();
    }
  }

 private:
  static constexpr int kMaxPending = 64;
  struct Range {
    char* begin;
    char* end;
  };

  static inline void stream_line(char* line) {
#ifdef FASTRL_NATIVE_AVX2
    const __m256i zero = _mm256_setzero_si256();
    _mm256_stream_si256(reinterpret_cast<__m256i*>(line), zero);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(line + 32), zero);
#else
    std::fill(line, line + kLine, char{0});
#endif
  }

  void next() {
    if (head_ < count_) {
      cur_ = pending_[head_].begin;
      end_ = pending_[head_].end;
      ++head_;
    } else {
      cur_ = end_ = nullptr;
      head_ = count_ = 0;
    }
  }

  char* cur_ = nullptr;
  char* end_ = nullptr;
  Range pending_[kMaxPending];
  int head_ = 0;
  int count_ = 0;
};

// Orders the non-temporal stores of ZeroRows before later loads and stores of the thread.
inline void store_fence() {
#ifdef FASTRL_NATIVE_AVX2
  _mm_sfence();
#endif
}

// Writes dL/dz for one row into o (which may be z itself), given the row's p and E through
//   p_j = e^{d_j - a},  x_j - E = d_j - b,
// with d_j = (v_j - frame) k.
template <class S, bool SOFTCAP, class T>
void row_grad_sweep(const T* z, T* o, int64_t V_, int64_t y, float frame, float a, float b, float g_lp,
                    float g_h, const Transform& tr, ZeroRows& zeros, const T* next = nullptr) {
  using V = typename S::V;
  constexpr int W = S::W;
  const V k = S::set1(tr.k_hi);
  const V fr = S::set1(frame);
  const V av = S::set1(a), bv = S::set1(b);
  // dL/dz_j = [g_lp 1[j=y] - p_j (g_lp + g_H (x_j - E))] dx/dz: the constant part of dx/dz and the
  // sign are folded into the two coefficients.
  const V glp = S::set1(-g_lp * tr.dxdz), gh = S::set1(-g_h * tr.dxdz);
  const V one = S::set1(1.0f);
  const float z_y = static_cast<float>(z[y]);  // read before the sweep: o may alias z
  // Returns -p (g_lp + g_H (x - E)) dx/dz; `softcap_factor` = 1 - tanh^2 (1 without softcap).
  auto grad_of = [&](V zv, V& softcap_factor) {
    const V vv = clamped_v<S, SOFTCAP>(zv, tr);
    const V d = S::mul(S::sub(vv, fr), k);
    const V p = fast_exp<S>(S::sub(d, av));  // clamped: stats from other logits must not overflow
    const V g = S::mul(p, S::fma(gh, S::sub(d, bv), glp));
    if constexpr (SOFTCAP) {
      softcap_factor = S::fma(S::sub(S::set1(0.0f), vv), vv, one);
      return S::mul(g, softcap_factor);
    } else {
      softcap_factor = one;
      return g;
    }
  };
  V factor;
  const int64_t full = V_ / W * W;
  int64_t j = 0;
  for (; j + 2 * W <= full; j += 2 * W) {
    const int64_t ahead = j + kGradPrefetch;  // near the row's end: the start of the next row swept
    __builtin_prefetch(ahead < V_ || next == nullptr ? z + ahead : next + (ahead - V_), 0, 3);
    zeros.step();
    V f2;
    const V g0 = grad_of(S::load(z + j), factor);
    const V g1 = grad_of(S::load(z + j + W), f2);
    S::store(o + j, g0);
    S::store(o + j + W, g1);
  }
  for (; j < full; j += W) S::store(o + j, grad_of(S::load(z + j), factor));
  if (full < V_) S::store_partial(o + full, grad_of(S::load_partial(z + full, V_ - full, 0.0f), factor), V_ - full);
  const float g_y = S::lane0(grad_of(S::set1(z_y), factor));
  o[y] = static_cast<T>(g_lp * tr.dxdz * S::lane0(factor) + g_y);
}

// Pass 2 from the float64 lse and mean_x of pass 1, taken apart on a frame c (in v units):
//   c = fp32(lse / k),  a = lse - c k,  b = mean_x - c k,  d_j = (v_j - c) k,
//   p_j = e^{d_j - a},  x_j - E = d_j - b.
// v_j - c is exact for every element with non-negligible p (Sterbenz), so p keeps float32 accuracy
// at |x| = 1e4, where a float32 lse alone would be off by ~5e-4.
template <class S, bool SOFTCAP, class T>
void row_grad(const T* z, T* o, int64_t V_, int64_t y, double lse, double mean_x, float g_lp, float g_h,
              const Transform& tr, ZeroRows& zeros, const T* next = nullptr) {
  const float c = static_cast<float>(lse / tr.k);
  const double frame = static_cast<double>(c) * tr.k;
  row_grad_sweep<S, SOFTCAP>(z, o, V_, y, c, static_cast<float>(lse - frame),
                                   static_cast<float>(mean_x - frame), g_lp, g_h, tr, zeros, next);
}

}  // namespace fastrl
