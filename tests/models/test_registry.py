import pytest

from pyvlm.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from pyvlm.models.registry import model_class_for, supported_architectures


def test_known_architecture_resolves_to_its_class():
    assert model_class_for(["LlavaOnevisionForConditionalGeneration"]) is \
        LlavaOnevisionForConditionalGeneration
    assert model_class_for(["SomethingElse", "LlavaOnevisionForConditionalGeneration"]) is \
        LlavaOnevisionForConditionalGeneration


@pytest.mark.parametrize("architectures", [["BertModel"], [], None])
def test_unknown_architecture_lists_the_supported_ones(architectures):
    with pytest.raises(ValueError) as error:
        model_class_for(architectures)
    assert "LlavaOnevisionForConditionalGeneration" in str(error.value)
    assert "LlavaOnevisionForConditionalGeneration" in supported_architectures()


def test_registry_imports_models_lazily():
    import subprocess
    import sys

    code = ("import sys, pyvlm.models.registry; "
            "assert 'pyvlm.models.llava_onevision' not in sys.modules; "
            "assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_family_resolves_its_processor_and_model():
    from pyvlm.models.registry import FAMILIES, image_processor_for

    for architecture, family in FAMILIES.items():
        assert model_class_for([architecture]).__name__ == family.model.split(":")[1]
        processor = image_processor_for([architecture], {}, {})
        assert type(processor).__name__ == family.processor.split(":")[1]


def test_other_layouts_resolve_to_a_conversion_not_a_family():
    from pyvlm.models.registry import (LAYOUT_CONVERSIONS, layout_conversion_for,
                                       supported_architectures)

    for architecture in LAYOUT_CONVERSIONS:
        assert callable(layout_conversion_for([architecture]))
        assert architecture in supported_architectures()
    assert layout_conversion_for(["Qwen2VLForConditionalGeneration"]) is None
