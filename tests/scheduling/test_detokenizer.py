"""Incremental detokenization against tokenizer.decode, with a byte-level BPE
trained here (multi-byte characters split across tokens)."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyvlm.scheduling.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, direct_decode

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "日本語のテキストと中文文本混在しています。東京は大きい都市です。",
    "Emoji 😀🎉🚀 party 👩‍💻 and flags 🇫🇷 mixed with café naïve résumé.",
    "Ünïcödé ümlauts, Ελληνικά κείμενα, русский текст, עברית.",
    "def f(x):\n    return x ** 2  # code with spaces\n",
]
SPECIAL = ["<eos>", "<img>"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                   additional_special_tokens=["<img>"], clean_up_tokenization_spaces=False)


def stream(tokenizer, ids, stop=(), skip_special_tokens=True):
    """Feeds ids one at a time; returns the emitted pieces and the stop hit."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens, stop)
    pieces = []
    for token_id in ids:
        matched = detok.add_token(token_id)
        pieces.append(detok.take_text(finished=matched is not None))
        if matched is not None:
            return pieces, matched
    pieces.append(detok.take_text(finished=True))
    return pieces, None


def expected_text(tokenizer, ids, stop, skip_special_tokens):
    """decode(ids up to the first token completing a stop) cut at the stop."""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=skip_special_tokens)
        hits = [(text.find(s), s) for s in stop if s in text.rstrip(REPLACEMENT_CHAR)]
        if hits:
            position, matched = min(hits)
            return text[:position], matched
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), None


@pytest.mark.parametrize("text", CORPUS + ["新しい🚀テスト 😀😀 ü"])
def test_multibyte_characters_never_break(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, _ = stream(tokenizer, ids)
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_vocabulary_splits_characters(tokenizer):
    """The tokenizer really splits some characters across tokens (else the
    test above proves nothing)."""
    ids = tokenizer.encode("🚀😀👩‍💻", add_special_tokens=False)
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)


def test_special_tokens(tokenizer):
    ids = tokenizer.encode("ab <img> cd", add_special_tokens=False) + [tokenizer.eos_token_id]
    for skip in (True, False):
        pieces, _ = stream(tokenizer, ids, skip_special_tokens=skip)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert "<eos>" not in "".join(stream(tokenizer, ids)[0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ids_and_stop_strings(tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=30))
    full = tokenizer.decode(ids, skip_special_tokens=True).replace(REPLACEMENT_CHAR, "")
    substrings = st.builds(lambda a, n: full[a:a + n], st.integers(0, max(len(full) - 1, 0)), st.integers(1, 4))
    stop = tuple(s for s in data.draw(st.lists(substrings | st.text(min_size=1, max_size=3), max_size=3)) if s)
    skip = data.draw(st.booleans())
    pieces, matched = stream(tokenizer, ids, stop, skip)
    text, expected_stop = expected_text(tokenizer, ids, stop, skip)
    assert "".join(pieces) == text and matched == expected_stop
    emitted = ""
    for piece in pieces:  # nothing emitted is ever taken back by a later stop
        emitted += piece
        assert text.startswith(emitted)


def test_holds_back_possible_stop_prefix(tokenizer):
    """After each token exactly the text minus its longest tail that starts
    the stop string has been emitted."""
    ids = tokenizer.encode("Hello world, hello wall", add_special_tokens=False)
    stop = "o wa"
    detok = IncrementalDetokenizer(tokenizer, stop=(stop,))
    emitted = ""
    for end, token_id in enumerate(ids, 1):
        if detok.add_token(token_id) is not None:
            break
        emitted += detok.take_text()
        text = tokenizer.decode(ids[:end])
        held = max(n for n in range(len(stop)) if text.endswith(stop[:n]))
        assert emitted == text[:len(text) - held]
    assert emitted + detok.take_text(finished=True) == "Hello world, hell"
    assert detok.matched_stop == stop


def test_direct_decode_skips_the_wrapper_only_when_it_decodes_alike(tokenizer):
    """The Rust decode stands in for tokenizer.decode only where they agree:
    the library's own decode without space clean-up; otherwise decode."""
    assert direct_decode(tokenizer) == tokenizer.backend_tokenizer.decode
    ids = tokenizer.encode(" ".join(CORPUS), add_special_tokens=False) + [tokenizer.eos_token_id]
    for skip in (True, False):
        assert (direct_decode(tokenizer)(ids, skip_special_tokens=skip)
                == tokenizer.decode(ids, skip_special_tokens=skip))

    class Custom(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return "custom"

    custom = Custom(tokenizer_object=tokenizer.backend_tokenizer, clean_up_tokenization_spaces=False)
    assert direct_decode(custom)([1, 2]) == "custom"
    tokenizer.clean_up_tokenization_spaces = True
    try:
        assert direct_decode(tokenizer) == tokenizer.decode
    finally:
        tokenizer.clean_up_tokenization_spaces = False


def test_shared_token_texts_give_the_decodes_text(tokenizer):
    from pyvlm.scheduling.detokenizer import TokenTexts

    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("".join(CORPUS), add_special_tokens=False) + [0, 1]  # + specials
    for skip in (True, False):
        for token_id in ids:
            want = tokenizer.decode([token_id], skip_special_tokens=skip)
            assert texts([token_id], skip) == want and texts([token_id], skip) == want
        assert texts(ids[:7], skip) == tokenizer.decode(ids[:7], skip_special_tokens=skip)
    # Streams sharing it (as an engine's requests do) each decode exactly.
    for text in CORPUS:
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer, True, (), texts)
        pieces = [detok.take_text() for t in token_ids if detok.add_token(t) is None]
        assert "".join(pieces) + detok.take_text(finished=True) == tokenizer.decode(token_ids)


class WholeTextDetokenizer:
    """The detokenizer as it was before it kept only the pending text: the
    whole decoded text, an emitted-length offset into it (the reference
    of the parity test below)."""

    def __init__(self, tokenizer, skip_special_tokens, stop):
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self.stop = tuple(s for s in stop if s)
        self.ids, self.text, self.matched_stop = [], "", None
        self.surr = self.read = self.num_emitted = 0

    def add_token(self, token_id):
        if self.matched_stop is not None:
            return self.matched_stop
        self.ids.append(token_id)
        new_text = self._delta()
        if new_text.endswith(REPLACEMENT_CHAR):
            self._cut(self.text + new_text.rstrip(REPLACEMENT_CHAR), len(self.text))
        elif new_text:
            self.surr, self.read = self.read, len(self.ids)
            old_len, self.text = len(self.text), self.text + new_text
            self._cut(self.text, old_len)
        return self.matched_stop

    def take_text(self, finished=False):
        if finished and self.matched_stop is None and self.read < len(self.ids):
            self.text += self._delta()
            self.surr = self.read = len(self.ids)
        held = 0 if self.matched_stop is not None else max(
            (n for stop in self.stop for n in range(len(stop)) if n and self.text.endswith(stop[:n])),
            default=0)
        end = max(len(self.text) if finished else len(self.text) - held, self.num_emitted)
        piece, self.num_emitted = self.text[self.num_emitted:end], end
        return piece

    def _delta(self):
        prefix, full = self.decode(self.ids[self.surr:self.read]), self.decode(self.ids[self.surr:])
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def _cut(self, text, num_checked):
        hits = [(text.find(s, max(0, num_checked - len(s) + 1)), s) for s in self.stop]
        hits = [hit for hit in hits if hit[0] >= 0]
        if hits:
            first, self.matched_stop = min(hits)
            self.text = text[:first]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_pieces_equal_the_whole_text_detokenizers(tokenizer, data):
    """Token by token, with text taken after some tokens only (as with
    stream_interval > 1), the same pieces and stop as the reference."""
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    substrings = st.builds(lambda a, n: full[a:a + n], st.integers(0, max(len(full) - 1, 0)),
                           st.integers(1, 5))
    stop = tuple(data.draw(st.lists(substrings | st.text(min_size=1, max_size=3), max_size=3)))
    skip = data.draw(st.booleans())
    takes = data.draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids)))
    fast, reference = IncrementalDetokenizer(tokenizer, skip, stop), WholeTextDetokenizer(
        tokenizer, skip, stop)
    for token_id, take in zip(ids, takes):
        assert fast.add_token(token_id) == reference.add_token(token_id)
        if take:
            assert fast.take_text() == reference.take_text()
    assert fast.take_text(finished=True) == reference.take_text(finished=True)
    assert fast.matched_stop == reference.matched_stop
