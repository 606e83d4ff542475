"""Completion text built from a request's outputs: the one output processor of tformer.

`Runtime.generate`/`stream` and the server's completions all turn engine outputs into text here:
the token that ended the request (EOS, a stop token id) is dropped, byte-level tokens that split a
character are held until it is whole, and the text is cut at the first stop string, which can span
several tokens (so text that could still turn out to begin one is held back too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tformer.engine.request import RequestOutput
from tformer.tokenizer import Tokenizer


@dataclass
class Piece:
    """What one request's newest outputs add: text ready to show (whole characters, never past a
    stop string), the new token ids (EOS and stop token ids excluded), and the finish reason once
    it has ended ("stop" for EOS or a stop string or stop ids, "length", "abort", "error"), with the
    error."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Output:
    """One prompt's whole completion (`Runtime.generate`): its text ("" without a tokenizer), its
    token ids (EOS and stop token ids excluded) and why it finished (as `Piece`)."""

    text: str
    token_ids: list[int]
    finish_reason: str


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort", "error": "error"}
ENDING = ("eos", "stop")  # the engine's reasons whose token ended the request: not part of the completion


class Completion:
    """One request's completion, fed its outputs in order (`take`): its text (`text`, without a
    tokenizer always empty) and token ids (`token_ids`) so far, and why it finished. `stop`: the
    request's stop strings (`SamplingParams.stop`); the engine ends it at EOS and stop token ids
    itself, and says so with that token, which is dropped here."""

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str] = ()):
        self.stop = list(stop)
        self.longest = max(map(len, self.stop), default=0)
        self.pieces = tokenizer.text_stream() if tokenizer is not None else None
        self.text = ""  # cut at the first stop string
        self.token_ids: list[int] = []  # EOS and stop token ids excluded
        self.shown = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take(self, outputs: Sequence[RequestOutput]) -> Piece:
        """The piece these outputs add; once finished, nothing more (a stop string ended it: the
        caller aborts the engine's request, whose later outputs are ignored)."""
        piece, error = Piece("", []), None
        if self.finished:
            return piece
        for out in outputs:
            if out.token is not None and out.finish_reason not in ENDING:
                piece.token_ids.append(out.token)
                self.token_ids.append(out.token)
                if self._push(out.token):
                    self.finish_reason = "stop"
                    break
            if out.finish_reason is not None:
                self.finish_reason, error = FINISH[out.finish_reason], out.error
                break
        piece.text, piece.finish_reason, piece.error = self._ready(), self.finish_reason, error
        return piece

    def output(self) -> Output:
        """The whole completion, once finished."""
        return Output(self.text, self.token_ids, self.finish_reason)

    def _push(self, token: int) -> bool:
        """Add `token`'s text; True when a stop string appeared (the text is cut before it)."""
        if self.pieces is None:
            return False
        new = self.pieces.push(token)
        if not new:
            return False
        search_from = max(0, len(self.text) - self.longest + 1)  # a stop string may span pieces
        self.text += new
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _ready(self) -> str:
        """Text not yet shown, minus a tail that could still turn out to begin a stop string
        (nothing is held once finished: no more tokens can complete one)."""
        hold = 0
        if not self.finished:
            hold = max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        end = max(self.shown, len(self.text) - hold)
        text, self.shown = self.text[self.shown : end], end
        return text
