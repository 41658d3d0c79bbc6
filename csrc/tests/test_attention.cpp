// Paged KV cache writes and decode attention against naive loops.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../kernels/attention.h"
#include "../kernels/dtypes.h"
#include "harness.h"

namespace {

// A tiny paged cache: num_pages x page_size x kv_heads x head_dim.
struct Cache {
  int64_t num_pages, page_size, kv_heads, head_dim;
  std::vector<float> k, v;
  float* row(std::vector<float>& c, int64_t page, int64_t off, int64_t h) {
    return c.data() + ((page * page_size + off) * kv_heads + h) * head_dim;
  }
};

// Naive double-precision attention of one query head over a block table.
std::vector<double> naive_decode(Cache& c, const float* q, const int32_t* table, int64_t len,
                                 int64_t kv_head, float scale) {
  std::vector<double> scores(len), out(c.head_dim, 0.0);
  for (int64_t t = 0; t < len; ++t) {
    const float* k = c.row(c.k, table[t / c.page_size], t % c.page_size, kv_head);
    double s = 0;
    for (int64_t i = 0; i < c.head_dim; ++i) s += double(q[i]) * k[i];
    scores[t] = s * scale;
  }
  const double mx = len ? *std::max_element(scores.begin(), scores.end()) : 0;
  double total = 0;
  for (auto& s : scores) total += (s = std::exp(s - mx));
  for (int64_t t = 0; t < len; ++t) {
    const float* v = c.row(c.v, table[t / c.page_size], t % c.page_size, kv_head);
    for (int64_t i = 0; i < c.head_dim; ++i) out[i] += scores[t] / total * v[i];
  }
  return out;
}

}  // namespace

PYVLM_KERNEL_TEST(reshape_and_cache_strided_and_negative_slots) {
  const int64_t tokens = 4, kv_heads = 2, d = 5, token_stride = 3 * kv_heads * d;
  auto fused = pyvlm_test::random_floats(tokens * token_stride);
  Cache c{3, 2, kv_heads, d, pyvlm_test::random_floats(3 * 2 * kv_heads * d),
          pyvlm_test::random_floats(3 * 2 * kv_heads * d)};
  const auto k_before = c.k;
  const std::vector<int64_t> slots = {5, -1, 0, 3};
  const pyvlm::CacheWriteArgs<float> args{fused.data() + kv_heads * d,
                                          fused.data() + 2 * kv_heads * d,
                                          c.k.data(), c.v.data(), slots.data(), token_stride, d,
                                          token_stride, d, kv_heads, d, 6};
  pyvlm::reshape_and_cache(args, 0, tokens);
  std::vector<float> expect = k_before;
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    for (int64_t i = 0; i < kv_heads * d; ++i)
      expect[slots[t] * kv_heads * d + i] = fused[t * token_stride + kv_heads * d + i];
  }
  EXPECT_TRUE(c.k == expect);
  EXPECT_TRUE(c.v[5 * kv_heads * d] == fused[2 * kv_heads * d]);
}

PYVLM_KERNEL_TEST(paged_attention_decode_gqa_float) {
  const int64_t seqs = 3, heads = 4, kv_heads = 2, d = 12, page_size = 3, max_pages = 4;
  Cache c{10, page_size, kv_heads, d, pyvlm_test::random_floats(10 * page_size * kv_heads * d),
          pyvlm_test::random_floats(10 * page_size * kv_heads * d)};
  const std::vector<int32_t> table = {7, 2, 9, 0, 1, 3, -5, -5, 4, 8, 6, 5};
  const std::vector<int32_t> lens = {10, 6, 0};
  auto query = pyvlm_test::random_floats(seqs * heads * d);
  std::vector<float> out(seqs * heads * d, NAN);
  const float scale = 0.4f;
  const pyvlm::PagedDecodeArgs<float> args{out.data(), query.data(), c.k.data(), c.v.data(),
                                           table.data(), lens.data(), heads * d, d, max_pages,
                                           seqs, heads, kv_heads, d, 10, page_size, max_pages,
                                           scale};
  pyvlm::paged_attention_decode(args, 0, seqs * kv_heads);
  std::vector<double> ref;
  for (int64_t s = 0; s < seqs; ++s)
    for (int64_t h = 0; h < heads; ++h) {
      auto o = naive_decode(c, query.data() + (s * heads + h) * d, table.data() + s * max_pages,
                            lens[s], h / (heads / kv_heads), scale);
      ref.insert(ref.end(), o.begin(), o.end());
    }
  EXPECT_NEAR_REL(out, ref, 1e-5);
}

PYVLM_KERNEL_TEST(paged_attention_decode_bf16_long) {
  const int64_t heads = 2, kv_heads = 1, d = 64, page_size = 16, pages = 20;
  const int64_t len = page_size * pages - 7;
  Cache c{pages, page_size, kv_heads, d, pyvlm_test::random_floats(pages * page_size * d),
          pyvlm_test::random_floats(pages * page_size * d)};
  std::vector<pyvlm::bf16_t> kb(c.k.size()), vb(c.v.size());
  for (size_t i = 0; i < kb.size(); ++i) {
    kb[i] = pyvlm::from_float<pyvlm::bf16_t>(c.k[i]);
    vb[i] = pyvlm::from_float<pyvlm::bf16_t>(c.v[i]);
    c.k[i] = pyvlm::to_float(kb[i]);  // the reference sees the rounded cache
    c.v[i] = pyvlm::to_float(vb[i]);
  }
  std::vector<int32_t> table(pages);
  std::iota(table.rbegin(), table.rend(), 0);
  const std::vector<int32_t> lens = {int32_t(len)};
  auto qf = pyvlm_test::random_floats(heads * d);
  std::vector<pyvlm::bf16_t> q(qf.size()), out(qf.size());
  for (size_t i = 0; i < q.size(); ++i) {
    q[i] = pyvlm::from_float<pyvlm::bf16_t>(qf[i]);
    qf[i] = pyvlm::to_float(q[i]);
  }
  const pyvlm::PagedDecodeArgs<pyvlm::bf16_t> args{
      out.data(), q.data(), kb.data(), vb.data(), table.data(), lens.data(), heads * d, d, pages,
      1, heads, kv_heads, d, pages, page_size, pages, 0.125f};
  pyvlm::paged_attention_decode(args, 0, kv_heads);
  std::vector<double> ref;
  for (int64_t h = 0; h < heads; ++h) {
    auto o = naive_decode(c, qf.data() + h * d, table.data(), len, 0, 0.125f);
    ref.insert(ref.end(), o.begin(), o.end());
  }
  std::vector<float> got(out.size());
  for (size_t i = 0; i < out.size(); ++i) got[i] = pyvlm::to_float(out[i]);
  EXPECT_NEAR_REL(got, ref, 1e-2);
}
