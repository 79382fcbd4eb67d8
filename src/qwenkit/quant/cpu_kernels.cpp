// Matrix-vector kernels for decoding on x86 CPUs with AVX2 + FMA + F16C, reading packed weights.
//
// Why hand-written: this is the one place PyTorch has nothing fast on AVX2. Measured on the 2-core
// AVX2 machine (Qwen2.5-0.5B MLP shape 4864 x 896, batch 1): aten::_weight_int8pack_mm takes 6-8x
// longer than fp32 sgemv, _weight_int4pack_mm_for_cpu 10x longer, fp16/bf16 F.linear 8x longer, and
// inductor's code for "dequantize then matmul" is slower still. Decoding reads every weight once per
// token, so the speed is set by the bytes read: these kernels read 1 (int8), 0.5 (int4) or 2 (16-bit)
// bytes per weight, and do little enough arithmetic per byte to keep up with memory on two cores.
//
// Quantized weights, per output row n and group g of `group_size` contiguous input columns:
//   W[n, i] = scales[n, g] * (q[n, i] - zeros[n, g]), szeros = scales * zeros, so
//   y[m, n] = sum_g scales[n, g] * dot(x[m, g], q[n, g]) - sum_g szeros[n, g] * sum(x[m, g])  (+ bias[n])
// int8 q is [N, K] uint8. int4 q is [N, K / 2] uint8 in blocks of 64 columns: byte j of a block holds
// column j in its low nibble and column 32 + j in its high nibble (qwenkit.quant.linear.pack_int4),
// so one 32-byte load gives 64 weights.
//
// Two ways to take the dot products:
// - int8 activations (the default, as llama.cpp's Q8_0 x Q4_0/Q8_0 dot products): x is quantized once
//   per call to int8 in blocks of 32 (d = max|x| / 127, x ~= d * xq, rounded to nearest), and each
//   block's dot product is taken in integers (_mm256_maddubs_epi16 of unsigned weights and signed
//   activations, pairs summed into int32 by _mm256_madd_epi16), then scaled by d in fp32. No weight is
//   ever widened to float, so int4 costs fewer instructions per byte than int8 and both reach memory
//   speed. The result is exactly W x_hat for the rounded x_hat (fp32 sums).
// - fp32 activations (`int8_activations=false`): weights widened to fp32 in registers, FMA with x;
//   the exact product W x up to fp32 rounding, about 2x slower for int8 and 4x for int4.
// Every kernel takes TILE output rows at a time (their x loads shared, one accumulator chain per
// row), and the rows are split evenly over the threads by at::parallel_for.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace {

constexpr int TILE = 4;       // output rows computed together
// Software prefetch this many bytes ahead of the rows being read (the tiles of a thread are one
// contiguous run; two cache lines per step, the bytes a step reads): measured on the 2-core AVX2
// machine over a decode-like chain of 96 matrices, 1.2-1.5x faster than leaving it to the hardware.
constexpr int64_t DIST = 8192;
constexpr int64_t QBLOCK = 32;  // activation quantization block (columns)

// Prefetch the cache line `offset` bytes after p. The address is formed in integers: it may lie past
// the end of the buffer (a prefetch never faults), where pointer arithmetic would be undefined.
inline void prefetch(const void* p, int64_t offset) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + offset), _MM_HINT_T0);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------------------------------------
// Activations to int8: x [K] -> xq [K] int8 and one scale d per block of 32 (x ~= d * xq), plus the
// sum of each group of the dequantized x_hat (for the zero-point term). Blocks of zeros get d = 0.
struct QuantizedRow {
  std::vector<int8_t> q;
  std::vector<float> d, group_sum;
};

void quantize_row(const float* x, int64_t K, int64_t group_size, QuantizedRow& out) {
  const int64_t blocks = K / QBLOCK;
  out.q.resize(K);
  out.d.resize(blocks);
  out.group_sum.assign(K / group_size, 0.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * QBLOCK;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(xb + 8 * k);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 127.f;
    const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
    __m256i i[4];
    for (int k = 0; k < 4; ++k) {
      i[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // int32 -> int8 with saturating packs, which interleave the 128-bit lanes: undo with a permute
    const __m256i packed = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3])), order);
    _mm256_storeu_si256((__m256i*)(out.q.data() + b * QBLOCK), packed);
    out.d[b] = d;
    // sum of the block's levels: |xq| * sign, pairs in int16, then int32
    const __m256i s16 = _mm256_maddubs_epi16(ones8, packed);
    const __m256i s32 = _mm256_madd_epi16(s16, ones16);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    out.group_sum[b * QBLOCK / group_size] += d * static_cast<float>(_mm_cvtsi128_si32(s));
  }
}

// Integer dot product of 32 int8 activations with 32 weights, as 8 int32 partial sums.
// Weights 0..15 (int4): maddubs directly (15 * 127 * 2 fits int16).
inline __m256i dot_u4(__m256i w, __m256i xq) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, xq), _mm256_set1_epi16(1));
}
// Weights 0..255 (int8): 255 * 127 * 2 would overflow maddubs' int16, so take w - 128 (in -128..127)
// and move its sign onto x: |w - 128| * (sign(w - 128) * xq), at most 128 * 127 * 2 in int16.
inline __m256i dot_u8_centered(__m256i w, __m256i xq) {
  const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(ws, ws), _mm256_sign_epi8(xq, ws)),
                           _mm256_set1_epi16(1));
}

// R rows of int8 levels (row r at q + r * K) times one quantized x: out[r] = sum_g scales[r, g] *
// sum_{b in g} d_b * dot(q_b - 128, xq_b); the caller adds the zero-point term (zeros - 128).
template <int R>
void int8_rows_i8x(const uint8_t* q, int64_t K, const QuantizedRow& x, const float* scales, int64_t G,
                   int64_t blocks_per_group, float* out) {
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (const int64_t end = b + blocks_per_group; b < end; ++b) {
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(x.q.data() + b * QBLOCK));
      const __m256 d = _mm256_set1_ps(x.d[b]);
      prefetch(q, DIST + b * R * QBLOCK);
      prefetch(q, DIST + b * R * QBLOCK + 64);
      for (int r = 0; r < R; ++r) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(q + r * K + b * QBLOCK));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_centered(w, xv)), d, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) total[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(scales[r * G + g]), total[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(total[r]);
}

// R rows of int4 levels in the 64-column block layout (row r at q + r * K / 2) times one quantized x.
template <int R>
void int4_rows_i8x(const uint8_t* q, int64_t K, const QuantizedRow& x, const float* scales, int64_t G,
                   int64_t blocks_per_group, float* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 total[R], acc[R];
  for (int r = 0; r < R; ++r) total[r] = acc[r] = _mm256_setzero_ps();
  const int64_t blocks = K / QBLOCK;
  int64_t g = 0, left = blocks_per_group;  // blocks left in group g
  auto close_group = [&]() {
    if (--left == 0) {
      for (int r = 0; r < R; ++r) {
        total[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(scales[r * G + g]), total[r]);
        acc[r] = _mm256_setzero_ps();
      }
      ++g;
      left = blocks_per_group;
    }
  };
  for (int64_t b = 0; b < blocks; b += 2) {  // one 32-byte load: blocks b (low nibbles) and b + 1 (high)
    const __m256i x0 = _mm256_loadu_si256((const __m256i*)(x.q.data() + b * QBLOCK));
    const __m256i x1 = _mm256_loadu_si256((const __m256i*)(x.q.data() + (b + 1) * QBLOCK));
    const __m256 d0 = _mm256_set1_ps(x.d[b]), d1 = _mm256_set1_ps(x.d[b + 1]);
    __m256i bytes[R];
    prefetch(q, DIST + b * R * QBLOCK / 2);
    prefetch(q, DIST + b * R * QBLOCK / 2 + 64);
    for (int r = 0; r < R; ++r) {
      bytes[r] = _mm256_loadu_si256((const __m256i*)(q + r * (K / 2) + b * (QBLOCK / 2)));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u4(_mm256_and_si256(bytes[r], low4), x0)), d0, acc[r]);
    }
    close_group();
    for (int r = 0; r < R; ++r) {
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes[r], 4), low4);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u4(high, x1)), d1, acc[r]);
    }
    close_group();
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(total[r]);
}

// ---------------------------------------------------------------------------------------------
// fp32 activations: 32 weights widened to fp32, FMA with x into four chains.
struct Acc4 {
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 sum() const { return _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])); }
};

inline void fma_u8x32(__m256i w, const float* x, Acc4& acc) {
  __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
  acc.a[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(x), acc.a[0]);
  acc.a[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                             _mm256_loadu_ps(x + 8), acc.a[1]);
  acc.a[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(x + 16), acc.a[2]);
  acc.a[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                             _mm256_loadu_ps(x + 24), acc.a[3]);
}

// One row times fp32 x: sum_g scales[g] * dot(x_g, q_g), over 32-column blocks (levels at `block(b)`).
template <typename Block>
float quant_row_f32x(const float* x, const float* scales, int64_t G, int64_t blocks_per_group, Block block) {
  __m256 total = _mm256_setzero_ps();
  int64_t b = 0;
  for (int64_t g = 0; g < G; ++g) {
    Acc4 acc;
    for (const int64_t end = b + blocks_per_group; b < end; ++b) fma_u8x32(block(b), x + b * QBLOCK, acc);
    total = _mm256_fmadd_ps(acc.sum(), _mm256_set1_ps(scales[g]), total);
  }
  return hsum(total);
}

// ---------------------------------------------------------------------------------------------
void check_quant_args(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                      const at::Tensor& szeros, const c10::optional<at::Tensor>& bias, int64_t group_size,
                      int64_t columns_per_byte) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "q: contiguous uint8");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) * columns_per_byte == K, "q does not match x's columns");
  TORCH_CHECK(group_size % QBLOCK == 0 && K % group_size == 0, "group_size must be a multiple of 32 dividing K");
  TORCH_CHECK(columns_per_byte == 1 || K % 64 == 0, "int4: K must be a multiple of 64");
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scales, &szeros}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == N && t->size(1) == G,
                "scales/szeros: contiguous fp32 [N, K / group_size]");
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias: contiguous fp32 [N]");
  }
}

// Rows of levels -> fp32 weights [N, K] (prefill: the caller multiplies a chunk of rows at a time).
at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& szeros, int64_t group_size,
                      int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t N = q.size(0), K = q.size(1) * (bits == 4 ? 2 : 1);
  check_quant_args(at::empty({0, K}, scales.options()), q, scales, szeros, c10::nullopt, group_size,
                   bits == 4 ? 2 : 1);
  const int64_t G = K / group_size, blocks_per_group = group_size / QBLOCK;
  at::Tensor out = at::empty({N, K}, scales.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scales.data_ptr<float>(), *zp = szeros.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = qp + n * q.size(1);
      for (int64_t b = 0; b < K / QBLOCK; ++b) {
        const int64_t g = b / blocks_per_group;
        const __m256 s = _mm256_set1_ps(sp[n * G + g]), z = _mm256_set1_ps(zp[n * G + g]);
        __m256i w;
        if (bits == 8) {
          w = _mm256_loadu_si256((const __m256i*)(row + b * QBLOCK));
        } else {
          const __m256i bytes = _mm256_loadu_si256((const __m256i*)(row + (b / 2) * QBLOCK));
          w = b % 2 == 0 ? _mm256_and_si256(bytes, low4) : _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
        }
        float* dst = op + n * K + b * QBLOCK;
        const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int k = 0; k < 4; ++k) {  // s * q - s * zero
          _mm256_storeu_ps(dst + 8 * k, _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[k])), s, z));
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// 16-bit weights [N, K] (fp16 or bf16) times fp32 x [M, K], widened to fp32 in registers.
inline __m256 widen(__m128i h, bool bf16) {
  return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))  // bf16: top half of fp32
              : _mm256_cvtph_ps(h);
}

template <int R>
void half_rows(const uint16_t* w, int64_t K, const float* x, bool bf16, float* out) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < K; j += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
    prefetch(w, DIST + j * R * 2);
    prefetch(w, DIST + j * R * 2 + 64);
    for (int r = 0; r < R; ++r) {
      const uint16_t* row = w + r * K + j;
      a0[r] = _mm256_fmadd_ps(widen(_mm_loadu_si128((const __m128i*)row), bf16), x0, a0[r]);
      a1[r] = _mm256_fmadd_ps(widen(_mm_loadu_si128((const __m128i*)(row + 8)), bf16), x1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(a0[r], a1[r]));
}

at::Tensor half_gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "w: contiguous [N, K]");
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || w.scalar_type() == at::kHalf, "w: float16 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 16 == 0, "K must be a multiple of 16");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias: contiguous fp32 [N]");
  }
  at::Tensor out = at::empty({M, N}, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* xp = x.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t tiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * TILE, count = std::min<int64_t>(TILE, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        float dots[TILE];
        if (count == TILE) half_rows<TILE>(wp + n0 * K, K, xp + m * K, bf16, dots);
        else for (int64_t r = 0; r < count; ++r) half_rows<1>(wp + (n0 + r) * K, K, xp + m * K, bf16, dots + r);
        for (int64_t r = 0; r < count; ++r) op[m * N + n0 + r] = dots[r] + (bp ? bp[n0 + r] : 0.f);
      }
    }
  });
  return out;
}

// The activation quantization alone (for tests): x [M, K] -> (xq int8 [M, K], d fp32 [M, K / 32]).
std::tuple<at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) % QBLOCK == 0,
              "x: contiguous fp32 [M, K], K a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar)), d = at::empty({M, K / QBLOCK}, x.options());
  QuantizedRow row;
  for (int64_t m = 0; m < M; ++m) {
    quantize_row(x.data_ptr<float>() + m * K, K, K, row);
    std::copy(row.q.begin(), row.q.end(), q.data_ptr<int8_t>() + m * K);
    std::copy(row.d.begin(), row.d.end(), d.data_ptr<float>() + m * (K / QBLOCK));
  }
  return {q, d};
}

// ---------------------------------------------------------------------------------------------
// A whole decoding step on CPU (qwenkit.model.Qwen.decode_step's native path): every block's
// RMSNorm, fused q/k/v product + bias, RoPE, KV-cache write, attention of the new token over its
// row's cache slots (GQA, boolean mask), o_proj + residual, RMSNorm, fused gate/up product, SiLU x
// up, down_proj + residual, then the final norm and the head, in one call with no Python between.
//
// Threads: one team for the whole step (the caller's thread and at::get_num_threads() - 1 workers
// kept for the next step), split every product's output rows (or columns) evenly, and meet at a
// spinning barrier after each stage: 5 per block. Starting an OpenMP region per product (what
// at::parallel_for does) and waking threads that fell asleep between two Python-level calls cost a
// fixed 20-100 us per product, a fifth of a small matrix's time.
//
// Why hand-written: PyTorch has no fused CPU decode step, and its per-op dispatch from Python is a
// third of an int8 token (benchmarks/decode_profile.py).

// fp32 weights [N, K] row-major: R rows at a time, x [K] broadcast, four accumulator chains per row.
template <int R>
void f32_rows(const float* w, int64_t K, const float* x, float* out) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= K; j += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
    for (int p = 0; p < R; ++p) prefetch(w, DIST + (j * R + 16 * p) * 4);  // R lines per step
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + j), x0, a0[r]);
      a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + j + 8), x1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(_mm256_add_ps(a0[r], a1[r]));
    for (int64_t i = j; i < K; ++i) s += w[r * K + i] * x[i];
    out[r] = s;
  }
}

// fp32 weights stored transposed, Wt [K, N] with row stride ld (nn.Linear weights that
// qwenkit.model.cpu_decode_layout keeps column-major): out[n0:n1] = x Wt[:, n0:n1], taking the
// columns in chunks whose sums stay in L1, four rows of Wt per pass.
void f32_cols(const float* wt, int64_t ld, int64_t K, const float* x, int64_t n0, int64_t n1, float* out) {
  constexpr int64_t CHUNK = 1024;
  for (int64_t c0 = n0; c0 < n1; c0 += CHUNK) {
    const int64_t width = std::min(n1, c0 + CHUNK) - c0, vec = width / 8 * 8;
    float* y = out + (c0 - n0);
    const float* w = wt + c0;
    std::fill(y, y + width, 0.f);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const float* w0 = w + k * ld;
      const __m256 x0 = _mm256_set1_ps(x[k]), x1 = _mm256_set1_ps(x[k + 1]);
      const __m256 x2 = _mm256_set1_ps(x[k + 2]), x3 = _mm256_set1_ps(x[k + 3]);
      for (int64_t c = 0; c < vec; c += 8) {
        __m256 acc = _mm256_loadu_ps(y + c);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + c), x0, acc);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + ld + c), x1, acc);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + 2 * ld + c), x2, acc);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + 3 * ld + c), x3, acc);
        _mm256_storeu_ps(y + c, acc);
      }
      for (int64_t c = vec; c < width; ++c) {
        y[c] += w0[c] * x[k] + w0[ld + c] * x[k + 1] + w0[2 * ld + c] * x[k + 2] + w0[3 * ld + c] * x[k + 3];
      }
    }
    for (; k < K; ++k) {
      for (int64_t c = 0; c < width; ++c) y[c] += w[k * ld + c] * x[k];
    }
  }
}

enum LinearKind : int64_t { F32_ROWS = 0, F32_COLS = 1, HALF = 2, Q8 = 3, Q4 = 4 };

// One linear layer of the step, as raw pointers (checked when the step is set up).
struct Linear {
  int64_t kind = F32_ROWS, N = 0, K = 0, ld = 0, G = 1, group_size = 0;
  bool int8_act = true, bf16 = false;
  const void* w = nullptr;
  const float *scales = nullptr, *szeros = nullptr, *bias = nullptr;
  bool quantized() const { return kind == Q8 || kind == Q4; }
  int64_t align() const { return kind == F32_COLS ? 8 : TILE; }
};

// What one thread prepares from an input x [M, K] before taking its rows of a product.
struct Prepared {
  const float* x = nullptr;
  int64_t M = 0;
  std::vector<QuantizedRow> xq;  // int8 activations, per row of x
  std::vector<float> xsum;       // [M, G]: sum of x (of x_hat with int8 activations) per group
};

void prepare(const Linear& L, const float* x, int64_t M, Prepared& p) {
  p.x = x;
  p.M = M;
  if (!L.quantized()) return;
  p.xsum.assign(M * L.G, 0.f);
  if (L.int8_act) {
    p.xq.resize(M);
    for (int64_t m = 0; m < M; ++m) {
      quantize_row(x + m * L.K, L.K, L.group_size, p.xq[m]);
      std::copy(p.xq[m].group_sum.begin(), p.xq[m].group_sum.end(), p.xsum.begin() + m * L.G);
    }
  } else {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 0; i < L.K; ++i) p.xsum[m * L.G + i / L.group_size] += x[m * L.K + i];
    }
  }
}

// Output columns n0 .. n1 - 1 of x W^T (+ bias) for every row m of x: written to out[m * ldo + n - n0 + shift]
// (or added to it when `add`), where the caller picks `shift` to place the range.
void linear_part(const Linear& L, const Prepared& p, int64_t n0, int64_t n1, float* out, int64_t ldo, bool add) {
  if (n1 <= n0) return;
  const int64_t K = L.K, G = L.G;
  auto store = [&](int64_t m, int64_t n, float v) {
    if (L.bias) v += L.bias[n];
    float& o = out[m * ldo + (n - n0)];
    o = add ? o + v : v;
  };
  if (L.kind == F32_COLS) {
    float tmp[1024];
    for (int64_t m = 0; m < p.M; ++m) {
      for (int64_t c0 = n0; c0 < n1; c0 += 1024) {
        const int64_t c1 = std::min(n1, c0 + 1024);
        f32_cols(static_cast<const float*>(L.w), L.ld, K, p.x + m * K, c0, c1, tmp);
        for (int64_t n = c0; n < c1; ++n) store(m, n, tmp[n - c0]);
      }
    }
    return;
  }
  const int64_t row_bytes = L.kind == Q4 ? K / 2 : K;
  const float zero_shift = L.int8_act && L.kind == Q8 ? 128.f : 0.f;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t t0 = n0; t0 < n1; t0 += TILE) {
    const int64_t count = std::min<int64_t>(TILE, n1 - t0);
    for (int64_t m = 0; m < p.M; ++m) {
      float dots[TILE];
      const float* xm = p.x + m * K;
      if (L.kind == F32_ROWS) {
        const float* w = static_cast<const float*>(L.w) + t0 * K;
        if (count == TILE) f32_rows<TILE>(w, K, xm, dots);
        else for (int64_t r = 0; r < count; ++r) f32_rows<1>(w + r * K, K, xm, dots + r);
      } else if (L.kind == HALF) {
        const uint16_t* w = static_cast<const uint16_t*>(L.w) + t0 * K;
        if (count == TILE) half_rows<TILE>(w, K, xm, L.bf16, dots);
        else for (int64_t r = 0; r < count; ++r) half_rows<1>(w + r * K, K, xm, L.bf16, dots + r);
      } else {
        const uint8_t* q = static_cast<const uint8_t*>(L.w) + t0 * row_bytes;
        const float* s = L.scales + t0 * G;
        const int64_t bpg = L.group_size / QBLOCK;
        if (L.int8_act && L.kind == Q8) {
          if (count == TILE) int8_rows_i8x<TILE>(q, K, p.xq[m], s, G, bpg, dots);
          else for (int64_t r = 0; r < count; ++r) int8_rows_i8x<1>(q + r * K, K, p.xq[m], s + r * G, G, bpg, dots + r);
        } else if (L.int8_act) {
          if (count == TILE) int4_rows_i8x<TILE>(q, K, p.xq[m], s, G, bpg, dots);
          else for (int64_t r = 0; r < count; ++r) int4_rows_i8x<1>(q + r * (K / 2), K, p.xq[m], s + r * G, G, bpg, dots + r);
        } else {
          for (int64_t r = 0; r < count; ++r) {
            const uint8_t* w = q + r * row_bytes;
            dots[r] = L.kind == Q8
                ? quant_row_f32x(xm, s + r * G, G, bpg,
                                 [&](int64_t b) { return _mm256_loadu_si256((const __m256i*)(w + b * QBLOCK)); })
                : quant_row_f32x(xm, s + r * G, G, bpg, [&](int64_t b) {
                    const __m256i bytes = _mm256_loadu_si256((const __m256i*)(w + (b / 2) * QBLOCK));
                    return b % 2 == 0 ? _mm256_and_si256(bytes, low4)
                                      : _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
                  });
          }
        }
        for (int64_t r = 0; r < count; ++r) {
          const int64_t n = t0 + r;
          float correction = 0.f;
          for (int64_t g = 0; g < G; ++g) {
            correction += (L.szeros[n * G + g] - zero_shift * L.scales[n * G + g]) * p.xsum[m * G + g];
          }
          dots[r] -= correction;
        }
      }
      for (int64_t r = 0; r < count; ++r) store(m, t0 + r, dots[r]);
    }
  }
}

// y = x W^T (+ bias) for int8 (bits 8) or int4 (bits 4) levels; see the top of the file. The layer
// alone, its tiles of rows split over at::parallel_for, computed as the decode step computes them.
at::Tensor quant_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                      const at::Tensor& szeros, const c10::optional<at::Tensor>& bias, int64_t group_size,
                      bool int8_activations, int bits) {
  check_quant_args(x, q, scales, szeros, bias, group_size, bits == 4 ? 2 : 1);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  Linear L;
  L.kind = bits == 8 ? Q8 : Q4;
  L.N = N;
  L.K = K;
  L.G = K / group_size;
  L.group_size = group_size;
  L.int8_act = int8_activations;
  L.w = q.data_ptr<uint8_t>();
  L.scales = scales.data_ptr<float>();
  L.szeros = szeros.data_ptr<float>();
  L.bias = bias ? bias->data_ptr<float>() : nullptr;
  Prepared prep;
  prepare(L, x.data_ptr<float>(), M, prep);
  float* op = out.data_ptr<float>();
  const int64_t tiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * TILE, n1 = std::min(N, end * TILE);
    linear_part(L, prep, n0, n1, op + n0, N, false);
  });
  return out;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& szeros,
                     const c10::optional<at::Tensor>& bias, int64_t group_size, bool int8_activations) {
  return quant_gemv(x, q, scales, szeros, bias, group_size, int8_activations, 8);
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& szeros,
                     const c10::optional<at::Tensor>& bias, int64_t group_size, bool int8_activations) {
  return quant_gemv(x, q, scales, szeros, bias, group_size, int8_activations, 4);
}

// The share [begin, end) of n items that thread `tid` of `threads` takes, cut at multiples of `align`.
inline std::pair<int64_t, int64_t> share(int64_t n, int tid, int threads, int64_t align) {
  const int64_t units = (n + align - 1) / align;
  const int64_t begin = units * tid / threads * align, end = units * (tid + 1) / threads * align;
  return {std::min(begin, n), std::min(end, n)};
}

// ---- the thread team --------------------------------------------------------------------------
class Team {
 public:
  explicit Team(int size) : size_(size) {
    for (int tid = 1; tid < size; ++tid) workers_.emplace_back([this, tid] { work(tid); });
  }
  ~Team() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return size_; }

  // job(tid) on every thread of the team (tid 0 is the caller's); returns when all have finished.
  void run(const std::function<void(int)>& job) {
    job_ = &job;
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job(0);
    for (int spins = 0; done_.load(std::memory_order_acquire) != size_ - 1; ++spins) relax(spins);
  }

  // Every thread of the team waits here until all have arrived.
  void barrier() {
    if (size_ == 1) return;
    const uint64_t phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == size_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_release);
    } else {
      for (int spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) relax(spins);
    }
  }

 private:
  // Spin briefly, then give the core away (a machine shared with other work must not stall).
  static void relax(int spins) {
    if (spins < 20000) _mm_pause();
    else std::this_thread::yield();
  }

  void work(int tid) {
    uint64_t seen = 0;
    while (true) {
      const auto start = std::chrono::steady_clock::now();
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        // Between two steps (Python picks the token) keep spinning ~0.2 ms, then sleep.
        if (spins % 256 == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(200)) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          break;
        }
        _mm_pause();
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_) return;
      (*job_)(tid);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  int size_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0}, phase_{0};
  std::atomic<int> done_{0}, arrived_{0};
  const std::function<void(int)>* job_ = nullptr;
  bool stop_ = false;
};

std::mutex team_mutex;   // one step at a time per process
Team* team = nullptr;    // made on first use; remade when the thread count changes

void forget_team_in_child() {  // after fork() the workers do not exist in the child: never join them
  team = nullptr;               // (the parent's object is leaked in the child on purpose)
  new (&team_mutex) std::mutex();
}

Team& get_team(int size) {
  static const bool registered = [] { return pthread_atfork(nullptr, nullptr, forget_team_in_child) == 0; }();
  (void)registered;
  if (team == nullptr || team->size() != size) {
    delete team;
    team = nullptr;
    team = new Team(size);
  }
  return *team;
}

// ---- small vector helpers ---------------------------------------------------------------------
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp of 8 floats: e^x = 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2, e^r by a degree-6
// polynomial (Cephes' expf coefficients; at most 1.3 ulp from the exact value over [-87, 88), measured
// at 13.6M points); inputs clamped to [-87.3, 88].
// Why hand-written: std::exp is scalar, and SiLU of the MLP takes one per intermediate unit per token.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// out[j] = silu(gate[j]) * up[j] = gate / (1 + e^-gate) * up, for j < n.
void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  int64_t j = 0;
  const __m256 one = _mm256_set1_ps(1.f);
  for (; j + 8 <= n; j += 8) {
    const __m256 g = _mm256_loadu_ps(gate + j);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + j)));
  }
  for (; j < n; ++j) out[j] = gate[j] / (1.f + std::exp(-gate[j])) * up[j];
}

// out = weight * (x * rsqrt(mean(x^2) + eps)), as qwenkit.model.RMSNorm in fp32.
void rms_norm(const float* x, const float* weight, int64_t n, float eps, float* out) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  const float r = 1.f / std::sqrt(static_cast<float>(sum / n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * r);
}

// Half-split RoPE of one head vector (rotate_half = cat(-x2, x1)); cos/sin [D].
void rope(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) out[i] = x[i] * cos[i] - x[i + h] * sin[i];
  for (int64_t i = h; i < D; ++i) out[i] = x[i] * cos[i] + x[i - h] * sin[i];
}

struct LayerPointers {
  const float *ln1, *ln2;
  Linear qkv, o, gate_up, down;
  float *keys, *values;  // [B, KVH, S, D] with strides below
  int64_t k_stride[3], v_stride[3];
  const bool* mask;  // [B, 1, 1, W]
  int64_t mask_row, mask_col, width;
};

Linear make_linear(const c10::List<std::optional<at::Tensor>>& t, int64_t at, const std::vector<int64_t>& ints,
                   int64_t at_int, int64_t K, const char* what) {
  Linear L;
  L.kind = ints[at_int];
  L.group_size = ints[at_int + 1];
  L.int8_act = ints[at_int + 2] != 0;
  const std::optional<at::Tensor> w = t.get(at), scales = t.get(at + 1), szeros = t.get(at + 2), bias = t.get(at + 3);
  TORCH_CHECK(w.has_value() && w->device().is_cpu(), what, ": no CPU weight");
  L.K = K;
  if (L.kind == F32_ROWS || L.kind == F32_COLS) {
    TORCH_CHECK(w->scalar_type() == at::kFloat && w->dim() == 2 && w->size(1) == K, what, ": fp32 [N, K] weight");
    L.N = w->size(0);
    if (L.kind == F32_ROWS) {
      TORCH_CHECK(w->stride(1) == 1 && w->stride(0) == K, what, ": row-major weight expected");
    } else {
      TORCH_CHECK(w->stride(0) == 1 && w->stride(1) >= L.N, what, ": column-major weight expected");
      L.ld = w->stride(1);
    }
  } else if (L.kind == HALF) {
    TORCH_CHECK((w->scalar_type() == at::kHalf || w->scalar_type() == at::kBFloat16) && w->is_contiguous() &&
                    w->dim() == 2 && w->size(1) == K && K % 16 == 0,
                what, ": contiguous 16-bit [N, K] weight, K a multiple of 16");
    L.bf16 = w->scalar_type() == at::kBFloat16;
    L.N = w->size(0);
  } else {
    TORCH_CHECK(L.kind == Q8 || L.kind == Q4, what, ": unknown kind ", L.kind);
    TORCH_CHECK(scales.has_value() && szeros.has_value(), what, ": scales and szeros needed");
    check_quant_args(at::empty({0, K}, scales->options()), *w, *scales, *szeros, bias, L.group_size,
                     L.kind == Q4 ? 2 : 1);
    L.N = w->size(0);
    L.G = K / L.group_size;
    L.scales = scales->data_ptr<float>();
    L.szeros = szeros->data_ptr<float>();
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == L.N,
                what, ": fp32 bias [N]");
    L.bias = bias->data_ptr<float>();
  }
  L.w = w->data_ptr();
  return L;
}

const float* vector_arg(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  TORCH_CHECK(t.has_value() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n && t->device().is_cpu(),
              what, ": contiguous fp32 [", n, "]");
  return t->data_ptr<float>();
}

// Weights per block in `weights`: ln1, qkv (w, scales, szeros, bias), o (4), ln2, gate_up (4), down (4);
// then the final norm and the head (4). `ints`: (kind, group_size, int8_activations) for qkv, o,
// gate_up, down of each block, then the head. dims: hidden, heads, kv heads, head dim, intermediate.
at::Tensor decode_layers(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& weights,
                         at::IntArrayRef ints_ref, at::TensorList keys, at::TensorList values, at::TensorList masks,
                         const at::Tensor& slot, const at::Tensor& cos, const at::Tensor& sin, double eps,
                         at::IntArrayRef dims) {
  TORCH_CHECK(dims.size() == 5, "dims: hidden, heads, kv heads, head dim, intermediate");
  const int64_t H = dims[0], NH = dims[1], KVH = dims[2], D = dims[3], I = dims[4];
  const int64_t L = keys.size();
  TORCH_CHECK(L > 0 && values.size() == static_cast<size_t>(L) && masks.size() == static_cast<size_t>(L),
              "keys, values, masks: one per block");
  TORCH_CHECK(weights.size() == static_cast<size_t>(L * 18 + 5) && ints_ref.size() == static_cast<size_t>(L * 12 + 3),
              "weights/ints do not match the number of blocks");
  TORCH_CHECK(NH % KVH == 0 && D % 2 == 0, "heads must be a multiple of kv heads, head dim even");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == H && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "x: fp32 [B, hidden]");
  const int64_t M = x_in.size(0);
  TORCH_CHECK(M >= 1 && M <= 64, "1 to 64 rows");
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.numel() == M && slot.is_contiguous(), "slot: int64 [B]");
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == M * D, "cos/sin: fp32 [B, 1, D]");
  }
  const std::vector<int64_t> ints(ints_ref.begin(), ints_ref.end());
  const int64_t QKV = (NH + 2 * KVH) * D;
  std::vector<LayerPointers> layers(L);
  const int64_t* slots = slot.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    LayerPointers& p = layers[l];
    const int64_t t = l * 18, i = l * 12;
    p.ln1 = vector_arg(weights.get(t), H, "input_layernorm");
    p.qkv = make_linear(weights, t + 1, ints, i, H, "qkv");
    p.o = make_linear(weights, t + 5, ints, i + 3, NH * D, "o_proj");
    p.ln2 = vector_arg(weights.get(t + 9), H, "post_attention_layernorm");
    p.gate_up = make_linear(weights, t + 10, ints, i + 6, H, "gate_up");
    p.down = make_linear(weights, t + 14, ints, i + 9, I, "down_proj");
    TORCH_CHECK(p.qkv.N == QKV && p.o.N == H && p.gate_up.N == 2 * I && p.down.N == H, "block ", l, ": shapes");
    const at::Tensor &k = keys[l], &v = values[l], &mask = masks[l];
    for (const at::Tensor* c : {&k, &v}) {
      TORCH_CHECK(c->scalar_type() == at::kFloat && c->dim() == 4 && c->size(0) >= M && c->size(1) == KVH &&
                      c->size(3) == D && c->stride(3) == 1 && c->device().is_cpu(),
                  "cache: fp32 [B, kv heads, S, D]");
    }
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(0) == M && mask.size(2) == 1 &&
                    mask.size(3) <= k.size(2),
                "mask: bool [B, 1, 1, W]");
    p.keys = k.data_ptr<float>();
    p.values = v.data_ptr<float>();
    for (int d = 0; d < 3; ++d) p.k_stride[d] = k.stride(d), p.v_stride[d] = v.stride(d);
    p.mask = mask.data_ptr<bool>();
    p.mask_row = mask.stride(0);
    p.mask_col = mask.stride(3);
    p.width = mask.size(3);
    for (int64_t m = 0; m < M; ++m) {
      TORCH_CHECK(slots[m] >= 0 && slots[m] < k.size(2), "slot outside the cache");
    }
  }
  const float* final_norm = vector_arg(weights.get(L * 18), H, "norm");
  const Linear head = make_linear(weights, L * 18 + 1, ints, L * 12, H, "lm_head");
  const int64_t V = head.N;

  at::Tensor x = x_in.contiguous().clone();
  at::Tensor logits = at::empty({M, V}, x.options());
  float* xp = x.data_ptr<float>();
  float* lp = logits.data_ptr<float>();
  std::vector<float> qkv(M * QKV), attn(M * NH * D), act(M * I);
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t group = NH / KVH;

  std::lock_guard<std::mutex> lock(team_mutex);
  Team& crew = get_team(std::max(1, at::get_num_threads()));
  const int T = crew.size();
  const std::function<void(int)> job = [&](int tid) {
    Prepared prep;
    std::vector<float> h(M * H), gu(M * 2 * ((I + T - 1) / T + 16)), qr(D), kr(D), scores;
    for (int64_t l = 0; l < L; ++l) {
      const LayerPointers& p = layers[l];
      // attention half: every thread normalizes x itself (no barrier), then takes its rows of qkv
      for (int64_t m = 0; m < M; ++m) rms_norm(xp + m * H, p.ln1, H, static_cast<float>(eps), h.data() + m * H);
      prepare(p.qkv, h.data(), M, prep);
      int64_t a, b;
      std::tie(a, b) = share(QKV, tid, T, p.qkv.align());
      linear_part(p.qkv, prep, a, b, qkv.data() + a, QKV, false);
      crew.barrier();
      // (row, kv head) pairs: RoPE and cache write of k, v, then the group's query heads
      for (int64_t task = tid; task < M * KVH; task += T) {
        const int64_t m = task / KVH, g = task % KVH, s = slots[m];
        const float *c = cp + m * D, *sn = sp + m * D, *row = qkv.data() + m * QKV;
        float* kc = p.keys + m * p.k_stride[0] + g * p.k_stride[1];
        float* vc = p.values + m * p.v_stride[0] + g * p.v_stride[1];
        rope(row + (NH + g) * D, c, sn, D, kc + s * p.k_stride[2]);
        std::copy(row + (NH + KVH + g) * D, row + (NH + KVH + g + 1) * D, vc + s * p.v_stride[2]);
        scores.resize(p.width);
        const bool* visible = p.mask + m * p.mask_row;
        for (int64_t hq = g * group; hq < (g + 1) * group; ++hq) {
          rope(row + hq * D, c, sn, D, qr.data());
          float top = -INFINITY;
          for (int64_t j = 0; j < p.width; ++j) {
            scores[j] = visible[j * p.mask_col] ? dot(qr.data(), kc + j * p.k_stride[2], D) * scale : -INFINITY;
            top = std::max(top, scores[j]);
          }
          // softmax numerators; masked slots (-inf) become exactly 0 and are skipped below
          int64_t j = 0;
          __m256 sums = _mm256_setzero_ps();
          const __m256 top8 = _mm256_set1_ps(top), minus_inf = _mm256_set1_ps(-INFINITY);
          for (; j + 8 <= p.width; j += 8) {
            const __m256 v = _mm256_loadu_ps(scores.data() + j);
            const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, minus_inf, _CMP_EQ_OQ), exp8(_mm256_sub_ps(v, top8)));
            _mm256_storeu_ps(scores.data() + j, e);
            sums = _mm256_add_ps(sums, e);
          }
          float total = hsum(sums);
          for (; j < p.width; ++j) {
            scores[j] = scores[j] == -INFINITY ? 0.f : std::exp(scores[j] - top);
            total += scores[j];
          }
          float* out = attn.data() + m * NH * D + hq * D;
          std::fill(out, out + D, 0.f);
          for (int64_t j = 0; j < p.width; ++j) {
            if (scores[j] == 0.f) continue;
            const float wj = scores[j] / total;
            const float* vj = vc + j * p.v_stride[2];
            for (int64_t d = 0; d < D; ++d) out[d] += wj * vj[d];
          }
        }
      }
      crew.barrier();
      prepare(p.o, attn.data(), M, prep);
      std::tie(a, b) = share(H, tid, T, p.o.align());
      linear_part(p.o, prep, a, b, xp + a, H, true);  // residual added in place
      crew.barrier();
      // MLP half: this thread's gate rows [a, b) and the matching up rows I + [a, b), so it makes
      // its own part of silu(gate) * up
      for (int64_t m = 0; m < M; ++m) rms_norm(xp + m * H, p.ln2, H, static_cast<float>(eps), h.data() + m * H);
      prepare(p.gate_up, h.data(), M, prep);
      std::tie(a, b) = share(I, tid, T, p.gate_up.align());
      const int64_t n = b - a;
      linear_part(p.gate_up, prep, a, b, gu.data(), 2 * n, false);
      linear_part(p.gate_up, prep, I + a, I + b, gu.data() + n, 2 * n, false);
      for (int64_t m = 0; m < M; ++m) silu_mul(gu.data() + m * 2 * n, gu.data() + m * 2 * n + n, n, act.data() + m * I + a);
      crew.barrier();
      prepare(p.down, act.data(), M, prep);
      std::tie(a, b) = share(H, tid, T, p.down.align());
      linear_part(p.down, prep, a, b, xp + a, H, true);
      crew.barrier();
    }
    for (int64_t m = 0; m < M; ++m) rms_norm(xp + m * H, final_norm, H, static_cast<float>(eps), h.data() + m * H);
    prepare(head, h.data(), M, prep);
    int64_t a, b;
    std::tie(a, b) = share(V, tid, T, head.align());
    linear_part(head, prep, a, b, lp + a, V, false);
  };
  crew.run(job);
  return logits;
}

// One linear layer as decode_layers runs it (the team, the same kernels): x [M, K] -> [M, N], for
// tests and benchmarks/quant_kernels.py. operands and ints as one layer's part of decode_layers'.
at::Tensor decode_linear(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& operands,
                         at::IntArrayRef ints_ref) {
  TORCH_CHECK(operands.size() == 4 && ints_ref.size() == 3, "operands: weight, scales, szeros, bias; ints: 3");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(), "x: fp32 [M, K]");
  const at::Tensor x = x_in.contiguous();
  const std::vector<int64_t> ints(ints_ref.begin(), ints_ref.end());
  const Linear L = make_linear(operands, 0, ints, 0, x.size(1), "linear");
  const int64_t M = x.size(0), N = L.N;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::lock_guard<std::mutex> lock(team_mutex);
  Team& crew = get_team(std::max(1, at::get_num_threads()));
  const std::function<void(int)> job = [&](int tid) {
    Prepared prep;
    prepare(L, xp, M, prep);
    int64_t a, b;
    std::tie(a, b) = share(N, tid, crew.size(), L.align());
    linear_part(L, prep, a, b, op + a, N, false);
  };
  crew.run(job);
  return out;
}

}  // namespace

TORCH_LIBRARY(qwenkit_cpu, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scales, Tensor szeros, Tensor? bias, int group_size, "
        "bool int8_activations) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor q, Tensor scales, Tensor szeros, Tensor? bias, int group_size, "
        "bool int8_activations) -> Tensor");
  m.def("half_gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("quantize_activations(Tensor x) -> (Tensor, Tensor)");
  m.def("dequantize(Tensor q, Tensor scales, Tensor szeros, int group_size, int bits) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor?[] weights, int[] ints, Tensor[] keys, Tensor[] values, Tensor[] masks, "
        "Tensor slot, Tensor cos, Tensor sin, float eps, int[] dims) -> Tensor");
  m.def("decode_linear(Tensor x, Tensor?[] operands, int[] ints) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwenkit_cpu, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("half_gemv", &half_gemv);
  m.impl("quantize_activations", &quantize_activations);
  m.impl("dequantize", &dequantize);
  m.impl("decode_layers", &decode_layers);
  m.impl("decode_linear", &decode_linear);
}
