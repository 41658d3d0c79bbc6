"""The token embedding and the LM head split over the vocabulary (Megatron-
LM's vocab-parallel embedding, as vLLM's VocabParallelEmbedding/ParallelLMHead).

Each of the group's ranks holds a contiguous slice of the table's rows: the
rows are padded to a multiple of the group size, so every rank holds the
same number (padding rows are zero from the checkpoint and never read for a
real id). The embedding looks up the ids of its slice, gives zeros for the
others, and the all-reduce sums the one real row per id; the LM head gives
each rank the logits of its slice, and the all-gather puts the full vocab
back on every rank (so every rank samples the same token).

With one rank (the default group) the embedding is nn.Embedding and the
head nn.Linear without a bias, on the same weights.
"""

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .linear import linear
from .tensor_parallel import TensorParallelGroup, current_group


class VocabParallelEmbedding(nn.Module):
    """An embedding table of num_embeddings rows of embedding_dim, rows
    split over tp (None: the current group). num_embeddings is the whole
    table's (ids past it are the caller's to keep out, as for nn.Embedding);
    the rank holds rows [vocab_start, vocab_start + num_local_rows), those
    past num_embeddings being padding."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 tp: Optional[TensorParallelGroup] = None):
        super().__init__()
        self.tp = tp or current_group()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_local_rows = -(-num_embeddings // self.tp.size)
        self.vocab_start = self.tp.rank * self.num_local_rows
        # Rows of the checkpoint this rank holds (fewer than num_local_rows
        # on the last ranks when the table was padded).
        self.num_real_rows = max(0, min(num_embeddings - self.vocab_start, self.num_local_rows))
        self.weight = nn.Parameter(torch.empty(self.num_local_rows, embedding_dim))
        nn.init.normal_(self.weight)  # as nn.Embedding, draw for draw at one rank
        self.weight.weight_loader = self.weight_loader

    @property
    def padded_size(self) -> int:
        """Rows of the whole padded table (num_local_rows on every rank)."""
        return self.num_local_rows * self.tp.size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_name: Optional[str] = None) -> None:
        """Copies this rank's rows of the full checkpoint table `loaded`
        [num_embeddings, embedding_dim] (padding rows become zero);
        ValueError if loaded has another shape."""
        if shard_name is not None:
            raise ValueError(f"an embedding has no shard {shard_name!r}")
        expected = (self.num_embeddings, self.embedding_dim)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expected shape {expected}, got {tuple(loaded.shape)}")
        if self.num_real_rows:
            param.data[:self.num_real_rows].copy_(loaded.narrow(0, self.vocab_start,
                                                                self.num_real_rows))
        param.data[self.num_real_rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_local_rows)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        rows.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(rows)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp_rank={self.tp.rank}, "
                f"tp_size={self.tp.size}")


class ParallelLMHead(VocabParallelEmbedding):
    """The LM head over the vocabulary's first vocab_size rows of its table
    (weight [num_local_rows, hidden], split as the embedding's). Tied to the
    embedding, it is built with the embedding's size (extra rows included)
    and shares its weight: both split the same rows."""

    def __init__(self, vocab_size: int, embedding_dim: int, num_embeddings: Optional[int] = None,
                 tp: Optional[TensorParallelGroup] = None):
        super().__init__(num_embeddings or vocab_size, embedding_dim, tp)
        self.vocab_size = vocab_size
        # nn.Linear's init (the head was one), so a seeded model draws the
        # same weights at one rank.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> logits [N, vocab_size] in the weights' dtype, the
        same on every rank."""
        logits = self.tp.all_gather_last_dim(linear(hidden, self.weight))
        if logits.shape[-1] != self.vocab_size:  # padding rows, or a tied table's extra rows
            logits = logits[..., :self.vocab_size]
        return logits
