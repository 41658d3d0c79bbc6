"""Images preprocessed in the step (pyvlm/runner/deferred_images.py, what a
GPU engine does): the front sends decoded uint8 pixels, the step runs the
family's prepare_images on the model's device. Its payloads equal the
request builder's, one call per prompt, and an engine forced to defer on
the CPU gives the tokens of one that does not, in a thread and across the
engine process (the pixels as shared memory)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pyvlm.entrypoints import startup
from pyvlm.entrypoints.core_messages import move_to_shared_memory
from pyvlm.runner.deferred_images import (DeferredImage, defer_images, prepare_deferred,
                                          shared_pixels)
from pyvlm.scheduling.types import MultimodalItem, SamplingParams
from tests.entrypoints.test_engine_parity import engine_for, make_prompts

FAMILIES = ["qwen2_vl", "mllama", "llava", "llava_next_mistral"]


def random_picture(height: int, width: int) -> Image.Image:
    rng = random.Random()
    return Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))


def tensors_of(payload) -> list:
    return [v for v in vars(payload).values() if isinstance(v, torch.Tensor)]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


def test_payloads_equal_the_builders_one_prepare_per_prompt(checkpoint):
    with engine_for(checkpoint) as engine:
        model, processor = engine.state.model, engine.builder.images.processor
        prompts = [[random_picture(37, 61), random_picture(90, 24)], [random_picture(50, 50)]]
        items, expected = [], []
        for images in prompts:
            plans = processor.plan_prompt([(im.height, im.width) for im in images], None)
            expected += model.prepare_images(images, plans)
            items += [MultimodalItem(hash=len(items) + i, offset=0, length=plan.num_tokens,
                                     plan=plan, prepared=payload)
                      for i, (plan, payload) in enumerate(zip(plans, defer_images(images, plans)))]
        assert all(isinstance(item.prepared, DeferredImage) for item in items)
        calls = []

        def counting(images, plans, device):
            calls.append(len(images))
            return model.prepare_images(images, plans, device)

        prepared = prepare_deferred(items, counting, torch.device("cpu"))
    assert calls == [2, 1]
    for item, want in zip(prepared, expected):
        assert type(item.prepared) is type(want)
        got_tensors, want_tensors = tensors_of(item.prepared), tensors_of(want)
        assert got_tensors and len(got_tensors) == len(want_tensors)
        for got, ref in zip(got_tensors, want_tensors):
            assert torch.equal(got, ref)
        assert {k: v for k, v in vars(item.prepared).items() if not isinstance(v, torch.Tensor)} \
            == {k: v for k, v in vars(want).items() if not isinstance(v, torch.Tensor)}


def test_items_prepared_already_pass_through():
    item = MultimodalItem(hash=1, offset=0, length=4, prepared=torch.zeros(3))
    assert prepare_deferred([item], lambda *a: pytest.fail("prepare called"), "cpu") == [item]


@pytest.fixture(params=["file_descriptor", "file_system"])
def sharing_strategy(request):
    before = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy(request.param)
    yield request.param
    torch.multiprocessing.set_sharing_strategy(before)


def test_shared_pixels_are_the_images_in_shared_memory(sharing_strategy):
    image = random_picture(37, 61)
    pixels = shared_pixels(image)
    assert pixels.is_shared() and pixels.dtype == torch.uint8 and pixels.shape == (37, 61, 3)
    assert np.array_equal(pixels.numpy(), np.asarray(image))
    with pytest.raises(ValueError, match="RGB image, got mode L"):
        shared_pixels(image.convert("L"))


def test_a_deferring_builders_request_has_nothing_left_to_move(tiny_checkpoint_qwen2_vl,
                                                                monkeypatch):
    monkeypatch.setattr(startup, "prepares_images_in_step", lambda device: True)
    with engine_for(tiny_checkpoint_qwen2_vl) as engine:
        request = engine.builder.from_prompt("describe", [random_picture(40, 50)],
                                             SamplingParams(max_new_tokens=1))
        [pixels] = request.mm_items[0].prepared.prompt.pixels
        address = pixels.data_ptr()
        move_to_shared_memory(request)
        assert pixels.is_shared() and pixels.data_ptr() == address  # no second copy
        engine.builder.release(request)


def test_defer_images_refuses_mismatched_plans():
    with pytest.raises(ValueError, match="2 images but 1 plans"):
        defer_images([random_picture(4, 4)] * 2, [object()])


def generate(checkpoint, defer: bool, monkeypatch, **server_args):
    monkeypatch.setattr(startup, "prepares_images_in_step", lambda device: defer)
    with engine_for(checkpoint, **server_args) as engine:
        # The family's encode_prepared cannot read a DeferredImage: tokens
        # at all mean the step prepared it.
        assert (engine.builder.images.prepare is defer_images) == defer
        prompts = make_prompts(seed=5, image=engine.builder.image_token)
        params = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
        results = engine.generate([p for p, _ in prompts], params,
                                  image_data=[ims for _, ims in prompts])
    return [r["output_ids"] for r in results]


def test_engine_deferring_gives_the_same_tokens(checkpoint, monkeypatch):
    assert generate(checkpoint, True, monkeypatch) == generate(checkpoint, False, monkeypatch)


def test_deferred_pixels_cross_the_engine_process(tiny_checkpoint_qwen2_vl, monkeypatch):
    in_thread = generate(tiny_checkpoint_qwen2_vl, False, monkeypatch)
    assert generate(tiny_checkpoint_qwen2_vl, True, monkeypatch,
                    engine_process="process") == in_thread
