"""Incremental detokenization with stop strings.

Text is decoded over a sliding window of ids (the surrounding/read offsets of
vLLM and SGLang): the new text of a token is decode(window + token) minus
decode(window). Text is held back while it ends in U+FFFD (a UTF-8 character
split across tokens), and while its tail could still grow into a stop
string, so nothing a stop string would remove ever reaches the client. The
concatenation of all emitted text equals tokenizer.decode(ids), truncated
at the first stop string.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pyvlm.scheduling.types import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), token_texts: Optional["TokenTexts"] = None):
        """token_texts: the engine's shared TokenTexts of this tokenizer (a
        private one when None)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode_ids = token_texts or TokenTexts(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.ids: List[int] = []
        self.text = ""  # stable decoded text (cut at a matched stop string)
        self.matched_stop: Optional[str] = None
        self._surr_offset = 0
        self._read_offset = 0
        self._num_emitted_chars = 0

    def add_token(self, token_id: int) -> Optional[str]:
        """Decodes one more token; returns the stop string it completed, if any."""
        if self.matched_stop is not None:
            return self.matched_stop
        self.ids.append(token_id)
        new_text = self._window_delta()
        if new_text.endswith(REPLACEMENT_CHAR):
            # Not stable yet, but a stop string may already be complete before the split character.
            self._cut_at_stop(self.text + new_text.rstrip(REPLACEMENT_CHAR), len(self.text))
        elif new_text:
            self._surr_offset, self._read_offset = self._read_offset, len(self.ids)
            old_len, self.text = len(self.text), self.text + new_text
            self._cut_at_stop(self.text, old_len)
        return self.matched_stop

    def take_text(self, finished: bool = False) -> str:
        """The text not emitted yet that no stop string can still remove; at
        finish (flush) everything up to the stop string."""
        if finished and self.matched_stop is None and self._read_offset < len(self.ids):
            self.text += self._window_delta()
            self._surr_offset = self._read_offset = len(self.ids)
        end = len(self.text) if finished else len(self.text) - self._num_held_chars()
        end = max(end, self._num_emitted_chars)
        piece = self.text[self._num_emitted_chars:end]
        self._num_emitted_chars = end
        return piece

    def _decode(self, ids: List[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=self.skip_special_tokens)

    def _window_delta(self) -> str:
        # The prefix is usually the one token emitted last: TokenTexts has it.
        prefix = self._decode(self.ids[self._surr_offset:self._read_offset])
        full = self._decode(self.ids[self._surr_offset:])
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def _cut_at_stop(self, text: str, num_checked_chars: int) -> None:
        """Ends the text at the earliest stop string occurring in it (only
        occurrences reaching past num_checked_chars are new)."""
        first, matched = -1, None
        for stop in self.stop:  # a plain loop: this runs for every token
            position = text.find(stop, max(0, num_checked_chars - len(stop) + 1))
            if position >= 0 and (matched is None or (position, stop) < (first, matched)):
                first, matched = position, stop
        if matched is not None:
            self.matched_stop, self.text = matched, text[:first]

    def _num_held_chars(self) -> int:
        """Length of the longest tail of text that begins some stop string."""
        if self.matched_stop is not None:
            return 0
        return max((_longest_suffix_prefix(self.text, stop) for stop in self.stop), default=0)


def _longest_suffix_prefix(text: str, stop: str) -> int:
    """Length of the longest tail of text (shorter than stop) that begins
    stop. Such a tail starts with stop[0] within the last len(stop) - 1
    characters, which str.find looks for in C: usually there is none."""
    start = max(0, len(text) - len(stop) + 1)
    position = text.find(stop[0], start)
    while position >= 0:
        if stop.startswith(text[position:]):
            return len(text) - position
        position = text.find(stop[0], position + 1)
    return 0


# What a transformers fast tokenizer's decode runs when it only hands the ids
# to its Rust tokenizer (transformers 5 names, then 4's).
_PLAIN_DECODES = {("PreTrainedTokenizerBase.decode", "TokenizersBackend._decode"),
                  ("PreTrainedTokenizerBase.decode", "PreTrainedTokenizerFast._decode")}


def direct_decode(tokenizer: Tokenizer) -> Callable[..., str]:
    """tokenizer.decode, or the same decode without its Python wrapper: for
    a transformers fast tokenizer whose decode is the library's own and
    cleans up no spaces, decode(ids) is exactly its Rust tokenizer's
    decode(ids), and the wrapper (converting every id, checking for a
    batch) cost more than the decoding itself, twice per token."""
    cls, backend = type(tokenizer), getattr(tokenizer, "_tokenizer", None)
    names = (getattr(getattr(cls, "decode", None), "__qualname__", None),
             getattr(getattr(cls, "_decode", None), "__qualname__", None))
    if (backend is None or names not in _PLAIN_DECODES
            or getattr(tokenizer, "clean_up_tokenization_spaces", True)):
        return tokenizer.decode
    return backend.decode


class TokenTexts:
    """decode(ids, skip_special_tokens) with the text of single tokens
    memoized (at most two entries per vocabulary id): the window prefix an
    incremental decode subtracts is nearly always the one token emitted
    last, so this halves the tokenizer calls per generated token. Shared by
    an engine's detokenizers (entries are only ever added, each the same
    text whoever adds it)."""

    def __init__(self, tokenizer: Tokenizer):
        self._decode = direct_decode(tokenizer)
        self._single: Dict[Tuple[int, bool], str] = {}

    def __call__(self, ids: List[int], skip_special_tokens: bool) -> str:
        if len(ids) != 1:
            return self._decode(ids, skip_special_tokens=skip_special_tokens)
        key = (ids[0], skip_special_tokens)
        text = self._single.get(key)
        if text is None:
            text = self._single[key] = self._decode(ids, skip_special_tokens=skip_special_tokens)
        return text


class NullDetokenizer:
    """For engines without a tokenizer: ids only, no text, no stop strings."""

    matched_stop: Optional[str] = None

    def add_token(self, token_id: int) -> Optional[str]:
        return None

    def take_text(self, finished: bool = False) -> str:
        return ""


def detokenizer_factory(tokenizer: Optional[Tokenizer]) -> Callable[[object], object]:
    """The Scheduler's detokenizer_factory: request -> its detokenizer."""
    token_texts = TokenTexts(tokenizer) if tokenizer is not None else None

    def make(request) -> object:
        if tokenizer is None:
            return NullDetokenizer()
        sampling = request.sampling
        return IncrementalDetokenizer(tokenizer, sampling.skip_special_tokens, sampling.stop,
                                      token_texts)
    return make
