"""Generated token ids to answer text: end of sequence, stop strings, and the part that is safe to stream.

Streaming and non-streaming answers both run every generated token through one :class:`TextAssembler`, so
the text a stream sends, joined, is exactly the text the same request gets without streaming, whatever the
engine's chunking (one token per step, or all tokens at once).

Imports neither torch nor Ray: unit-tested with a plain byte-level tokenizer
(``tests/unit/test_serve_requests.py``).
"""

from __future__ import annotations

from typing import Callable, Optional

#: What a tokenizer's decode gives for the bytes of a character that is not complete yet (U+FFFD).
REPLACEMENT_CHAR = "\ufffd"


def stop_holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string (held back when streaming).

    Args:
        text: the text decoded so far (without a trailing incomplete character).
        stops: the request's stop strings.

    Returns:
        The length of the longest proper prefix of a stop string that ``text`` ends with (0 if none).
    """
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class TextAssembler:
    """The text of one choice, built token by token.

    Each token is appended and the ids decoded; generation is over at the end-of-sequence token (counted
    as generated, not shown), at ``max_tokens``, or once any stop string appears in the text — the text is
    then cut before the earliest stop string present, the way a server that stops on the string as soon
    as it is complete answers. Text is only released once it can no longer change: a trailing incomplete
    character (decoded as U+FFFD) and a tail that could be the start of a stop string (including one that
    starts inside that incomplete character) are held back.

    Args:
        decode: token ids -> text (e.g. ``tokenizer.decode(ids, skip_special_tokens=True)``).
        eos_id: the end-of-sequence token id, or None.
        stops: stop strings (each non-empty).
        max_tokens: most tokens of this choice (>= 1).

    Attributes:
        n_tokens: tokens generated up to the one that ended the text (eos, or the one completing a stop).
        finish_reason: ``"stop"`` (eos or a stop string) or ``"length"``.
        done: True once no more tokens are wanted.
    """

    def __init__(self, decode: Callable[[list[int]], str], eos_id: Optional[int], stops: list[str],
                 max_tokens: int) -> None:
        self._decode = decode
        self._eos_id = eos_id
        self._stops = list(stops)
        self._max_tokens = max_tokens
        self._ids: list[int] = []
        self._text = ""
        self._emitted = 0
        self.n_tokens = 0
        self.finish_reason = "length"
        self.done = False

    def feed(self, token_ids: list[int]) -> str:
        """Take newly generated tokens (any number); returns the text that became safe to send (maybe "").

        Tokens after the one that ended the choice are ignored."""
        out = []
        for token in token_ids:
            if self.done:
                break
            out.append(self._feed_one(token))
        return "".join(out)

    def _feed_one(self, token: int) -> str:
        self.n_tokens += 1
        if self._eos_id is not None and token == self._eos_id:
            self.finish_reason, self.done = "stop", True
            return self.finish()
        self._ids.append(token)
        text = self._decode(self._ids)
        found = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if found:
            self._text = text[: min(found)]
            self.finish_reason, self.done = "stop", True
            return self.finish()
        self._text = text
        if self.n_tokens >= self._max_tokens:
            self.done = True
            return self.finish()
        stable = text.rstrip(REPLACEMENT_CHAR)
        safe = len(stable) - stop_holdback(stable, self._stops)
        if safe <= self._emitted:
            return ""
        delta = text[self._emitted:safe]
        self._emitted = safe
        return delta

    def finish(self) -> str:
        """The rest of the text (call once generation is over, whatever ended it); marks the choice done."""
        self.done = True
        delta = self._text[self._emitted:]
        self._emitted = len(self._text)
        return delta

    @property
    def text(self) -> str:
        """The whole text so far (cut at a stop string once one appeared)."""
        return self._text
