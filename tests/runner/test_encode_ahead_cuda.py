"""The vision tower, encoding ahead on its side stream, makes no host wait,
for every family: a host sync there (a blocking copy, a device value read
back) waits for every tower queued before it on the side stream, and the
scheduler's step loop with it, so the steps no longer run beside the tower
(pyvlm/runner/encoder_cache.py). The rows it gives are then the rows the
steps read, once its event has passed; on a green context's stream of 16
SMs (--vision-tower-sms) as well."""

import pytest
import torch

from pyvlm import ops
from pyvlm.scheduling.types import SamplingParams
from tests.entrypoints.test_engine_parity import engine_for, random_image

pytestmark = pytest.mark.cuda


@pytest.fixture(params=["qwen2", "qwen2_vl", "qwen2_5_vl", "mllama", "llava",
                        "llava_next_mistral"])
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


def image_items(engine, gen: torch.Generator, count: int):
    """The images of one request of `count` random images of random sizes."""
    sizes = torch.randint(30, 200, (count, 2), generator=gen).tolist()
    images = [random_image(height, width, gen) for height, width in sizes]
    request = engine.builder.from_prompt("describe", images, SamplingParams())
    engine.builder.release(request)
    return request.mm_items


@pytest.mark.parametrize("tower_sms", [0, 16])  # 16: a green context's stream
def test_encoding_ahead_on_the_side_stream_makes_no_host_sync(checkpoint, tower_sms):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    with engine_for(checkpoint, device="cuda", dtype="bfloat16", engine_process="thread",
                    max_total_tokens=4096, vision_side_stream=True, vision_tower_sms=tower_sms,
                    vision_encode_ahead=True) as engine:
        runner = engine.state.runner
        vision = runner.vision
        assert vision.encodes_beside_steps
        # The first tower call allocates (pinned buffers, cuBLAS workspaces):
        # the steady state is what runs beside the steps.
        vision.encode_ahead(image_items(engine, gen, 2))
        torch.cuda.synchronize()
        items = image_items(engine, gen, 2)
        # As the engine's thread launches it: without the ops' index checks,
        # each a device read (pyvlm.ops.index_checks).
        torch.cuda.set_sync_debug_mode("error")
        try:
            with ops.index_checks(runner.check_indices):
                vision.encode_ahead(items)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert vision.is_ready(items)
        rows = vision.embed(items)
        assert vision.cache.num_misses == 0  # the step read what was encoded ahead
        for item in items:
            assert rows[item.hash].shape[0] == vision.rows_of(item)
            assert bool(torch.isfinite(rows[item.hash]).all())
