// Every op schema of the pyvlm extension, in one place.
//
// Implementations register per device next to their adapters:
// TORCH_LIBRARY_IMPL(pyvlm, CPU, m) in csrc/cpu/*.cpp and
// TORCH_LIBRARY_IMPL(pyvlm, CUDA, m) in csrc/cuda/*.cu.
// Conventions: outputs are preallocated by the caller and passed first as
// `Tensor(a!) out` (so the Python wrappers and the tests own allocation and
// poisoning); every tensor an op writes is marked with an alias annotation.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pyvlm, m) {
  // ---- KV cache and attention -------------------------------------------
  // key/value: [num_tokens, num_kv_heads, head_dim]; caches:
  // [num_pages, page_size, num_kv_heads, head_dim]; slot_mapping: int64
  // [num_tokens], slot = page * page_size + offset, negative = skip.
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
  // out/query: [num_seqs, num_heads, head_dim]; block_tables: int32
  // [num_seqs, max_pages_per_seq]; seq_lens: int32 [num_seqs].
  m.def(
      "paged_attention_decode(Tensor(a!) out, Tensor query, Tensor key_cache, "
      "Tensor value_cache, Tensor block_tables, Tensor seq_lens, float scale) "
      "-> ()");
  // out/query: [num_new_tokens, num_heads, head_dim] packed by cu_seqlens_q
  // (int32 [num_seqs + 1]); the new tokens' K/V are already in the cache after
  // prefix_lens[s] (int32 [num_seqs]) cached tokens; causal over the new span.
  m.def(
      "paged_attention_prefill(Tensor(a!) out, Tensor query, Tensor key_cache, "
      "Tensor value_cache, Tensor block_tables, Tensor cu_seqlens_q, "
      "Tensor prefix_lens, int max_seqlen_q, float scale) -> ()");
  // Non-causal, block-diagonal attention over packed sequences.
  // query/out: [total_q, num_heads, head_dim]; key/value: [total_k,
  // num_kv_heads, head_dim]; cu_seqlens_*: int32 [num_seqs + 1].
  m.def(
      "varlen_attention(Tensor(a!) out, Tensor query, Tensor key, Tensor value, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float scale) -> ()");

  // ---- Multimodal ----------------------------------------------------------
  // inputs_embeds[positions[i]] = mm_embeds[i]; positions: int64 [num_mm].
  m.def(
      "merge_multimodal_embeddings(Tensor(a!) inputs_embeds, Tensor mm_embeds, "
      "Tensor positions) -> ()");
  // out: [num_entries, 3, H, W]. Entry j takes images[source_index[j]]
  // (uint8 [h, w, 3]), resizes it to resize_hw[2j:2j+2] with Pillow's
  // algorithm (resample: PIL constant, 2 bilinear, 3 bicubic), crops the
  // H x W window at crop_tl[2j:2j+2] (outside the image: fill), then
  // computes (pixel * rescale_factor - mean[c]) / std[c].
  m.def(
      "preprocess_images(Tensor(a!) out, Tensor[] images, int[] source_index, "
      "int[] resize_hw, int[] crop_tl, int resample, float rescale_factor, "
      "float[] mean, float[] std, int[] fill) -> ()");
  // Qwen2-VL layout: out [sum_i (h_i/p)*(w_i/p), 3 * temporal_patch_size * p * p];
  // each image is one temporal group (the frame repeated), patches in 2x2
  // (merge_size) merge order.
  m.def(
      "preprocess_images_patchify(Tensor(a!) out, Tensor[] images, "
      "int[] resize_hw, int resample, float rescale_factor, float[] mean, "
      "float[] std, int patch_size, int temporal_patch_size, int merge_size) "
      "-> ()");

  // ---- Sampling -----------------------------------------------------------
  // logits: [batch, vocab]; per-row temperatures (0 = greedy), top_ks
  // (int32, <= 0 = off), top_ps, min_ps (float32), seeds and steps (int64,
  // the counter-based RNG key). out_tokens int64 [batch]; out_logprobs
  // float32 [batch] (log-softmax of the logits as given); out_top_ids int64
  // and out_top_logprobs float32 [batch, num_top] (num_top may be 0).
  m.def(
      "sample(Tensor(a!) out_tokens, Tensor(b!) out_logprobs, "
      "Tensor(c!) out_top_ids, Tensor(d!) out_top_logprobs, Tensor logits, "
      "Tensor temperatures, Tensor top_ks, Tensor top_ps, Tensor min_ps, "
      "Tensor seeds, Tensor steps) -> ()");
  // Per row (CSR over rows): token_ids int64 [nnz] (unique within a row) with
  // output_counts int32 [nnz] (0 = seen only in the prompt); penalties float32
  // [batch]; logit bias as a second CSR (bias_token_ids, bias_values).
  m.def(
      "apply_penalties(Tensor(a!) logits, Tensor token_ids, "
      "Tensor output_counts, Tensor cu_token_rows, Tensor presence_penalties, "
      "Tensor frequency_penalties, Tensor repetition_penalties, "
      "Tensor bias_token_ids, Tensor bias_values, Tensor cu_bias_rows) -> ()");

  // ---- Layers ---------------------------------------------------------------
  m.def(
      "rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float epsilon) "
      "-> ()");
  // residual += input; input = rms_norm(residual) * weight.
  m.def(
      "fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, "
      "Tensor weight, float epsilon) -> ()");
  // nn.LayerNorm over the last dimension (float32 mean and biased variance
  // of each row), scaled by weight and shifted by bias (None: no bias).
  m.def(
      "layer_norm(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias, "
      "float epsilon) -> ()");
  // residual += input (rounded to the dtype); input = layer_norm(residual).
  m.def(
      "fused_add_layer_norm(Tensor(a!) input, Tensor(b!) residual, "
      "Tensor weight, Tensor? bias, float epsilon) -> ()");
  // query: [num_tokens, num_heads * head_size] or [num_tokens, num_heads,
  // head_size]; key likewise; cos_sin_cache: [max_position, rotary_dim]
  // (cos half, then sin half); positions int64 [num_tokens].
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, "
      "int head_size, Tensor cos_sin_cache, bool is_neox) -> ()");
  // Qwen2-VL multimodal rotary: positions int64 [3, num_tokens] (t, h, w);
  // mrope_section sums to rotary_dim / 2.
  m.def(
      "mrope(Tensor positions, Tensor(a!) query, Tensor(b!) key, int head_size, "
      "Tensor cos_sin_cache, int[] mrope_section, bool is_neox) -> ()");
  // input: [..., 2 * d] -> out: [..., d] = act(input[..., :d]) * input[..., d:].
  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  m.def("gelu_and_mul(Tensor(a!) out, Tensor input, str approximate) -> ()");
  // out = input * sigmoid(1.702 * input) (QuickGELU), each step rounded to the
  // dtype as transformers' eager QuickGELUActivation; out has input's shape.
  m.def("quick_gelu(Tensor(a!) out, Tensor input) -> ()");

  // ---- Linear layers for a few tokens ---------------------------------------
  // out [num_tokens, out_features] (input's dtype, or float32 for logits) =
  // input [num_tokens, in_features] (each row contiguous) x weight^T + bias
  // (weight contiguous [out_features, in_features]). Bound by reading the
  // weight once; for decode steps of up to a few tokens (see
  // pyvlm.layers.linear for where the engine prefers it to the BLAS).
  m.def(
      "skinny_gemm(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias) "
      "-> ()");

  // ---- Settings ---------------------------------------------------------------
  // Whether the CUDA adapters range-check index tensors on the calling thread
  // (one device-to-host sync per check; CPU adapters always check). Each
  // thread starts from PYVLM_CHECK_INDICES ("0" = off); see checks.h.
  // set_index_checks returns the thread's previous value.
  m.def("set_index_checks(bool enabled) -> bool");
  m.def("index_checks_enabled() -> bool");

  // ---- Streams ------------------------------------------------------------------
  // A new stream of CUDA device `device` confined to at least num_sms of its
  // SMs (a green context; CUDA builds only), at the given stream priority.
  // Returns [the cudaStream_t as an integer, the SMs granted]; the stream and
  // its context live as long as the process.
  m.def("green_context_stream(int device, int num_sms, int priority) -> int[]");
}

// `import pyvlm._C` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr,
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
