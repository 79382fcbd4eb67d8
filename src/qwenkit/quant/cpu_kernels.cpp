// Matrix-vector kernels for decoding on x86 CPUs with AVX2 + FMA + F16C, reading packed weights.
//
// Why hand-written: this is the one place PyTorch has nothing fast on AVX2. Measured on the 2-core
// AVX2 machine (Qwen2.5-0.5B MLP shape 4864 x 896, batch 1): aten::_weight_int8pack_mm takes 6-8x
// longer than fp32 sgemv, _weight_int4pack_mm_for_cpu 10x longer, fp16/bf16 F.linear 8x longer, and
// inductor's code for "dequantize then matmul" is slower still. Decoding reads every weight once per
// token, so the speed is set by the bytes read; these kernels read 1 (int8), 0.5 (int4) or 2 (16-bit)
// bytes per weight and widen to fp32 in registers. Activations and accumulation stay fp32.
//
// Quantized weights: y[m, n] = sum_g scales[n, g] * dot(x[m, group g], q[n, group g])
//                              - sum_g szeros[n, g] * xsum[m, g]            (+ bias[n])
// which is sum_i x[m, i] * scales[n, g(i)] * (q[n, i] - zeros[n, g(i)]) with szeros = scales * zeros
// and xsum[m, g] the sum of x[m] over group g; groups are contiguous runs of group_size columns.
// int8 q is [N, K] uint8. int4 q is [N, K / 2] uint8 in blocks of 64 columns: byte j of a block holds
// column j in its low nibble and column 32 + j in its high nibble (the layout qwenkit.quant.linear
// packs), so one 32-byte load gives 64 weights.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 unsigned bytes -> fp32, multiplied by x[0..31] and added to four independent accumulators
// (one FMA chain each, so the FMA latency is hidden).
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

void check_quant_args(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                      const at::Tensor& szeros, const at::Tensor& xsum, int64_t group_size,
                      int64_t columns_per_byte) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "q: contiguous uint8");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) * columns_per_byte == K, "q does not match x's columns");
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "group_size must be a multiple of 32 dividing K");
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scales, &szeros}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == N && t->size(1) == G,
                "scales/szeros: contiguous fp32 [N, K / group_size]");
  }
  TORCH_CHECK(xsum.scalar_type() == at::kFloat && xsum.is_contiguous() && xsum.size(0) == x.size(0) &&
                  xsum.size(1) == G, "xsum: contiguous fp32 [M, K / group_size]");
}

// Per output row: the grouped dot product (quantized part) minus the zero-point correction.
template <typename GroupDot>
at::Tensor quant_gemv(const at::Tensor& x, const at::Tensor& scales, const at::Tensor& szeros,
                      const at::Tensor& xsum, int64_t N, int64_t group_size, GroupDot group_dot) {
  const int64_t M = x.size(0), K = x.size(1), G = K / group_size;
  at::Tensor out = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scales.data_ptr<float>(), *zp = szeros.data_ptr<float>(),
              *xs = xsum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        const float* xrow = xp + m * K;
        __m256 total = _mm256_setzero_ps();
        float correction = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          __m256 acc = group_dot(n, xrow, g * group_size, group_size);
          total = _mm256_fmadd_ps(acc, _mm256_set1_ps(sp[n * G + g]), total);
          correction += zp[n * G + g] * xs[m * G + g];
        }
        op[m * N + n] = hsum(total) - correction;
      }
    }
  });
  return out;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                     const at::Tensor& szeros, const at::Tensor& xsum, int64_t group_size) {
  check_quant_args(x, q, scales, szeros, xsum, group_size, 1);
  const int64_t K = x.size(1);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  return quant_gemv(x, scales, szeros, xsum, q.size(0), group_size,
                    [&](int64_t n, const float* xrow, int64_t start, int64_t count) {
                      const uint8_t* w = qp + n * K + start;
                      Acc4 acc;
                      for (int64_t j = 0; j < count; j += 32) {
                        fma_u8x32(_mm256_loadu_si256((const __m256i*)(w + j)), xrow + start + j, acc);
                      }
                      return acc.sum();
                    });
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                     const at::Tensor& szeros, const at::Tensor& xsum, int64_t group_size) {
  check_quant_args(x, q, scales, szeros, xsum, group_size, 2);
  const int64_t K = x.size(1);
  TORCH_CHECK(K % 64 == 0, "int4: K must be a multiple of 64");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  return quant_gemv(x, scales, szeros, xsum, q.size(0), group_size,
                    [&](int64_t n, const float* xrow, int64_t start, int64_t count) {
                      const uint8_t* row = qp + n * (K / 2);
                      Acc4 acc;
                      int64_t c = start;
                      if (c % 64 == 32) {  // a group that starts in a high half (group_size 32)
                        const __m256i bytes = _mm256_loadu_si256((const __m256i*)(row + (c / 64) * 32));
                        fma_u8x32(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4), xrow + c, acc);
                        c += 32;
                      }
                      for (; c + 64 <= start + count; c += 64) {  // both halves of a block from one load
                        const __m256i bytes = _mm256_loadu_si256((const __m256i*)(row + c / 2));
                        fma_u8x32(_mm256_and_si256(bytes, low4), xrow + c, acc);
                        fma_u8x32(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4), xrow + c + 32, acc);
                      }
                      if (c < start + count) {  // a group that ends in a low half
                        const __m256i bytes = _mm256_loadu_si256((const __m256i*)(row + c / 2));
                        fma_u8x32(_mm256_and_si256(bytes, low4), xrow + c, acc);
                      }
                      return acc.sum();
                    });
}

// 16-bit weights [N, K] (fp16 or bf16) times fp32 x [M, K], widened to fp32 in registers.
at::Tensor half_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "w: contiguous [N, K]");
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || w.scalar_type() == at::kHalf, "w: float16 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 16 == 0, "K must be a multiple of 16");
  at::Tensor out = at::empty({M, N}, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* row = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xrow = xp + m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t j = 0; j < K; j += 16) {
          __m128i h0 = _mm_loadu_si128((const __m128i*)(row + j));
          __m128i h1 = _mm_loadu_si128((const __m128i*)(row + j + 8));
          __m256 w0, w1;
          if (bf16) {  // bf16 is the top half of an fp32
            w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h0), 16));
            w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h1), 16));
          } else {
            w0 = _mm256_cvtph_ps(h0);
            w1 = _mm256_cvtph_ps(h1);
          }
          a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xrow + j), a0);
          a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xrow + j + 8), a1);
        }
        op[m * N + n] = hsum(_mm256_add_ps(a0, a1));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(qwenkit_cpu, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scales, Tensor szeros, Tensor xsum, int group_size) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor q, Tensor scales, Tensor szeros, Tensor xsum, int group_size) -> Tensor");
  m.def("half_gemv(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwenkit_cpu, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("half_gemv", &half_gemv);
}
