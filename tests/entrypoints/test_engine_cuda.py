"""The engine on a GPU: the same greedy tokens as transformers (float32, tiny
checkpoints of LLaVA-OneVision and Qwen2-VL / Qwen2.5-VL), chunked prefill
and prefix-cache hits included; bfloat16 log
probabilities within bfloat16 rounding of transformers' float32 ones; and
the engine thread's index-check setting never reaches the caller's thread."""

import pytest
import torch

from pyvlm import ops
from pyvlm.scheduling.types import SamplingParams
from tests.entrypoints.test_engine_parity import (GREEDY, NUM_NEW_TOKENS, Reference,
                                                  assert_same_tokens, engine_for, generate_all,
                                                  make_prompts)
from tests.entrypoints.logprob_parity import assert_logprobs_near, teacher_forced_logprobs
from tests.hf_reference import (LlavaInputs, LlavaNextInputs, MllamaInputs, MllamaPyvlmTiles,
                                PyvlmLlavaPixels, Qwen2VLInputs, pyvlm_pixels)
from tests.tiny_models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID

pytestmark = pytest.mark.cuda

# Largest |bfloat16 engine - float32 transformers| log-probability allowed.
# The logits themselves are rounded to bfloat16 (8 significant bits). Measured
# with the CPU kernels in bfloat16 (check_bfloat16_logprobs(..., "cpu"), both
# tiny backbones, prompt seeds 3-5): worst 0.075; the greedy token was never
# more than 0.034 below transformers' best. Swapping each image for its
# negative moves some log-probability of every image prompt by 0.96 or more.
BF16_LOGPROB_TOLERANCE = 0.25
NUM_TOP_LOGPROBS = 20
# The engine must not emit image placeholders: teacher-forcing one would ask
# transformers for an image that is not there. Both sides get this bias.
NO_PLACEHOLDERS = {IMAGE_TOKEN_ID: -100.0, VIDEO_TOKEN_ID: -100.0}


def hf_float32(checkpoint, device):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        checkpoint, dtype=torch.float32).to(device).eval()


@pytest.fixture(scope="module", autouse=True)
def full_float32_reference():
    """transformers' float32 reference in full float32: cuDNN convolutions
    (the Qwen2-VL patch embedding) default to TF32, whose 1e-3 rounding
    flips near-tied greedy choices; pyvlm's patch embedding is a matmul."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module", params=["qwen2", "qwen2_vl", "qwen2_5_vl", "mllama", "llava",
                                        "llava_next_mistral"])
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


@pytest.fixture(scope="module")
def hf_model_cuda(checkpoint):
    return hf_float32(checkpoint, "cuda")


@pytest.mark.parametrize("server_args", [
    {}, {"chunked_prefill_size": 16},
    {"chunked_prefill_size": 16, "vision_side_stream": True},  # the tower beside the steps
    # waiting requests' images encoded ahead on the side stream, read by a later step
    {"max_running_requests": 2, "vision_side_stream": True, "vision_encode_ahead": True}])
def test_cuda_engine_matches_transformers(checkpoint, hf_model_cuda, server_args):
    with engine_for(checkpoint, device="cuda", max_total_tokens=8192,
                    **server_args) as engine:
        reference = Reference(hf_model_cuda, engine)
        if isinstance(reference.image_inputs, Qwen2VLInputs):
            # The GPU image's Pillow (12.3) resamples some pixels unlike the
            # Pillow CI checks pyvlm's kernel against (13.0): transformers
            # gets pyvlm's CPU pixel rows, so this compares the GPU compute.
            reference.image_inputs.image_processor = pyvlm_pixels(engine.builder.images.processor)
        if isinstance(reference.image_inputs, MllamaInputs):  # the same, for mllama's tiles
            reference.image_inputs.image_processor = MllamaPyvlmTiles(
                engine.builder.images.processor)
        if isinstance(reference.image_inputs, (LlavaInputs, LlavaNextInputs)):  # and CLIP's
            reference.image_inputs = PyvlmLlavaPixels(engine)
        prompts = make_prompts(seed=1, image=engine.builder.image_token)
        first = generate_all(engine, prompts)
        again = generate_all(engine, prompts)  # every prompt now hits the prefix cache
    assert_same_tokens(first, prompts, reference)
    assert_same_tokens(again, prompts, reference)
    assert all(r["meta_info"]["cached_tokens"] > 0 for r in again)


def check_bfloat16_logprobs(checkpoint, device, tolerance=BF16_LOGPROB_TOLERANCE):
    """The engine in bfloat16 on `device` against transformers in float32 on
    the CPU, teacher-forced on the engine's own tokens (logprob_parity.py)."""
    params = {**GREEDY, "logprobs": True, "top_logprobs": NUM_TOP_LOGPROBS,
              "logit_bias": NO_PLACEHOLDERS}
    with engine_for(checkpoint, device=device, dtype="bfloat16", max_total_tokens=8192) as engine:
        prompts = make_prompts(seed=3, image=engine.builder.image_token)
        results = engine.generate([p for p, _ in prompts], params,
                                  image_data=[ims for _, ims in prompts])
        reference = Reference(hf_float32(checkpoint, "cpu"), engine)
    for (prompt, images), result in zip(prompts, results):
        assert len(result["output_ids"]) == NUM_NEW_TOKENS
        prompt_ids = reference.builder.from_prompt(prompt, images, SamplingParams()).prompt_ids
        expected = teacher_forced_logprobs(reference.hf_model, reference.image_inputs,
                                           prompt_ids, images, result["output_ids"],
                                           NO_PLACEHOLDERS)
        assert_logprobs_near(result, expected, tolerance, NUM_TOP_LOGPROBS)


def test_cuda_engine_bfloat16_logprobs_match_transformers_float32(tiny_checkpoint_llama):
    check_bfloat16_logprobs(tiny_checkpoint_llama, "cuda")


def test_engine_thread_index_setting_stays_on_the_engine_thread(tiny_checkpoint_qwen2):
    """The engine turns CUDA index checks off for its own steps only: the
    caller's thread still gets an IndexError for a bad index (this failed
    tests/ops/test_attention.py after an engine test, when the setting was a
    process-wide environment variable)."""
    with engine_for(tiny_checkpoint_qwen2, device="cuda", max_total_tokens=8192,
                    engine_process="thread") as engine:  # it reads the runner
        assert engine.state.runner.check_indices is False  # the CUDA default
        result = engine.generate("the cat sat", GREEDY)
        assert len(result["output_ids"]) == NUM_NEW_TOKENS
        assert ops.index_checks_enabled()
        cache = torch.zeros(2, 4, 2, 16, device="cuda")
        table = torch.tensor([[0, 1]], dtype=torch.int32, device="cuda")
        too_long = torch.tensor([9], dtype=torch.int32, device="cuda")  # 2 pages hold 8
        with pytest.raises(IndexError, match="seq_lens values must be in"):
            ops.paged_attention_decode(torch.randn(1, 2, 16, device="cuda"), cache, cache, table,
                                       too_long)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_tower_graphs_give_the_eager_tokens(family, request):
    """The same prompts three times, the caches flushed between: the first
    run's tower calls are eager, the second's capture their keys' graphs,
    the third's replay them; the tokens never change. The prompts go one at
    a time: a batch's requests are submitted while the engine steps, so
    which images share a tower call (the graphs' key) would depend on
    timing, and a key that never recurs is never captured."""
    checkpoint = request.getfixturevalue(f"tiny_checkpoint_{family}")
    with engine_for(checkpoint, device="cuda", max_total_tokens=8192,
                    engine_process="thread", vision_cuda_graphs=8) as engine:
        prompts = make_prompts(seed=2, image=engine.builder.image_token)
        runs = []
        for _ in range(3):
            runs.append([engine.generate(p, GREEDY, image_data=ims)["output_ids"]
                         for p, ims in prompts])
            assert engine.flush_cache()
        graphs = engine.state.runner.model.visual.shape_graphs
        assert graphs.enabled and graphs.num_captures >= 1 and graphs.num_replays >= 1
    assert runs[1] == runs[0] and runs[2] == runs[0]
