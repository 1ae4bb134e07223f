"""Token ids -> text pieces as they are generated, for streaming and stop strings."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character,
    and holds back text that could be the start of a stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""          # full decoded text so far (may end mid-character)
        self.emitted = 0        # characters of `text` already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add a token; return the new piece of text that is safe to show (may be '')."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.text = text
        for s in self.stop:
            cut = text.find(s)
            if cut >= 0:
                self.text = text[:cut]
                self.stopped = True
        if self.stopped:
            return self._take(len(self.text))
        safe = len(text)
        if text.endswith("\ufffd"):          # an incomplete multi-byte character
            safe = len(text.rstrip("\ufffd"))
        for s in self.stop:                   # a partial stop string at the end
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return self._take(safe)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.text.endswith("\ufffd"):
            self.text = self.text.rstrip("\ufffd")
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece
