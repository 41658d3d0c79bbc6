"""A step's images split over the tensor-parallel ranks (vLLM's
mm_encoder_tp_mode="data"): every rank holds the whole vision tower and
encodes only its share of the images that missed the encoder cache, then
the ranks all-gather the rows, so every rank ends with every image's rows
(and the same encoder cache) as if it had encoded them all.

Every rank sees the same items (rank 0 broadcasts the step), so each
computes the same owners without a message: largest image first, to the
rank with the fewest rows so far. A rank's rows travel as one tensor,
padded to the largest share (all_gather takes equal shapes).

A failure must not leave the other ranks waiting in the gather: after
encoding its share, each rank says whether it failed (a host all-reduce
over the gloo group). If any did, every rank encodes every image itself,
as one replicated rank would: a bad image then fails the same way on every
rank, with its own message, and rank 0's scheduler isolates its request as
it does for one rank.
"""

from typing import Callable, List, Sequence

import torch

from pyvlm.layers.tensor_parallel import TensorParallelGroup
from pyvlm.scheduling.types import MultimodalItem

# (items) -> their rows [rows_of(item), width] each, in order
EncodeItems = Callable[[Sequence[MultimodalItem]], List[torch.Tensor]]


def share_owners(rows: Sequence[int], num_ranks: int) -> List[int]:
    """The rank that encodes each image: the largest first, each to the rank
    holding the fewest rows so far (the lowest such rank on a tie); every
    rank computes the same list from the same rows."""
    loads = [0] * num_ranks
    owners = [0] * len(rows)
    for index in sorted(range(len(rows)), key=lambda i: -rows[i]):
        owner = min(range(num_ranks), key=loads.__getitem__)
        owners[index] = owner
        loads[owner] += rows[index]
    return owners


class ImageShares:
    """Encodes a step's images over the ranks of `group` (module docstring).
    rows_of(item): the rows the encoder gives for an item; width/dtype:
    those rows' (a rank with no share still sends a padded block)."""

    def __init__(self, group: TensorParallelGroup, rows_of: Callable[[MultimodalItem], int],
                 width: int, dtype: torch.dtype, device: torch.device):
        self.group, self.rows_of = group, rows_of
        self.width, self.dtype, self.device = width, dtype, device

    def encode(self, items: Sequence[MultimodalItem],
               encode_items: EncodeItems) -> List[torch.Tensor]:
        """Every item's rows, in order, each rank encoding its share with
        encode_items; every rank gets the same result."""
        rows = [self.rows_of(item) for item in items]
        owners = share_owners(rows, self.group.size)
        mine = [item for item, owner in zip(items, owners) if owner == self.group.rank]
        try:
            encoded = self._encode_share(mine, encode_items)
            failed = False
        except Exception:  # noqa: BLE001 - every rank retries all images below
            failed = True
        if self.group.any_rank(failed):
            return encode_items(items)
        return self._gather(rows, owners, encoded)

    def _encode_share(self, mine: Sequence[MultimodalItem],
                      encode_items: EncodeItems) -> torch.Tensor:
        """This rank's images' rows packed into one [rows, width] block
        (encode_items checks each image's row count)."""
        if not mine:
            return torch.empty(0, self.width, dtype=self.dtype, device=self.device)
        encoded = torch.cat(encode_items(mine))
        if encoded.shape[1] != self.width:
            raise RuntimeError(f"image encoder gave rows of width {encoded.shape[1]}, "
                               f"not {self.width}")
        return encoded.to(self.dtype)

    def _gather(self, rows: Sequence[int], owners: Sequence[int],
                encoded: torch.Tensor) -> List[torch.Tensor]:
        totals = [0] * self.group.size
        for count, owner in zip(rows, owners):
            totals[owner] += count
        padded = encoded.new_zeros(max(totals), self.width)
        padded[:encoded.shape[0]] = encoded
        blocks = self.group.all_gather(padded)
        offsets = [0] * self.group.size
        out = []
        for count, owner in zip(rows, owners):
            out.append(blocks[owner][offsets[owner]:offsets[owner] + count])
            offsets[owner] += count
        return out
