"""The mllama cross-attention decoder layer over image K/V kept in the
paged pool equals transformers' MllamaCrossAttentionDecoderLayer with the
mask transformers' processor builds: text before the first image (which
attends to every row, padding tiles included), runs of consecutive images,
separate images, a prefill in chunks and a decode step (generated tokens
attend as the prompt's last token); the paged decode path and the gathered
path both."""

import pytest
import torch

from pyvlm.layers.attention import AttentionMetadata
from pyvlm.models.mllama_cross_attention import MllamaCrossAttentionDecoderLayer
from pyvlm.models.mllama_cross_inputs import build_cross_attention_inputs
from pyvlm.models.weight_loading import load_weights
from pyvlm.multimodal.mllama_masks import spans_from_offsets
from pyvlm.runner.kv_pool import KVPool, KVShape
from pyvlm.scheduling.types import CrossImage, MultimodalItem, SamplingParams, SequenceChunk

hf_mllama = pytest.importorskip("transformers.models.mllama.modeling_mllama",
                                reason="transformers is the reference")
from transformers import MllamaTextConfig  # noqa: E402
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

MAX_TILES, PATCHES, HIDDEN, IMAGE = 4, 6, 64, 99
PAGE_SIZE = 4
PROMPTS = {  # token ids (IMAGE marks an image) and each image's real tiles
    "run_of_two": ([5, 6, 7, IMAGE, IMAGE, 8, 9, 10, 11], [2, 1]),
    "separate": ([5, 6, IMAGE, 7, 8, 9, IMAGE, 10, 11, 12], [4, 3]),
    "image_first": ([IMAGE, 7, 8, 9], [3]),
}


def _hf_layer():
    config = MllamaTextConfig(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128, num_hidden_layers=2,
                              cross_attention_layers=[1], vocab_size=128, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    layer = hf_mllama.MllamaCrossAttentionDecoderLayer(config, layer_idx=1).eval()
    with torch.no_grad():
        # every parameter perturbed: the gates init to 0 (tanh 0 would hide the blocks)
        for param in layer.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        for gate in (layer.cross_attn_attn_gate, layer.cross_attn_mlp_gate):
            gate.add_(torch.randn(1).sign() * (0.5 + torch.rand(1)))
    return config, layer


def _expected(layer, prompt, num_tiles, hidden, states):
    """transformers' layer over prompt + one generated token (its mask row
    repeats the prompt's last, as generate does)."""
    sparse = get_cross_attention_token_mask(prompt, IMAGE)
    dense = convert_sparse_cross_attention_mask_to_dense([sparse], [num_tiles], MAX_TILES,
                                                          len(prompt))
    dense = torch.tensor(dense)
    dense = torch.cat([dense, dense[:, -1:]], dim=1).float()
    additive, row_kept = hf_mllama._prepare_cross_attention_mask(
        dense, num_vision_tokens=PATCHES, dtype=torch.float32)
    with torch.no_grad():
        return layer(hidden[None], states.reshape(1, -1, HIDDEN), additive, None, row_kept)[0]


class Step:
    """Our layer driven as the engine drives it: a KV pool whose pages hold
    the images' K/V, one chunk per step."""

    def __init__(self, layer, prompt, num_tiles, states, device="cpu"):
        self.layer, self.prompt, self.device = layer, prompt, device
        shape = KVShape(2, 2, HIDDEN // 4, torch.float32, cross_layers=(1,))
        self.pool = KVPool(shape, 64, PAGE_SIZE, torch.device(device))
        offsets = [i for i, token in enumerate(prompt) if token == IMAGE]
        spans = spans_from_offsets(offsets)
        rows_per_page = self.pool.image_rows_per_page
        self.images, next_page = [], 10
        per_image = states.view(len(num_tiles), MAX_TILES * PATCHES, HIDDEN)
        self.states = {}
        for index, (offset, tiles, span) in enumerate(zip(offsets, num_tiles, spans)):
            item = MultimodalItem(1000 + index, offset, 1, num_cross_rows=tiles * PATCHES,
                                  cross_span=(span.start, span.end))
            num_pages = -(-item.num_cross_rows // rows_per_page)
            # pages out of order, as a used pool hands them out
            pages = tuple(range(next_page + num_pages - 1, next_page - 1, -1))
            next_page += num_pages + 1
            self.images.append(CrossImage(item, pages, needs_write=True))
            self.states[item.hash] = per_image[index].to(device)
        self.num_encoded = 0

    def encode(self, items):
        self.num_encoded += len(items)
        return {item.hash: self.states[item.hash] for item in items}

    def run(self, hidden, start, is_decode, needs_write):
        images = [CrossImage(i.item, i.pages, needs_write) for i in self.images]
        chunk = SequenceChunk("r", [0] * hidden.shape[0], start, [[]], [], [], True,
                              SamplingParams(), 0, 0, prompt_ids=self.prompt,
                              cross_images=images)
        cross = build_cross_attention_inputs([chunk], self.pool, self.encode, is_decode,
                                              self.device, torch.float32,
                                              lambda item: MAX_TILES * PATCHES)
        attn = AttentionMetadata(is_decode, torch.zeros(0), torch.zeros(0),
                                 cross_attention=cross)
        with torch.no_grad():
            out, residual = self.layer(None, hidden.to(self.device), None,
                                       self.pool.caches[1], attn)
        return (out + residual).cpu(), cross


@pytest.mark.parametrize("name", PROMPTS)
@pytest.mark.parametrize("chunk_size", [100, 3])
@pytest.mark.parametrize("folded", [False, True], ids=["gates", "gates_in_weights"])
def test_prefill_and_decode_match_transformers(name, chunk_size, folded):
    check_against_transformers(name, chunk_size, "cpu", folded)


@pytest.mark.parametrize("name", PROMPTS)
def test_gathered_keys_split_in_chunks_match_transformers(name, monkeypatch):
    """The gathered path with its keys cut in chunks (as on CUDA, where
    FlashAttention runs it; here a float64 attention that returns its
    log-sum-exp stands in): still transformers' output."""
    from pyvlm.layers import split_key_attention as split
    from pyvlm.models import mllama_cross_inputs

    monkeypatch.setattr(split, "MIN_KEYS_PER_SPLIT", 3)  # 6-24 image rows: 2-8 chunks
    monkeypatch.setattr(mllama_cross_inputs, "takes_torch_flash", lambda *args: True)
    calls = []

    def split_attention(query, key, value, splits, scale):
        calls.append(splits.num_splits)
        return split.split_key_attention(query, key, value, splits, scale,
                                         attend=grouped_reference)

    monkeypatch.setattr(mllama_cross_inputs, "split_key_attention", split_attention)
    check_against_transformers(name, 100, "cpu", folded=True)
    assert calls and all(n >= 2 for n in calls)


def grouped_reference(query, key, value, *args):
    """reference_attention_with_lse with each key/value head serving its
    group of query heads."""
    from tests.layers.test_split_key_attention import reference_attention_with_lse

    group = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(group, dim=1) for t in (key, value))
    return reference_attention_with_lse(query, key, value, *args)


@pytest.mark.cuda
@pytest.mark.parametrize("name", PROMPTS)
@pytest.mark.parametrize("chunk_size", [100, 3])
@pytest.mark.parametrize("folded", [False, True], ids=["gates", "gates_in_weights"])
def test_cuda_prefill_and_decode_match_transformers(name, chunk_size, folded):
    """The CUDA kernels (paged decode, varlen, cache writes) on the same
    inputs, against transformers' float32 layer on the CPU."""
    check_against_transformers(name, chunk_size, "cuda", folded)


def check_against_transformers(name, chunk_size, device, folded):
    """folded: the gates folded into o_proj and down_proj, as the loader
    leaves a model (after_weights_loaded), or applied in the forward."""
    prompt, num_tiles = PROMPTS[name]
    config, reference = _hf_layer()
    ours = MllamaCrossAttentionDecoderLayer.from_config(config).to(device)
    load_weights(ours, reference.state_dict().items(), rename=lambda name: name)
    if folded:
        ours.after_weights_loaded()
    hidden = torch.randn(len(prompt) + 1, HIDDEN)
    states = torch.randn(len(num_tiles) * MAX_TILES * PATCHES, HIDDEN)
    expected = _expected(reference, prompt, num_tiles, hidden, states)

    step = Step(ours, prompt, num_tiles, states, device)
    got = []
    for start in range(0, len(prompt), chunk_size):
        end = min(start + chunk_size, len(prompt))
        out, _ = step.run(hidden[start:end], start, False, needs_write=start == 0)
        got.append(out)
    decoded, cross = step.run(hidden[-1:], len(prompt), True, needs_write=False)
    torch.testing.assert_close(torch.cat(got), expected[:-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded, expected[-1:], rtol=1e-5, atol=1e-5)
    # the decode step reads the pool only: one image through the decode
    # kernel, a run of two through the gathered keys
    assert cross.image_states is None
    single = name != "run_of_two"
    assert (cross.paged is not None) == single and (cross.gathered is None) == single
    # one token reading one image: the kernel's output is the whole output
    assert not single or cross.paged.every_token


def test_folding_the_gates_twice_folds_them_once():
    config, reference = _hf_layer()
    layer = MllamaCrossAttentionDecoderLayer.from_config(config)
    load_weights(layer, reference.state_dict().items(), rename=lambda name: name)
    layer.after_weights_loaded()
    folded = layer.cross_attn.o_proj.weight.clone()
    layer.after_weights_loaded()
    assert torch.equal(layer.cross_attn.o_proj.weight, folded)
    gate = reference.cross_attn_attn_gate.tanh()
    torch.testing.assert_close(folded, gate * reference.cross_attn.o_proj.weight)


def test_a_step_without_images_passes_the_layer_through():
    config, _ = _hf_layer()
    layer = MllamaCrossAttentionDecoderLayer.from_config(config)
    hidden, residual = torch.randn(5, HIDDEN), torch.randn(5, HIDDEN)
    attn = AttentionMetadata(False, torch.zeros(0), torch.zeros(0))
    out, out_residual = layer(None, hidden, residual, None, attn)
    assert out is hidden and out_residual is residual


@pytest.mark.parametrize("folded", [False, True], ids=["gates", "gates_in_weights"])
def test_text_only_tokens_beside_image_tokens_are_left_unchanged(folded):
    """A request without images in a step with images: the layer adds
    exactly nothing to its tokens (transformers skips the layer for it)."""
    config, reference = _hf_layer()
    ours = MllamaCrossAttentionDecoderLayer.from_config(config)
    load_weights(ours, reference.state_dict().items(), rename=lambda name: name)
    if folded:
        ours.after_weights_loaded()
    prompt, num_tiles = PROMPTS["separate"]
    step = Step(ours, prompt, num_tiles, torch.randn(2 * MAX_TILES * PATCHES, HIDDEN))
    images = [CrossImage(i.item, i.pages, True) for i in step.images]
    with_images = SequenceChunk("a", [0] * len(prompt), 0, [[]], [], [], True, SamplingParams(),
                                0, 0, prompt_ids=prompt, cross_images=images)
    text_only = SequenceChunk("b", [0] * 4, 0, [[]], [], [], True, SamplingParams(), 0, 0,
                              prompt_ids=[1, 2, 3, 4])
    cross = build_cross_attention_inputs([with_images, text_only], step.pool, step.encode, False,
                                         "cpu", torch.float32, lambda item: MAX_TILES * PATCHES)
    attn = AttentionMetadata(False, torch.zeros(0), torch.zeros(0), cross_attention=cross)
    hidden = torch.randn(len(prompt) + 4, HIDDEN)
    residual = torch.randn(len(prompt) + 4, HIDDEN)
    with torch.no_grad():
        out, out_residual = ours(None, hidden.clone(), residual.clone(), step.pool.caches[1], attn)
    text_rows = slice(len(prompt), None)
    assert torch.equal(out[text_rows] + out_residual[text_rows],
                       hidden[text_rows] + residual[text_rows])
    assert not torch.equal(out[:len(prompt)], torch.zeros_like(out[:len(prompt)]))
