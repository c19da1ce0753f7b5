// A minimal SIMD layer for the row kernels: one struct per instruction set, the same operation names.
//
// The build picks one struct at compile time (`Simd`): AVX-512F when the compiler targets it (on top of
// AVX2+FMA+F16C), else AVX2+FMA+F16C, else plain scalar code. The loader passes the -m flags only on a
// CPU that has them and caches each build under its own name. exp and tanh are written once, on top of
// these operations.
//
// NaN convention of max/min: `max(a, b)` returns b when either is NaN (as the x86 instructions do), so
// `max(constant, x)` lets a NaN in x through.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define FASTRL_NATIVE_AVX2 1
#endif

namespace fastrl {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Fused multiply-add with one rounding in both builds: the kernels rely on a*b - c being exact before
// rounding when a*b and c are both ~1e4 and their difference is small (see row_kernels.h).
inline float fused_madd(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  // The product of two floats is exact in double; one double add, then one (double) rounding to float.
  return static_cast<float>(static_cast<double>(a) * b + c);
#endif
}

// The first k elements of p, then `pad`, as one vector of S / the first k lanes of a stored to p: the
// partial last vector of a row, once per row, so a float buffer and plain loops do.
template <class S, class T>
inline typename S::V load_first(const T* p, int64_t k, float pad) {
  float buf[S::W];
  for (int i = 0; i < S::W; ++i) buf[i] = i < k ? static_cast<float>(p[i]) : pad;
  return S::load(static_cast<const float*>(buf));
}

template <class S, class T>
inline void store_first(T* p, typename S::V a, int64_t k) {
  float buf[S::W];
  S::store(static_cast<float*>(buf), a);
  for (int i = 0; i < k; ++i) p[i] = static_cast<T>(buf[i]);
}

struct ScalarSimd {
  using V = float;
  using M = bool;
  static constexpr int W = 1;
  static constexpr const char* name = "generic";

  static V set1(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V fma(V a, V b, V c) { return fused_madd(a, b, c); }
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V abs(V a) { return std::fabs(a); }
  static V copysign(V mag, V sign) { return std::copysign(mag, sign); }
  static M gt(V a, V b) { return a > b; }
  static M eq(V a, V b) { return a == b; }
  static M not_less(V a, V b) { return !(a < b); }  // true when unordered (NaN)
  static V blend(M m, V if_true, V if_false) { return m ? if_true : if_false; }
  static V keep(M m, V a) { return m ? a : 0.0f; }
  // y * 2^n for t = 1.5 * 2^23 + n (exp's round-to-integer trick) by an integer add to the exponent
  // field: (bits(t) << 23) == n << 23 mod 2^32, as bits(1.5 * 2^23) = 0x4B400000 is a multiple of 2^9.
  // Valid while y * 2^n is a normal float.
  static V scale_by_magic(V y, V t) { return bits_to_float(float_to_bits(y) + (float_to_bits(t) << 23)); }
  static float hsum(V a) { return a; }
  static float hmax(V a) { return a; }
  static float lane0(V a) { return a; }

  static V load(const float* p) { return *p; }
  static V load(const c10::BFloat16* p) { return static_cast<float>(*p); }
  static V load(const c10::Half* p) { return static_cast<float>(*p); }
  template <class T>
  static void store(T* p, V a) {
    *p = static_cast<T>(a);
  }
  // Never used with W == 1 (no partial vectors); present so the kernels compile unchanged.
  template <class T>
  static V load_partial(const T* p, int64_t, float) {
    return load(p);
  }
  template <class T>
  static void store_partial(T* p, V a, int64_t) {
    store(p, a);
  }
  static M first_lanes(int64_t k) { return k > 0; }
};

#ifdef FASTRL_NATIVE_AVX2
struct Avx2Simd {
  using V = __m256;
  using M = __m256;
  static constexpr int W = 8;
  static constexpr const char* name = "avx2";

  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static V copysign(V mag, V sign) {
    const V s = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(s, mag), _mm256_and_ps(s, sign));
  }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M eq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static M not_less(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_NLT_UQ); }
  static V blend(M m, V if_true, V if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
  static V keep(M m, V a) { return _mm256_and_ps(m, a); }
  static V scale_by_magic(V y, V t) {
    return _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_castps_si256(y), _mm256_slli_epi32(_mm256_castps_si256(t), 23)));
  }
  static float hsum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(V a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float lane0(V a) { return _mm256_cvtss_f32(a); }

  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const c10::BFloat16* p) {
    // bf16 is the high half of a float: widen to 32 bits and shift into place (exact).
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static V load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  static void store(c10::BFloat16* p, V a) {
    // Round to nearest even, as c10::BFloat16(float) does; NaN becomes the canonical quiet NaN.
    const __m256i u = _mm256_castps_si256(a);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), is_nan);
    // Pack 8 x 32-bit (values < 2^16) to 8 x 16-bit; packus works per 128-bit lane, then reorder.
    const __m256i packed = _mm256_packus_epi32(r, r);
    const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(ordered));
  }
  static void store(c10::Half* p, V a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
  }
  template <class T>
  static V load_partial(const T* p, int64_t k, float pad) {
    return load_first<Avx2Simd>(p, k, pad);
  }
  template <class T>
  static void store_partial(T* p, V a, int64_t k) {
    store_first<Avx2Simd>(p, a, k);
  }
  static M first_lanes(int64_t k) {
    const V iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmp_ps(iota, _mm256_set1_ps(static_cast<float>(k)), _CMP_LT_OQ);
  }
};
#endif

#if defined(FASTRL_NATIVE_AVX2) && defined(__AVX512F__)
#define FASTRL_NATIVE_AVX512 1
// Sixteen lanes, masks in k registers. Only AVX-512F instructions: the build asks for -mavx512f alone.
struct Avx512Simd {
  using V = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static constexpr const char* name = "avx512";

  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // vmaxps/vminps: the second operand when either is NaN, as in the AVX2 build.
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V abs(V a) {
    return _mm512_castsi512_ps(_mm512_and_epi32(_mm512_castps_si512(a), _mm512_set1_epi32(0x7FFFFFFF)));
  }
  static V copysign(V mag, V sign) {
    const __m512i s = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_epi32(_mm512_andnot_epi32(s, _mm512_castps_si512(mag)),
                                               _mm512_and_epi32(s, _mm512_castps_si512(sign))));
  }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static M not_less(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_NLT_UQ); }
  static V blend(M m, V if_true, V if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  static V keep(M m, V a) { return _mm512_maskz_mov_ps(m, a); }
  static V scale_by_magic(V y, V t) {
    return _mm512_castsi512_ps(
        _mm512_add_epi32(_mm512_castps_si512(y), _mm512_slli_epi32(_mm512_castps_si512(t), 23)));
  }
  static float hsum(V a) {
    return Avx2Simd::hsum(_mm256_add_ps(_mm512_castps512_ps256(a),
                                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))));
  }
  static float hmax(V a) {
    return Avx2Simd::hmax(_mm256_max_ps(_mm512_castps512_ps256(a),
                                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))));
  }
  static float lane0(V a) { return _mm512_cvtss_f32(a); }

  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const c10::BFloat16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static V load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static void store(c10::BFloat16* p, V a) {
    // Round to nearest even as Avx2Simd::store; the 16-bit results are narrowed with vpmovdw.
    const __m512i u = _mm512_castps_si512(a);
    const __m512i odd = _mm512_and_epi32(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static void store(c10::Half* p, V a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
  }
  template <class T>
  static V load_partial(const T* p, int64_t k, float pad) {
    return load_first<Avx512Simd>(p, k, pad);
  }
  template <class T>
  static void store_partial(T* p, V a, int64_t k) {
    store_first<Avx512Simd>(p, a, k);
  }
  static M first_lanes(int64_t k) { return k >= W ? M{0xFFFF} : static_cast<M>((1u << k) - 1u); }
};
using Simd = Avx512Simd;
#elif defined(FASTRL_NATIVE_AVX2)
using Simd = Avx2Simd;
#else
using Simd = ScalarSimd;
#endif

// e^x, relative error ~1 ulp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then the degree-7
// Cephes polynomial for e^r. For x <= 88 only (the row kernels exponentiate x - max x <= ~0; fast_exp
// clamps for general use). Results below ~1.2e-38 (x < -87) are flushed to 0: they are < 1.2e-38 of the
// row's largest term. -inf gives 0, NaN gives NaN.
template <class S>
inline typename S::V fast_exp_upto88(typename S::V x) {
  using V = typename S::V;
  const V lo = S::set1(-87.0f);
  const V magic = S::set1(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const V t = S::fma(x, S::set1(1.44269504088896341f), magic);
  const V n = S::sub(t, magic);
  V r = S::fma(n, S::set1(-0.693359375f), x);  // ln2 split in two so n * ln2_hi is exact
  r = S::fma(n, S::set1(2.12194440e-4f), r);
  V p = S::set1(1.9875691500e-4f);
  p = S::fma(p, r, S::set1(1.3981999507e-3f));
  p = S::fma(p, r, S::set1(8.3334519073e-3f));
  p = S::fma(p, r, S::set1(4.1665795894e-2f));
  p = S::fma(p, r, S::set1(1.6666665459e-1f));
  p = S::fma(p, r, S::set1(5.0000001201e-1f));
  const V y = S::add(S::fma(p, S::mul(r, r), r), S::set1(1.0f));
  // Lanes below -87 hold garbage (n out of range) and are zeroed here; NaN compares "not less".
  return S::keep(S::not_less(x, lo), S::scale_by_magic(y, t));
}

// e^x for any float x (saturates at e^88 ~ 1.7e38 instead of overflowing).
template <class S>
inline typename S::V fast_exp(typename S::V x) {
  // min returns its second operand when unordered, so NaN passes through.
  return fast_exp_upto88<S>(S::min(S::set1(88.0f), x));
}

// tanh(x), ~2 ulp: odd Cephes polynomial for |x| <= 0.625, else sign(x) (1 - 2 / (e^{2|x|} + 1)),
// which saturates to +-1 without overflow (fast_exp clamps its argument at 88).
template <class S>
inline typename S::V fast_tanh(typename S::V x) {
  using V = typename S::V;
  const V ax = S::abs(x);
  const V e = fast_exp<S>(S::add(ax, ax));
  const V one = S::set1(1.0f);
  const V big = S::copysign(S::sub(one, S::div(S::set1(2.0f), S::add(e, one))), x);
  const V z = S::mul(x, x);
  V p = S::set1(-5.70498872745e-3f);
  p = S::fma(p, z, S::set1(2.06390887954e-2f));
  p = S::fma(p, z, S::set1(-5.37397155531e-2f));
  p = S::fma(p, z, S::set1(1.33314422036e-1f));
  p = S::fma(p, z, S::set1(-3.33332819422e-1f));
  const V small = S::fma(S::mul(p, z), x, x);
  return S::blend(S::gt(ax, S::set1(0.625f)), big, small);
}

}  // namespace fastrl
