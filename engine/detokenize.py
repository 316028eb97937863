"""Incremental detokenization with stop strings.

Text is released only when it is final: a token sequence that decodes to an incomplete UTF-8
character (U+FFFD at the end) waits for the next token, and the last len(longest stop) - 1
characters are held back until they can no longer start a stop string.
"""
from __future__ import annotations

# A UTF-8 character is at most 4 bytes, so a U+FFFD that this many tokens have not completed is final
# (the model emitted invalid bytes). Releasing it keeps each decode call's window short: a run of
# invalid bytes would otherwise make detokenising quadratic.
MAX_PENDING = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok = tokenizer
        self.stop = list(stop or [])
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # decode window start: keeps context so leading spaces come out right
        self.read = 0    # tokens whose text is already in self.text
        self.text = ""
        self.emitted = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        """Feed one token -> (text now safe to emit, whether a stop string ended the output)."""
        self.ids.append(token)
        upto = len(self.ids)
        after = self._decode(self.ids[self.prefix:upto])
        if after.endswith("\ufffd"):
            if upto - self.read < MAX_PENDING:
                return "", False
            # what lies before the last MAX_PENDING - 1 tokens can no longer join a character: release it
            upto -= MAX_PENDING - 1
            after = self._decode(self.ids[self.prefix:upto])
        start = max(0, len(self.text) - self.hold)
        self._advance(after, upto)
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._release(len(self.text)), True
            return self._release(max(self.emitted, len(self.text) - self.hold)), False
        return self._release(len(self.text)), False

    def flush(self) -> str:
        """At the end of generation: whatever was held back, incomplete characters included, up to a
        stop string that the pending text completes (never the stop string itself)."""
        if self.read < len(self.ids):
            start = max(0, len(self.text) - self.hold)
            self._advance(self._decode(self.ids[self.prefix:]), len(self.ids))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
        return self._release(len(self.text))

    def _advance(self, after: str, upto: int):
        """Append the text of ids[read:upto], given `after`, the decode of ids[prefix:upto]."""
        before = self._decode(self.ids[self.prefix:self.read])
        self.text += after[len(before):]
        self.prefix, self.read = self.read, upto

    def _release(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out
