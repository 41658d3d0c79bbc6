"""pyvlm.Engine against transformers on tiny LLaVA-1.5 (Llama backbone) and
LLaVA-NeXT (Mistral and Llama-3 backbones) checkpoints: 32 greedy tokens of
8 concurrent requests (text only, one image, two images) are transformers'
generate tokens, again with chunked prefill, and with prefix-cache hits;
the same weights in the authors' layout (tower inside the checkpoint or in
the folder mm_vision_tower names) give the tokens of their transformers-
format twin, the images preprocessed by the authors' rules."""

import pytest
import torch

from tests.entrypoints.test_engine_parity import (WORDS, Reference, assert_same_tokens,
                                                  engine_for, generate_all, make_prompts,
                                                  random_image)
from pyvlm.models.checkpoint import CheckpointFiles
from pyvlm.scheduling.types import SamplingParams
from tests.hf_reference import PyvlmLlavaPixels, reference_inputs_for

FAMILIES = ["llava", "llava_next_mistral", "llava_next_llama3"]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


def hf_model_of(checkpoint):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(checkpoint):
    with engine_for(checkpoint) as engine:
        return Reference(hf_model_of(checkpoint), engine)


@pytest.fixture(scope="module")
def prompts(reference):
    return make_prompts(seed=1, image=reference.builder.image_token)


def test_eight_concurrent_requests_match_transformers(checkpoint, prompts, reference):
    with engine_for(checkpoint) as engine:
        assert_same_tokens(generate_all(engine, prompts), prompts, reference)


def test_chunked_prefill_and_prefix_hits_give_the_same_tokens(checkpoint, prompts, reference):
    with engine_for(checkpoint, chunked_prefill_size=16) as engine:
        first = generate_all(engine, prompts)
        again = generate_all(engine, prompts)
    assert_same_tokens(first, prompts, reference)
    assert_same_tokens(again, prompts, reference)
    assert all(r["meta_info"]["cached_tokens"] > 0 for r in again)


@pytest.mark.parametrize("original, twin", [
    ("llava_original", "llava"), ("llava_original_separate_tower", "llava"),
    ("llava_next_original_mistral", "llava_next_mistral"),
    ("onevision_original", "qwen2")])
def test_the_authors_layout_gives_its_twins_tokens(request, original, twin):
    original_dir = request.getfixturevalue(f"tiny_checkpoint_{original}")
    twin_dir = request.getfixturevalue(f"tiny_checkpoint_{twin}")
    with engine_for(original_dir) as engine:
        # LLaVA-1.5 / NeXT: the authors' pad and anyres rules, through pyvlm's
        # plans; OneVision's original follows transformers' rules (the twin's own)
        image_inputs = (reference_inputs_for(CheckpointFiles.from_dir(twin_dir))
                        if original == "onevision_original" else PyvlmLlavaPixels(engine))
        reference = Reference(hf_model_of(twin_dir), engine, image_inputs)
        prompts = authors_prompts(engine.builder.image_token)
        results = generate_all(engine, prompts)
    assert_same_tokens(results, prompts, reference)


def authors_prompts(image: str):
    """6 prompts whose images (60 to 170 px against 56 px tiles) have one
    best grid under both pinpoint readings: the LLaVA repository reads the
    pinpoints as (width, height) and transformers as (height, width), so an
    image that fits several grids equally well (both sides under a tile)
    is tiled differently by the two, and a twin cannot match there."""
    gen = torch.Generator().manual_seed(4)

    def words(n):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen))

    sizes = [(60, 170), (170, 60), (120, 100), (100, 120), (150, 150), (90, 168)]
    images = [random_image(h, w, gen) for h, w in sizes]
    return [
        (words(9), []),
        (f"{image}\n{words(7)}", [images[0]]),
        (f"{words(3)} {image} {words(12)}", [images[1]]),
        (f"{image}\n{words(20)}", [images[2]]),
        (f"{words(4)} {image} and {image} {words(9)}", [images[3], images[4]]),
        (f"{image}{words(11)}", [images[5]]),
    ]


@pytest.mark.parametrize("defer", [False, True], ids=["cpu-engine", "gpu-like-engine"])
@pytest.mark.parametrize("name", ["llava", "llava_next_mistral"])
def test_pyvlm_pixels_stand_in_equals_transformers_processor(request, name, defer, monkeypatch):
    """PyvlmLlavaPixels (what the CUDA parity test feeds transformers, whose
    GPU machine has another Pillow) is the checkpoint's own processor here,
    also for an engine whose step preprocesses the images (a GPU's)."""
    from pyvlm.entrypoints import startup

    monkeypatch.setattr(startup, "prepares_images_in_step", lambda device: defer)
    checkpoint = request.getfixturevalue(f"tiny_checkpoint_{name}")
    gen = torch.Generator().manual_seed(5)
    images = [random_image(h, w, gen) for h, w in ((60, 170), (120, 100), (33, 33))]
    with engine_for(checkpoint) as engine:
        expected = reference_inputs_for(engine.state.files)([], images, "cpu", torch.float32)
        got = PyvlmLlavaPixels(engine)([], images, "cpu", torch.float32)
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def test_pytorch_bin_shards_load_as_the_safetensors_do(tiny_checkpoint_llava_original, tmp_path):
    """liuhaotian/llava-v1.5-7b ships pytorch_model-0000N-of-0000M.bin shards
    with an index: the same weights so saved give the same tokens."""
    import json
    import shutil

    from safetensors.torch import load_file

    copy = tmp_path / "bin_copy"
    shutil.copytree(tiny_checkpoint_llava_original, copy)
    weight_map = {}
    for index, path in enumerate(sorted(copy.glob("*.safetensors")), start=1):
        shard = f"pytorch_model-{index:05d}.bin"
        tensors = load_file(str(path))
        torch.save(tensors, copy / shard)
        weight_map.update({name: shard for name in tensors})
        path.unlink()
    (copy / "model.safetensors.index.json").unlink()
    (copy / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    prompt = "look: <image> what is it?"
    image = random_image(80, 80, torch.Generator().manual_seed(6))
    results = []
    for checkpoint in (tiny_checkpoint_llava_original, copy):
        with engine_for(checkpoint) as engine:
            results.append(engine.generate(prompt, dict(max_new_tokens=8, temperature=0),
                                           image_data=[image])["output_ids"])
    assert results[0] == results[1] and len(results[0]) == 8


def sentencepiece_tokenizer(folder, vocab_size: int) -> None:
    """A tokenizer.model trained in a second, configured as the LLaVA-1.5
    repositories' LlamaTokenizer (no tokenizer.json: transformers converts
    it with sentencepiece)."""
    import json
    import random

    import sentencepiece

    folder.mkdir(parents=True)
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12))
                                for _ in range(300)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
        minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True, "legacy": False}))


def test_a_sentencepiece_tokenizer_from_tokenizer_path(tiny_checkpoint_llava_original,
                                                       tiny_checkpoint_llava, tmp_path):
    """The authors' checkpoint without tokenizer files, its sentencepiece
    tokenizer given by --tokenizer-path: <image> is added past its 382
    pieces, and the answers are transformers' on the same ids."""
    import shutil

    from transformers import AutoTokenizer

    checkpoint = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_checkpoint_llava_original, checkpoint)
    for path in checkpoint.glob("*token*"):
        path.unlink()
    sentencepiece_tokenizer(tmp_path / "sp", vocab_size=382)
    gen = torch.Generator().manual_seed(7)
    prompts = [("the cat sat on a mat <image> what is it?", [random_image(90, 90, gen)]),
               ("near blue hills", [])]
    with engine_for(checkpoint, tokenizer_path=str(tmp_path / "sp")) as engine:
        reference = Reference(hf_model_of(tiny_checkpoint_llava), engine,
                              PyvlmLlavaPixels(engine))
        results = generate_all(engine, prompts)
        ids = engine.builder.from_prompt(*prompts[0], SamplingParams(),
                                         add_special_tokens=True).prompt_ids
    assert_same_tokens(results, prompts, reference)
    sp = AutoTokenizer.from_pretrained(str(tmp_path / "sp"))
    text_ids = sp("the cat sat on a mat")["input_ids"]
    assert ids[:len(text_ids)] == text_ids and 382 in ids  # BOS, pieces, then the image


def test_missing_pieces_name_the_flag_that_supplies_them(tiny_checkpoint_llava_original_separate_tower,
                                                        tmp_path):
    """A tower folder that is not there names --vision-tower-path; a
    checkpoint without tokenizer files names --tokenizer-path."""
    import json
    import shutil

    from pyvlm.models.checkpoint import CheckpointError

    checkpoint = tmp_path / "moved_tower"
    shutil.copytree(tiny_checkpoint_llava_original_separate_tower, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    tower = config["mm_vision_tower"]
    config["mm_vision_tower"] = str(tmp_path / "nowhere" / "clip")
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="--vision-tower-path"):
        engine_for(checkpoint)
    with engine_for(checkpoint, vision_tower_path=tower) as engine:  # the flag supplies it
        assert engine.generate("hello", dict(max_new_tokens=2))["output_ids"]
    for path in checkpoint.glob("*token*"):
        path.unlink()
    with pytest.raises(CheckpointError, match="--tokenizer-path"):
        engine_for(checkpoint, vision_tower_path=tower)
