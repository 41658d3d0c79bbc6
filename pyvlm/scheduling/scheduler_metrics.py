"""Scheduler counters and SGLang's batch log lines (logger `pyvlm.engine`)."""

import logging
import time

logger = logging.getLogger("pyvlm.engine")


class SchedulerMetrics:
    """Prompt/cache-hit totals, preemptions and decode throughput."""

    def __init__(self, decode_log_interval: int):
        self.decode_log_interval = max(decode_log_interval, 1)
        self.num_prompt_tokens = 0  # prompt tokens at first admission
        self.num_cached_prompt_tokens = 0  # of which served by the prefix cache
        self.num_preemptions = 0
        self.num_failed_requests = 0  # ended by a model error (fault isolation)
        self.num_decode_steps = 0
        self.last_gen_throughput = 0.0
        self._num_generated_since_log = 0
        self._last_log_time = time.perf_counter()

    @property
    def cache_hit_rate(self) -> float:
        return self.num_cached_prompt_tokens / max(self.num_prompt_tokens, 1)

    def on_first_admission(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        self.num_prompt_tokens += num_prompt_tokens
        self.num_cached_prompt_tokens += num_cached_tokens

    def log_prefill(self, num_new_seqs: int, num_new_tokens: int, num_cached_tokens: int,
                    token_usage: float, num_running: int, num_queued: int) -> None:
        """num_running: requests running when the batch was planned, not
        those it admits (SGLang's #running-req); in a mixed step, the
        decodes that ran with the prefill."""
        hit_rate = 100.0 * num_cached_tokens / max(num_new_tokens + num_cached_tokens, 1)
        logger.info(
            f"Prefill batch. #new-seq: {num_new_seqs}, #new-token: {num_new_tokens}, "
            f"#cached-token: {num_cached_tokens}, cache hit rate: {hit_rate:.2f}%, "
            f"token usage: {token_usage:.2f}, #running-req: {num_running}, "
            f"#queue-req: {num_queued}")

    def on_mixed_decodes(self, num_decodes: int) -> None:
        """Counts the tokens decoded alongside a prefill (a mixed step) in
        the generation throughput; the step logs as a prefill batch."""
        self._num_generated_since_log += num_decodes

    def on_decode_step(self, num_running: int, num_used_tokens: int, token_usage: float,
                       num_queued: int) -> None:
        """Counts one decode step (one token per running request) and logs
        every decode_log_interval steps."""
        self.num_decode_steps += 1
        self._num_generated_since_log += num_running
        if self.num_decode_steps % self.decode_log_interval:
            return
        now = time.perf_counter()
        self.last_gen_throughput = self._num_generated_since_log / max(now - self._last_log_time, 1e-9)
        self._num_generated_since_log, self._last_log_time = 0, now
        logger.info(
            f"Decode batch. #running-req: {num_running}, #token: {num_used_tokens}, "
            f"token usage: {token_usage:.2f}, "
            f"gen throughput (token/s): {self.last_gen_throughput:.2f}, #queue-req: {num_queued}")
