"""Stop strings, stop token ids, EOS, max_new_tokens and logprobs through the
scheduler, with a tokenizer whose tokens are two-character pieces."""

import pytest

from pyvlm.config import CacheConfig, SchedulerConfig
from pyvlm.scheduling.detokenizer import detokenizer_factory
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.scheduler import Scheduler
from pyvlm.scheduling.types import SamplingParams

from tests.scheduling.fakes import VOCAB, FakeRunner, joined_ids, reference_generate, run_until_idle


class PieceTokenizer:
    """Token id -> a two-letter piece; decode concatenates."""

    eos_token_id = None
    all_special_ids = []

    def piece(self, token_id):
        return chr(97 + token_id % 26) + chr(97 + token_id * 7 % 26)

    def convert_ids_to_tokens(self, ids):
        return [self.piece(i) for i in ids]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.piece(i) for i in ids)


TOKENIZER = PieceTokenizer()


def generate(rng, eos_token_ids=frozenset(), stream_interval=1, **sampling_args):
    prompt, seed = [rng.choice(VOCAB) for _ in range(9)], rng.randrange(1000)
    runner = FakeRunner(4, 64)
    scheduler = Scheduler(SchedulerConfig(stream_interval=stream_interval), CacheConfig(page_size=4), 64, 4096,
                          detokenizer_factory(TOKENIZER))
    sampling = SamplingParams(**sampling_args)
    scheduler.add_request(runner.register(Request("r", prompt, sampling, seed=seed, eos_token_ids=eos_token_ids)))
    outputs = run_until_idle(scheduler, runner)["r"]
    return outputs, reference_generate(prompt, [], seed, sampling.max_new_tokens)


def text_of(outputs):
    return "".join(output.new_text for output in outputs)


@pytest.mark.parametrize("stream_interval", [1, 3])
def test_stop_string_across_tokens(rng, stream_interval):
    rng_state = rng.getstate()
    _, reference = generate(rng, max_new_tokens=20)  # learn what this prompt and seed generate
    full_text = TOKENIZER.decode(reference)
    starts = [2 * rng.randrange(2, 15) + 1 for _ in range(5)]  # odd: straddles two tokens
    for start in starts:
        stop = full_text[start:start + 3]
        rng.setstate(rng_state)
        outputs, _ = generate(rng, stream_interval=stream_interval, max_new_tokens=20, stop=(stop,))
        position = full_text.find(stop)
        num_tokens = -(-(position + len(stop)) // 2)
        assert text_of(outputs) == full_text[:position]
        assert joined_ids(outputs) == reference[:num_tokens]
        assert outputs[-1].finish_reason == "stop" and outputs[-1].matched_stop == stop


def first_generated(rng, index):
    state = rng.getstate()
    _, reference = generate(rng, max_new_tokens=20)
    rng.setstate(state)
    return reference, reference[index]


def test_stop_token_id(rng):
    reference, stop_id = first_generated(rng, 5)
    outputs, _ = generate(rng, max_new_tokens=20, stop_token_ids=(stop_id,))
    num_tokens = reference.index(stop_id) + 1
    assert joined_ids(outputs) == reference[:num_tokens]
    assert text_of(outputs) == TOKENIZER.decode(reference[:num_tokens - 1])  # its text is not emitted
    assert outputs[-1].finish_reason == "stop" and outputs[-1].matched_stop == stop_id


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_eos(rng, ignore_eos):
    reference, eos = first_generated(rng, 4)
    outputs, _ = generate(rng, eos_token_ids=frozenset({eos}), max_new_tokens=20, ignore_eos=ignore_eos)
    if ignore_eos:
        assert joined_ids(outputs) == reference and outputs[-1].finish_reason == "length"
        assert outputs[-1].matched_stop is None and text_of(outputs) == TOKENIZER.decode(reference)
    else:
        assert joined_ids(outputs) == reference[:reference.index(eos) + 1]
        assert outputs[-1].finish_reason == "stop" and outputs[-1].matched_stop == eos


def test_max_new_tokens_and_logprobs(rng):
    outputs, reference = generate(rng, max_new_tokens=7, logprobs=True)
    assert joined_ids(outputs) == reference and len(outputs) == 7
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 7
    logprobs = [entry for output in outputs for entry in output.new_logprobs]
    assert logprobs == [(t, -t / 100.0, ((t, -t / 100.0),)) for t in reference]
    assert text_of(outputs) == TOKENIZER.decode(reference)
