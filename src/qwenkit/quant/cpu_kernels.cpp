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

#include <cmath>
#include <vector>

namespace {

constexpr int TILE = 4;       // output rows computed together
// Software prefetch this many bytes ahead of the rows being read (the tiles of a thread are one
// contiguous run; two cache lines per step, the bytes a step reads): measured on the 2-core AVX2
// machine over a decode-like chain of 96 matrices, 1.2-1.5x faster than leaving it to the hardware.
constexpr int64_t DIST = 8192;
constexpr int64_t QBLOCK = 32;  // activation quantization block (columns)

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
      _mm_prefetch((const char*)(q + DIST + b * R * QBLOCK), _MM_HINT_T0);
      _mm_prefetch((const char*)(q + DIST + b * R * QBLOCK + 64), _MM_HINT_T0);
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
    _mm_prefetch((const char*)(q + DIST + b * R * QBLOCK / 2), _MM_HINT_T0);
    _mm_prefetch((const char*)(q + DIST + b * R * QBLOCK / 2 + 64), _MM_HINT_T0);
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

// y = x W^T (+ bias) for int8 (bits 8) or int4 (bits 4) levels; see the top of the file.
at::Tensor quant_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                      const at::Tensor& szeros, const c10::optional<at::Tensor>& bias, int64_t group_size,
                      bool int8_activations, int bits) {
  check_quant_args(x, q, scales, szeros, bias, group_size, bits == 4 ? 2 : 1);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = K / group_size;
  const int64_t row_bytes = q.size(1), blocks_per_group = group_size / QBLOCK;
  at::Tensor out = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scales.data_ptr<float>(), *zp = szeros.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const uint8_t* qp = q.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();

  // Per (row of x, group): sum of x over the group, of x_hat with int8 activations.
  std::vector<QuantizedRow> xq(int8_activations ? M : 0);
  std::vector<float> xsum(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    if (int8_activations) {
      quantize_row(xp + m * K, K, group_size, xq[m]);
      std::copy(xq[m].group_sum.begin(), xq[m].group_sum.end(), xsum.begin() + m * G);
    } else {
      for (int64_t i = 0; i < K; ++i) xsum[m * G + i / group_size] += xp[m * K + i];
    }
  }
  // With int8 activations the int8 kernel takes q - 128, so its zero-point term uses zeros - 128.
  const float zero_shift = int8_activations && bits == 8 ? 128.f : 0.f;

  auto rows = [&](int64_t n0, int64_t count) {  // output rows n0 .. n0 + count - 1, count <= TILE
    for (int64_t m = 0; m < M; ++m) {
      float dots[TILE];
      const uint8_t* qrow = qp + n0 * row_bytes;
      const float* srow = sp + n0 * G;
      if (int8_activations) {
        if (bits == 8) {
          if (count == TILE) int8_rows_i8x<TILE>(qrow, K, xq[m], srow, G, blocks_per_group, dots);
          else for (int64_t r = 0; r < count; ++r) int8_rows_i8x<1>(qrow + r * K, K, xq[m], srow + r * G, G, blocks_per_group, dots + r);
        } else {
          if (count == TILE) int4_rows_i8x<TILE>(qrow, K, xq[m], srow, G, blocks_per_group, dots);
          else for (int64_t r = 0; r < count; ++r) int4_rows_i8x<1>(qrow + r * (K / 2), K, xq[m], srow + r * G, G, blocks_per_group, dots + r);
        }
      } else {
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        for (int64_t r = 0; r < count; ++r) {
          const uint8_t* w = qrow + r * row_bytes;
          dots[r] = bits == 8
              ? quant_row_f32x(xp + m * K, srow + r * G, G, blocks_per_group,
                               [&](int64_t b) { return _mm256_loadu_si256((const __m256i*)(w + b * QBLOCK)); })
              : quant_row_f32x(xp + m * K, srow + r * G, G, blocks_per_group, [&](int64_t b) {
                  const __m256i bytes = _mm256_loadu_si256((const __m256i*)(w + (b / 2) * QBLOCK));
                  return b % 2 == 0 ? _mm256_and_si256(bytes, low4)
                                    : _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
                });
        }
      }
      for (int64_t r = 0; r < count; ++r) {
        const int64_t n = n0 + r;
        float correction = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          correction += (zp[n * G + g] - zero_shift * sp[n * G + g]) * xsum[m * G + g];
        }
        op[m * N + n] = dots[r] - correction + (bp ? bp[n] : 0.f);
      }
    }
  };
  const int64_t tiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rows(t * TILE, std::min<int64_t>(TILE, N - t * TILE));
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
    _mm_prefetch((const char*)(w + DIST / 2 + j * R), _MM_HINT_T0);
    _mm_prefetch((const char*)(w + DIST / 2 + j * R + 32), _MM_HINT_T0);
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

}  // namespace

TORCH_LIBRARY(qwenkit_cpu, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scales, Tensor szeros, Tensor? bias, int group_size, "
        "bool int8_activations) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor q, Tensor scales, Tensor szeros, Tensor? bias, int group_size, "
        "bool int8_activations) -> Tensor");
  m.def("half_gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("quantize_activations(Tensor x) -> (Tensor, Tensor)");
  m.def("dequantize(Tensor q, Tensor scales, Tensor szeros, int group_size, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwenkit_cpu, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("half_gemv", &half_gemv);
  m.impl("quantize_activations", &quantize_activations);
  m.impl("dequantize", &dequantize);
}
