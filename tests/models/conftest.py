import pytest

from pyvlm.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from tests.tiny_models import tiny_llava_onevision


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def models(request):
    """(transformers reference, pyvlm model loaded from its state_dict)."""
    hf_model = tiny_llava_onevision(request.param)
    model = LlavaOnevisionForConditionalGeneration(hf_model.config).eval()
    model.load_weights(hf_model.state_dict().items())
    return hf_model, model
