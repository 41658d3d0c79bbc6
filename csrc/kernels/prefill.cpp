#include "prefill.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dtypes.h"

namespace pyvlm {
namespace {

// Keys per tile; a compile-time width lets the score loop vectorize.
constexpr int64_t kKeysPerTile = 64;
// (query, head) rows that share one K/V tile.
constexpr int64_t kRowsPerBlock = 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One query block: rows r = qi * group + g are query token first_token + qi
// of head kv_head * group + g. Row qi sees keys [0, row_limit(qi)).
struct Block {
  int64_t first_token, num_queries, kv_head, group;
  int64_t num_keys;     // keys of the sequence
  int64_t causal_base;  // row qi sees keys [0, causal_base + qi]; < 0: all
  int64_t row_limit(int64_t qi) const {
    return causal_base < 0 ? num_keys : std::min(num_keys, causal_base + qi + 1);
  }
  int64_t rows() const { return num_queries * group; }
  int64_t keys_needed() const { return row_limit(num_queries - 1); }
};

// Per-thread float buffers, allocated once per chunk of work items.
struct Scratch {
  int64_t d;
  std::vector<float> q, kt, v, s, o, m, l;
  explicit Scratch(int64_t head_dim, int64_t rows)
      : d(head_dim),
        q(rows * head_dim),
        kt(head_dim * kKeysPerTile),
        v(kKeysPerTile * head_dim),
        s(rows * kKeysPerTile),
        o(rows * head_dim),
        m(rows),
        l(rows) {}
};

template <typename T>
void load_queries(Scratch& sc, const Block& b, const T* query, int64_t qs_token,
                  int64_t qs_head, float scale) {
  for (int64_t r = 0; r < b.rows(); ++r) {
    const int64_t head = b.kv_head * b.group + r % b.group;
    const T* src = query + (b.first_token + r / b.group) * qs_token + head * qs_head;
    float* dst = sc.q.data() + r * sc.d;
    for (int64_t i = 0; i < sc.d; ++i) dst[i] = to_float(src[i]) * scale;
  }
  std::fill(sc.o.begin(), sc.o.begin() + b.rows() * sc.d, 0.f);
  std::fill(sc.m.begin(), sc.m.begin() + b.rows(), kNegInf);
  std::fill(sc.l.begin(), sc.l.begin() + b.rows(), 0.f);
}

// Keys [j0, j0 + n): K transposed (kt[i][j]) so scores vectorize over keys.
template <typename T, typename KvRow>
void load_kv_tile(Scratch& sc, const KvRow& kv_row, int64_t j0, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const auto [k, v] = kv_row(j0 + j);
    float* vd = sc.v.data() + j * sc.d;
    for (int64_t i = 0; i < sc.d; ++i) {
      sc.kt[i * kKeysPerTile + j] = to_float(k[i]);
      vd[i] = to_float(v[i]);
    }
  }
}

// S = Q K^T for the tile, rows in groups of kRowGroup so every K^T load
// feeds several rows (fewer loads per multiply-add).
constexpr int64_t kRowGroup = 4;

void tile_scores(Scratch& sc, int64_t rows) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
    const int64_t nr = std::min(kRowGroup, rows - r0);
    float acc[kRowGroup][kKeysPerTile] = {};
    for (int64_t i = 0; i < sc.d; ++i) {
      const float* k = sc.kt.data() + i * kKeysPerTile;
      float qi[kRowGroup];
      for (int64_t r = 0; r < kRowGroup; ++r) qi[r] = r < nr ? sc.q[(r0 + r) * sc.d + i] : 0.f;
      for (int64_t r = 0; r < kRowGroup; ++r)
        for (int64_t j = 0; j < kKeysPerTile; ++j) acc[r][j] += qi[r] * k[j];
    }
    for (int64_t r = 0; r < nr; ++r)
      std::copy(acc[r], acc[r] + kKeysPerTile, sc.s.data() + (r0 + r) * kKeysPerTile);
  }
}

// Online softmax update of row r with its first `valid` scores of the tile.
void update_row(Scratch& sc, int64_t r, int64_t valid) {
  float* s = sc.s.data() + r * kKeysPerTile;
  float mx = sc.m[r];
  for (int64_t j = 0; j < valid; ++j) mx = std::max(mx, s[j]);
  const float alpha = sc.m[r] == kNegInf ? 0.f : std::exp(sc.m[r] - mx);
  float sum = 0.f;
  for (int64_t j = 0; j < valid; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  sc.m[r] = mx;
  sc.l[r] = sc.l[r] * alpha + sum;
  float* o = sc.o.data() + r * sc.d;
  for (int64_t i = 0; i < sc.d; ++i) o[i] *= alpha;
  for (int64_t j = 0; j < valid; ++j) {
    const float p = s[j];
    const float* v = sc.v.data() + j * sc.d;
    for (int64_t i = 0; i < sc.d; ++i) o[i] += p * v[i];
  }
}

template <typename T>
void store_rows(const Scratch& sc, const Block& b, T* out, int64_t num_heads) {
  for (int64_t r = 0; r < b.rows(); ++r) {
    const int64_t head = b.kv_head * b.group + r % b.group;
    T* dst = out + ((b.first_token + r / b.group) * num_heads + head) * sc.d;
    const float inv = sc.l[r] > 0.f ? 1.f / sc.l[r] : 0.f;
    const float* o = sc.o.data() + r * sc.d;
    for (int64_t i = 0; i < sc.d; ++i) dst[i] = from_float<T>(o[i] * inv);
  }
}

// The shared tiled core: kv_row(j) gives (key row, value row) pointers of key
// j of the block's sequence and kv head.
template <typename T, typename KvRow>
void attend_block(Scratch& sc, const Block& b, const KvRow& kv_row) {
  const int64_t keys = b.keys_needed();
  for (int64_t j0 = 0; j0 < keys; j0 += kKeysPerTile) {
    const int64_t n = std::min(kKeysPerTile, keys - j0);
    load_kv_tile<T>(sc, kv_row, j0, n);
    tile_scores(sc, b.rows());
    for (int64_t r = 0; r < b.rows(); ++r) {
      const int64_t valid = std::min(n, b.row_limit(r / b.group) - j0);
      if (valid > 0) update_row(sc, r, valid);
    }
  }
}

// Decodes work item -> (sequence, kv head, first query of the block).
struct Item {
  int64_t seq, kv_head, first_query;
};

Item decode_item(int64_t item, const int64_t* cu_blocks, int64_t num_seqs,
                 int64_t queries_per_block) {
  const int64_t total_blocks = cu_blocks[num_seqs];
  const int64_t block = item % total_blocks;
  const int64_t seq =
      std::upper_bound(cu_blocks, cu_blocks + num_seqs + 1, block) - cu_blocks - 1;
  return {seq, item / total_blocks, (block - cu_blocks[seq]) * queries_per_block};
}

Block make_block(const Item& it, const int32_t* cu_seqlens_q, int64_t num_keys,
                 int64_t causal_base, int64_t group, int64_t queries_per_block) {
  const int64_t len = cu_seqlens_q[it.seq + 1] - cu_seqlens_q[it.seq];
  return {cu_seqlens_q[it.seq] + it.first_query,
          std::min(queries_per_block, len - it.first_query),
          it.kv_head,
          group,
          num_keys,
          causal_base < 0 ? -1 : causal_base + it.first_query};
}

}  // namespace

int64_t attention_queries_per_block(const AttentionDims& dims) {
  const int64_t group = dims.num_heads / dims.num_kv_heads;
  return std::max<int64_t>(1, kRowsPerBlock / group);
}

void attention_block_offsets(const int32_t* cu_seqlens_q, int64_t num_seqs,
                             int64_t queries_per_block, int64_t* cu_blocks) {
  cu_blocks[0] = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = cu_seqlens_q[s + 1] - cu_seqlens_q[s];
    cu_blocks[s + 1] = cu_blocks[s] + (len + queries_per_block - 1) / queries_per_block;
  }
}

template <typename T>
void paged_attention_prefill(const PagedPrefillArgs<T>& a, const int64_t* cu_blocks,
                             int64_t item_begin, int64_t item_end) {
  const AttentionDims& dm = a.dims;
  const int64_t group = dm.num_heads / dm.num_kv_heads;
  const int64_t qpb = attention_queries_per_block(dm);
  Scratch sc(dm.head_dim, qpb * group);
  const int64_t row_stride = dm.num_kv_heads * dm.head_dim;
  for (int64_t item = item_begin; item < item_end; ++item) {
    const Item it = decode_item(item, cu_blocks, a.num_seqs, qpb);
    const int64_t prefix = a.prefix_lens[it.seq];
    const int64_t len = a.cu_seqlens_q[it.seq + 1] - a.cu_seqlens_q[it.seq];
    const Block b = make_block(it, a.cu_seqlens_q, prefix + len, prefix, group, qpb);
    const int32_t* pages = a.block_tables + it.seq * a.max_pages_per_seq;
    const int64_t head_offset = it.kv_head * dm.head_dim;
    auto kv_row = [&](int64_t j) {
      const int64_t slot = int64_t(pages[j / a.page_size]) * a.page_size + j % a.page_size;
      const int64_t off = slot * row_stride + head_offset;
      return std::pair<const T*, const T*>(a.key_cache + off, a.value_cache + off);
    };
    load_queries(sc, b, a.query, a.q_stride_token, a.q_stride_head, dm.scale);
    attend_block<T>(sc, b, kv_row);
    store_rows(sc, b, a.out, dm.num_heads);
  }
}

template <typename T>
void varlen_attention(const VarlenArgs<T>& a, const int64_t* cu_blocks, int64_t item_begin,
                      int64_t item_end) {
  const AttentionDims& dm = a.dims;
  const int64_t group = dm.num_heads / dm.num_kv_heads;
  const int64_t qpb = attention_queries_per_block(dm);
  Scratch sc(dm.head_dim, qpb * group);
  for (int64_t item = item_begin; item < item_end; ++item) {
    const Item it = decode_item(item, cu_blocks, a.num_seqs, qpb);
    const int64_t k0 = a.cu_seqlens_k[it.seq];
    const int64_t num_keys = a.cu_seqlens_k[it.seq + 1] - k0;
    const Block b = make_block(it, a.cu_seqlens_q, num_keys, -1, group, qpb);
    const T* kbase = a.key + k0 * a.k_stride_token + it.kv_head * a.k_stride_head;
    const T* vbase = a.value + k0 * a.v_stride_token + it.kv_head * a.v_stride_head;
    auto kv_row = [&](int64_t j) {
      return std::pair<const T*, const T*>(kbase + j * a.k_stride_token,
                                           vbase + j * a.v_stride_token);
    };
    load_queries(sc, b, a.query, a.q_stride_token, a.q_stride_head, dm.scale);
    attend_block<T>(sc, b, kv_row);
    store_rows(sc, b, a.out, dm.num_heads);
  }
}

#define PYVLM_INSTANTIATE_PREFILL(T)                                                   \
  template void paged_attention_prefill<T>(const PagedPrefillArgs<T>&, const int64_t*, \
                                           int64_t, int64_t);                          \
  template void varlen_attention<T>(const VarlenArgs<T>&, const int64_t*, int64_t, int64_t);
PYVLM_INSTANTIATE_PREFILL(float)
PYVLM_INSTANTIATE_PREFILL(half_t)
PYVLM_INSTANTIATE_PREFILL(bf16_t)
#undef PYVLM_INSTANTIATE_PREFILL

}  // namespace pyvlm
