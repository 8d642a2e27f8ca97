// The CPU attention kernels, forward and backward, fp32 and bf16 (fp32 accumulation), compiled twice (see
// cpu_capability.h): by attention.cpp for AVX2 and by kernels_avx512.cpp for AVX-512. Everything below the
// includes lives in namespace dit_kernels::CPU_CAPABILITY (AVX2 or AVX512), as at::vec does, so the two
// builds never share a name.
//
// q (B, H, N, D); k, v (B, KV, N, D); query head h reads key/value head h / (H / KV); scale 1/sqrt(D).
// The forward returns the output and the log-sum-exp of each score row (B, H, N); the backward
// recomputes the probabilities from it, so no (B, H, N, N) tensor is ever kept (flash-attention style).
//
// One task is one (batch, kv head): it packs that head's K and V into fp32 buffers once and runs the
// H / KV query heads that share them, in blocks of query rows whose score block fits in L2. Owning the
// kv head also means the backward sums dK and dV over its query heads without atomics. Each thread takes
// the next task from a shared counter rather than a fixed share of them, so on a busy machine a thread
// that loses its core for a while does fewer tasks instead of holding up the others at the end.
// All products go through gemm() below, a 6 x (2 vectors) register-blocked kernel over row-major fp32 buffers
// whose rows are padded to a whole number of vectors; exp is at::vec's polynomial exp_u20. In the AVX2 build
// the inner loop is ymm vbroadcastss + vfmadd231ps with the twelve accumulators in registers, zmm in the
// AVX-512 one (check: objdump -d csrc/_C*.so | grep -c 'vfmadd231ps.*[yz]mm'). Plain loops vectorised by
// GCC 12 came out as xmm with spilled accumulators, 5x slower.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "cpu_capability.h"

namespace dit_kernels {

// What the kernels see of the tensors: pointers, sizes and strides in elements. q, k, v and grad_out may have
// any strides; out, lse, dq, dk and dv are contiguous, allocated by attention.cpp, which alone handles tensors.
struct AttentionArgs {
  int B, H, KV, N, D;
  bool bf16;
  const void *q, *k, *v, *grad_out;
  int64_t q_stride[4], k_stride[4], v_stride[4], grad_out_stride[4];
  void *out, *dq, *dk, *dv;
  float* lse;
};

namespace CPU_CAPABILITY {

// -----------------------------------------------------------------------------
// small dense kernels on fp32 buffers

using Vec = at::vec::Vectorized<float>;  // one ymm register of 8 floats in the AVX2 build, zmm of 16 in AVX-512
constexpr int kVec = Vec::size();

static inline int round_up(int n) { return (n + kVec - 1) / kVec * kVec; }

// C (MR, NV * kVec) (+)= A (MR, K) @ B (K, NV * kVec): MR x NV accumulators stay in registers while
// one row of B is loaded and each element of A broadcast. A is read through strides, so A^T needs no copy.
template <int MR, int NV>
static inline void gemm_tile(int K, const float* A, long a_row, long a_col, const float* B, long ldb, float* C,
                             long ldc, bool accumulate) {
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Vec(0.0f);
  for (int p = 0; p < K; ++p) {
    Vec b[NV];
    for (int j = 0; j < NV; ++j) b[j] = Vec::loadu(B + p * ldb + j * kVec);
    for (int i = 0; i < MR; ++i) {
      const Vec a(A[i * a_row + p * a_col]);
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) {
      float* c = C + i * ldc + j * kVec;
      (accumulate ? acc[i][j] + Vec::loadu(c) : acc[i][j]).store(c);
    }
}

// An odd number of vectors would end on a one-vector tile, whose six accumulators cannot hide the FMA latency.
// AVX-512's 32 registers hold a three-vector tile (18 accumulators) instead, which takes D = 48 whole.
template <int MR>
static void gemm_rows(int NC, int K, const float* A, long a_row, long a_col, const float* B, long ldb, float* C,
                      long ldc, bool accumulate) {
  int j = 0;
#ifdef CPU_CAPABILITY_AVX512
  if (NC % (2 * kVec) != 0 && NC >= 3 * kVec) {
    gemm_tile<MR, 3>(K, A, a_row, a_col, B, ldb, C, ldc, accumulate);
    j = 3 * kVec;
  }
#endif
  for (; j + 2 * kVec <= NC; j += 2 * kVec) gemm_tile<MR, 2>(K, A, a_row, a_col, B + j, ldb, C + j, ldc, accumulate);
  if (j < NC) gemm_tile<MR, 1>(K, A, a_row, a_col, B + j, ldb, C + j, ldc, accumulate);
}

// C (M, NC) (+)= A (M, K) @ B (K, NC) with B, C row-major and NC a multiple of kVec (buffers are padded).
// Six rows at a time: 12 accumulators, more than the 8 FMAs in flight that Zen 3 (and Intel's two 512-bit FMA
// units) need to hide latency.
static void gemm(int M, int NC, int K, const float* A, long a_row, long a_col, const float* B, long ldb, float* C,
                 long ldc, bool accumulate) {
  int i = 0;
  for (; i + 6 <= M; i += 6) gemm_rows<6>(NC, K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc, accumulate);
  const float* a = A + i * a_row;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: gemm_rows<5>(NC, K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 4: gemm_rows<4>(NC, K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 3: gemm_rows<3>(NC, K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_rows<2>(NC, K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_rows<1>(NC, K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
  }
}

// C (M, round_up(NC)) = A (M, K) @ B^T, B (NC, K): the products Q K^T and dO V^T, whose NC is the sequence
// length. Whole vectors of columns go through gemm() on Bt, B transposed and padded; a remainder of one to
// three columns (N = 65 = 8 * 8 + 1 in the default DiT) is cheaper as dot products of A's rows with B's rows
// than as a one-vector tile, whose six accumulators cannot hide the FMA latency. The dot products read A's and
// B's rows up to round_up(K), so both must be zero there; C's padding columns come out zero either way.
static void gemm_nt(int M, int NC, int K, const float* A, long lda, const float* Bt, long ldbt, const float* B,
                    long ldb, float* C, long ldc) {
  const int r = NC % kVec, whole = NC - r;
  if (r == 0 || r > 3) {
    gemm(M, round_up(NC), K, A, lda, 1, Bt, ldbt, C, ldc, false);
    return;
  }
  if (whole > 0) gemm(M, whole, K, A, lda, 1, Bt, ldbt, C, ldc, false);
  for (int i = 0; i < M; ++i) {
    // lane c of the stored vector is column whole + c; built in registers, as a store of the scalars and a
    // vector load of them would stall on store forwarding
    Vec tail(0.0f);
    for (int c = r - 1; c >= 0; --c) {
      const float *a = A + i * lda, *b = B + (whole + c) * ldb;
      Vec acc = Vec::loadu(a) * Vec::loadu(b);
      for (int d = kVec; d < round_up(K); d += kVec) acc = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc);
      tail = Vec::set(tail, Vec(at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc)), c + 1);
    }
    tail.store(C + i * ldc + whole);
  }
}

// dst[r * ld + c] = src(r, c) for r < rows, c < cols, from any strides, into fp32; dst's padding columns
// (cols .. ld) are left as they are (zero from allocation)
template <typename scalar_t>
static void pack(const scalar_t* src, long row_stride, long col_stride, int rows, int cols, float* dst, long ld) {
  for (int r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * row_stride;
    float* d = dst + r * ld;
    if (col_stride == 1)  // the usual case, which the compiler vectorises
      for (int c = 0; c < cols; ++c) d[c] = static_cast<float>(s[c]);
    else
      for (int c = 0; c < cols; ++c) d[c] = static_cast<float>(s[c * col_stride]);
  }
}

// the transpose: dst[c * ld + r] = src(r, c), so that K^T is a row-major right-hand side for Q K^T
template <typename scalar_t>
static void pack_transposed(const scalar_t* src, long row_stride, long col_stride, int rows, int cols, float* dst,
                            long ld) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) dst[c * ld + r] = static_cast<float>(src[r * row_stride + c * col_stride]);
}

// dst[r * cols + c] = src[r * ld + c] * scale, from a padded fp32 buffer to a contiguous output
template <typename scalar_t>
static void unpack(const float* src, long ld, int rows, int cols, float scale, scalar_t* dst) {
  for (int r = 0; r < rows; ++r) {
    const float* s = src + r * ld;
    scalar_t* d = dst + static_cast<long>(r) * cols;
    if constexpr (std::is_same_v<scalar_t, float>)  // at::vec: GCC left the plain loop scalar
      at::vec::map([scale](Vec x) { return x * Vec(scale); }, d, s, cols);
    else
      for (int c = 0; c < cols; ++c) d[c] = static_cast<scalar_t>(s[c] * scale);
  }
}

// x[j] = exp((x[j] - m) * scale) for j < n, returning their sum, in one pass; the padding up to the next
// multiple of the vector width is set to zero
static float exp_and_sum(float* x, float m, float scale, int n) {
  Vec sum(0.0f);
  int j = 0;
  for (; j + kVec <= n; j += kVec) {
    const Vec e = ((Vec::loadu(x + j) - Vec(m)) * Vec(scale)).exp_u20();
    e.store(x + j);
    sum = sum + e;
  }
  if (j < n) {
    const Vec e = Vec::set(Vec(0.0f), ((Vec::loadu(x + j, n - j) - Vec(m)) * Vec(scale)).exp_u20(), n - j);
    e.store(x + j);
    sum = sum + e;
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
}

// `rows` rows of D values from src as fp32 rows `ld` floats apart: src itself when it already is that (fp32,
// unit column stride, D a whole number of vectors, so no padding is needed), else a copy packed into buf
template <typename scalar_t>
static const float* fp32_rows(const scalar_t* src, long row_stride, long col_stride, int rows, int D, float* buf,
                              long buf_ld, long& ld) {
  if constexpr (std::is_same_v<scalar_t, float>)
    if (col_stride == 1 && D % kVec == 0) {
      ld = row_stride;
      return src;
    }
  pack(src, row_stride, col_stride, rows, D, buf, buf_ld);
  ld = buf_ld;
  return buf;
}

// where a product bound for the output dst (rows of D values, contiguous) is written: dst itself when fp32 and
// D needs no padding, so the result is stored once, from the product's registers, rather than stored to a
// buffer and copied; else buf, rows round_up(D) apart, for unpack() to convert
template <typename scalar_t>
static float* fp32_out(scalar_t* dst, int D, float* buf, long& ld) {
  if constexpr (std::is_same_v<scalar_t, float>)
    if (D % kVec == 0) {
      ld = D;
      return dst;
    }
  ld = round_up(D);
  return buf;
}

// query rows per block: the whole sequence when its scores fit in ~128 KB, else equal blocks that do
static int query_block(int N) {
  const int max_rows = std::max(4, 32768 / round_up(N));
  const int blocks = (N + max_rows - 1) / max_rows;
  return (N + blocks - 1) / blocks;
}

// a zeroed fp32 buffer. Not std::vector: its out-of-line members would be compiled in both instruction-set
// builds under one name, and the linker keeps one of the two for the whole library (see kernels_avx512.cpp)
struct Buffer {
  explicit Buffer(size_t n) : ptr(new float[n]()) {}
  ~Buffer() { delete[] ptr; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* data() const { return ptr; }
  float& operator[](size_t i) const { return ptr[i]; }
  float* const ptr;
};

// -----------------------------------------------------------------------------
// forward

template <typename scalar_t>
static void forward_kernel(const AttentionArgs& a) {
  const int B = a.B, H = a.H, N = a.N, D = a.D, KV = a.KV, G = H / KV;
  const int Np = round_up(N), Dp = round_up(D), BQ = query_block(N);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto *qp = static_cast<const scalar_t*>(a.q), *kp = static_cast<const scalar_t*>(a.k),
             *vp = static_cast<const scalar_t*>(a.v);
  const int64_t *qs = a.q_stride, *ks = a.k_stride, *vs = a.v_stride;
  auto* op = static_cast<scalar_t*>(a.out);
  float* lp = a.lse;
  std::atomic<int64_t> next_task{0};  // see the header: threads take tasks one at a time
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), B * KV), 1, [&](int64_t, int64_t) {
    Buffer kt(D * Np), kb(N * Dp), vb(N * Dp), qb(BQ * Dp), s(BQ * Np), o(BQ * Dp);  // zeroed: padding stays zero
    Buffer row_max(BQ), row_sum(BQ);
    for (int64_t task; (task = next_task++) < B * KV;) {
      const int b = task / KV, kv = task % KV;
      const scalar_t* k_head = kp + b * ks[0] + kv * ks[1];
      pack_transposed(k_head, ks[2], ks[3], N, D, kt.data(), Np);
      long k_ld;
      const float* k_rows = fp32_rows(k_head, ks[2], ks[3], N, D, kb.data(), Dp, k_ld);
      long v_ld;
      const float* v_rows = fp32_rows(vp + b * vs[0] + kv * vs[1], vs[2], vs[3], N, D,
                                      vb.data(), Dp, v_ld);
      for (int h = kv * G; h < (kv + 1) * G; ++h) {
        for (int i0 = 0; i0 < N; i0 += BQ) {
          const int rows = std::min(BQ, N - i0);
          long q_ld;
          const float* q_rows = fp32_rows(qp + b * qs[0] + h * qs[1] + i0 * qs[2], qs[2],
                                          qs[3], rows, D, qb.data(), Dp, q_ld);
          // Q K^T unscaled: the softmax scales it, so q is read in place rather than copied to be scaled
          gemm_nt(rows, N, D, q_rows, q_ld, kt.data(), Np, k_rows, k_ld, s.data(), Np);
          for (int i = 0; i < rows; ++i) {
            float* si = s.data() + i * Np;
            row_max[i] = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, si, N);
            row_sum[i] = exp_and_sum(si, row_max[i], scale, N);
          }
          at::vec::map2([scale](Vec m, Vec sum) { return m * Vec(scale) + sum.log(); },
                        lp + (static_cast<long>(b) * H + h) * N + i0, row_max.data(), row_sum.data(), rows);
          scalar_t* out_rows = op + ((static_cast<long>(b) * H + h) * N + i0) * D;
          long o_ld;
          float* o_rows = fp32_out(out_rows, D, o.data(), o_ld);
          gemm(rows, Dp, N, s.data(), Np, 1, v_rows, v_ld, o_rows, o_ld, false);  // unnormalised
          // normalise the output rather than the probabilities: D multiplies a row, not N (in place for fp32)
          for (int i = 0; i < rows; ++i) unpack(o_rows + i * o_ld, o_ld, 1, D, 1.0f / row_sum[i], out_rows + i * D);
        }
      }
    }
  });
}

// -----------------------------------------------------------------------------
// backward: with P = softmax(S) recomputed as exp(scale * Q K^T - lse) and Delta_i = sum_j P_ij dP_ij,
// dV = P^T dO, dP = dO V^T, dS = P * (dP - Delta), dQ = dS K * scale, dK = dS^T Q * scale.
// Delta also equals sum_d dO_id O_id, the form flash attention uses because it never holds a whole row of
// P; a block here holds every key, so the row sum comes from P and dP in cache and O is never read.

template <typename scalar_t>
static void backward_kernel(const AttentionArgs& a) {
  const int B = a.B, H = a.H, N = a.N, D = a.D, KV = a.KV, G = H / KV;
  const int Np = round_up(N), Dp = round_up(D), BQ = query_block(N);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto *qp = static_cast<const scalar_t*>(a.q), *kp = static_cast<const scalar_t*>(a.k),
             *vp = static_cast<const scalar_t*>(a.v);
  const int64_t *qs = a.q_stride, *ks = a.k_stride, *vs = a.v_stride;
  const auto* gp = static_cast<const scalar_t*>(a.grad_out);
  const int64_t* gs = a.grad_out_stride;
  const float* lp = a.lse;
  auto *dqp = static_cast<scalar_t*>(a.dq), *dkp = static_cast<scalar_t*>(a.dk), *dvp = static_cast<scalar_t*>(a.dv);
  std::atomic<int64_t> next_task{0};  // see the header: threads take tasks one at a time
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), B * KV), 1, [&](int64_t, int64_t) {
    Buffer kt(D * Np), vt(D * Np), kb(N * Dp), vb(N * Dp), dk_acc(N * Dp), dv_acc(N * Dp);
    Buffer qb(BQ * Dp), gb(BQ * Dp), p(BQ * Np), ds(BQ * Np), dq_buf(BQ * Dp);
    for (int64_t task; (task = next_task++) < B * KV;) {
      const int b = task / KV, kv = task % KV;
      const scalar_t* k_head = kp + b * ks[0] + kv * ks[1];
      const scalar_t* v_head = vp + b * vs[0] + kv * vs[1];
      pack_transposed(k_head, ks[2], ks[3], N, D, kt.data(), Np);
      pack_transposed(v_head, vs[2], vs[3], N, D, vt.data(), Np);
      long k_ld, v_ld, dk_ld, dv_ld;
      const float* k_rows = fp32_rows(k_head, ks[2], ks[3], N, D, kb.data(), Dp, k_ld);
      const float* v_rows = fp32_rows(v_head, vs[2], vs[3], N, D, vb.data(), Dp, v_ld);
      scalar_t* dk_out = dkp + (static_cast<long>(b) * KV + kv) * N * D;
      scalar_t* dv_out = dvp + (static_cast<long>(b) * KV + kv) * N * D;
      float* dk_rows = fp32_out(dk_out, D, dk_acc.data(), dk_ld);  // summed over the group's query heads
      float* dv_rows = fp32_out(dv_out, D, dv_acc.data(), dv_ld);
      for (int h = kv * G; h < (kv + 1) * G; ++h) {
        for (int i0 = 0; i0 < N; i0 += BQ) {
          const int rows = std::min(BQ, N - i0);
          const bool first = h == kv * G && i0 == 0;  // dK and dV start from this block's products
          const long q_off = b * qs[0] + h * qs[1] + i0 * qs[2];
          const long g_off = b * gs[0] + h * gs[1] + i0 * gs[2];
          // q unscaled, as in the forward: the scale goes into P's exponent and into dS
          long q_ld, g_ld;
          const float* q_rows = fp32_rows(qp + q_off, qs[2], qs[3], rows, D, qb.data(), Dp, q_ld);
          const float* g_rows = fp32_rows(gp + g_off, gs[2], gs[3], rows, D, gb.data(), Dp,
                                          g_ld);
          gemm_nt(rows, N, D, q_rows, q_ld, kt.data(), Np, k_rows, k_ld, p.data(), Np);  // unscaled scores
          gemm_nt(rows, N, D, g_rows, g_ld, vt.data(), Np, v_rows, v_ld, ds.data(), Np);  // dP
          const float* row_lse = lp + (static_cast<long>(b) * H + h) * N + i0;
          // P with Delta, then dS times the scale (which dQ and dK both carry), over whole vectors: the products
          // left the padding columns zero, so they add nothing to Delta, and nothing below reads them
          const Vec scale_v(scale);
          for (int i = 0; i < rows; ++i) {
            float *pi = p.data() + i * Np, *dsi = ds.data() + i * Np;
            const Vec m(-row_lse[i]);
            Vec delta(0.0f);
            for (int j = 0; j < Np; j += kVec) {
              const Vec pij = at::vec::fmadd(Vec::loadu(pi + j), scale_v, m).exp_u20();
              pij.store(pi + j);
              delta = at::vec::fmadd(pij, Vec::loadu(dsi + j), delta);
            }
            const Vec di(at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, delta));
            for (int j = 0; j < Np; j += kVec)
              (Vec::loadu(pi + j) * (Vec::loadu(dsi + j) - di) * scale_v).store(dsi + j);
          }
          // P^T and dS^T are read in place through swapped strides
          gemm(N, Dp, rows, p.data(), 1, Np, g_rows, g_ld, dv_rows, dv_ld, !first);
          gemm(N, Dp, rows, ds.data(), 1, Np, q_rows, q_ld, dk_rows, dk_ld, !first);
          scalar_t* dq_out = dqp + ((static_cast<long>(b) * H + h) * N + i0) * D;
          long dq_ld;
          float* dq_rows = fp32_out(dq_out, D, dq_buf.data(), dq_ld);
          gemm(rows, Dp, N, ds.data(), Np, 1, k_rows, k_ld, dq_rows, dq_ld, false);
          if (dq_rows == dq_buf.data()) unpack(dq_rows, dq_ld, rows, D, 1.0f, dq_out);
        }
      }
      if (dk_rows == dk_acc.data()) unpack(dk_rows, dk_ld, N, D, 1.0f, dk_out);
      if (dv_rows == dv_acc.data()) unpack(dv_rows, dv_ld, N, D, 1.0f, dv_out);
    }
  });
}

// -----------------------------------------------------------------------------
// the entry points attention.cpp calls

void attention_forward_kernel(const AttentionArgs& a) {
  if (a.bf16)
    forward_kernel<c10::BFloat16>(a);
  else
    forward_kernel<float>(a);
}

void attention_backward_kernel(const AttentionArgs& a) {
  if (a.bf16)
    backward_kernel<c10::BFloat16>(a);
  else
    backward_kernel<float>(a);
}

}  // namespace CPU_CAPABILITY
}  // namespace dit_kernels
