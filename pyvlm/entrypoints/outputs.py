"""Accumulates a request's RequestOutput deltas into SGLang-style results.

A delta's meta_info lists the logprobs of its new tokens only (so a long
stream costs linear time); the final result's lists cover every token."""

from typing import List, Optional

from pyvlm.scheduling.request import Request, RequestOutput


class OutputAccumulator:
    """Turns deltas into {"text", "output_ids", "meta_info"} dicts."""

    def __init__(self, request: Request):
        self.rid = request.rid
        self.text_parts: List[str] = []
        self.output_ids: List[int] = []
        self.logprobs: list = []
        self.last: RequestOutput = None

    def delta(self, out: RequestOutput) -> dict:
        self.text_parts.append(out.new_text)
        self.output_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.new_logprobs)
        self.last = out
        return {"text": out.new_text, "token_ids": list(out.new_token_ids),
                "finished": out.finished, "meta_info": self._meta(out, out.new_logprobs)}

    def result(self) -> dict:
        return {"text": "".join(self.text_parts), "output_ids": list(self.output_ids),
                "meta_info": self._meta(self.last, self.logprobs)}

    def _meta(self, out: RequestOutput, logprobs: list) -> dict:
        return output_meta(self.rid, out, logprobs if self.logprobs else None)


def output_meta(rid: str, out: RequestOutput, logprobs: Optional[list]) -> dict:
    """SGLang's meta_info of an output; logprobs (the tokens' (id, logprob,
    top-N) to list) None leaves the logprob keys out (no logprob yet)."""
    finish = None
    if out.finished:
        finish = {"type": out.finish_reason, "matched": out.matched_stop}
    meta = {"id": rid, "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "cached_tokens": out.cached_tokens,
            "finish_reason": finish}
    if logprobs is not None:
        meta["output_token_logprobs"] = [(lp, tid) for tid, lp, _ in logprobs]
        meta["output_top_logprobs"] = [list(top) for _, _, top in logprobs]
    return meta
