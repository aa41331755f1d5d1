"""Incremental detokenization with OpenAI-style stop strings.

Text is streamed as tokens arrive, but a stop string may span several tokens, so the last
len(longest stop) - 1 characters are held back until they can no longer start one. What is sent
over all deltas is exactly the final text, so a streamed answer concatenates to the non-streamed one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


@dataclass
class TextStream:
    decode: Callable[[list[int]], str]
    stops: Sequence[str] = ()
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # the text handed out so far
    stopped: bool = False  # a stop string was found; the text ends before it

    def feed(self, token: int) -> str:
        """Add a token; return the new text that is safe to send (may be "")."""
        self.tokens.append(token)
        full = self.decode(self.tokens)
        cut = self._stop_at(full)
        if cut is not None:
            self.stopped = True
            return self._advance(full[:cut])
        hold = max((len(s) for s in self.stops), default=1) - 1
        safe = len(full) - hold
        while safe > 0 and full[safe - 1] == REPLACEMENT:  # wait for the rest of the character
            safe -= 1
        return self._advance(full[: max(safe, len(self.sent))]) if safe > len(self.sent) else ""

    def flush(self) -> str:
        """The held-back rest, once generation has ended (not after a stop string)."""
        if self.stopped:
            return ""
        return self._advance(self.decode(self.tokens))

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _advance(self, upto: str) -> str:
        # Decoding more tokens normally only appends; if it ever rewrites sent text, keep what was sent.
        if not upto.startswith(self.sent):
            return ""
        delta = upto[len(self.sent):]
        self.sent = upto
        return delta
