#include "prefill.h"

// The vf helpers take and return 64-byte vectors; they are always inlined,
// so the ABI note GCC gives for non-AVX-512 clones does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#if defined(__GNUC__)
#define PYVLM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PYVLM_ALWAYS_INLINE inline
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "dtypes.h"

namespace pyvlm {
namespace {

// The float hot loops use GCC/Clang vector extensions: one `vf` is 16 rows of
// a block (one AVX-512 register, two AVX2 ones), so the softmax state and
// the score/output accumulators vectorise over (query, head) rows and K/V
// elements are broadcast straight from the cache rows (no K transpose).
template <int N>
struct VecWidth;
#define PYVLM_VEC_WIDTH(N)                                         \
  template <>                                                      \
  struct VecWidth<N> {                                             \
    typedef float F __attribute__((vector_size(4 * N)));           \
    typedef int32_t I __attribute__((vector_size(4 * N)));         \
  };
PYVLM_VEC_WIDTH(4)   // SSE2
PYVLM_VEC_WIDTH(8)   // AVX2
PYVLM_VEC_WIDTH(16)  // AVX-512
#undef PYVLM_VEC_WIDTH
// Rows per chunk (the tile loop's unit); a kernel of narrower vectors walks
// a chunk in 16 / N slices, each with its own 8-register blocking.
constexpr int64_t kLanes = 16;

// Keys per tile (the K/V rows every row of a block reuses from L1).
constexpr int64_t kKeysPerTile = 64;
// (query, head) rows per block, before rounding up to whole vectors.
constexpr int64_t kRowsPerBlock = 96;
// Keys (score kernel) and head-dim elements (PV kernel) per register block.
constexpr int64_t kRegBlock = 8;
constexpr float kLog2e = 1.4426950408889634f;
// Running max before any key: finite, so exp2(m_old - m_new) is 0 or 1, never NaN.
constexpr float kLowest = -std::numeric_limits<float>::max();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename V>
PYVLM_ALWAYS_INLINE V splat(float x) {
  return V{} + x;
}
template <typename V>
PYVLM_ALWAYS_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
PYVLM_ALWAYS_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename V>
PYVLM_ALWAYS_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

// 2^x for x <= 0 (Cephes exp2f on [-0.5, 0.5], relative error ~2e-7); x is
// clamped to -127, where the exponent field is 0 and the result exactly 0,
// so masked (-inf) scores give 0 without a branch.
template <typename vf, typename vi>
PYVLM_ALWAYS_INLINE vf exp2_nonpositive(vf x) {
  x = x < splat<vf>(-127.f) ? splat<vf>(-127.f) : x;
  const vf shifter = splat<vf>(12582912.f);  // 1.5 * 2^23: round to nearest
  const vf t = x + shifter;
  const vf f = x - (t - shifter);
  vi bits;
  std::memcpy(&bits, &t, sizeof bits);
  const vi exponent = (bits - 0x4B400000 + 127) << 23;
  vf scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  vf p = splat<vf>(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  return (p * f + 1.f) * scale;
}

// One tile of keys against one vector of rows. Layouts (row index fastest,
// ld = rows of the block): qt[d][ld] (queries * scale * log2 e), st[keys][ld]
// scratch, ot[d][ld] unnormalised output; m, l, limit: this vector's 16
// entries of the running max (log2 domain), running sum and key limit.
struct TileChunk {
  const float* const* krow;  // n key rows (head_dim contiguous floats)
  const float* const* vrow;  // n value rows
  int64_t n, first_key, d, ld;
  bool needs_mask;
  const float* qt;
  float *st, *ot, *m, *l;
  const float* limit;
};

// st[j] = sum_i krow[j][i] * qt[i] for j < n, kRegBlock keys at a time.
template <typename vf, typename vi = void>
PYVLM_ALWAYS_INLINE void chunk_scores(const TileChunk& c) {
  int64_t j0 = 0;
  for (; j0 + kRegBlock <= c.n; j0 += kRegBlock) {
    vf acc[kRegBlock] = {};
    for (int64_t i = 0; i < c.d; ++i) {
      const vf q = load<vf>(c.qt + i * c.ld);
      for (int64_t jj = 0; jj < kRegBlock; ++jj) acc[jj] += c.krow[j0 + jj][i] * q;
    }
    for (int64_t jj = 0; jj < kRegBlock; ++jj) store(c.st + (j0 + jj) * c.ld, acc[jj]);
  }
  for (; j0 < c.n; ++j0) {
    vf acc = {};
    for (int64_t i = 0; i < c.d; ++i) acc += c.krow[j0][i] * load<vf>(c.qt + i * c.ld);
    store(c.st + j0 * c.ld, acc);
  }
}

// Masks keys at or past each row's limit, updates the running max and sum,
// turns st into probabilities; returns the factor rescaling the old output.
template <typename vf, typename vi>
PYVLM_ALWAYS_INLINE vf chunk_softmax(const TileChunk& c) {
  const vf limit = load<vf>(c.limit);
  if (c.needs_mask)
    for (int64_t j = 0; j < c.n; ++j) {
      const vf s = load<vf>(c.st + j * c.ld);
      store(c.st + j * c.ld, splat<vf>(float(c.first_key + j)) < limit ? s : splat<vf>(kNegInf));
    }
  const vf m_old = load<vf>(c.m);
  vf m_new = m_old;
  for (int64_t j = 0; j < c.n; ++j) m_new = vmax<vf>(m_new, load<vf>(c.st + j * c.ld));
  vf sum = {};
  for (int64_t j = 0; j < c.n; ++j) {
    const vf p = exp2_nonpositive<vf, vi>(load<vf>(c.st + j * c.ld) - m_new);
    store(c.st + j * c.ld, p);
    sum += p;
  }
  const vf alpha = exp2_nonpositive<vf, vi>(m_old - m_new);
  store(c.m, m_new);
  store(c.l, load<vf>(c.l) * alpha + sum);
  return alpha;
}

// ot[i] = alpha * ot[i] + sum_j vrow[j][i] * st[j], kRegBlock elements at a time.
template <typename vf, typename vi = void>
PYVLM_ALWAYS_INLINE void chunk_values(const TileChunk& c, vf alpha) {
  for (int64_t i0 = 0; i0 < c.d; i0 += kRegBlock) {
    const int64_t ni = std::min(kRegBlock, c.d - i0);
    vf acc[kRegBlock];
    for (int64_t ii = 0; ii < ni; ++ii) acc[ii] = load<vf>(c.ot + (i0 + ii) * c.ld) * alpha;
    if (ni == kRegBlock) {
      for (int64_t j = 0; j < c.n; ++j) {
        const vf p = load<vf>(c.st + j * c.ld);
        const float* v = c.vrow[j] + i0;
        for (int64_t ii = 0; ii < kRegBlock; ++ii) acc[ii] += v[ii] * p;
      }
    } else {
      for (int64_t j = 0; j < c.n; ++j) {
        const vf p = load<vf>(c.st + j * c.ld);
        for (int64_t ii = 0; ii < ni; ++ii) acc[ii] += c.vrow[j][i0 + ii] * p;
      }
    }
    for (int64_t ii = 0; ii < ni; ++ii) store(c.ot + (i0 + ii) * c.ld, acc[ii]);
  }
}

// The portable build is SSE2 only (4 lanes, no FMA), where these loops run
// several times slower, so the kernel is also compiled for AVX2 + FMA and
// AVX-512 and picked by what the CPU has. (Not target_clones: GCC splits
// its "avx2,fma" into two clones, and the AVX2 one then has no FMA.)
#if defined(__GNUC__) && defined(__x86_64__)
#define PYVLM_X86_DISPATCH 1
#else
#define PYVLM_X86_DISPATCH 0
#endif

// The chunk's 16 rows in slices of N-lane vectors.
template <int N>
PYVLM_ALWAYS_INLINE void attend_chunk(const TileChunk& c) {
  using vf = typename VecWidth<N>::F;
  using vi = typename VecWidth<N>::I;
  for (int64_t o = 0; o < kLanes; o += N) {
    TileChunk s = c;
    s.qt += o, s.st += o, s.ot += o, s.m += o, s.l += o, s.limit += o;
    chunk_scores<vf>(s);
    chunk_values<vf>(s, chunk_softmax<vf, vi>(s));
  }
}

void attend_tile_chunk_portable(const TileChunk& c) { attend_chunk<4>(c); }

#if PYVLM_X86_DISPATCH
__attribute__((target("avx2,fma"))) void attend_tile_chunk_avx2(const TileChunk& c) {
  attend_chunk<8>(c);
}

__attribute__((target("avx512f,avx2,fma"))) void attend_tile_chunk_avx512(const TileChunk& c) {
  attend_chunk<16>(c);
}

using ChunkKernel = void (*)(const TileChunk&);

ChunkKernel best_chunk_kernel() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return attend_tile_chunk_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return attend_tile_chunk_avx2;
  return attend_tile_chunk_portable;
}
#endif

void attend_tile_chunk(const TileChunk& c) {
#if PYVLM_X86_DISPATCH
  static const ChunkKernel kernel = best_chunk_kernel();
  kernel(c);
#else
  attend_tile_chunk_portable(c);
#endif
}

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

// Per-thread buffers, allocated once per chunk of work items; ld is the
// block's rows rounded up to whole vectors.
struct Scratch {
  int64_t d, ld;
  std::vector<float> qt, st, ot, m, l, limit, k, v;
  std::vector<const float*> krow, vrow;
  Scratch(int64_t head_dim, int64_t rows)
      : d(head_dim),
        ld((rows + kLanes - 1) / kLanes * kLanes),
        qt(head_dim * ld),
        st(kKeysPerTile * ld),
        ot(head_dim * ld),
        m(ld),
        l(ld),
        limit(ld),
        k(kKeysPerTile * head_dim),
        v(kKeysPerTile * head_dim),
        krow(kKeysPerTile),
        vrow(kKeysPerTile) {}
};

// Queries transposed and pre-scaled into the log2 domain; padding rows get
// zero queries and the last real row's limit (computed, never stored).
template <typename T>
void load_queries(Scratch& sc, const Block& b, const T* query, int64_t qs_token,
                  int64_t qs_head, float scale) {
  const float qscale = scale * kLog2e;
  std::fill(sc.qt.begin(), sc.qt.end(), 0.f);
  for (int64_t r = 0; r < b.rows(); ++r) {
    const int64_t head = b.kv_head * b.group + r % b.group;
    const T* src = query + (b.first_token + r / b.group) * qs_token + head * qs_head;
    for (int64_t i = 0; i < sc.d; ++i) sc.qt[i * sc.ld + r] = to_float(src[i]) * qscale;
  }
  for (int64_t r = 0; r < sc.ld; ++r)
    sc.limit[r] = float(b.row_limit(std::min(r, b.rows() - 1) / b.group));
  std::fill(sc.ot.begin(), sc.ot.end(), 0.f);
  std::fill(sc.m.begin(), sc.m.end(), kLowest);
  std::fill(sc.l.begin(), sc.l.end(), 0.f);
}

// Row pointers of keys [j0, j0 + n): float caches are read in place, 16-bit
// ones converted into the scratch tile first.
template <typename T, typename KvRow>
void load_kv_tile(Scratch& sc, const KvRow& kv_row, int64_t j0, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const auto kv = kv_row(j0 + j);
    if constexpr (std::is_same<T, float>::value) {
      sc.krow[j] = kv.first;
      sc.vrow[j] = kv.second;
    } else {
      float* kd = sc.k.data() + j * sc.d;
      float* vd = sc.v.data() + j * sc.d;
      for (int64_t i = 0; i < sc.d; ++i) {
        kd[i] = to_float(kv.first[i]);
        vd[i] = to_float(kv.second[i]);
      }
      sc.krow[j] = kd;
      sc.vrow[j] = vd;
    }
  }
}

template <typename T>
void store_rows(const Scratch& sc, const Block& b, T* out, int64_t num_heads) {
  for (int64_t r = 0; r < b.rows(); ++r) {
    const int64_t head = b.kv_head * b.group + r % b.group;
    T* dst = out + ((b.first_token + r / b.group) * num_heads + head) * sc.d;
    const float inv = sc.l[r] > 0.f ? 1.f / sc.l[r] : 0.f;
    for (int64_t i = 0; i < sc.d; ++i) dst[i] = from_float<T>(sc.ot[i * sc.ld + r] * inv);
  }
}

// The chunk of one vector of rows for the tile [j0, j0 + n); its n is cut
// to the keys some row of the vector sees (0: skip), and masking is only
// needed where some row sees fewer.
TileChunk make_chunk(Scratch& sc, int64_t c0, int64_t j0, int64_t n) {
  const float* lim = sc.limit.data() + c0;
  const int64_t max_limit = int64_t(*std::max_element(lim, lim + kLanes));
  const int64_t min_limit = int64_t(*std::min_element(lim, lim + kLanes));
  const int64_t keys = std::max<int64_t>(0, std::min(n, max_limit - j0));
  return {sc.krow.data(), sc.vrow.data(), keys,  j0,
          sc.d,           sc.ld,          j0 + keys > min_limit,
          sc.qt.data() + c0, sc.st.data() + c0, sc.ot.data() + c0,
          sc.m.data() + c0,  sc.l.data() + c0,  lim};
}

// The shared tiled core: kv_row(j) gives (key row, value row) pointers of key
// j of the block's sequence and kv head.
template <typename T, typename KvRow>
void attend_block(Scratch& sc, const Block& b, const KvRow& kv_row) {
  const int64_t keys = b.keys_needed();
  for (int64_t j0 = 0; j0 < keys; j0 += kKeysPerTile) {
    const int64_t n = std::min(kKeysPerTile, keys - j0);
    load_kv_tile<T>(sc, kv_row, j0, n);
    for (int64_t c0 = 0; c0 < b.rows(); c0 += kLanes) {
      const TileChunk c = make_chunk(sc, c0, j0, n);
      if (c.n > 0) attend_tile_chunk(c);
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
