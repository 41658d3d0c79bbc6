"""The tiny Llama-3.2-Vision (mllama) checkpoints load in transformers as the
released repository does (same weights as the in-memory models, each
layout's weight names, <|image|> past the LM head), the image path matters
(every gate, every image), and tests/hf_reference.py's MllamaInputs equals
what MllamaProcessor makes, so greedy_tokens and prefill_logits are
transformers' own generate() and forward on the processor's outputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.hf_reference import MllamaInputs, greedy_tokens, prefill_logits, reference_inputs_for
from tests.tiny_mllama import (BOS_ID, CHAT_TEMPLATE, EOS_IDS, EOT_ID, IMAGE_TOKEN,
                               IMAGE_TOKEN_ID, PAD_ID, SPECIAL_TOKENS, START_HEADER_ID,
                               VOCAB_SIZE, hub_weight_name, mllama_processor, tiny_mllama,
                               write_mllama_checkpoint)

# fixture -> (seed, cross_attention_layers, is_hub_style), as tests/conftest.py writes them
CHECKPOINTS = {"tiny_checkpoint_mllama": (0, [1, 3], False),
               "tiny_checkpoint_mllama_one_cross": (1, [2], False),
               "tiny_checkpoint_mllama_hub_style": (2, [1, 3], True)}
IMAGE_TEXT_PROMPT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                     "<|image|>What is in this image?<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.fixture(params=list(CHECKPOINTS))
def checkpoint(request):
    """(directory, seed, cross_attention_layers, is_hub_style)."""
    return (request.getfixturevalue(request.param), *CHECKPOINTS[request.param])


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint_mllama):
    """(model, processor, CheckpointFiles) of the default tiny checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyvlm.models.checkpoint import CheckpointFiles

    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint_mllama,
                                                        dtype=torch.float32).eval()
    return (model, AutoProcessor.from_pretrained(tiny_checkpoint_mllama),
            CheckpointFiles.from_dir(tiny_checkpoint_mllama))


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# 1, 2 (1 x 2) and 4 (2 x 2) tiles of 56 pixels
IMAGES = [random_image(40, 40, 0), random_image(50, 110, 1), random_image(120, 120, 2)]


def weight_names(directory) -> set:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    names = set()
    for shard in set(index["weight_map"].values()):
        with safe_open(str(directory / shard), framework="pt") as handle:
            names |= set(handle.keys())
    assert names == set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # sharded, as the real repository
    return names


@torch.inference_mode()
def logits_of(model, processor, text: str, images) -> torch.Tensor:
    inputs = processor(text=text, images=list(images) or None, return_tensors="pt")
    return model(**inputs).logits[0]


# --- the files ------------------------------------------------------------------

def test_transformers_loads_the_in_memory_weights(checkpoint):
    from transformers import AutoModelForImageTextToText, MllamaForConditionalGeneration

    directory, seed, cross_layers, _ = checkpoint
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
    assert type(model) is MllamaForConditionalGeneration and model.dtype == torch.float32
    assert model.config.text_config.cross_attention_layers == cross_layers
    loaded = model.state_dict()
    expected = tiny_mllama(seed, cross_layers).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_weight_names_follow_the_layout(checkpoint):
    directory, seed, cross_layers, hub_style = checkpoint
    expected = tiny_mllama(seed, cross_layers).state_dict().keys()
    names = weight_names(directory)
    if hub_style:
        assert names == {hub_weight_name(name) for name in expected}
        assert {name.split(".")[0] for name in names} == {
            "vision_model", "language_model", "multi_modal_projector"}
        assert "language_model.lm_head.weight" in names
    else:
        assert names == set(expected)
        assert {".".join(name.split(".")[:2]) for name in names} == {
            "model.vision_model", "model.language_model", "model.multi_modal_projector",
            "lm_head.weight"}
    cross = [f"layers.{i}.cross_attn_attn_gate" for i in cross_layers]
    assert all(any(name.endswith(suffix) for name in names) for suffix in cross)


def test_image_token_lies_past_the_lm_head(checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    directory, seed, cross_layers, _ = checkpoint
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = AutoConfig.from_pretrained(directory)
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    assert tokenizer.decode([IMAGE_TOKEN_ID]) == IMAGE_TOKEN
    assert IMAGE_TOKEN_ID == config.image_token_index == config.text_config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        BOS_ID, EOT_ID, PAD_ID)
    assert config.text_config.eos_token_id == EOS_IDS
    # like the released tokenizer: BOS prepended, <|image|> one token
    ids = tokenizer(f"the cat{IMAGE_TOKEN}{IMAGE_TOKEN} is")["input_ids"]
    assert ids[0] == BOS_ID and ids.count(IMAGE_TOKEN_ID) == 2 and max(ids) == IMAGE_TOKEN_ID
    assert tokenizer.decode(ids[1:], skip_special_tokens=True) == "the cat is"
    model = tiny_mllama(seed, cross_layers)
    assert model.model.language_model.embed_tokens.num_embeddings == VOCAB_SIZE + 8
    assert model.lm_head.out_features == VOCAB_SIZE
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == EOS_IDS and "temperature" not in generation


def test_hub_style_config_is_the_older_form(tiny_checkpoint_mllama_hub_style):
    directory = tiny_checkpoint_mllama_hub_style
    config = json.loads((directory / "config.json").read_text())
    text = config["text_config"]
    assert "rope_parameters" not in text and text["rope_theta"] == 500000.0
    assert text["rope_scaling"]["rope_type"] == "llama3" and text["rope_scaling"]["factor"] == 8.0
    assert config["torch_dtype"] == "float32" and config["transformers_version"].startswith("4.45")
    assert not (directory / "processor_config.json").exists()
    assert json.loads((directory / "chat_template.json").read_text()) == {
        "chat_template": CHAT_TEMPLATE}
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert tokenizer_config["added_tokens_decoder"][str(IMAGE_TOKEN_ID)]["content"] == IMAGE_TOKEN


def test_hub_style_gives_the_logits_of_the_transformers_layout(
        tiny_checkpoint_mllama_hub_style, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    seed, cross_layers, _ = CHECKPOINTS["tiny_checkpoint_mllama_hub_style"]
    same_weights = write_mllama_checkpoint(tmp_path, seed, cross_layers)
    hub = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint_mllama_hub_style).eval()
    ours = AutoModelForImageTextToText.from_pretrained(same_weights).eval()
    assert hub.config.text_config.rope_parameters == ours.config.text_config.rope_parameters
    processor = AutoProcessor.from_pretrained(tiny_checkpoint_mllama_hub_style)
    text = "<|image|>the cat<|image|>What is in this image?"
    expected = logits_of(ours, processor, text, IMAGES[1:])
    assert torch.equal(logits_of(hub, processor, text, IMAGES[1:]), expected)


# --- the image path matters -----------------------------------------------------------

def test_an_image_changes_the_logits_after_it(loaded):
    model, processor, _ = loaded
    text = "<|begin_of_text|>the cat is<|image|>What is in this image?"
    first = logits_of(model, processor, text, [IMAGES[0]])
    assert torch.equal(logits_of(model, processor, text, [IMAGES[0]]), first)
    other = logits_of(model, processor, text, [IMAGES[2]])
    ids = processor(text=text, images=[IMAGES[0]])["input_ids"][0]
    after = ids.index(IMAGE_TOKEN_ID) + 1
    assert ((first[after:] - other[after:]).abs().amax(-1) > 0.1).all()
    with torch.inference_mode():
        text_only = model(input_ids=torch.tensor([ids])).logits[0]
    assert ((first[after:] - text_only[after:]).abs().amax(-1) > 0.1).all()


def test_every_gate_matters():
    """Zeroing any gate (cross-attention: tanh(0) closes the block; vision:
    tile/position embedding gates, global layer gates) changes the logits
    of the tokens after the image."""
    model = tiny_mllama(0)
    processor = mllama_processor()
    text = "<|image|>What is in this image?"
    expected = logits_of(model, processor, text, [IMAGES[1]])
    gates = [name for name, _ in model.named_parameters()
             if name.endswith(("gate", "gate_attn", "gate_ffn"))]
    assert sum("cross_attn" in name for name in gates) == 4
    assert sum("global_transformer" in name for name in gates) == 4
    assert len(gates) == 11  # and the gated position, pre-tile and post-tile embeddings
    for name in gates:
        param = model.get_parameter(name)
        kept = param.detach().clone()
        with torch.no_grad():
            param.zero_()
        changed = (logits_of(model, processor, text, [IMAGES[1]]) - expected).abs().max()
        with torch.no_grad():
            param.copy_(kept)
        assert changed > 1e-2, name


# --- MllamaInputs is the processor's ---------------------------------------------------

# (prompt text, indices into IMAGES): one image, an image first, two images
# apart, and a run of two consecutive image tokens after text
LAYOUTS = {
    "one": ("<|begin_of_text|>the cat<|image|>What is in this image?", [1]),
    "image_first": ("<|image|>If I had to write a haiku for this one", [2]),
    "two_apart": ("<|begin_of_text|><|image|>the cat<|image|>is red", [0, 2]),
    "two_consecutive": ("<|begin_of_text|>a dog<|image|><|image|>and a cat", [2, 1]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mllama_inputs_equal_the_processor(loaded, layout):
    _, processor, files = loaded
    text, indices = LAYOUTS[layout]
    images = [IMAGES[i] for i in indices]
    expected = processor(text=text, images=images, return_tensors="pt")
    prompt_ids = expected["input_ids"][0].tolist()
    inputs = reference_inputs_for(files)
    assert isinstance(inputs, MllamaInputs) and inputs.image_token_id == IMAGE_TOKEN_ID
    got = inputs(prompt_ids, images, torch.device("cpu"), torch.float32)
    assert got.keys() == {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                          "cross_attention_mask"}
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key
    mask = got["cross_attention_mask"][0]
    first = prompt_ids.index(IMAGE_TOKEN_ID)
    assert not mask[:first].any()  # text before the first image sees no image
    assert inputs(prompt_ids, [], torch.device("cpu"), torch.float32) == {}


def test_consecutive_images_are_both_seen_by_the_text_after_them(loaded):
    _, processor, files = loaded
    text, indices = LAYOUTS["two_consecutive"]
    images = [IMAGES[i] for i in indices]
    ids = processor(text=text, images=images)["input_ids"][0]
    mask = reference_inputs_for(files)(ids, images, "cpu", torch.float32)[
        "cross_attention_mask"][0]
    first = ids.index(IMAGE_TOKEN_ID)
    # 4 and 2 tiles: each image's own tiles, never its padding tiles
    assert mask[first + 2:, 0].tolist() == [[1, 1, 1, 1]] * (len(ids) - first - 2)
    assert mask[first + 2:, 1].tolist() == [[1, 1, 0, 0]] * (len(ids) - first - 2)


@pytest.mark.parametrize("layout", ["image_first", "two_consecutive"])
def test_greedy_tokens_and_prefill_logits_are_transformers_on_the_processor_outputs(
        loaded, layout):
    from transformers import GenerationConfig

    model, processor, files = loaded
    text, indices = LAYOUTS[layout]
    images = [IMAGES[i] for i in indices]
    inputs = processor(text=text, images=images, return_tensors="pt")
    prompt_ids = inputs["input_ids"][0].tolist()
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    with torch.inference_mode():
        expected = model.generate(**inputs, generation_config=config)[0, len(prompt_ids):]
        expected_logits = model(**inputs).logits[0]
    image_inputs = reference_inputs_for(files)
    assert greedy_tokens(model, image_inputs, prompt_ids, images, 6) == expected.tolist()
    assert torch.equal(prefill_logits(model, image_inputs, prompt_ids, images), expected_logits)


def test_text_only_prompts_take_no_image_inputs(loaded):
    model, processor, files = loaded
    prompt_ids = processor.tokenizer("the cat is red")["input_ids"]
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([prompt_ids])).logits[0]
    image_inputs = reference_inputs_for(files)
    assert torch.equal(prefill_logits(model, image_inputs, prompt_ids, []), expected)
    assert len(greedy_tokens(model, image_inputs, prompt_ids, [], 4)) == 4


# --- the chat template --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_checkpoint_mllama", "tiny_checkpoint_mllama_hub_style"])
def test_chat_template_renders_as_the_released_one(request, name):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(request.getfixturevalue(name))
    assert processor.chat_template == CHAT_TEMPLATE
    content = [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]
    rendered = processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)
    assert rendered == IMAGE_TEXT_PROMPT  # no system block when there is an image
    text_only = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True, date_string="26 Jul 2024")
    assert text_only == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                         "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                         "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                         "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(Exception, match="incompatible with system messages"):
        processor.apply_chat_template([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": content}])


def test_chat_template_tokens_hold_one_bos(loaded):
    """apply_chat_template(tokenize=True) keeps the template's one BOS; the
    processor called on the rendered text adds the tokenizer's second one,
    as with the released checkpoint."""
    _, processor, _ = loaded
    content = [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "Hi"}]
    ids = processor.apply_chat_template([{"role": "user", "content": content}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"][0]
    assert ids[:2] == [BOS_ID, START_HEADER_ID] and ids.count(BOS_ID) == 1 and IMAGE_TOKEN_ID in ids
    again = processor(text=IMAGE_TEXT_PROMPT, images=[IMAGES[0]])["input_ids"][0]
    assert again[:2] == [BOS_ID, BOS_ID]
