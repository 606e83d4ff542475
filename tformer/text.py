"""Completion text built token by token: whole characters only, cut at the first stop string.

Shared by everything that turns generated ids into text for a user (`Runtime.generate`/`stream`,
the server's streaming): byte-level tokens can split a character, and a stop string can span
several tokens, so text is held back until it can no longer turn out to be either.
"""

from __future__ import annotations

from tformer.tokenizer import Tokenizer


class StopText:
    """One row's completion text, built piece by piece, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.stop = stop
        self.longest = max(map(len, self.stop), default=0)
        self.pieces = tokenizer.text_stream()
        self.text = ""
        self.shown = 0
        self.stopped = False

    def push(self, token: int) -> None:
        piece = self.pieces.push(token)
        if not piece or self.stopped:
            return
        search_from = max(0, len(self.text) - self.longest + 1)  # a stop string may span pieces
        self.text += piece
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def ready(self) -> str:
        """Text not yet shown, minus a tail that could still turn out to begin a stop string."""
        hold = 0
        if not self.stopped:
            hold = max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        end = max(self.shown, len(self.text) - hold)
        piece, self.shown = self.text[self.shown : end], end
        return piece
