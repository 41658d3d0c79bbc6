"""The tiny LLaVA-1.5 / LLaVA-NeXT checkpoints load in transformers with the
in-memory weights, their image path matters (each image, image_newline, the
tower up to layer -2), tests/hf_reference.py's LlavaInputs / LlavaNextInputs
equal what LlavaProcessor / LlavaNextProcessor make (so greedy_tokens and
prefill_logits are transformers' own generate() and forward on the
processor's outputs), and the original-layout checkpoints hold exactly the
stated names, keys and the twin's tensors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.hf_reference import (LlavaInputs, LlavaNextInputs, greedy_tokens, prefill_logits,
                                reference_inputs_for)
from tests.tiny_llava import (BOS_ID, EOS_ID, EOT_ID, GRID_PINPOINTS, IMAGE_TOKEN,
                              IMAGE_TOKEN_ID, LLAMA3_BOS_ID, NUM_BASE_TOKENS, NUM_PATCHES, PAD_ID,
                              RANGE_GRID_PINPOINTS, TOWER_PREFIX, UNK_ID, VOCAB_SIZE,
                              chat_template, clip_weight_name, default_clip_dir,
                              expand_grid_pinpoints, llava_next_processor, llava_processor,
                              original_weight_name,
                              read_safetensors_folder, tiny_llava, tiny_llava_next,
                              write_llava_next_original_checkpoint)

# fixture -> (family, seed, backbone), as tests/conftest.py writes them
CHECKPOINTS = {"tiny_checkpoint_llava": ("llava", 0, "llama"),
               "tiny_checkpoint_llava_next_mistral": ("llava_next", 1, "mistral"),
               "tiny_checkpoint_llava_next_llama3": ("llava_next", 2, "llama3")}
# original-layout fixture -> (its transformers-layout twin, tower)
ORIGINALS = {"tiny_checkpoint_llava_original": ("tiny_checkpoint_llava", "inside"),
             "tiny_checkpoint_llava_original_separate_tower": ("tiny_checkpoint_llava", "separate"),
             "tiny_checkpoint_llava_next_original_mistral": ("tiny_checkpoint_llava_next_mistral",
                                                             "inside")}
QUESTION = "What is in this image?"


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# square, wide and tall: NeXT picks 1 x 2, 2 x 1 / 1 x 3 grids and unpads differently
IMAGES = [random_image(40, 40, 0), random_image(50, 110, 1), random_image(130, 60, 2)]


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def loaded(request):
    """(name, model, processor, CheckpointFiles) of each transformers-layout checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyvlm.models.checkpoint import CheckpointFiles

    directory = request.getfixturevalue(request.param)
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
    return (request.param, model, AutoProcessor.from_pretrained(directory),
            CheckpointFiles.from_dir(directory))


def in_memory_model(name: str):
    family, seed, backbone = CHECKPOINTS[name]
    return tiny_llava(seed, backbone) if family == "llava" else tiny_llava_next(seed, backbone)


def weight_names(directory) -> set:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    names = set()
    for shard in set(index["weight_map"].values()):
        with safe_open(str(directory / shard), framework="pt") as handle:
            names |= set(handle.keys())
    assert names == set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # sharded, as the real repositories
    return names


def image_prompt(processor, num_images: int, text: str = QUESTION) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True)


@torch.inference_mode()
def logits_of(model, processor, text: str, images) -> torch.Tensor:
    inputs = processor(text=text, images=list(images) or None, return_tensors="pt")
    return model(**inputs).logits[0]


# --- the transformers-layout files ------------------------------------------------------

def test_transformers_loads_the_in_memory_weights(loaded):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    name, model, _, _ = loaded
    family = CHECKPOINTS[name][0]
    expected_class = (LlavaForConditionalGeneration if family == "llava"
                      else LlavaNextForConditionalGeneration)
    assert type(model) is expected_class and model.dtype == torch.float32
    expected = in_memory_model(name).state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_weight_names_follow_the_transformers_5_layout(request, name):
    names = weight_names(request.getfixturevalue(name))
    assert names == set(in_memory_model(name).state_dict())
    top = {".".join(n.split(".")[:2]) for n in names}
    expected = {"model.vision_tower", "model.multi_modal_projector", "model.language_model",
                "lm_head.weight"}
    if CHECKPOINTS[name][0] == "llava_next":
        expected.add("model.image_newline")
    assert top == expected
    assert "model.vision_tower.embeddings.class_embedding" in names  # no vision_model. level
    assert "model.multi_modal_projector.linear_2.bias" in names


def test_token_ids(loaded):
    name, model, processor, files = loaded
    backbone = CHECKPOINTS[name][2]
    tokenizer, config = processor.tokenizer, model.config
    assert len(tokenizer) == VOCAB_SIZE == config.text_config.vocab_size
    assert tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, "<pad>"]) == [IMAGE_TOKEN_ID, PAD_ID]
    assert config.image_token_index == IMAGE_TOKEN_ID == processor.image_token_id
    bos, eos = (LLAMA3_BOS_ID, EOT_ID) if backbone == "llama3" else (BOS_ID, EOS_ID)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        bos, eos, PAD_ID)
    assert (config.text_config.bos_token_id, config.text_config.eos_token_id) == (bos, eos)
    if backbone != "llama3":
        assert tokenizer.unk_token_id == UNK_ID
    ids = tokenizer(f"the cat{IMAGE_TOKEN}{IMAGE_TOKEN} is")["input_ids"]
    assert ids[0] == bos and ids.count(IMAGE_TOKEN_ID) == 2  # BOS prepended, <image> one token
    assert max(i for i in ids if i != IMAGE_TOKEN_ID) < NUM_BASE_TOKENS
    assert tokenizer.decode(ids[1:], skip_special_tokens=True) == "the cat is"
    generation = files.generation_config
    assert generation["pad_token_id"] == PAD_ID and "temperature" not in generation


def test_processor_files_are_llava_hf_s(loaded):
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil

    name, _, processor, files = loaded
    family, _, backbone = CHECKPOINTS[name]
    saved = json.loads((files.root / "processor_config.json").read_text())
    assert {k: saved[k] for k in ("patch_size", "num_additional_image_tokens",
                                  "vision_feature_select_strategy", "image_token")} == {
        "patch_size": 14, "num_additional_image_tokens": 1,
        "vision_feature_select_strategy": "default", "image_token": IMAGE_TOKEN}
    preprocessor = files.processor_config
    assert preprocessor["size"] == {"shortest_edge": 56} and preprocessor["resample"] == 3
    assert preprocessor["crop_size"] == {"height": 56, "width": 56}
    if family == "llava":
        assert preprocessor["image_processor_type"] == "CLIPImageProcessor"
        assert type(processor.image_processor) is CLIPImageProcessorPil
    else:
        assert preprocessor["image_processor_type"] == "LlavaNextImageProcessor"
        assert preprocessor["image_grid_pinpoints"] == GRID_PINPOINTS
        assert type(processor.image_processor) is LlavaNextImageProcessorPil
    assert files.chat_template == chat_template(backbone) == processor.chat_template


@pytest.mark.parametrize("name, expected", [
    ("tiny_checkpoint_llava", f"USER: <image>\n{QUESTION} ASSISTANT:"),
    ("tiny_checkpoint_llava_next_mistral", f"[INST] <image>\n{QUESTION} [/INST]"),
    ("tiny_checkpoint_llava_next_llama3",
     f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{QUESTION}<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_chat_template_renders_as_llava_hf_s(request, name, expected):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(request.getfixturevalue(name))
    assert image_prompt(processor, 1) == expected


# --- the image path matters ---------------------------------------------------------------

def test_each_image_changes_the_logits_after_it(loaded):
    _, model, processor, _ = loaded
    text = image_prompt(processor, 1)
    first = logits_of(model, processor, text, [IMAGES[0]])
    assert torch.equal(logits_of(model, processor, text, [IMAGES[0]]), first)
    other = logits_of(model, processor, text, [IMAGES[2]])
    ids = processor(text=text, images=[IMAGES[0]])["input_ids"][0]
    start = ids.index(IMAGE_TOKEN_ID)
    assert torch.equal(first[:start], other[:start])  # causal: text before the image
    num_after = ids[::-1].index(IMAGE_TOKEN_ID)  # the text after the image (NeXT: the
    # other image may have another number of rows, so align from the end)
    assert ((first[-num_after:] - other[-num_after:]).abs().amax(-1) > 0.1).all()


def test_image_newline_matters():
    """Zeroing image_newline changes every logit after a NeXT image."""
    model, processor = tiny_llava_next(1, "mistral"), llava_next_processor("mistral")
    text = image_prompt(processor, 1)
    expected = logits_of(model, processor, text, [IMAGES[1]])
    with torch.no_grad():
        model.model.image_newline.zero_()
    changed = logits_of(model, processor, text, [IMAGES[1]])
    ids = processor(text=text, images=[IMAGES[1]])["input_ids"][0]
    after = len(ids) - ids[::-1].index(IMAGE_TOKEN_ID)
    assert ((changed[after:] - expected[after:]).abs().amax(-1) > 1e-2).all()


def test_the_tower_is_read_at_layer_minus_2():
    """vision_feature_layer -2: the tower's last layer and post_layernorm
    never reach the logits (as in the released models); the layer before does."""
    model = tiny_llava(0)
    processor = llava_processor()
    text = image_prompt(processor, 1)
    expected = logits_of(model, processor, text, [IMAGES[0]])
    tower = model.model.vision_tower
    with torch.no_grad():
        for param in [*tower.encoder.layers[-1].parameters(), *tower.post_layernorm.parameters()]:
            param.mul_(3.0)
    assert torch.equal(logits_of(model, processor, text, [IMAGES[0]]), expected)
    with torch.no_grad():
        tower.encoder.layers[-2].mlp.fc2.bias.add_(0.5)
    assert (logits_of(model, processor, text, [IMAGES[0]]) - expected).abs().max() > 1e-2


# --- LlavaInputs / LlavaNextInputs are the processors' ------------------------------------------

# indices into IMAGES of the images before the question
LAYOUTS = {"one": [1], "two": [0, 2], "three": [2, 1, 0]}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_inputs_equal_the_processor(loaded, layout):
    name, model, processor, files = loaded
    images = [IMAGES[i] for i in LAYOUTS[layout]]
    expected = processor(text=image_prompt(processor, len(images)), images=images,
                         return_tensors="pt")
    prompt_ids = expected["input_ids"][0].tolist()
    inputs = reference_inputs_for(files)
    got = inputs(prompt_ids, images, torch.device("cpu"), torch.float32)
    if CHECKPOINTS[name][0] == "llava":
        assert type(inputs) is LlavaInputs and got.keys() == {"pixel_values"}
        assert got["pixel_values"].shape == (len(images), 3, 56, 56)
    else:
        assert type(inputs) is LlavaNextInputs and got.keys() == {"pixel_values", "image_sizes"}
        assert got["image_sizes"].tolist() == [[im.height, im.width] for im in images]
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key
    with torch.inference_mode():
        rows = model.model.get_image_features(
            **got, vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output
    counts = [len(image_rows) for image_rows in rows]
    assert prompt_ids.count(IMAGE_TOKEN_ID) == sum(counts)  # the placeholders the rows fill
    if CHECKPOINTS[name][0] == "llava":
        assert counts == [NUM_PATCHES] * len(images)
    assert inputs(prompt_ids, [], torch.device("cpu"), torch.float32) == {}


def test_next_image_token_counts():
    """Hand-counted anyres rows: base tile 16 + unpadded grid rows + one
    image_newline per grid row. 40 x 40 -> 1 x 2 tiles (4 x 8 patches),
    unpadded to 4 x 4: 16 + 4 * (4 + 1) = 36. 50 x 110 -> 1 x 2 (4 x 8); the
    image fills int(50 * 8 / 110) = 3 of the 4 patch rows, but the padding
    removed from each side is (4 - 3) // 2 = 0 rows (LLaVA's rule, which
    transformers keeps): 16 + 4 * (8 + 1) = 52."""
    processor = llava_next_processor("mistral")
    for image, expected in ((IMAGES[0], 36), (IMAGES[1], 52)):
        ids = processor(text=IMAGE_TOKEN, images=[image])["input_ids"][0]
        assert ids.count(IMAGE_TOKEN_ID) == expected


@pytest.mark.parametrize("layout", ["two", "three"])
def test_greedy_tokens_and_prefill_logits_are_transformers_on_the_processor_outputs(
        loaded, layout):
    from transformers import GenerationConfig

    _, model, processor, files = loaded
    images = [IMAGES[i] for i in LAYOUTS[layout]]
    inputs = processor(text=image_prompt(processor, len(images)), images=images,
                       return_tensors="pt")
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
    _, model, processor, files = loaded
    prompt_ids = processor.tokenizer("the cat is red")["input_ids"]
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([prompt_ids])).logits[0]
    image_inputs = reference_inputs_for(files)
    assert torch.equal(prefill_logits(model, image_inputs, prompt_ids, []), expected)
    assert len(greedy_tokens(model, image_inputs, prompt_ids, [], 4)) == 4


@pytest.mark.parametrize("name", list(ORIGINALS))
def test_reference_inputs_refuse_the_original_layout(request, name):
    from pyvlm.models.checkpoint import CheckpointFiles

    files = CheckpointFiles.from_dir(request.getfixturevalue(name))
    with pytest.raises(ValueError, match="transformers-format twin"):
        reference_inputs_for(files)


# --- the original layouts ------------------------------------------------------------------------

V1_5_KEYS = {
    "_name_or_path", "architectures", "bos_token_id", "eos_token_id", "pad_token_id",
    "freeze_mm_mlp_adapter", "hidden_act", "hidden_size", "image_aspect_ratio",
    "initializer_range", "intermediate_size", "max_length", "max_position_embeddings",
    "mm_hidden_size", "mm_projector_type", "mm_use_im_patch_token", "mm_use_im_start_end",
    "mm_vision_select_feature", "mm_vision_select_layer", "mm_vision_tower", "model_type",
    "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pretraining_tp",
    "rms_norm_eps", "rope_scaling", "tie_word_embeddings", "torch_dtype", "transformers_version",
    "tune_mm_mlp_adapter", "use_cache", "use_mm_proj", "vocab_size"}
V1_6_MISTRAL_KEYS = {
    "_name_or_path", "architectures", "attention_dropout", "bos_token_id", "eos_token_id",
    "freeze_mm_mlp_adapter", "freeze_mm_vision_resampler", "hidden_act", "hidden_size",
    "image_aspect_ratio", "image_crop_resolution", "image_grid_pinpoints",
    "image_split_resolution", "initializer_range", "intermediate_size",
    "max_position_embeddings", "mm_hidden_size", "mm_patch_merge_type", "mm_projector_lr",
    "mm_projector_type", "mm_resampler_type", "mm_use_im_patch_token", "mm_use_im_start_end",
    "mm_vision_select_feature", "mm_vision_select_layer", "mm_vision_tower",
    "mm_vision_tower_lr", "model_type", "num_attention_heads", "num_hidden_layers",
    "num_key_value_heads", "pretrain_mm_mlp_adapter", "rms_norm_eps", "rope_theta",
    "sliding_window", "tie_word_embeddings", "tokenizer_model_max_length",
    "tokenizer_padding_side", "torch_dtype", "transformers_version", "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler", "unfreeze_mm_vision_tower", "use_cache", "use_mm_proj",
    "vocab_size"}


def original_and_twin(request, name):
    twin, tower = ORIGINALS[name]
    return request.getfixturevalue(name), request.getfixturevalue(twin), tower


@pytest.mark.parametrize("name", list(ORIGINALS))
def test_original_weight_names(request, name):
    directory, twin, tower = original_and_twin(request, name)
    names = weight_names(directory)
    twin_names = weight_names(twin)
    kept = {n for n in twin_names if tower == "inside" or not n.startswith(TOWER_PREFIX)}
    assert names == {original_weight_name(n) for n in kept}
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight",
            "model.mm_projector.0.weight", "model.mm_projector.0.bias",
            "model.mm_projector.2.weight", "model.mm_projector.2.bias"} <= names
    tower_names = {n for n in names if n.startswith("model.vision_tower.")}
    if tower == "inside":
        assert "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding" in names
        assert "model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc2.bias" in names
        assert all(n.startswith("model.vision_tower.vision_tower.vision_model.")
                   for n in tower_names)
    else:
        assert not tower_names
    assert ("model.image_newline" in names) == ("next" in name)
    assert all(n.split(".")[0] in ("model", "lm_head") for n in names)


@pytest.mark.parametrize("name", list(ORIGINALS))
def test_original_weights_are_the_twin_s(request, name):
    """Tensor by tensor through original_weight_name; the CLIP folder holds
    the twin's tower when the tower is separate, another one when inside."""
    directory, twin, tower = original_and_twin(request, name)
    original, expected = read_safetensors_folder(directory), read_safetensors_folder(twin)
    clip = read_safetensors_folder(default_clip_dir(directory))
    for key, tensor in expected.items():
        if key.startswith(TOWER_PREFIX) and tower == "separate":
            assert torch.equal(clip[clip_weight_name(key)], tensor), key
        else:
            assert torch.equal(original[original_weight_name(key)], tensor), key
    if tower == "inside":
        class_embedding = "model.vision_tower.embeddings.class_embedding"
        assert not torch.equal(clip[clip_weight_name(class_embedding)], expected[class_embedding])
    assert set(clip) == {clip_weight_name(k) for k in expected if k.startswith(TOWER_PREFIX)}


@pytest.mark.parametrize("name", list(ORIGINALS))
def test_original_config_keys(request, name):
    directory, twin, tower = original_and_twin(request, name)
    config = json.loads((directory / "config.json").read_text())
    twin_config = json.loads((twin / "config.json").read_text())
    clip_dir = default_clip_dir(directory).resolve()
    assert config["mm_vision_tower"] == str(clip_dir)
    common = {"mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "hidden_size": 64, "vocab_size": VOCAB_SIZE, "tie_word_embeddings": False}
    assert {k: config[k] for k in common} == common
    if "next" in name:
        assert set(config) == V1_6_MISTRAL_KEYS
        assert config["architectures"] == ["LlavaMistralForCausalLM"]
        assert config["model_type"] == "llava_mistral" and config["sliding_window"] is None
        assert config["image_aspect_ratio"] == "anyres"
        assert config["mm_patch_merge_type"] == "spatial_unpad"
        assert config["image_grid_pinpoints"] == twin_config["image_grid_pinpoints"]
        assert config["rope_theta"] == 1000000.0 and config["unfreeze_mm_vision_tower"] is True
    else:
        assert set(config) == V1_5_KEYS | ({"unfreeze_mm_vision_tower"} if tower == "inside"
                                           else set())
        assert config["architectures"] == ["LlavaLlamaForCausalLM"]
        assert config["model_type"] == "llava" and config["image_aspect_ratio"] == "pad"
    text = twin_config["text_config"]
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "max_position_embeddings"):
        assert config[key] == text[key], key


@pytest.mark.parametrize("name", list(ORIGINALS))
def test_the_clip_folder_loads_as_a_clip_vision_model(request, name):
    from transformers import CLIPVisionModel

    directory, twin, tower = original_and_twin(request, name)
    clip_dir = default_clip_dir(directory)
    assert json.loads((clip_dir / "preprocessor_config.json").read_text())["crop_size"] == 56
    config = json.loads((clip_dir / "config.json").read_text())
    assert config["model_type"] == "clip_vision_model" and config["image_size"] == 56
    clip = CLIPVisionModel.from_pretrained(clip_dir)
    folder = read_safetensors_folder(clip_dir)
    for key, tensor in clip.state_dict().items():
        assert torch.equal(tensor, folder["vision_model." + key]), key


def test_original_tokenizer_has_no_image_token(tiny_checkpoint_llava_original,
                                              tiny_checkpoint_llava):
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(tiny_checkpoint_llava_original)
    twin = AutoTokenizer.from_pretrained(tiny_checkpoint_llava)
    assert len(original) == NUM_BASE_TOKENS
    text = "USER: What is in this image? ASSISTANT:"
    assert original(text)["input_ids"] == twin(text)["input_ids"]  # same ids, BOS first
    assert IMAGE_TOKEN_ID not in original(f"a {IMAGE_TOKEN} b")["input_ids"]
    config = json.loads((tiny_checkpoint_llava_original / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["pad_token"] == "<unk>"
    special = json.loads((tiny_checkpoint_llava_original / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>",
                       "unk_token": "<unk>"}


def test_string_grid_pinpoints_and_the_llama3_original(tmp_path, tiny_checkpoint_llava_next_llama3):
    """The "(1x1),...,(3x3)" form is written as is and stands for the 3 x 3
    grid of 56-pixel tiles; the lmms-lab Llama 3 layout is LlavaLlamaForCausalLM
    with model_type "llava" and the twin's weights (pinpoints do not change them)."""
    assert expand_grid_pinpoints(RANGE_GRID_PINPOINTS) == [
        [56 * i, 56 * j] for i in (1, 2, 3) for j in (1, 2, 3)]
    assert expand_grid_pinpoints(GRID_PINPOINTS) == GRID_PINPOINTS
    directory = write_llava_next_original_checkpoint(tmp_path / "llama3", seed=2,
                                                     backbone="llama3",
                                                     grid_pinpoints=RANGE_GRID_PINPOINTS,
                                                     clip_layout="full")
    config = json.loads((directory / "config.json").read_text())
    assert config["image_grid_pinpoints"] == RANGE_GRID_PINPOINTS
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["model_type"] == "llava"
    assert config["rope_theta"] == 500000.0 and config["eos_token_id"] == EOT_ID
    original = read_safetensors_folder(directory)
    for key, tensor in read_safetensors_folder(tiny_checkpoint_llava_next_llama3).items():
        assert torch.equal(original[original_weight_name(key)], tensor), key
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["bos_token"] == "<|begin_of_text|>"


def test_full_clip_layout_is_openai_s(tmp_path):
    """clip_layout="full": a whole CLIPModel as openai ships it, from which
    transformers' CLIPVisionModel takes the vision tower."""
    from transformers import CLIPVisionModel

    directory = write_llava_next_original_checkpoint(tmp_path / "next", clip_layout="full")
    clip_dir = default_clip_dir(directory)
    config = json.loads((clip_dir / "config.json").read_text())
    assert config["model_type"] == "clip" and config["vision_config"]["image_size"] == 56
    folder = read_safetensors_folder(clip_dir)
    assert "text_model.embeddings.token_embedding.weight" in folder
    assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= set(folder)
    clip = CLIPVisionModel.from_pretrained(clip_dir)
    for key, tensor in clip.state_dict().items():
        assert torch.equal(tensor, folder["vision_model." + key]), key
