"""Incremental detokenization: the text of a growing token list at O(window) per token.

Decoding the whole output after every token costs O(n) per token (O(n^2) per request).
Instead we decode a short window: the tokens since the last point where the text was
complete (``prefix_offset``) and, separately, the part of that window already emitted
(up to ``read_offset``); the difference is the new text. A window whose text ends in
U+FFFD stops mid-way through a multi-byte character, so its text is held until the next
token completes it; ``finish`` releases such a tail as the full decode would (U+FFFD).
The same scheme as vLLM's and text-generation-inference's streaming detokenizers.
"""
from __future__ import annotations

from collections.abc import Callable

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, detokenize: Callable[[list[int]], str]) -> None:
        self._detokenize = detokenize
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # window start: a token boundary that is also a character boundary
        self._read_offset = 0    # tokens whose text is already in ``self.text``

    def add(self, token: int) -> str:
        """Append ``token``; return the text it completed ("" while a character is partial)."""
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        """Release text held back for a partial character (as U+FFFD, like a full decode)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read_offset == len(self.ids):
            return ""
        done = self._detokenize(self.ids[self._prefix_offset:self._read_offset])
        window = self._detokenize(self.ids[self._prefix_offset:])
        if not final and (len(window) <= len(done) or window.endswith(_REPLACEMENT)):
            return ""
        delta = window[len(done):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += delta
        return delta
