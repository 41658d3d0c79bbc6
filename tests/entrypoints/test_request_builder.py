"""The request builder: per-process seeds for unseeded requests, the
context check before any preprocessing, the media policy of the
offline Engine (the server's: no private URLs, local files only under an
allowed folder, unless opted out), and the images' cache keys (their
encoded bytes', also for an image the server decoded)."""

import asyncio
import base64
import dataclasses
import io
import json
import shutil
from types import SimpleNamespace

import pytest
from PIL import Image

import pyvlm
from pyvlm.scheduling.types import SamplingParams
from pyvlm.entrypoints.request_builder import RequestBuilder
from pyvlm.multimodal.hashing import combine_hash, encoded_bytes_key
from pyvlm.multimodal.media import MediaError, MediaPolicy, load_images

GREEDY = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}


def builder(random_seed=None):
    return RequestBuilder(None, None, [], None, MediaPolicy(), 100, random_seed)


def first_seeds(b, n=3):
    return [b.from_prompt([1, 2, 3], [], SamplingParams()).seed for _ in range(n)]


def test_unseeded_requests_draw_from_a_random_base_per_process():
    assert first_seeds(builder()) != first_seeds(builder())
    assert first_seeds(builder(7)) == [7, 8, 9] == first_seeds(builder(7))
    assert builder().from_prompt([1], [], SamplingParams(seed=42)).seed == 42


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_qwen2):
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2), device="cpu", page_size=4,
                      max_total_tokens=4096, context_length=512) as eng:
        yield eng


def test_too_many_image_tokens_are_refused_naming_each_image(engine, monkeypatch):
    prepared = []
    monkeypatch.setattr(engine.builder, "images", dataclasses.replace(
        engine.builder.images, prepare=lambda *args: prepared.append(args)))
    images = [Image.new("RGB", (400, 300), (10, 20, 30)), Image.new("RGB", (50, 60))]
    text = "<image> <image> " + "the cat sat on a mat " * 80
    with pytest.raises(ValueError, match=r"image 1: \d+, image 2: \d+.*context length of 512"):
        engine.generate(text, GREEDY, image_data=images)
    assert prepared == []  # refused before any preprocessing


def test_local_paths_need_an_allowed_folder(engine, tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (30, 20), (255, 0, 0)).save(path)
    with pytest.raises(MediaError, match="--allowed-local-media-path|allowed_local_media_path"):
        engine.generate("<image> what", GREEDY, image_data=str(path))
    with pytest.raises(MediaError):
        engine.generate("<image> what", GREEDY, image_data=f"file://{path}")


def test_private_urls_are_refused_without_connecting(engine):
    with pytest.raises(MediaError, match="private|loopback|allow"):
        engine.generate("<image> what", GREEDY, image_data="http://127.0.0.1:9/x.png")


def test_the_opt_out_reads_local_files(tiny_checkpoint_qwen2, tmp_path):
    path = tmp_path / "red.png"
    image = Image.new("RGB", (30, 20), (255, 0, 0))
    image.save(path)
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2), device="cpu", page_size=4,
                      max_total_tokens=2048, allowed_local_media_path=str(tmp_path)) as eng:
        from_path = eng.generate("<image> what", GREEDY, image_data=str(path))
        from_pil = eng.generate("<image> what", GREEDY, image_data=image)
    assert from_path["output_ids"] == from_pil["output_ids"]


def test_generation_config_defaults_apply_to_unset_fields(tiny_checkpoint_qwen2, tmp_path):
    folder = tmp_path / "greedy_by_default"
    shutil.copytree(tiny_checkpoint_qwen2, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(dict(config, temperature=0.0)))
    with pyvlm.Engine(model=str(folder), device="cpu", page_size=4,
                      max_total_tokens=2048) as eng:
        unset = [eng.generate("the cat", {"max_new_tokens": 6, "ignore_eos": True})
                 for _ in range(2)]
        greedy = eng.generate("the cat", dict(GREEDY, max_new_tokens=6))
        assert eng.state.sampling_defaults == {"temperature": 0.0}
    assert unset[0]["output_ids"] == unset[1]["output_ids"] == greedy["output_ids"]


def test_token_ids_outside_the_vocabulary_are_refused(engine):
    vocab = engine.model_info()["vocab_size"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([1, vocab], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([-1, 2], GREEDY)
    assert len(engine.generate([1, vocab - 1], GREEDY)["output_ids"]) == 3


def test_a_text_prompt_too_long_is_refused_when_built(engine):
    with pytest.raises(ValueError, match="exceeds the context length of 512"):
        engine.builder.from_prompt("the cat sat " * 400, [], SamplingParams())


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def image_keys(engine, sources) -> list:
    request = engine.builder.from_prompt("<image> what", sources, SamplingParams())
    engine.builder.release(request)
    return [item.hash for item in request.mm_items]


def test_image_keys_follow_the_encoded_bytes_as_the_server_sends_them(engine):
    # The server decodes with media.load_images and builds from the decoded
    # image; the key made from its bytes must survive the trip.
    picture = Image.frombytes("RGB", (30, 20), bytes(range(256)) * 7 + bytes(8))
    png, other = encoded(picture, "PNG"), encoded(picture.rotate(90), "PNG")
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    [decoded] = asyncio.run(load_images([SimpleNamespace(source=uri, param="p")], MediaPolicy()))
    [key] = image_keys(engine, [decoded])
    assert image_keys(engine, [uri]) == image_keys(engine, [png]) == [key]
    assert key == combine_hash(encoded_bytes_key(png), request_variant(engine, picture))
    # Another picture, or the same pixels in other bytes: another key.
    assert image_keys(engine, [other]) != [key]
    assert image_keys(engine, [encoded(picture, "BMP")]) != [key]


def request_variant(engine, picture: Image.Image) -> str:
    [plan] = engine.builder.images.processor.plan_prompt([(picture.height, picture.width)])
    return plan.variant
