"""What every vision-language model file shares: the text decoder, the LM
head (tied to the embeddings when the checkpoint ties them), the KV shape
the runner sizes the pool by, and weight loading by renamed prefixes.

Tensor parallel: built inside `building_with(group)`
(pyvlm.layers.tensor_parallel), the decoder's layers, its embedding and the
LM head split over the group's ranks (vocab-parallel embedding and head),
and the KV shape is the rank's own (num_kv_heads: its local heads).
Families build their vision towers inside `building_tower()` (replicated,
every rank holding the whole tower, unless the engine builds
with shard_towers: its --mm-encoder-tp-mode "weights", when the tower's
attention and MLPs split over the group like the decoder's) and their
projectors inside `replicated()`.

A family's model subclasses VisionLanguageModel, builds its vision tower
and projector, and adds the image stages of the engine's contract
(prepare_images, encode_prepared; see pyvlm/models/README.md).
"""

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pyvlm.layers.attention import AttentionMetadata
from pyvlm.layers.linear import num_local_kv_heads
from pyvlm.layers.vocab_parallel import ParallelLMHead
from .decoders import decoder_for
from .llama import KVCache, LayerFactory, self_attention_layer
from .weight_loading import load_weights as load_named_weights


def renamed(name: str, prefixes: Sequence[Tuple[str, str]]) -> str:
    """A checkpoint name in the model's naming (first matching prefix)."""
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class VisionLanguageModel(nn.Module):
    """The text half of a VLM. NAME_PREFIXES: (checkpoint prefix, model
    prefix) pairs, tried in order, mapping every layout the family ships in
    onto the module tree."""

    NAME_PREFIXES: Tuple[Tuple[str, str], ...] = ()

    def __init__(self, config, text_config, layer_factory: LayerFactory = self_attention_layer,
                 **decoder_kwargs):
        super().__init__()
        self.config = config
        self.language_model = decoder_for(text_config, layer_factory, **decoder_kwargs)
        shape = self.language_model.shape
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        embedding = self.language_model.embed_tokens
        # Tied, the head splits the embedding's rows (extra rows included,
        # dropped from the logits), so each rank's head is its embedding slice.
        self.lm_head = ParallelLMHead(
            shape.vocab_size, shape.hidden_size,
            embedding.num_embeddings if self.tie_word_embeddings else None)
        if self.tie_word_embeddings:
            self.lm_head.weight = embedding.weight
        # The KV pool of this rank holds its own key/value heads only.
        self.num_layers = shape.num_layers
        self.num_kv_heads = num_local_kv_heads(shape.num_kv_heads)
        self.head_dim = shape.head_dim

    # --- weights -----------------------------------------------------------

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors into the parameters; raises listing
        unknown or missing names."""
        load_named_weights(self, weights, self.model_name_of)

    def model_name_of(self, checkpoint_name: str) -> Optional[str]:
        """This model's name for a checkpoint tensor; None for ones it ignores."""
        name = renamed(checkpoint_name, self.NAME_PREFIXES)
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return None  # tied to embed_tokens, as transformers ties it
        return self.vision_name_of(name)

    def vision_name_of(self, name: str) -> Optional[str]:
        """Hook: None for vision-tower tensors the model does not use."""
        return name

    # --- language model ----------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, hidden] (images are merged in by the runner).
        Ids past the embedding (an image placeholder the tokenizer added, as
        for the LLaVA authors' checkpoints) are clamped: their rows are
        replaced by the image's."""
        table = self.language_model.embed_tokens
        return table(input_ids.clamp(max=table.num_embeddings - 1))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: List[KVCache], inputs_embeds: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Final hidden states [T, hidden] of the step's packed tokens
        (positions [T], or [3, T] for M-RoPE)."""
        return self.language_model(input_ids, positions, attn, kv_caches, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab], the whole vocabulary on
        every rank (the head gathers the ranks' slices)."""
        # Rounded to the weights' dtype first, as transformers' logits are.
        return self.lm_head(hidden).float()
