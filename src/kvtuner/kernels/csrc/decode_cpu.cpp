// Decode attention of one query token per sequence over a packed KV history, on the CPU.
//
// Why native code: in torch, unpacking a 4-bit code costs about ten times copying a float, so any
// torch path that reads a packed history (whole or tile by tile) is slower than DynamicCache's plain
// SDPA over fp32 keys it reads whole. Here each history token's codes are unpacked once into a
// D-float row that stays in L1, used by every query head of its GQA group, and dropped:
//
//   keys, per channel (KIVI): score = sum_d (q_d * s_gd) c_td + sum_d q_d z_gd  -- the scales and zeros
//     of a key group folded into the query once per group (MixPE's fold), so a token costs one dot;
//   keys, per token: score = sum_j s_tj sum_{d in j} q_d c_td + sum_j z_tj sum_{d in j} q_d;
//   values, per token: out_d += (p_t s_tj) c_td, and the zeros' share sum_t p_t z_tj once per group at the end.
//
// Codes decode as float(code) (minus 2^(bits-1) for symmetric specs) or as levels[code] (a 1-D level table:
// codebooks, and fp8 bytes through a 256-entry table); this is kvtuner.quant.dequantize's arithmetic, with the
// sums in a different order. The softmax is online (base 2, the query prescaled by scale * log2 e), per
// tile of history tokens; the history is split across threads (at::parallel_for) by (sequence, KV head,
// token range), and each split's (max, sum, output) is merged with the full-precision tokens at the end.
// Plain loops: gcc -O3 -march=native vectorizes the unpack, the dots, the axpys and exp2.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace kvtuner_cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kTile = 128;        // history tokens scored before their values are read
constexpr int64_t kMinSplit = 512;    // fewer tokens a split do not pay for a thread

// 2^x for x <= 0, within 2e-7 relative (Cephes' exp2f polynomial after rounding x to the nearest
// integer); branch-free so that gcc vectorizes the softmax loops. x below -126 gives 2^-126.
inline float exp2_nonpositive(float x) {
  x = std::max(x, -126.0f);
  const float rounded = (x + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float f = x - rounded;                             // [-0.5, 0.5]
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t exponent = (static_cast<int32_t>(rounded) + 127) << 23;
  return p * __builtin_bit_cast(float, exponent);
}

// One packed side (keys or values) of one (sequence, KV head): rows of ``row_bytes`` a token.
struct Side {
  const uint8_t* codes;     // token 0's row
  int64_t row_bytes;
  int bits;                 // 2, 3, 4 or 8
  const float* table;       // levels[code] (nullptr: float(code) - offset)
  float offset;             // 2^(bits-1) for symmetric codes, else 0
  bool per_channel;         // scales per (group of tokens, channel); else per (token, group of channels)
  int64_t group;            // tokens (per channel) or channels (per token) a scale covers
  at::ScalarType scale_type;
  const void* scale;        // [groups or tokens, n] rows, contiguous
  const void* zero;         // same layout, or nullptr (symmetric, fp8)
  int64_t scale_cols;       // D (per channel) or D / group (per token)
};

// Sixteen codes at a time in GCC vector types (one AVX-512 register, or two AVX2 ones): a word (or two)
// broadcast, shifted lane by lane, masked, converted. A plain loop over codes makes gcc gather the words.
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

// sum of a vector's lanes as a tree (gcc reduces an ``omp simd`` sum lane after lane: 16 dependent adds)
inline float lane_sum(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// sum_i a_i b_i over ``n`` floats (N of them when known at compile time)
template <int N = 0>
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  const int64_t len = N > 0 ? N : n;  // a compile-time N unrolls the loop
  if (len % 16) {
    float acc = 0.0f;
    for (int64_t i = 0; i < len; ++i) acc += a[i] * b[i];
    return acc;
  }
  f32x16 acc = {};
  for (int64_t i = 0; i < len; i += 16) {
    f32x16 x, y;
    std::memcpy(&x, a + i, sizeof(x));
    std::memcpy(&y, b + i, sizeof(y));
    acc += x * y;
  }
  return lane_sum(acc);
}

inline uint32_t load_word(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

template <int BITS>
inline u32x16 codes16(const uint8_t* row, int64_t k, int64_t low_words) {  // codes 16k .. 16k + 15 of a row
  const u32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  if constexpr (BITS == 8) {  // bytes of little-endian words (a byte vector's convertvector: 16 scalar extracts)
    const uint8_t* p = row + 16 * k;
    const uint32_t w0 = load_word(p), w1 = load_word(p + 4), w2 = load_word(p + 8), w3 = load_word(p + 12);
    const u32x16 words = {w0, w0, w0, w0, w1, w1, w1, w1, w2, w2, w2, w2, w3, w3, w3, w3};
    return (words >> ((lane & 3) * 8)) & 255;
  } else if constexpr (BITS == 4) {
    const uint32_t w0 = load_word(row + 8 * k), w1 = load_word(row + 8 * k + 4);
    const u32x16 words = {w0, w0, w0, w0, w0, w0, w0, w0, w1, w1, w1, w1, w1, w1, w1, w1};
    return (words >> ((lane & 7) * 4)) & 15;
  } else if constexpr (BITS == 2) {
    return ((u32x16{} + load_word(row + 4 * k)) >> (lane * 2)) & 3;
  } else {  // 3 bits: the 2-bit plane's word k, then 16 bits of the 1-bit plane (after the d / 16 low words)
    return (((u32x16{} + load_word(row + 4 * k)) >> (lane * 2)) & 3) |
           ((((u32x16{} + load_word(row + 4 * (low_words + k / 2))) >> (lane + static_cast<uint32_t>(16 * (k & 1)))) & 1) << 2);
  }
}
template <int BITS, bool TABLE>
inline void unpack_row_scalar(const uint8_t* __restrict row, int64_t d, const float* __restrict table, float offset,
                       float* __restrict out) {
  if constexpr (BITS == 8) {
    for (int64_t i = 0; i < d; ++i) out[i] = TABLE ? table[row[i]] : static_cast<float>(row[i]) - offset;
  } else if constexpr (BITS == 3) {  // a 2-bit plane of the low bits, then a 1-bit plane of the high bit
    const uint32_t* low = reinterpret_cast<const uint32_t*>(row);
    const uint32_t* high = low + (d + 15) / 16;
    for (int64_t i = 0; i < d; ++i) {
      const uint32_t code = ((low[i >> 4] >> ((i & 15) * 2)) & 3u) | (((high[i >> 5] >> (i & 31)) & 1u) << 2);
      out[i] = TABLE ? table[code] : static_cast<float>(code) - offset;
    }
  } else {
    constexpr int kPerWord = 32 / BITS;
    constexpr uint32_t kMask = (1u << BITS) - 1;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(row);
    const int64_t n_words = (d + kPerWord - 1) / kPerWord;
    for (int64_t w = 0; w < n_words; ++w) {
      const uint32_t x = words[w];
      float* o = out + w * kPerWord;
      for (int j = 0; j < kPerWord; ++j) {
        const uint32_t code = (x >> (BITS * j)) & kMask;
        o[j] = TABLE ? table[code] : static_cast<float>(code) - offset;
      }
    }
  }
}

template <int BITS>
inline void unpack_row(const uint8_t* __restrict row, int64_t d, float offset, float* __restrict out) {
  const int64_t low_words = (d + 15) / 16;
  for (int64_t k = 0; k < d / 16; ++k) {
    const f32x16 f = __builtin_convertvector(codes16<BITS>(row, k, low_words), f32x16) - offset;
    std::memcpy(out + 16 * k, &f, sizeof(f));
  }
}

// Token ``t``'s codes as floats into ``out`` (room for the padded row: a whole number of words). Level tables
// and head dims that are not a multiple of 16 take the scalar loop.
inline void decode_codes(const Side& s, int64_t t, int64_t d, float* out) {
  const uint8_t* row = s.codes + t * s.row_bytes;
  if (s.table == nullptr && d % 16 == 0) {
    switch (s.bits) {
      case 2: unpack_row<2>(row, d, s.offset, out); return;
      case 3: unpack_row<3>(row, d, s.offset, out); return;
      case 4: unpack_row<4>(row, d, s.offset, out); return;
      default: unpack_row<8>(row, d, s.offset, out); return;
    }
  }
  const bool table = s.table != nullptr;
  switch (s.bits * 2 + table) {
    case 4: unpack_row_scalar<2, false>(row, d, s.table, s.offset, out); break;
    case 5: unpack_row_scalar<2, true>(row, d, s.table, s.offset, out); break;
    case 6: unpack_row_scalar<3, false>(row, d, s.table, s.offset, out); break;
    case 7: unpack_row_scalar<3, true>(row, d, s.table, s.offset, out); break;
    case 8: unpack_row_scalar<4, false>(row, d, s.table, s.offset, out); break;
    case 9: unpack_row_scalar<4, true>(row, d, s.table, s.offset, out); break;
    case 16: unpack_row_scalar<8, false>(row, d, s.table, s.offset, out); break;
    default: unpack_row_scalar<8, true>(row, d, s.table, s.offset, out); break;
  }
}

// ``count`` scale (or zero) entries from entry ``start`` as floats, into ``out[i * stride]``.
inline void read_floats(at::ScalarType type, const void* base, int64_t start, int64_t count, float* out,
                        int64_t stride = 1) {
  if (type == at::kHalf) {
    const c10::Half* p = static_cast<const c10::Half*>(base) + start;
    for (int64_t i = 0; i < count; ++i) out[i * stride] = static_cast<float>(p[i]);
  } else if (type == at::kBFloat16) {
    const c10::BFloat16* p = static_cast<const c10::BFloat16*>(base) + start;
    for (int64_t i = 0; i < count; ++i) out[i * stride] = static_cast<float>(p[i]);
  } else {
    const float* p = static_cast<const float*>(base) + start;
    for (int64_t i = 0; i < count; ++i) out[i * stride] = p[i];
  }
}

// max of ``n`` floats, sixteen lanes at a time (std::max's NaN rule keeps gcc from vectorizing a plain loop)
inline float max_of(const float* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= 16) {
    f32x16 m;
    std::memcpy(&m, x, sizeof(m));
    for (i = 16; i + 16 <= n; i += 16) {
      f32x16 v;
      std::memcpy(&v, x + i, sizeof(v));
      m = m > v ? m : v;
    }
    for (int k = 0; k < 16; ++k) best = std::max(best, m[k]);
  }
  for (; i < n; ++i) best = std::max(best, x[i]);
  return best;
}

// Online-softmax state of one split: per query head of the GQA group, running max (log2 units),
// sum of weights, unnormalized output.
struct Partial {
  float* max;  // [r]
  float* sum;  // [r]
  float* out;  // [r, d]
};

// Lane t of the result: the sum of p[t]'s lanes. Sixteen dot products finished together in four rounds of
// two-source shuffles and adds (45 operations) instead of a lane_sum each (112, and a dependency chain).
inline f32x16 lane_sums16(const f32x16* p) {
  f32x16 a[8], b[4], c[2];
  for (int t = 0; t < 8; ++t)  // lanes 0-7: p[t] folded to 8, lanes 8-15: p[t + 8]
    a[t] = __builtin_shufflevector(p[t], p[t + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(p[t], p[t + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int t = 0; t < 4; ++t)  // fours: p[t], p[t + 4], p[t + 8], p[t + 12]
    b[t] = __builtin_shufflevector(a[t], a[t + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a[t], a[t + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int t = 0; t < 2; ++t)  // pairs: p[t], p[t + 2], p[t + 4], ..., p[t + 14]
    c[t] = __builtin_shufflevector(b[t], b[t + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(b[t], b[t + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// Value rows decoded at a time: with register accumulators, a query head reads them back from L1.
constexpr int64_t kValueRows = 32;

// Attend the query heads ``q`` [r, d] (prescaled) to history tokens [begin, end) of one (sequence, KV head).
// D: the head dim at compile time (64 or 128; value groups a multiple of 16 channels), so that the loops over
// it unroll and each head's output stays in registers across a block of value rows; 0: any head dim.
template <int D>
void attend_history(const float* q, int64_t r, int64_t d_runtime, const Side& keys, const Side& values,
                    int64_t begin, int64_t end, Partial part) {
  const int64_t d = D ? D : d_runtime;
  const int64_t d_pad = (d + 31) / 32 * 32;
  std::vector<float> codes(d_pad), folded(r * d), bias(r), scores(r * kTile), key_scale(d), key_zero(d);
  const int64_t v_groups = d / values.group;
  std::vector<float> zero_acc(r * v_groups, 0.0f), v_scale(kValueRows * v_groups), v_zero(kValueRows * v_groups);
  std::vector<float> value_rows(D ? kValueRows * D : 0), key_rows(D ? 16 * D : 0);
  const int64_t k_cols = keys.scale_cols;
  std::vector<float> q_group_sum, k_scale_row(k_cols), k_zero_row(k_cols);
  if (!keys.per_channel) {  // sum of q over each channel group, for the zeros of per-token keys
    q_group_sum.assign(r * k_cols, 0.0f);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < k_cols; ++j)
        for (int64_t c = 0; c < keys.group; ++c) q_group_sum[i * k_cols + j] += q[i * d + j * keys.group + c];
  }
  std::fill(part.max, part.max + r, -std::numeric_limits<float>::infinity());
  std::fill(part.sum, part.sum + r, 0.0f);
  std::fill(part.out, part.out + r * d, 0.0f);
  int64_t folded_group = -1;

  for (int64_t t0 = begin; t0 < end; t0 = (t0 / kTile + 1) * kTile) {  // tiles after the first start at multiples
    const int64_t n = std::min((t0 / kTile + 1) * kTile, end) - t0;      // of kTile: key blocks of 16 stay aligned
    // scores of the tile
    for (int64_t t = t0; t < t0 + n; ++t) {
      if (keys.per_channel && t / keys.group != folded_group) {  // fold the group's scales into the query
        folded_group = t / keys.group;
        read_floats(keys.scale_type, keys.scale, folded_group * d, d, key_scale.data());
        if (keys.zero) read_floats(keys.scale_type, keys.zero, folded_group * d, d, key_zero.data());
        for (int64_t i = 0; i < r; ++i) {
          float b = 0.0f;
          for (int64_t c = 0; c < d; ++c) {
            folded[i * d + c] = q[i * d + c] * key_scale[c];
            b += keys.zero ? q[i * d + c] * key_zero[c] : 0.0f;
          }
          bias[i] = b;
        }
      }
      if constexpr (D > 0) {  // sixteen tokens of one key group at a time: one lane_sums16 a head
        if (keys.per_channel && t % 16 == 0 && t + 16 <= t0 + n && (t + 15) / keys.group == folded_group) {
          for (int64_t u = 0; u < 16; ++u) decode_codes(keys, t + u, D, key_rows.data() + u * D);
          for (int64_t i = 0; i < r; ++i) {
            f32x16 fq[D / 16], products[16];
            std::memcpy(fq, folded.data() + i * D, sizeof(fq));
            for (int u = 0; u < 16; ++u) {
              f32x16 x;
              std::memcpy(&x, key_rows.data() + u * D, sizeof(x));
              products[u] = fq[0] * x;
              for (int k = 1; k < D / 16; ++k) {
                std::memcpy(&x, key_rows.data() + u * D + 16 * k, sizeof(x));
                products[u] += fq[k] * x;
              }
            }
            const f32x16 block = lane_sums16(products) + bias[i];
            std::memcpy(scores.data() + i * kTile + (t - t0), &block, sizeof(block));
          }
          t += 15;
          continue;
        }
      }
      decode_codes(keys, t, d, codes.data());
      if (keys.per_channel) {
        for (int64_t i = 0; i < r; ++i) {
          scores[i * kTile + (t - t0)] = dot<D>(folded.data() + i * d, codes.data(), d) + bias[i];
        }
      } else {
        read_floats(keys.scale_type, keys.scale, t * k_cols, k_cols, k_scale_row.data());
        if (keys.zero) read_floats(keys.scale_type, keys.zero, t * k_cols, k_cols, k_zero_row.data());
        for (int64_t i = 0; i < r; ++i) {
          float total = 0.0f;
          for (int64_t j = 0; j < k_cols; ++j) {
            const float acc = dot(q + i * d + j * keys.group, codes.data() + j * keys.group, keys.group);
            total += acc * k_scale_row[j] + (keys.zero ? q_group_sum[i * k_cols + j] * k_zero_row[j] : 0.0f);
          }
          scores[i * kTile + (t - t0)] = total;
        }
      }
    }
    // online softmax: new maxima, rescale what was accumulated, weights of the tile
    for (int64_t i = 0; i < r; ++i) {
      float* s = scores.data() + i * kTile;
      const float new_max = std::max(part.max[i], max_of(s, n));
      const float alpha = std::exp2(part.max[i] - new_max);  // 0 on the first tile (max was -inf)
      part.max[i] = new_max;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {
        s[t] = exp2_nonpositive(s[t] - new_max);
        sum += s[t];
      }
      part.sum[i] = part.sum[i] * alpha + sum;
      if (alpha != 1.0f) {
        for (int64_t c = 0; c < d; ++c) part.out[i * d + c] *= alpha;
        for (int64_t j = 0; j < v_groups; ++j) zero_acc[i * v_groups + j] *= alpha;
      }
    }
    // values of the tile
    if constexpr (D > 0) {
      for (int64_t b0 = t0; b0 < t0 + n; b0 += kValueRows) {
        const int64_t m = std::min(kValueRows, t0 + n - b0);
        for (int64_t t = 0; t < m; ++t) {
          decode_codes(values, b0 + t, d, value_rows.data() + t * D);
          read_floats(values.scale_type, values.scale, (b0 + t) * v_groups, v_groups, v_scale.data() + t * v_groups);
          if (values.zero)  // column-major, for a dot product over the block's tokens a group
            read_floats(values.scale_type, values.zero, (b0 + t) * v_groups, v_groups, v_zero.data() + t, kValueRows);
        }
        for (int64_t i = 0; i < r; ++i) {
          const float* w = scores.data() + i * kTile + (b0 - t0);
          f32x16 acc[D / 16];
          std::memcpy(acc, part.out + i * D, sizeof(acc));
          for (int64_t t = 0; t < m; ++t) {
            const float* row = value_rows.data() + t * D;
            const float* sc = v_scale.data() + t * v_groups;
            for (int k = 0; k < D / 16; ++k) {
              f32x16 x;
              std::memcpy(&x, row + 16 * k, sizeof(x));
              acc[k] += (w[t] * sc[(16 * k) / values.group]) * x;
            }
          }
          std::memcpy(part.out + i * D, acc, sizeof(acc));
          if (values.zero) {
            for (int64_t j = 0; j < v_groups; ++j) zero_acc[i * v_groups + j] += dot(w, v_zero.data() + j * kValueRows, m);
          }
        }
      }
    } else {
      for (int64_t t = t0; t < t0 + n; ++t) {
        decode_codes(values, t, d, codes.data());
        read_floats(values.scale_type, values.scale, t * v_groups, v_groups, v_scale.data());
        if (values.zero) read_floats(values.scale_type, values.zero, t * v_groups, v_groups, v_zero.data());
        for (int64_t i = 0; i < r; ++i) {
          const float w = scores[i * kTile + (t - t0)];
          float* o = part.out + i * d;
          for (int64_t j = 0; j < v_groups; ++j) {
            const float a = w * v_scale[j];
            float* oj = o + j * values.group;
            const float* cj = codes.data() + j * values.group;
            for (int64_t c = 0; c < values.group; ++c) oj[c] += a * cj[c];
            if (values.zero) zero_acc[i * v_groups + j] += w * v_zero[j];
          }
        }
      }
    }
  }
  if (values.zero) {
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < v_groups; ++j)
        for (int64_t c = 0; c < values.group; ++c) part.out[i * d + j * values.group + c] += zero_acc[i * v_groups + j];
  }
}

// Attend ``q`` [r, d] to full-precision tokens (rows of ``d`` floats, ``n`` of them) into ``part``.
void attend_dense(const float* q, int64_t r, int64_t d, const float* k, const float* v, int64_t n, Partial part) {
  std::vector<float> s(n);
  for (int64_t i = 0; i < r; ++i) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) {
      const float acc = dot(q + i * d, k + t * d, d);
      s[t] = acc;
      mx = std::max(mx, acc);
    }
    float sum = 0.0f;
    float* o = part.out + i * d;
    std::fill(o, o + d, 0.0f);
    for (int64_t t = 0; t < n; ++t) {
      const float w = exp2_nonpositive(s[t] - mx);
      sum += w;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] += w * v[t * d + c];
    }
    part.max[i] = mx;
    part.sum[i] = sum;
  }
}

Side make_side(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
               const c10::optional<at::Tensor>& table, int64_t bits, bool symmetric, bool per_channel,
               int64_t group, int64_t b, int64_t h) {
  Side s;
  s.codes = static_cast<const uint8_t*>(codes.const_data_ptr()) +
            (b * codes.stride(0) + h * codes.stride(1)) * codes.element_size();
  s.row_bytes = codes.stride(2) * codes.element_size();
  s.bits = static_cast<int>(bits);
  s.table = table ? table->const_data_ptr<float>() : nullptr;
  s.offset = symmetric ? static_cast<float>(1 << (bits - 1)) : 0.0f;
  s.per_channel = per_channel;
  s.group = group;
  s.scale_type = scale.scalar_type();
  const int64_t offset = b * scale.stride(0) + h * scale.stride(1);
  s.scale = static_cast<const uint8_t*>(scale.const_data_ptr()) + offset * scale.element_size();
  s.zero = zero ? static_cast<const uint8_t*>(zero->const_data_ptr()) + offset * zero->element_size() : nullptr;
  s.scale_cols = scale.size(3);
  return s;
}

void check_side(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                const c10::optional<at::Tensor>& table, int64_t bits, const char* what) {
  TORCH_CHECK(codes.dim() == 4 && codes.stride(3) == 1, what, " codes must be [B, H, T, W] with contiguous rows");
  TORCH_CHECK(codes.scalar_type() == at::kInt || codes.scalar_type() == at::kByte, what, " codes must be int32 or uint8");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, what, " bits must be 2, 3, 4 or 8, not ", bits);
  TORCH_CHECK(scale.dim() == 4 && scale.stride(3) == 1 && scale.stride(2) == scale.size(3), what,
              " scales must be [B, H, rows, n] with contiguous rows");
  TORCH_CHECK(scale.scalar_type() == at::kHalf || scale.scalar_type() == at::kBFloat16 ||
              scale.scalar_type() == at::kFloat, what, " scales must be float16, bfloat16 or float32");
  if (zero) {
    TORCH_CHECK(zero->sizes() == scale.sizes() && zero->strides() == scale.strides() &&
                zero->scalar_type() == scale.scalar_type(), what, " zeros must match the scales' layout");
  }
  if (table) {
    TORCH_CHECK(table->dim() == 1 && table->scalar_type() == at::kFloat && table->is_contiguous() &&
                table->numel() == (int64_t{1} << bits), what, " levels must be a float32 table of 2^bits entries");
  }
}

}  // namespace

// query [B, H_q, D] float32; key/value codes [B, H_kv, T, W] (int32 words, or uint8 bytes for 8 bits),
// history tokens from ``history_start`` attended; keys / values [B, H_kv, T_r, D] float32 full precision.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key_codes, const at::Tensor& key_scale,
                            const c10::optional<at::Tensor>& key_zero, const c10::optional<at::Tensor>& key_levels,
                            int64_t key_bits, bool key_symmetric, bool key_per_channel, int64_t key_group,
                            const at::Tensor& value_codes, const at::Tensor& value_scale,
                            const c10::optional<at::Tensor>& value_zero, const c10::optional<at::Tensor>& value_levels,
                            int64_t value_bits, bool value_symmetric, int64_t value_group, const at::Tensor& keys,
                            const at::Tensor& values, double scale, int64_t history_start) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == at::kFloat && query.is_contiguous(),
              "query must be a contiguous float32 [B, H_q, D]");
  check_side(key_codes, key_scale, key_zero, key_levels, key_bits, "key");
  check_side(value_codes, value_scale, value_zero, value_levels, value_bits, "value");
  const int64_t batch = query.size(0), heads_q = query.size(1), d = query.size(2);
  const int64_t heads_kv = key_codes.size(1), tokens = key_codes.size(2);
  TORCH_CHECK(key_group > 0 && value_group > 0, "group sizes must be positive");
  TORCH_CHECK(heads_q % heads_kv == 0, "query heads ", heads_q, " are not a multiple of KV heads ", heads_kv);
  auto check_shapes = [&](const at::Tensor& codes, const at::Tensor& scale, int64_t bits, int64_t scale_rows,
                          int64_t scale_cols, const char* what) {
    TORCH_CHECK(codes.size(0) == batch && codes.size(1) == heads_kv && codes.size(2) == tokens, what,
                " codes must be [B, H_kv, T, W] with the query's batch and the keys' heads and tokens");
    // bytes a row of d codes takes: int32 words packed as kvtuner.quant.pack does, or one byte a code
    const int64_t row_bytes = codes.scalar_type() == at::kByte ? d
                              : 4 * (bits == 3 ? (d + 15) / 16 + (d + 31) / 32 : (d * bits + 31) / 32);
    TORCH_CHECK(codes.scalar_type() == at::kInt || bits == 8, what, " uint8 codes hold 8 bits");
    TORCH_CHECK(codes.size(3) * codes.element_size() >= row_bytes, what, " code rows hold fewer than head_dim codes");
    TORCH_CHECK(scale.size(0) == batch && scale.size(1) == heads_kv && scale.size(2) >= scale_rows &&
                scale.size(3) == scale_cols, what, " scales do not match the codes, head_dim and group");
  };
  TORCH_CHECK(key_per_channel || d % key_group == 0, "key groups must tile head_dim");
  TORCH_CHECK(d % value_group == 0, "value groups must tile head_dim");
  check_shapes(key_codes, key_scale, key_bits, key_per_channel ? (tokens + key_group - 1) / key_group : tokens,
               key_per_channel ? d : d / key_group, "key");
  check_shapes(value_codes, value_scale, value_bits, tokens, d / value_group, "value");
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kFloat && keys.is_contiguous() &&
              values.sizes() == keys.sizes() && values.scalar_type() == at::kFloat && values.is_contiguous() &&
              keys.size(0) == batch && keys.size(1) == heads_kv && keys.size(3) == d,
              "full-precision keys and values must be contiguous float32 [B, H_kv, T_r, D] like the query's");
  TORCH_CHECK(0 <= history_start && history_start <= tokens, "history_start out of range");
  const int64_t residual = keys.size(2);
  const int64_t r = heads_q / heads_kv;
  const int64_t attended = tokens - history_start;
  TORCH_CHECK(attended + residual > 0, "nothing to attend to: an empty history and no full-precision tokens");

  // query prescaled into log2 units, [B, H_kv, r, D]
  const at::Tensor q = query.mul(static_cast<float>(scale) * kLog2e).contiguous();
  const int64_t pairs = batch * heads_kv;
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = std::max<int64_t>(1, (2 * threads + pairs - 1) / pairs);
  const int64_t splits = attended > 0 ? std::max<int64_t>(1, std::min(wanted, attended / kMinSplit)) : 0;
  const int64_t chunk = splits ? (attended + splits - 1) / splits : 0;
  const int64_t parts = splits + (residual > 0);
  std::vector<float> maxes(pairs * parts * r), sums(pairs * parts * r), outs(pairs * parts * r * d);
  auto partial = [&](int64_t pair, int64_t index) {
    const int64_t at_ = (pair * parts + index) * r;
    return Partial{maxes.data() + at_, sums.data() + at_, outs.data() + at_ * d};
  };
  const float* qp = q.const_data_ptr<float>();

  at::parallel_for(0, pairs * splits, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t pair = item / splits, split = item % splits;
      const int64_t b = pair / heads_kv, h = pair % heads_kv;
      const Side ks = make_side(key_codes, key_scale, key_zero, key_levels, key_bits, key_symmetric, key_per_channel,
                                key_group, b, h);
      const Side vs = make_side(value_codes, value_scale, value_zero, value_levels, value_bits, value_symmetric,
                                false, value_group, b, h);
      const int64_t begin = history_start + split * chunk;
      const int64_t end = std::min(tokens, begin + chunk);
      const bool blocked = value_group % 16 == 0 && (key_per_channel || key_group % 16 == 0);
      if (blocked && d == 64) {
        attend_history<64>(qp + pair * r * d, r, d, ks, vs, begin, end, partial(pair, split));
      } else if (blocked && d == 128) {
        attend_history<128>(qp + pair * r * d, r, d, ks, vs, begin, end, partial(pair, split));
      } else {
        attend_history<0>(qp + pair * r * d, r, d, ks, vs, begin, end, partial(pair, split));
      }
    }
  });

  at::Tensor out = at::empty({batch, heads_q, d}, query.options());
  float* op = out.mutable_data_ptr<float>();
  const float* kp = keys.const_data_ptr<float>();
  const float* vp = values.const_data_ptr<float>();
  at::parallel_for(0, pairs, 1, [&](int64_t first, int64_t last) {
    for (int64_t pair = first; pair < last; ++pair) {
      if (residual > 0) {
        attend_dense(qp + pair * r * d, r, d, kp + pair * residual * d, vp + pair * residual * d, residual,
                     partial(pair, splits));
      }
      for (int64_t i = 0; i < r; ++i) {  // merge the parts: rescale each to the largest max
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < parts; ++p) mx = std::max(mx, partial(pair, p).max[i]);
        float sum = 0.0f;
        float* o = op + (pair * r + i) * d;
        std::fill(o, o + d, 0.0f);
        for (int64_t p = 0; p < parts; ++p) {
          const Partial part = partial(pair, p);
          const float w = std::exp2(part.max[i] - mx);
          sum += w * part.sum[i];
          for (int64_t c = 0; c < d; ++c) o[c] += w * part.out[i * d + c];
        }
        for (int64_t c = 0; c < d; ++c) o[c] /= sum;
      }
    }
  });
  return out;
}

TORCH_LIBRARY(kvtuner_cpu, m) {
  m.def("decode_attention(Tensor query, Tensor key_codes, Tensor key_scale, Tensor? key_zero, Tensor? key_levels, "
        "int key_bits, bool key_symmetric, bool key_per_channel, int key_group, Tensor value_codes, "
        "Tensor value_scale, Tensor? value_zero, Tensor? value_levels, int value_bits, bool value_symmetric, "
        "int value_group, Tensor keys, Tensor values, float scale, int history_start) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvtuner_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }

}  // namespace kvtuner_cpu
