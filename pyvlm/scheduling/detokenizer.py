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
    """Turns one request's generated ids into text deltas.

    Only the text not emitted yet is kept (`pending`): a stop string never
    begins in emitted text (the tail that could begin one is held back), so
    matching and holding look at the pending text alone, and a token costs
    time in its own text, not in the length of the output."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), token_texts: Optional["TokenTexts"] = None):
        """token_texts: the engine's shared TokenTexts of this tokenizer (a
        private one when None)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode_ids = token_texts or TokenTexts(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.ids: List[int] = []
        self.pending = ""  # stable decoded text not emitted yet (cut at a matched stop string)
        self.matched_stop: Optional[str] = None
        self._surr_offset = 0
        self._read_offset = 0

    def add_token(self, token_id: int) -> Optional[str]:
        """Decodes one more token; returns the stop string it completed, if any."""
        if self.matched_stop is not None:
            return self.matched_stop
        self.ids.append(token_id)
        new_text = self._window_delta()
        if not new_text:
            return None
        if new_text[-1] == REPLACEMENT_CHAR:
            # Not stable yet, but a stop string may already be complete before the split character.
            stable = new_text.rstrip(REPLACEMENT_CHAR)
            if stable and self.stop:
                self._cut_at_stop(self.pending + stable, len(self.pending))
            return self.matched_stop
        self._surr_offset, self._read_offset = self._read_offset, len(self.ids)
        num_checked_chars = len(self.pending)
        self.pending += new_text
        if self.stop:
            self._cut_at_stop(self.pending, num_checked_chars)
        return self.matched_stop

    def take_text(self, finished: bool = False) -> str:
        """The text not emitted yet that no stop string can still remove; at
        finish (flush) everything up to the stop string."""
        if finished and self.matched_stop is None and self._read_offset < len(self.ids):
            self.pending += self._window_delta()
            self._surr_offset = self._read_offset = len(self.ids)
        piece = self.pending
        if piece and not finished and self.stop and self.matched_stop is None:
            end = len(piece) - self._num_held_chars()
            piece, self.pending = piece[:end], piece[end:]
        else:
            self.pending = ""
        return piece

    def _window_delta(self) -> str:
        # The prefix is usually the one token emitted last: TokenTexts has it.
        ids, surr = self.ids, self._surr_offset
        decode, skip = self._decode_ids, self.skip_special_tokens
        prefix = decode(ids[surr:self._read_offset], skip)
        full = decode(ids[surr:], skip)
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def _cut_at_stop(self, text: str, num_checked_chars: int) -> None:
        """Ends the pending text at the earliest stop string occurring in
        text (the pending text and what may follow it; only occurrences
        reaching past num_checked_chars are new)."""
        first, matched = -1, None
        for stop in self.stop:  # a plain loop: this runs for every token
            position = text.find(stop, max(0, num_checked_chars - len(stop) + 1))
            if position >= 0 and (matched is None or (position, stop) < (first, matched)):
                first, matched = position, stop
        if matched is not None:
            self.matched_stop, self.pending = matched, text[:first]

    def _num_held_chars(self) -> int:
        """Length of the longest tail of the pending text that begins some
        stop string."""
        text = self.pending
        return max(_longest_suffix_prefix(text, stop) for stop in self.stop)


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
