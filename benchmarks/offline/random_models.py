"""Random-weight LLaVA-OneVision models of real shapes, built on the GPU with
no download: the config of llava-onevision-qwen2-7b-ov-hf (Qwen2-7B + SigLIP
so400m), a word-level tokenizer covering the whole vocabulary (so random
tokens detokenize), and the real preprocessor settings."""

import json
from pathlib import Path

import torch

QWEN2_7B = dict(model_type="qwen2", vocab_size=152128, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, eos_token_id=151645)
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                     num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                     layer_norm_eps=1e-6, vision_use_head=False)
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151646, 151647
PREPROCESSOR = {
    "image_processor_type": "LlavaOnevisionImageProcessor", "do_resize": True,
    "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "do_pad": True, "do_convert_rgb": True,
}


def llava_onevision_7b_config():
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(text_config=QWEN2_7B, vision_config=SIGLIP_SO400M,
                                image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                vision_aspect_ratio="anyres_max_9",
                                architectures=["LlavaOnevisionForConditionalGeneration"])


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer: "w<i>" for every id, the chatml specials and <image>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
                IMAGE_TOKEN_ID: "<image>", VIDEO_TOKEN_ID: "<video>"}
    vocab = {specials.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=list(specials.values()))
    fast.save_pretrained(folder)


def write_checkpoint_metadata(folder: Path, config) -> None:
    """Everything but the weights (the benchmark hands the engine its model)."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        dict(PREPROCESSOR, image_grid_pinpoints=config.image_grid_pinpoints)))
    (folder / "model.safetensors").touch()  # weights are supplied in memory
    write_tokenizer(folder, config.text_config.vocab_size)


def random_hf_model(config, device: str, dtype: torch.dtype, seed: int = 0):
    """transformers' model with random weights, created on the device."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def pyvlm_model_from(hf_model, device: str, dtype: torch.dtype):
    """pyvlm's model of the same config holding a copy of hf_model's weights."""
    from pyvlm.models.registry import model_class_for

    config = hf_model.config
    with torch.device(device):
        model = model_class_for(config.architectures)(config).to(dtype)
    model.load_weights(hf_model.state_dict().items())
    return model.eval()
