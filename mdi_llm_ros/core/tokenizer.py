"""The coordinator's tokenizer without `transformers`: the `tokenizers` library and a chat template.

A model folder's tokenizer.json (written by `transformers`, or by `mdi-llm model prepare` from
a GGUF) holds the whole tokenizer, post-processing (a BOS token) included, so encoding and
decoding with `tokenizers` give the ids and the text `transformers` gives (tested). The chat
template is rendered with jinja2 as `transformers` renders it. Importing `transformers` only
for this cost the coordinator about 100 MB of resident memory.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import ModelError


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or a dict with "content"."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class TextTokenizer:
    """Encode, decode, the chat template and the special tokens of one model folder."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ModelError(f"{folder} has no tokenizer.json; prepare the model (`mdi-llm model prepare`) or save "
                             "its tokenizer with transformers (`tokenizer.save_pretrained`)")
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template = folder / "chat_template.jinja"
        self.chat_template: str | None = (template.read_text() if template.is_file()
                                          else self.config.get("chat_template"))
        if isinstance(self.chat_template, list):        # named templates: the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.special_tokens = {key: _token_text(self.config.get(key))
                               for key in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if _token_text(self.config.get(key)) is not None}
        self.special_strings = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        self.clean_up_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tokenizer.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """`split_special_tokens`: special tokens spelled in `text` stay plain text (their pieces)."""
        self.tokenizer.encode_special_tokens = split_special_tokens
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("no chat template")
        if self._template is None:
            self._template = _environment().from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:        # as transformers' clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text
