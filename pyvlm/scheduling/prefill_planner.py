"""Which waiting requests join a prefill batch, and how many tokens each.

SGLang's PrefillAdder in small pieces: a token budget per batch
(max_prefill_tokens) and per chunk (chunked_prefill_size), the schedule
policy's order, and at most one request left mid-chunk. In a mixed step the
decode tokens that run alongside count against both budgets first, as in
SGLang (its mixed_with_decode_tokens).
"""

from typing import Callable, List, Optional, Sequence

from pyvlm.scheduling.request import Request


class PrefillBudget:
    """Tokens one prefill batch may still take; num_decode_tokens: tokens of
    the decodes mixed into the same step, taken off both limits.
    max_mixed_prefill_tokens (> 0): the most prefill tokens of a step that
    also decodes, so the running streams' inter-token time stays near a
    decode step's (a lone prompt too long for it still runs whole when
    chunking is off)."""

    def __init__(self, max_prefill_tokens: int, chunked_prefill_size: Optional[int],
                 num_decode_tokens: int = 0, max_mixed_prefill_tokens: Optional[int] = None):
        self.num_tokens_left = max_prefill_tokens - num_decode_tokens
        is_chunked = chunked_prefill_size is not None and chunked_prefill_size > 0
        self.num_chunk_tokens_left = chunked_prefill_size - num_decode_tokens if is_chunked else None
        if num_decode_tokens > 0 and max_mixed_prefill_tokens and max_mixed_prefill_tokens > 0:
            self.num_tokens_left = min(self.num_tokens_left, max_mixed_prefill_tokens)
            if is_chunked:
                self.num_chunk_tokens_left = min(self.num_chunk_tokens_left,
                                                 max_mixed_prefill_tokens)

    @property
    def can_chunk(self) -> bool:
        return self.num_chunk_tokens_left is not None

    def grant(self, num_wanted: int, is_first: bool) -> int:
        """How many of num_wanted tokens may run now (nothing is taken): all
        if they fit; else, with chunking, what is left of the budget;
        without chunking, all of them only for the batch's first request (a
        prompt must run somehow)."""
        return self._num_granted(num_wanted, is_first)

    def spend(self, num_tokens: int) -> None:
        """Takes num_tokens (granted) from the batch's and the chunk's budget."""
        self.num_tokens_left -= num_tokens
        if self.can_chunk:
            self.num_chunk_tokens_left -= num_tokens

    def charge(self, num_tokens: int) -> None:
        """Counts work that is not chunked (an image's K/V rows, the tower
        work of the images a chunk starts: encoder_budget) against the batch's budget;
        it may go below zero, and then nothing else joins."""
        self.num_tokens_left -= num_tokens

    def _num_granted(self, num_wanted: int, is_first: bool) -> int:
        limit = self.num_tokens_left
        if self.can_chunk:
            return max(0, min(num_wanted, limit, self.num_chunk_tokens_left))
        if num_wanted <= limit or is_first:
            return num_wanted
        return 0


def order_waiting(waiting: Sequence[Request], policy: str,
                  num_cached_tokens: Callable[[Request], int]) -> List[Request]:
    """fcfs keeps the queue order (preempted requests sit at its front);
    lpm puts the longest cached prefix first, ties in queue order."""
    if policy == "fcfs":
        return list(waiting)
    if policy == "lpm":
        return sorted(waiting, key=lambda request: -num_cached_tokens(request))
    raise ValueError(f"unknown schedule_policy {policy!r} (expected 'fcfs' or 'lpm')")
