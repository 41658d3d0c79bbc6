// Prefill attention kernels against a naive double-precision softmax loop.
#include <cmath>
#include <vector>

#include "../kernels/dtypes.h"
#include "../kernels/prefill.h"
#include "harness.h"

namespace {

// out[t][h] for query t of a sequence whose keys are k/v rows [0, limit(t)).
template <typename Limit>
void naive_attention(const std::vector<float>& q, const std::vector<float>& k,
                     const std::vector<float>& v, int64_t num_q, int64_t heads, int64_t kv_heads,
                     int64_t d, float scale, const Limit& limit, std::vector<double>& out) {
  const int64_t group = heads / kv_heads;
  for (int64_t t = 0; t < num_q; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t n = limit(t), kvh = h / group;
      std::vector<double> p(n);
      double mx = -INFINITY, sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t i = 0; i < d; ++i) s += double(q[(t * heads + h) * d + i]) * k[(j * kv_heads + kvh) * d + i];
        p[j] = s * scale;
        mx = std::max(mx, p[j]);
      }
      for (auto& x : p) sum += (x = std::exp(x - mx));
      for (int64_t i = 0; i < d; ++i) {
        double acc = 0;
        for (int64_t j = 0; j < n; ++j) acc += p[j] * v[(j * kv_heads + kvh) * d + i];
        out[(t * heads + h) * d + i] = n > 0 ? acc / sum : 0.0;
      }
    }
}

}  // namespace

// One sequence: 5 cached tokens + 7 new ones, page size 4, pages shuffled.
PYVLM_KERNEL_TEST(paged_attention_prefill_float) {
  const int64_t heads = 4, kv_heads = 2, d = 12, page_size = 4, prefix = 5, num_q = 7;
  const int64_t total = prefix + num_q, num_pages = 4;
  const std::vector<int32_t> table = {2, 0, 3, 1};
  auto q = pyvlm_test::random_floats(num_q * heads * d);
  auto k = pyvlm_test::random_floats(total * kv_heads * d);
  auto v = pyvlm_test::random_floats(total * kv_heads * d);
  std::vector<float> kc(num_pages * page_size * kv_heads * d), vc(kc.size());
  for (int64_t p = 0; p < total; ++p)
    for (int64_t i = 0; i < kv_heads * d; ++i) {
      const int64_t slot = table[p / page_size] * page_size + p % page_size;
      kc[slot * kv_heads * d + i] = k[p * kv_heads * d + i];
      vc[slot * kv_heads * d + i] = v[p * kv_heads * d + i];
    }
  const std::vector<int32_t> cu = {0, int32_t(num_q)}, prefixes = {int32_t(prefix)};
  const pyvlm::AttentionDims dims{heads, kv_heads, d, 0.3f};
  std::vector<float> out(q.size(), NAN);
  pyvlm::PagedPrefillArgs<float> args{out.data(), q.data(), heads * d, d, kc.data(), vc.data(),
                                      table.data(), num_pages, page_size, cu.data(),
                                      prefixes.data(), 1, dims};
  std::vector<int64_t> cu_blocks(2);
  pyvlm::attention_block_offsets(cu.data(), 1, pyvlm::attention_queries_per_block(dims),
                                 cu_blocks.data());
  pyvlm::paged_attention_prefill(args, cu_blocks.data(), 0, cu_blocks[1] * kv_heads);
  std::vector<double> ref(q.size());
  naive_attention(q, k, v, num_q, heads, kv_heads, d, 0.3f,
                  [&](int64_t t) { return prefix + t + 1; }, ref);
  EXPECT_NEAR_REL(out, ref, 1e-5);
}

// Two sequences (3 queries x 70 keys, 40 queries x 2 keys), bf16.
PYVLM_KERNEL_TEST(varlen_attention_bf16) {
  const int64_t heads = 2, kv_heads = 1, d = 16;
  const std::vector<int32_t> cu_q = {0, 3, 43}, cu_k = {0, 70, 72};
  auto to_bf16 = [](std::vector<float>& x) {
    std::vector<pyvlm::bf16_t> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = pyvlm::to_float(y[i] = pyvlm::from_float<pyvlm::bf16_t>(x[i]));
    return y;
  };
  auto q = pyvlm_test::random_floats(43 * heads * d);
  auto k = pyvlm_test::random_floats(72 * kv_heads * d);
  auto v = pyvlm_test::random_floats(72 * kv_heads * d);
  const auto qb = to_bf16(q), kb = to_bf16(k), vb = to_bf16(v);
  std::vector<pyvlm::bf16_t> out(q.size());
  const pyvlm::AttentionDims dims{heads, kv_heads, d, 0.25f};
  pyvlm::VarlenArgs<pyvlm::bf16_t> args{out.data(), qb.data(), heads * d, d, kb.data(),
                                        kv_heads * d, d, vb.data(), kv_heads * d, d,
                                        cu_q.data(), cu_k.data(), 2, dims};
  std::vector<int64_t> cu_blocks(3);
  pyvlm::attention_block_offsets(cu_q.data(), 2, pyvlm::attention_queries_per_block(dims),
                                 cu_blocks.data());
  pyvlm::varlen_attention(args, cu_blocks.data(), 0, cu_blocks[2] * kv_heads);
  std::vector<double> ref(q.size());
  for (int s = 0; s < 2; ++s) {
    const int64_t nq = cu_q[s + 1] - cu_q[s], nk = cu_k[s + 1] - cu_k[s];
    std::vector<float> qs(q.begin() + cu_q[s] * heads * d, q.begin() + cu_q[s + 1] * heads * d);
    std::vector<float> ks(k.begin() + cu_k[s] * d, k.begin() + cu_k[s + 1] * d);
    std::vector<float> vs(v.begin() + cu_k[s] * d, v.begin() + cu_k[s + 1] * d);
    std::vector<double> part(qs.size());
    naive_attention(qs, ks, vs, nq, heads, kv_heads, d, 0.25f, [&](int64_t) { return nk; }, part);
    std::copy(part.begin(), part.end(), ref.begin() + cu_q[s] * heads * d);
  }
  std::vector<float> got(out.size());
  for (size_t i = 0; i < out.size(); ++i) got[i] = pyvlm::to_float(out[i]);
  EXPECT_NEAR_REL(got, ref, 1e-2);
}
