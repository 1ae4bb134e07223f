"""The coordinator's model parts: tokenizer, embedding, final norm and LM head.

The coordinator owns what sits at both ends of the ring: the tokenizer and
chat template, the token embedding (plus any first layers it holds itself),
the final norm and the LM head. Chunk nodes hold everything in between.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable

import torch

from .chunk import ChunkExecutor
from .codec import DTYPES
from .decoder import NATIVE_MODEL_TYPES, RMSNorm
from .errors import ErrorCode, RequestError
from .kernels import PackedHead, check_kernels
from .models import ModelInfo
from .weights import TensorReader, meta_model

# Stands for the user's text while the chat template is rendered (never tokenized itself).
_CONTENT = "\uE000mdi-user-content\uE000"


class CoordinatorModel:
    """Tokenizer + embedding (+ optional first layers) + final norm + LM head."""

    def __init__(self, info: ModelInfo, *, device: str = "cpu", dtype: str = "float32",
                 layers: tuple[int, int] | None = None, max_cached_requests: int = 64,
                 kernels: str = "exact") -> None:
        from transformers import AutoTokenizer, GenerationConfig
        self.info = info
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(info.path)
        self._tokenizer_lock = threading.Lock()
        self._special_strings = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]
        check_kernels(kernels, self.device, self.dtype)
        self.kernels = kernels
        self.reader = TensorReader(info)
        if kernels == "packed":
            # the head keeps only its reordered copy; embedding rows are read when looked up
            t = self.reader.read(["model.norm.weight"], self.dtype, str(self.device))
            self.embed = self.reader.rows("model.embed_tokens.weight", self.dtype)
            head_rows = self.embed if info.tied_embeddings else self.reader.rows("lm_head.weight", self.dtype)
            self.head: Callable[[torch.Tensor], torch.Tensor] = PackedHead(head_rows.block, head_rows.shape[0])
            embed_bytes = self.embed.nbytes
        else:
            names = ["model.embed_tokens.weight", "model.norm.weight"]
            if not info.tied_embeddings:
                names.append("lm_head.weight")
            t = self.reader.read(names, self.dtype, str(self.device))
            self.embed = torch.nn.Embedding.from_pretrained(t["model.embed_tokens.weight"], freeze=True)
            head_weight = t.get("lm_head.weight", t["model.embed_tokens.weight"])   # (vocab, hidden)
            self.head = functools.partial(torch.nn.functional.linear, weight=head_weight)
            embed_bytes = head_weight.numel() * head_weight.element_size()
        if info.model_type in NATIVE_MODEL_TYPES:
            # the same computation as these models' own RMSNorm, without building transformers'
            # config and modelling code (which cost the coordinator resident memory)
            self.norm = RMSNorm(info.hidden_size, float(info.text_config.get("rms_norm_eps", 1e-6)))
            self.norm.weight = torch.nn.Parameter(t["model.norm.weight"], requires_grad=False)
        else:
            self.norm = meta_model(info.config).model.norm
            self.norm.to_empty(device=self.device)
            self.norm.load_state_dict({"weight": t["model.norm.weight"]}, assign=True)
        self.local_layers: ChunkExecutor | None = None
        if layers is not None and layers[1] > layers[0]:
            self.local_layers = ChunkExecutor(info, layers[0], layers[1], device=device, dtype=dtype,
                                              max_cached_requests=max_cached_requests, reader=self.reader,
                                              kernels=kernels)
        eos: set[int] = set()
        try:
            gen = GenerationConfig.from_pretrained(info.path)
            ids = gen.eos_token_id
            eos.update(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        except OSError:
            pass
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        # the model's share held here (embedding, norm, untied head), whichever kernels hold it
        self.parameter_bytes = (embed_bytes * (1 if info.tied_embeddings else 2)
                                + self.norm.weight.numel() * self.norm.weight.element_size())
        if self.local_layers is not None:
            self.parameter_bytes += self.local_layers.parameter_bytes

    def encode_prompt(self, prompt: str, use_chat_template: bool, parse_special_tokens: bool = False) -> list[int]:
        """The prompt's token ids. By default special tokens written in the prompt (such as
        `<|im_start|>system`) stay plain text, so a user cannot inject turns or control tokens;
        `parse_special_tokens` makes them control tokens, as a raw tokenizer call would."""
        # The Rust tokenizer refuses concurrent use ("Already borrowed"): callers are serialised.
        with self._tokenizer_lock:
            return self._encode(prompt, use_chat_template, parse_special_tokens)

    def _text_ids(self, text: str, parse_special_tokens: bool, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens,
                                   split_special_tokens=not parse_special_tokens)["input_ids"])

    def _encode(self, prompt: str, use_chat_template: bool, parse_special_tokens: bool) -> list[int]:
        # A prompt that spells no special token is tokenized exactly as `transformers` would.
        plain = parse_special_tokens or not any(s in prompt for s in self._special_strings)
        if not use_chat_template:
            return self._text_ids(prompt, plain, add_special_tokens=True)
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(ErrorCode.INVALID_TEXT,
                               "this model has no chat template; send use_chat_template=false")
        if plain:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            return list(ids if isinstance(ids, list) else ids["input_ids"])   # BatchEncoding in some versions
        # The template's own text (its control tokens) is tokenized as the template means it, the
        # user's text between them with special tokens split into plain pieces.
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": _CONTENT}],
                                                      add_generation_prompt=True, tokenize=False)
        before, _, after = rendered.partition(_CONTENT)
        return self._text_ids(before, True) + self._text_ids(prompt, False) + self._text_ids(after, True)

    @torch.inference_mode()
    def embed_tokens(self, token_ids: list[int]) -> torch.Tensor:
        """(seq,) ids -> (1, seq, hidden) input of the first ring hop."""
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self.embed(ids)

    @torch.inference_mode()
    def embed_tokens_batch(self, token_ids: list[int]) -> torch.Tensor:
        """One new token per request -> (batch, 1, hidden)."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device).unsqueeze(1)   # (batch, 1)
        return self.embed(ids)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(1, seq, hidden) ring output -> (vocab,) float32 logits of the last position."""
        return self.logits_batch(hidden[:, -1:, :])[0]

    @torch.inference_mode()
    def logits_batch(self, last: torch.Tensor) -> torch.Tensor:
        """(batch, 1, hidden) last positions -> (batch, vocab) float32 logits."""
        x = self.norm(last.to(device=self.device, dtype=self.dtype))
        return self.head(x)[:, -1].float()
