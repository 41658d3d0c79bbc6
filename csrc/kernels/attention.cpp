#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "dtypes.h"

namespace pyvlm {
namespace {

// Tokens scored before each online-softmax rescale: the rescale of the
// accumulators is paid once per chunk instead of once per token.
constexpr int64_t kChunk = 32;

// Dot product with eight independent partial sums, which GCC turns into
// vector code at -O3 without needing -ffast-math's reassociation.
inline float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) +
         ((part[4] + part[5]) + (part[6] + part[7])) + tail;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline void scale_in_place(float* y, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

// A cached row as floats: float rows are used in place, 16-bit rows are
// converted into `buffer`.
template <typename T>
inline const float* row_as_float(const T* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = to_float(src[i]);
    return buffer;
  }
}

template <typename T>
void copy_row(T* dst, const T* src, int64_t n) {
  std::memcpy(dst, src, sizeof(T) * n);
}

// Per-thread scratch of one (sequence, KV head) item: the group's scaled
// queries, accumulators and running softmax state, plus a chunk of scores.
struct DecodeScratch {
  std::vector<float> query, acc, row, max, sum, scores;
  DecodeScratch(int64_t group, int64_t head_dim)
      : query(group * head_dim), acc(group * head_dim), row(head_dim),
        max(group), sum(group), scores(group * kChunk) {}
};

// Flat element offset of token `t`'s row for `kv_head` in a cache.
template <typename T>
inline int64_t cache_row(const PagedDecodeArgs<T>& a, const int32_t* block_table,
                         int64_t t, int64_t kv_head) {
  const int64_t page = block_table[t / a.page_size];
  return ((page * a.page_size + t % a.page_size) * a.num_kv_heads + kv_head) *
         a.head_dim;
}

template <typename T>
void score_chunk(const PagedDecodeArgs<T>& a, const int32_t* block_table,
                 int64_t kv_head, int64_t t0, int64_t n, int64_t group,
                 DecodeScratch& s) {
  const int64_t d = a.head_dim;
  for (int64_t i = 0; i < n; ++i) {
    const float* k =
        row_as_float(a.key_cache + cache_row(a, block_table, t0 + i, kv_head),
                     s.row.data(), d);
    for (int64_t g = 0; g < group; ++g)
      s.scores[g * kChunk + i] = dot(s.query.data() + g * d, k, d);
  }
}

// Online softmax (Milakov & Gimelshein 2018): rescales each head's running
// sum and accumulator to the chunk's new maximum and turns its scores into
// weights exp(score - max).
inline void rescale_chunk(int64_t n, int64_t group, int64_t d, DecodeScratch& s) {
  for (int64_t g = 0; g < group; ++g) {
    float* sc = s.scores.data() + g * kChunk;
    const float new_max = std::max(s.max[g], *std::max_element(sc, sc + n));
    const float alpha = std::exp(s.max[g] - new_max);  // 0 on the first chunk
    float total = 0;
    for (int64_t i = 0; i < n; ++i) {
      sc[i] = std::exp(sc[i] - new_max);
      total += sc[i];
    }
    s.sum[g] = s.sum[g] * alpha + total;
    s.max[g] = new_max;
    scale_in_place(s.acc.data() + g * d, alpha, d);
  }
}

template <typename T>
void accumulate_chunk(const PagedDecodeArgs<T>& a, const int32_t* block_table,
                      int64_t kv_head, int64_t t0, int64_t n, int64_t group,
                      DecodeScratch& s) {
  const int64_t d = a.head_dim;
  for (int64_t i = 0; i < n; ++i) {
    const float* v =
        row_as_float(a.value_cache + cache_row(a, block_table, t0 + i, kv_head),
                     s.row.data(), d);
    for (int64_t g = 0; g < group; ++g)
      axpy(s.acc.data() + g * d, s.scores[g * kChunk + i], v, d);
  }
}

template <typename T>
void decode_item(const PagedDecodeArgs<T>& a, int64_t seq, int64_t kv_head,
                 DecodeScratch& s) {
  const int64_t d = a.head_dim, group = a.num_heads / a.num_kv_heads;
  const int64_t first_head = kv_head * group;
  for (int64_t g = 0; g < group; ++g) {
    const T* q = a.query + seq * a.query_stride_seq + (first_head + g) * a.query_stride_head;
    for (int64_t i = 0; i < d; ++i) s.query[g * d + i] = to_float(q[i]) * a.scale;
  }
  std::fill(s.acc.begin(), s.acc.end(), 0.f);
  std::fill(s.max.begin(), s.max.end(), -std::numeric_limits<float>::infinity());
  std::fill(s.sum.begin(), s.sum.end(), 0.f);
  const int32_t* block_table = a.block_tables + seq * a.block_table_stride;
  const int64_t seq_len = a.seq_lens[seq];
  for (int64_t t0 = 0; t0 < seq_len; t0 += kChunk) {
    const int64_t n = std::min(kChunk, seq_len - t0);
    score_chunk(a, block_table, kv_head, t0, n, group, s);
    rescale_chunk(n, group, d, s);
    accumulate_chunk(a, block_table, kv_head, t0, n, group, s);
  }
  for (int64_t g = 0; g < group; ++g) {
    // An empty sequence attends to nothing: its output is zero.
    const float inv = s.sum[g] > 0 ? 1.f / s.sum[g] : 0.f;
    T* o = a.out + (seq * a.num_heads + first_head + g) * d;
    for (int64_t i = 0; i < d; ++i) o[i] = from_float<T>(s.acc[g * d + i] * inv);
  }
}

}  // namespace

template <typename T>
void reshape_and_cache(const CacheWriteArgs<T>& a, int64_t token_begin,
                       int64_t token_end) {
  for (int64_t t = token_begin; t < token_end; ++t) {
    const int64_t slot = a.slot_mapping[t];
    if (slot < 0 || slot >= a.num_slots) continue;
    for (int64_t h = 0; h < a.num_kv_heads; ++h) {
      const int64_t dst = (slot * a.num_kv_heads + h) * a.head_dim;
      copy_row(a.key_cache + dst, a.key + t * a.key_stride_token + h * a.key_stride_head,
               a.head_dim);
      copy_row(a.value_cache + dst,
               a.value + t * a.value_stride_token + h * a.value_stride_head, a.head_dim);
    }
  }
}

template <typename T>
void paged_attention_decode(const PagedDecodeArgs<T>& a, int64_t item_begin,
                            int64_t item_end) {
  if (item_begin >= item_end) return;
  DecodeScratch scratch(a.num_heads / a.num_kv_heads, a.head_dim);
  for (int64_t item = item_begin; item < item_end; ++item)
    decode_item(a, item / a.num_kv_heads, item % a.num_kv_heads, scratch);
}

#define PYVLM_INSTANTIATE_ATTENTION(T)                                         \
  template void reshape_and_cache<T>(const CacheWriteArgs<T>&, int64_t, int64_t); \
  template void paged_attention_decode<T>(const PagedDecodeArgs<T>&, int64_t, int64_t);

PYVLM_INSTANTIATE_ATTENTION(float)
PYVLM_INSTANTIATE_ATTENTION(half_t)
PYVLM_INSTANTIATE_ATTENTION(bf16_t)
#undef PYVLM_INSTANTIATE_ATTENTION

}  // namespace pyvlm
