"""The continuous-batching scheduler (SGLang style), free of torch.

Each step runs the waiting requests that fit (or the one request
mid-chunk) as prefill chunks, and one decode token of every running
request. With enable_mixed_chunk (SGLang's mixed chunk) both go into one
step, the decode tokens counted against the prefill budget, so arrivals
never pause the streams; without it, or when the decodes' pages could only
come from preemption, a step is prefill alone when any fits, else decode
alone. Prefixes are shared through the radix cache; when decode runs out of
pages the most recently arrived request is preempted and later recomputed
(its cached full pages make that cheap), so clients never see an error.
With overlap scheduling each step is planned and launched while the one
before it still runs (pyvlm.scheduling.overlap).
"""

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Callable, Deque, Dict, List, Mapping, Optional, Tuple

from pyvlm.config import CacheConfig, SchedulerConfig
from pyvlm.scheduling.decode_reserve import DecodeReserve
from pyvlm.scheduling.detokenizer import detokenizer_factory as default_detokenizer_factory
from pyvlm.scheduling.encode_ahead import charged_images, pick_encode_ahead
from pyvlm.scheduling.encoder_budget import fit_chunk
from pyvlm.scheduling.errors import DeviceFailure
from pyvlm.scheduling.future_tokens import FUTURE_TOKEN
from pyvlm.scheduling.isolation import ChunkFailure, forward_isolated
from pyvlm.scheduling.kv_manager import KVManager
from pyvlm.scheduling.output_processor import record_sample, take_output
from pyvlm.scheduling.overlap import Frontier, InFlight, frontier_after, is_still_running
from pyvlm.scheduling.prefill_planner import PrefillBudget, order_waiting
from pyvlm.scheduling.radix_cache import PrefixMatch
from pyvlm.scheduling.request import Request, RequestOutput, RequestStatus
from pyvlm.scheduling.scheduler_metrics import SchedulerMetrics
from pyvlm.scheduling.types import (CrossImage, ForwardBatch, ModelRunner, MultimodalItem,
                                    SchedulerStats, SequenceChunk)

Planned = Tuple[Request, int]  # a request and how many of its tokens run this step
NOTHING_UNREAD: Mapping[Request, int] = MappingProxyType({})  # no step in flight
UNBOUNDED = 1 << 62  # a budget nothing exceeds


@dataclass
class PrefillPlan:
    """The prefill chunks of a step, planned from `frontier`."""

    frontier: Optional[Frontier] = None
    items: List[Planned] = field(default_factory=list)
    num_cached_tokens: int = 0  # prefix-cache hits of the newly admitted requests
    # image K/V rows (cross-attention families) computed this step or found
    # in the pool; the prefill log counts them as tokens, as SGLang does
    num_new_image_rows: int = 0
    num_cached_image_rows: int = 0
    num_new_seqs: int = 0
    has_partial: bool = False  # the last request stops mid-prompt (then nothing may follow)
    # the running requests' reserved pages, summed once per plan (_has_room)
    num_running_reserved: Optional[int] = None
    num_tokens_left: int = 0  # what the step's budget leaves (encode_ahead may use it)


@dataclass
class StepPlan:
    """One step: its prefill chunks first, then the decodes (one token
    each). is_decode: no prefill, so the runner's decode path."""

    prefill: PrefillPlan
    decodes: List[Request]
    num_running: int  # requests running when it was planned (the log's #running-req)
    encode_ahead: List[MultimodalItem] = field(default_factory=list)  # (encode_ahead.py)

    @property
    def is_decode(self) -> bool:
        return not self.prefill.items

    @cached_property
    def items(self) -> List[Planned]:
        # Built once: a step reads it several times, and neither part
        # changes once the plan is made.
        return self.prefill.items + [(request, 1) for request in self.decodes]


class Scheduler:
    """Owns the request queues and page bookkeeping; `step` runs one batch.

    detokenizer_factory(request) makes each request's detokenizer (see
    pyvlm.scheduling.detokenizer.detokenizer_factory); None streams ids only.
    images_ready(items): given where the runner encodes images ahead beside
    its steps (ModelRunner.images_ready); with vision_encode_ahead, a
    request then waits for its images while others run (encode_ahead.py).
    """

    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_pages: int,
                 context_length: int, detokenizer_factory: Optional[Callable] = None,
                 image_rows_per_page: int = 0,
                 images_ready: Optional[Callable[[List[MultimodalItem]], bool]] = None):
        self.config = sched
        self.images_ready = images_ready if sched.vision_encode_ahead else None
        self.page_size = cache.page_size
        self.context_length = context_length
        self.kv = KVManager(num_pages, cache.page_size, not cache.disable_radix_cache,
                            image_rows_per_page)
        self.make_detokenizer = detokenizer_factory or default_detokenizer_factory(None)
        self.waiting: Deque[Request] = deque()
        self.running: List[Request] = []
        self.chunked: Optional[Request] = None  # the request mid-way through a chunked prefill
        self.requests: Dict[str, Request] = {}
        self.metrics = SchedulerMetrics(sched.decode_log_interval)
        self.reserve = DecodeReserve(sched.schedule_conservativeness)
        self._arrivals = itertools.count()
        self._pending_outputs: List[RequestOutput] = []
        self._launched: Optional[InFlight] = None  # a decode step launched, not read (overlap)

    # ---- public API -------------------------------------------------------

    def validate(self, request: Request) -> None:
        """Refuses prompts the context or the KV pool cannot hold and clips
        max_new_tokens to the context (sets request.max_new_tokens)."""
        num_prompt_tokens = len(request.prompt_ids)
        if num_prompt_tokens == 0:
            raise ValueError("The prompt is empty")
        if num_prompt_tokens + 1 > self.context_length:
            raise ValueError(
                f"The prompt has {num_prompt_tokens} tokens (after image expansion), which "
                f"exceeds the context length of {self.context_length} tokens")
        capacity = self.kv.num_total_pages * self.page_size
        num_image_pages = self.kv.num_image_pages(request)
        if self.kv.num_pages_for(num_prompt_tokens + 1) + num_image_pages > self.kv.num_total_pages:
            images = (f" and its images' cross-attention K/V take {num_image_pages} pages "
                      f"({num_image_pages * self.page_size} tokens)") if num_image_pages else ""
            raise ValueError(
                f"The prompt has {num_prompt_tokens} tokens (after image expansion){images}, "
                f"which exceeds the KV cache capacity of {capacity} tokens")
        request.max_new_tokens = min(request.sampling.max_new_tokens,
                                     self.context_length - num_prompt_tokens)

    def add_request(self, request: Request) -> None:
        """Validates and queues a request (ValueError if it cannot run)."""
        if request.rid in self.requests:
            raise ValueError(f"request id {request.rid!r} is already in use")
        self.validate(request)
        request.arrival = next(self._arrivals)
        request.status = RequestStatus.WAITING
        request.detokenizer = self.make_detokenizer(request)
        self.requests[request.rid] = request
        self.waiting.append(request)

    def abort(self, rid: str) -> Optional[RequestOutput]:
        """Ends a request at any stage, freeing all its pages; returns its
        final output (finish_reason "abort"), or None for an unknown rid."""
        request = self.requests.get(rid)
        if request is None:
            return None
        self._detach(request)
        self.kv.release(request)
        request.finish_reason, request.matched_stop = "abort", None
        return self._retire(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self._pending_outputs
                    or self._launched)

    def step(self, runner: ModelRunner) -> List[RequestOutput]:
        """Schedules one batch, runs it and returns the outputs due. With
        overlap scheduling a step is only launched here, and its outputs
        come from the next call, which launches the step after it first
        (pyvlm.scheduling.overlap)."""
        if self._launched is not None:
            outputs, self._pending_outputs = self._pending_outputs, []
            return outputs + self._step_overlapped(runner)
        step = self._schedule()
        outputs, self._pending_outputs = self._pending_outputs, []
        if not step.items:
            return outputs
        if self._may_overlap(runner):
            self._launched = self._launch(runner, step, self._batch(step))
            if self._launched is not None:
                return outputs
        return outputs + self._run_plainly(runner, step)

    # ---- overlap scheduling (pyvlm/scheduling/overlap.py) -------------------

    def _may_overlap(self, runner: ModelRunner) -> bool:
        """Whether a step may be launched before the one in flight is read."""
        return bool(self.config.overlap_schedule) and hasattr(runner, "launch")

    def _launch(self, runner: ModelRunner, step: StepPlan,
                batch: ForwardBatch) -> Optional[InFlight]:
        """Launches a step; None when launching raised (the caller then runs
        the step the plain way, which isolates the failure)."""
        try:
            launched = runner.launch(batch)
        except DeviceFailure:
            raise
        except Exception:  # noqa: BLE001 - forward_isolated reruns it and blames one request
            return None
        return InFlight(step, batch, launched)

    def _step_overlapped(self, runner: ModelRunner) -> List[RequestOutput]:
        """Launches the step after the one in flight when it can, then reads
        and processes the one in flight; a following step whose launch
        raised runs plainly after that."""
        flight, self._launched = self._launched, None
        following = self._plan_following(flight) if self._may_overlap(runner) else None
        if following is not None:
            batch = self._batch(following, flight.num_tokens)
            self._launched = self._launch(runner, following, batch)
        outputs = self._read(flight)
        if following is not None and self._launched is None:
            outputs += self._run_plainly(runner, following)
        return outputs

    def _plan_following(self, flight: InFlight) -> Optional[StepPlan]:
        """The step after the one in flight, planned as a plain step is but
        from what the flight leaves (overlap.frontier_after) and without
        preemption; None when nothing can run without reading it first."""
        frontier = frontier_after(flight, self.running, self.chunked, self.context_length)
        step = self._plan(frontier, self._decode_without_preemption)
        return step if step.items else None

    def _decode_without_preemption(self, frontier: Frontier) -> List[Request]:
        if frontier.running and self._reserve_decode_pages(frontier):
            return list(frontier.running)
        return []

    def _read(self, flight: InFlight) -> List[RequestOutput]:
        """Waits for the step in flight and processes the results of its
        requests still running (a result of a request that ended or was
        aborted meanwhile is dropped)."""
        try:
            results = flight.launched.wait()
        except DeviceFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - no chunk to blame: the step's requests fail
            results = [ChunkFailure(exc)] * len(flight.batch.chunks)
        live = self._live_indices(flight.step.items)
        return self._finish(flight.step, live, [results[i] for i in live])

    def _run_plainly(self, runner: ModelRunner, step: StepPlan) -> List[RequestOutput]:
        """Runs the step and processes its results (nothing in flight); a
        request that ended since it was planned is left out."""
        items = step.items
        live = self._live_indices(items)
        is_decode = not live or live[0] >= len(step.prefill.items)  # (live ascends)
        batch = ForwardBatch(is_decode, [self._chunk(*items[i]) for i in live], step.encode_ahead)
        results = forward_isolated(runner, batch) if live else []
        return self._finish(step, live, results)

    @staticmethod
    def _live_indices(items: List[Planned]) -> List[int]:
        return [i for i, (request, _) in enumerate(items) if is_still_running(request)]

    def _finish(self, step: StepPlan, live: List[int], results) -> List[RequestOutput]:
        """Processes the results of the step's items at indices `live`."""
        items, num_prefills = step.items, len(step.prefill.items)
        outputs = self._process([items[i] for i in live], results,
                                bisect.bisect_left(live, num_prefills))  # (live ascends)
        self._after_step(step)
        return outputs

    def flush_cache(self) -> bool:
        """Empties the prefix cache; only when idle (returns False otherwise).
        The caller also drops the runner's encoder cache."""
        if self.has_work():
            return False
        self.kv.cache.reset()
        return True

    def stats(self) -> SchedulerStats:
        return {
            "num_running_reqs": len(self.running) + (self.chunked is not None),
            "num_queued_reqs": len(self.waiting),
            "token_usage": self._token_usage(),
            "cache_hit_rate": self.metrics.cache_hit_rate,
            "num_used_pages": self.kv.num_used_pages,
            "num_cached_pages": self.kv.cache.num_pages,
            "num_preemptions": self.metrics.num_preemptions,
            "num_failed_requests": self.metrics.num_failed_requests,
        }

    # ---- what a step runs ---------------------------------------------------

    def _schedule(self) -> StepPlan:
        """The next step with nothing in flight; decode alone may preempt."""
        return self._plan(Frontier(self.running, self.chunked),
                          lambda frontier: self._schedule_decode())

    def _plan(self, frontier: Frontier,
              schedule_decode: Callable[[Frontier], List[Request]]) -> StepPlan:
        """Mixed: pages for the decodes first (free list, then cache
        eviction), then prefill in what the decodes leave of the budget.
        Otherwise today's rule: prefill alone if any fits, else decode alone
        (schedule_decode: the running requests that decode, their pages
        taken)."""
        num_running = len(frontier.running)
        if self._can_mix(frontier) and self._reserve_decode_pages(frontier):
            plan = self._schedule_prefill(frontier, num_running)
            step = StepPlan(plan, list(frontier.running), num_running)
        else:
            plan = self._schedule_prefill(frontier)
            decodes = [] if plan.items else schedule_decode(frontier)
            step = StepPlan(plan, decodes, num_running)
        if self.config.vision_encode_ahead and step.items:
            # A tower beside the steps is not the step's work (encode_ahead.py).
            budget = step.prefill.num_tokens_left if self.images_ready is None else UNBOUNDED
            step.encode_ahead = pick_encode_ahead(self.waiting, self._images_to_encode, budget)
        return step

    def _can_mix(self, frontier: Frontier) -> bool:
        """Mixing is on, something runs, and its decode tokens leave room in
        the prefill budget (else prefill would starve behind the decodes, as
        in SGLang; a step of prefill alone is the better fallback)."""
        num_decodes, config = len(frontier.running), self.config
        if not config.enable_mixed_chunk or not frontier.running:
            return False
        chunk_size = config.chunked_prefill_size
        is_chunked = chunk_size is not None and chunk_size > 0
        return num_decodes < config.max_prefill_tokens and (not is_chunked or num_decodes < chunk_size)

    # ---- prefill ----------------------------------------------------------

    def _schedule_prefill(self, frontier: Frontier, num_decode_tokens: int = 0) -> PrefillPlan:
        plan = PrefillPlan(frontier)
        budget = PrefillBudget(self.config.max_prefill_tokens, self.config.chunked_prefill_size,
                               num_decode_tokens, self.config.max_mixed_prefill_tokens)
        chunked = frontier.chunked
        if chunked is None or self._continue_chunk(chunked, frontier.start_of(chunked), budget,
                                                   plan):
            for request in order_waiting(self.waiting, self.config.schedule_policy,
                                         self._num_matched):
                if plan.has_partial or not self._has_running_slot(plan):
                    break
                if self._waits_for_tower(request, plan):
                    continue
                if not self._admit(request, budget, plan):
                    break
        plan.num_tokens_left = budget.num_tokens_left
        return plan

    def _continue_chunk(self, request: Request, start: int, budget: PrefillBudget,
                        plan: PrefillPlan) -> bool:
        """The next chunk of the request mid-prompt, from position start."""
        num_tokens, tower = fit_chunk(charged_images(request), start,
                                      budget.grant(request.num_tokens - start, is_first=True),
                                      budget.num_tokens_left, budget.can_chunk, must_run=True)
        if num_tokens == 0 or not self.kv.reserve(request, start + num_tokens):
            return False
        budget.spend(num_tokens)
        budget.charge(tower)  # the tower work of the images it starts (encoder_budget)
        plan.items.append((request, num_tokens))
        plan.has_partial = start + num_tokens < request.num_tokens
        return True

    def _waits_for_tower(self, request: Request, plan: PrefillPlan) -> bool:
        """Whether request's images still run through the tower beside the
        steps (or are yet to start there) while other work fills this step:
        it is admitted once they are ready. With nothing else to run, its
        own step encodes them (an idle server's first token waits for
        nothing else)."""
        if self.images_ready is None or not request.mm_items:
            return False
        if not (plan.frontier.running or plan.items):
            return False
        images = self._images_to_encode(request)
        return bool(images) and not (request.encoded_ahead and self.images_ready(images))

    def _admit(self, request: Request, budget: PrefillBudget, plan: PrefillPlan) -> bool:
        """Matches the prefix cache, takes budget and pages; False to stop."""
        match = self.kv.match(request)
        if not self._has_room(request, match, plan):
            return False
        # Image K/V rows to compute (Llama-3.2-Vision) count as prefill
        # tokens, as SGLang counts encoder tokens: they bound the tower work
        # and activations of one step. They are never chunked.
        num_image_rows = self.kv.num_unwritten_image_rows(request)
        if plan.items and num_image_rows > budget.num_tokens_left:
            return False
        # A chunk pays for the tower work of the images it starts, or is cut
        # to what it can pay for (encoder_budget).
        num_tokens, num_image_tokens = fit_chunk(
            charged_images(request), match.num_tokens,
            budget.grant(request.num_tokens - match.num_tokens, is_first=not plan.items),
            budget.num_tokens_left, budget.can_chunk, must_run=not plan.items)
        if num_tokens == 0 or not self.kv.admit(request, match, num_tokens):
            return False
        budget.spend(num_tokens)
        budget.charge(num_image_rows + num_image_tokens)
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        if request.num_preemptions == 0:
            request.num_cached_tokens = match.num_tokens
            self.metrics.on_first_admission(len(request.prompt_ids), match.num_tokens)
        self._add_admitted(plan, request, num_tokens, match)
        if plan.has_partial:
            self.chunked = request
        return True

    @staticmethod
    def _add_admitted(plan: PrefillPlan, request: Request, num_tokens: int,
                      match: PrefixMatch) -> None:
        plan.items.append((request, num_tokens))
        plan.has_partial = num_tokens < request.num_uncomputed_tokens
        plan.num_cached_tokens += match.num_tokens
        plan.num_new_seqs += 1
        for entry in request.image_kv:
            if entry.is_written:
                plan.num_cached_image_rows += entry.num_rows
            else:
                plan.num_new_image_rows += entry.num_rows

    def _has_room(self, request: Request, match: PrefixMatch, plan: PrefillPlan) -> bool:
        """Whether the pool, after this request's whole prompt and its decode
        reserve, still holds the reserve of every request already running,
        mid-chunk or admitted this step. A request with nothing else in
        flight is always admitted (it fits: validate checked its prompt)."""
        others = self._planned_or_chunked(plan)
        if self.reserve.is_off or not (plan.frontier.running or others):
            return True
        needed = self._running_reserved(plan) + sum(self._reserved_pages(o) for o in others)
        needed += self._reserved_pages(request) - len(match.pages)
        available = (self.kv.allocator.num_free + self.kv.num_evictable_pages
                     - self.kv.cache.num_unprotected_on_path(match.node))
        return needed <= available

    def _running_reserved(self, plan: PrefillPlan) -> int:
        """_reserved_pages summed over the running requests: fixed while a
        step's prefill is planned, so summed once, not per admission."""
        if plan.num_running_reserved is None:
            plan.num_running_reserved = sum(self._reserved_pages(r) for r in plan.frontier.running)
        return plan.num_running_reserved

    @staticmethod
    def _planned_or_chunked(plan: PrefillPlan) -> List[Request]:
        """The plan's requests and the one mid-prompt (running ones aside)."""
        frontier = plan.frontier
        admitted = [request for request, _ in plan.items]
        is_extra = frontier.chunked is not None and frontier.chunked not in admitted
        return admitted + ([frontier.chunked] if is_extra else [])

    def _reserved_pages(self, request: Request) -> int:
        """Pages request still needs for its prompt and its decode reserve,
        beyond those it holds (capped at the pool: it must fit alone)."""
        num_tokens = request.num_tokens + self.reserve.num_tokens_for(request)
        num_pages = min(self.kv.num_pages_for(num_tokens), self.kv.num_total_pages)
        return max(num_pages - len(request.page_table), 0) + self.kv.num_missing_image_pages(request)

    def _has_running_slot(self, plan: PrefillPlan) -> bool:
        # A continuing chunked request is already among plan.items.
        return len(plan.frontier.running) + len(plan.items) < self.config.max_running_requests

    def _images_to_encode(self, request: Request) -> List[MultimodalItem]:
        """The images admitting request would send through the tower: those
        its cached prefix does not cover, and cross-attention images whose
        K/V rows are not in the pool."""
        num_matched = self._num_matched(request)
        has_cross_rows_to_write = self.kv.num_unwritten_image_rows(request) > 0
        return [item for item in request.mm_items
                if (has_cross_rows_to_write if item.num_cross_rows
                    else item.offset + item.length > num_matched)]

    def _num_matched(self, request: Request) -> int:
        # a look (kv.match never touches the LRU order; admission does)
        return self.kv.match(request).num_tokens

    # ---- decode and preemption --------------------------------------------

    def _schedule_decode(self) -> List[Request]:
        """Every running request feeds its last token; pages for the new slots
        come from the free list, then the cache, then preemption."""
        while self.running:
            if self._reserve_decode_pages(Frontier(self.running, self.chunked)):
                return list(self.running)
            self._preempt_latest()
        return []

    def _reserve_decode_pages(self, frontier: Frontier) -> bool:
        """A slot for the decode token of every request of the frontier,
        from the free list and then the cache; False (no page taken) if too
        few."""
        # A token at position p lies past a request's pages when
        # p >= len(page_table) * page_size (inline: a call per request adds up).
        page_size, start_of = self.page_size, frontier.start_of
        needy = [r for r in frontier.running if start_of(r) >= len(r.page_table) * page_size]
        if not self.kv.make_free(len(needy)):
            return False
        for request in needy:
            self.kv.reserve(request, frontier.start_of(request) + 1)
        return True

    def _preempt_latest(self) -> None:
        candidates = self.running + ([self.chunked] if self.chunked is not None else [])
        victim = max(candidates, key=lambda request: request.arrival)
        num_pages = self.kv.num_pages_for(victim.num_tokens) + self.kv.num_image_pages(victim)
        if len(candidates) > 1 and num_pages <= self.kv.num_total_pages:
            self._preempt(victim)
            return
        # Alone and still short, or too long to ever resume: the pool cannot hold it.
        self._detach(victim)
        self.kv.cache_computed(victim)
        self.kv.release(victim)
        victim.finish_reason = "length"
        self._pending_outputs.append(self._retire(victim))

    def _preempt(self, request: Request) -> None:
        """Releases the request's pages (its computed full pages stay cached)
        and queues it first; it will prefill prompt + output again."""
        self._detach(request)
        self.kv.cache_computed(request)
        self.kv.release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.metrics.num_preemptions += 1
        self.reserve.on_preemption()
        self.waiting.appendleft(request)

    # ---- running a batch and its results ----------------------------------

    def _batch(self, step: StepPlan,
               num_unread: Mapping[Request, int] = NOTHING_UNREAD) -> ForwardBatch:
        """The step's chunks, each after its request's tokens in a launched
        step not read yet (num_unread: overlap.InFlight.num_tokens)."""
        return ForwardBatch(step.is_decode, [self._chunk(request, n, num_unread.get(request, 0))
                                             for request, n in step.items], step.encode_ahead)

    def _chunk(self, request: Request, num_tokens: int, num_unread: int = 0) -> SequenceChunk:
        """The chunk of the request's next num_tokens after its computed and
        its num_unread tokens; its page_table, prompt_ids and output_ids are
        the request's own lists (read-only for the runner), so a step costs
        time in its new tokens, not the context. A chunk that starts at
        num_tokens feeds the token the step in flight samples: FUTURE_TOKEN."""
        start, num_total = request.num_computed_tokens + num_unread, request.num_tokens
        end = start + num_tokens
        feeds_future = start == num_total
        return SequenceChunk(
            rid=request.rid,
            token_ids=[FUTURE_TOKEN] if feeds_future else request.token_ids(start, end),
            start_pos=start,
            positions=request.positions(start, end),
            page_table=request.page_table,
            mm_items=request.mm_items_overlapping(start, end),
            sample=end >= num_total,
            sampling=request.sampling,
            seed=request.seed,
            step=len(request.output_ids) + feeds_future,
            prompt_ids=request.prompt_ids,
            output_ids=request.output_ids,
            cross_images=self._cross_image_refs(request, is_written_in_flight=num_unread > 0),
        )

    def _cross_image_refs(self, request: Request,
                          is_written_in_flight: bool = False) -> List[CrossImage]:
        """is_written_in_flight: the request's chunk in the step in flight
        writes whatever of its images' K/V is not written yet (a chunk asks
        for every unwritten image), so this one needs not."""
        if not request.image_kv:  # not a cross-attention family's request
            return []
        return [CrossImage(item, tuple(entry.pages), not (entry.is_written or is_written_in_flight))
                for item, entry in self._cross_images(request)]

    @staticmethod
    def _cross_images(request: Request):
        """(item, its K/V pages) of every cross-attention image of the request."""
        if not request.image_kv:
            return []
        by_hash = {entry.key: entry for entry in request.image_kv}
        return [(item, by_hash[item.hash]) for item in request.mm_items if item.hash in by_hash]

    def _process(self, items: List[Planned], results, num_prefills: int) -> List[RequestOutput]:
        """Results of the step's items: the first num_prefills are prefill
        chunks, the rest decodes of requests already running."""
        outputs = []
        for index, ((request, num_tokens), result) in enumerate(zip(items, results)):
            if isinstance(result, ChunkFailure):
                outputs.append(self._fail(request, result.message))
                continue
            if request.image_kv:
                self.kv.mark_images_written(request)
            request.num_computed_tokens += num_tokens
            if request.num_uncomputed_tokens > 0:
                continue  # mid-chunk: nothing sampled
            if index < num_prefills:
                self._on_prefill_done(request)
            output = self._on_sample(request, result)
            if output is not None:
                outputs.append(output)
        return outputs

    def _on_prefill_done(self, request: Request) -> None:
        if self.chunked is request:
            self.chunked = None
        self.kv.cache_computed(request)
        self.running.append(request)

    def _on_sample(self, request: Request, result) -> Optional[RequestOutput]:
        record_sample(request, result, self.context_length)
        if request.finish_reason is None:
            return take_output(request, self.config.stream_interval)
        self._detach(request)
        self.kv.cache_computed(request)
        self.kv.release(request)
        return self._retire(request)

    def _fail(self, request: Request, message: str) -> RequestOutput:
        """Ends a request the model failed on; its pages are freed, none of
        them cached (its KV may be garbage), and every other request goes on."""
        self._detach(request)
        self.kv.release(request)
        request.finish_reason, request.matched_stop, request.error = "error", None, message
        self.metrics.num_failed_requests += 1
        return self._retire(request)

    def _retire(self, request: Request) -> RequestOutput:
        request.status = RequestStatus.FINISHED
        del self.requests[request.rid]
        return take_output(request, self.config.stream_interval)

    def _detach(self, request: Request) -> None:
        """Takes the request out of whichever queue holds it."""
        if self.chunked is request:
            self.chunked = None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def _after_step(self, step: StepPlan) -> None:
        if step.decodes:
            # every step that decoded ages the reserve's estimate, mixed or not
            self.reserve.on_decode_step()
        if step.is_decode:
            self.metrics.on_decode_step(len(step.decodes), self.kv.num_used_pages * self.page_size,
                                        self._token_usage(), len(self.waiting))
            return
        plan = step.prefill
        self.metrics.on_mixed_decodes(len(step.decodes))
        num_new_tokens = sum(n for _, n in plan.items) + plan.num_new_image_rows
        self.metrics.log_prefill(plan.num_new_seqs, num_new_tokens,
                                 plan.num_cached_tokens + plan.num_cached_image_rows,
                                 self._token_usage(), step.num_running, len(self.waiting))

    def _token_usage(self) -> float:
        return self.kv.num_used_pages / max(self.kv.num_total_pages, 1)
