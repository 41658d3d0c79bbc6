import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where a GPU is; elsewhere they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Tiny checkpoints on disk (tests/tiny_checkpoints.py), written once per
# session. Tests must not modify them: copy the folder first.

@pytest.fixture(scope="session")
def tiny_checkpoint_qwen2(tmp_path_factory):
    from tests.tiny_checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_llama(tmp_path_factory):
    from tests.tiny_checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint_hub_style(tmp_path_factory):
    from tests.tiny_checkpoints import write_hub_style_checkpoint

    return write_hub_style_checkpoint(tmp_path_factory.mktemp("tiny_hub_style"))


# Tiny Qwen2-VL / Qwen2.5-VL checkpoints (tests/tiny_qwen2_vl.py): the
# transformers-5 layout, and the Qwen hub layout (visual.*, model.layers.*).

@pytest.fixture(scope="session")
def tiny_checkpoint_qwen2_vl(tmp_path_factory):
    from tests.tiny_qwen2_vl import write_qwen2_vl_checkpoint

    return write_qwen2_vl_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_vl"), "2", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_qwen2_5_vl(tmp_path_factory):
    from tests.tiny_qwen2_vl import write_qwen2_vl_checkpoint

    return write_qwen2_vl_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), "2.5", seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint_qwen2_vl_hub_style(tmp_path_factory):
    from tests.tiny_qwen2_vl import write_qwen2_vl_hub_style_checkpoint

    return write_qwen2_vl_hub_style_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_vl_hub"),
                                               "2", seed=2)


@pytest.fixture(scope="session")
def tiny_checkpoint_qwen2_5_vl_hub_style(tmp_path_factory):
    from tests.tiny_qwen2_vl import write_qwen2_vl_hub_style_checkpoint

    return write_qwen2_vl_hub_style_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_5_vl_hub"),
                                               "2.5", seed=3)


# Tiny Llama-3.2-Vision (mllama) checkpoints (tests/tiny_mllama.py): the
# transformers-5 layout with cross-attention layers [1, 3] of 4, the same
# with one cross-attention layer ([2] of 4), and the meta-llama hub layout
# (vision_model.*, language_model.model.*).

@pytest.fixture(scope="session")
def tiny_checkpoint_mllama(tmp_path_factory):
    from tests.tiny_mllama import write_mllama_checkpoint

    return write_mllama_checkpoint(tmp_path_factory.mktemp("tiny_mllama"), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_mllama_one_cross(tmp_path_factory):
    from tests.tiny_mllama import write_mllama_checkpoint

    return write_mllama_checkpoint(tmp_path_factory.mktemp("tiny_mllama_one_cross"), seed=1,
                                   cross_attention_layers=[2], num_hidden_layers=4)


@pytest.fixture(scope="session")
def tiny_checkpoint_mllama_hub_style(tmp_path_factory):
    from tests.tiny_mllama import write_mllama_hub_style_checkpoint

    return write_mllama_hub_style_checkpoint(tmp_path_factory.mktemp("tiny_mllama_hub"), seed=2)


# Tiny LLaVA-1.5 / LLaVA-NeXT checkpoints (tests/tiny_llava.py): the
# transformers-5 layout, and the authors' layout with the SAME weights as a
# transformers-layout twin (same seed): tiny_checkpoint_llava_original* are
# tiny_checkpoint_llava's model, tiny_checkpoint_llava_next_original_mistral
# is tiny_checkpoint_llava_next_mistral's. Each original-layout checkpoint
# has its CLIP folder (mm_vision_tower, an absolute path) next to it.

@pytest.fixture(scope="session")
def tiny_checkpoint_llava(tmp_path_factory):
    from tests.tiny_llava import write_llava_checkpoint

    return write_llava_checkpoint(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_llava_next_mistral(tmp_path_factory):
    from tests.tiny_llava import write_llava_next_checkpoint

    return write_llava_next_checkpoint(tmp_path_factory.mktemp("tiny_llava_next_mistral"),
                                       seed=1, backbone="mistral")


@pytest.fixture(scope="session")
def tiny_checkpoint_llava_next_llama3(tmp_path_factory):
    from tests.tiny_llava import write_llava_next_checkpoint

    return write_llava_next_checkpoint(tmp_path_factory.mktemp("tiny_llava_next_llama3"),
                                       seed=2, backbone="llama3")


@pytest.fixture(scope="session")
def tiny_checkpoint_llava_original(tmp_path_factory):
    from tests.tiny_llava import write_llava_original_checkpoint

    return write_llava_original_checkpoint(tmp_path_factory.mktemp("tiny_llava_original"),
                                           seed=0, tower="inside")


@pytest.fixture(scope="session")
def tiny_checkpoint_llava_original_separate_tower(tmp_path_factory):
    from tests.tiny_llava import write_llava_original_checkpoint

    return write_llava_original_checkpoint(
        tmp_path_factory.mktemp("tiny_llava_original_separate"), seed=0, tower="separate")


@pytest.fixture(scope="session")
def tiny_checkpoint_llava_next_original_mistral(tmp_path_factory):
    from tests.tiny_llava import write_llava_next_original_checkpoint

    return write_llava_next_original_checkpoint(
        tmp_path_factory.mktemp("tiny_llava_next_original_mistral"), seed=1, backbone="mistral")


@pytest.fixture(scope="session")
def tiny_checkpoint_onevision_original(tmp_path_factory):
    """tiny_checkpoint_qwen2's weights in lmms-lab's layout (LlavaQwenForCausalLM)."""
    from tests.tiny_checkpoints import write_onevision_original_checkpoint

    return write_onevision_original_checkpoint(tmp_path_factory.mktemp("tiny_ov_original") / "ckpt",
                                               seed=0)
