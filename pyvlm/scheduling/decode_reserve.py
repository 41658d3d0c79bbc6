"""The decode room admission keeps for running requests (SGLang's
new_token_ratio), so a request admitted now is not preempted on the next
step for lack of pages.

Each running request is expected to generate `ratio` of the tokens it may
still generate (at least MIN_RESERVED_STEPS more, never more than it may).
The ratio starts at 0.7 x conservativeness and decays over decode steps
toward a seventh of that, as requests turn out to stop early; a preemption
shows the estimate was too low and resets it. conservativeness 0 reserves
nothing: admission then only needs the prompt's pages (and decode may
preempt), the behaviour before this reserve existed.
"""

import math

from pyvlm.scheduling.request import Request

INIT_RATIO = 0.7
MIN_RATIO_FACTOR = 0.14
DECAY_STEPS = 600
MAX_ESTIMATED_NEW_TOKENS = 4096  # SGLang's CLIP_MAX_NEW_TOKENS_ESTIMATION
MIN_RESERVED_STEPS = 8  # an admitted request decodes at least this long unpreempted


class DecodeReserve:
    """The ratio and the per-request decode-token estimate (module docstring)."""

    def __init__(self, conservativeness: float = 1.0):
        self.init_ratio = min(INIT_RATIO * conservativeness, 1.0)
        self.min_ratio = self.init_ratio * MIN_RATIO_FACTOR
        self.decay = (self.init_ratio - self.min_ratio) / DECAY_STEPS
        self.ratio = self.init_ratio
        self.min_tokens = MIN_RESERVED_STEPS if conservativeness > 0 else 0

    @property
    def is_off(self) -> bool:
        return self.init_ratio == 0.0

    def num_tokens_for(self, request: Request) -> int:
        """Decode tokens to keep room for on behalf of request."""
        remaining = max(request.max_new_tokens - len(request.output_ids), 0)
        estimate = math.ceil(min(remaining, MAX_ESTIMATED_NEW_TOKENS) * self.ratio)
        return min(remaining, max(estimate, self.min_tokens))

    def on_decode_step(self) -> None:
        self.ratio = max(self.ratio - self.decay, self.min_ratio)

    def on_preemption(self) -> None:
        self.ratio = self.init_ratio
