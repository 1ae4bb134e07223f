"""The coordinator's model parts: tokenizer, embedding, final norm and LM head.

The coordinator owns what sits at both ends of the ring: the tokenizer and
chat template, the token embedding (plus any first layers it holds itself),
the final norm and the LM head. Chunk nodes hold everything in between.
"""
from __future__ import annotations

import functools
import json
import threading
from typing import Callable

import torch

from .chunk import ChunkExecutor
from .codec import DTYPES
from .decoder import DecoderSpec, RMSNorm
from .errors import ErrorCode, RequestError
from .kernels import PackedHead, check_kernels
from .models import ModelInfo
from .formats import head_format
from .quant import GROUP, ROW_SLICE, Int4Linear, Int8Linear, RefinedHead, check_quantization, to_int4, to_int8
from .tokenizer import TextTokenizer
from .weights import meta_model, open_weights

HEAD_REFINE = 32         # logits of each position a quantized head recomputes in float32 (see RefinedHead)
# Stands for the user's text while the chat template is rendered (never tokenized itself).
_CONTENT = "\uE000mdi-user-content\uE000"


class CoordinatorModel:
    """Tokenizer + embedding (+ optional first layers) + final norm + LM head."""

    def __init__(self, info: ModelInfo, *, device: str = "cpu", dtype: str = "float32",
                 layers: tuple[int, int] | None = None, max_cached_requests: int = 64,
                 kernels: str = "exact", quantization: str = "none") -> None:
        self.info = info
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.tokenizer = TextTokenizer(info.path)
        self._tokenizer_lock = threading.Lock()
        check_kernels(kernels, self.device, self.dtype)
        check_quantization(quantization, self.device)
        self.kernels, self.quantization = kernels, quantization
        self.reader = open_weights(info)
        spec, _ = DecoderSpec.support(info.raw_config)
        self.embed_scale = spec.embed_scale if spec is not None else None
        head_name = "model.embed_tokens.weight" if info.tied_embeddings else "lm_head.weight"
        t = self.reader.read(["model.norm.weight"], self.dtype, str(self.device))
        if quantization != "none":
            # Embedding rows are read from the file when looked up (their exact values; no
            # second copy in memory), and so are the head rows its refinement needs.
            head = RefinedHead(quantized_head(self.reader, head_name, info, self.device),
                               self.reader.rows(head_name, torch.float32), HEAD_REFINE)
            self.embed = self.reader.rows("model.embed_tokens.weight", self.dtype)
            self.head: Callable[[torch.Tensor], torch.Tensor] = head
            self.parameter_bytes = head.nbytes
        elif kernels == "packed":
            # the head keeps only its reordered copy; embedding rows are read when looked up
            self.embed = self.reader.rows("model.embed_tokens.weight", self.dtype)
            head_rows = self.embed if info.tied_embeddings else self.reader.rows("lm_head.weight", self.dtype)
            self.head = PackedHead(head_rows.block, head_rows.shape[0])
            self.parameter_bytes = self.embed.nbytes * (1 if info.tied_embeddings else 2)
        else:
            names = ["model.embed_tokens.weight"] + ([] if info.tied_embeddings else ["lm_head.weight"])
            w = self.reader.read(names, self.dtype, str(self.device))
            self.embed = torch.nn.Embedding.from_pretrained(w["model.embed_tokens.weight"], freeze=True)
            head_weight = w.get("lm_head.weight", w["model.embed_tokens.weight"])   # (vocab, hidden)
            self.head = functools.partial(torch.nn.functional.linear, weight=head_weight)
            self.parameter_bytes = sum(x.numel() * x.element_size() for x in w.values())
        if spec is not None:
            # the same computation as these models' own RMSNorm, without building transformers'
            # config and modelling code (which cost the coordinator resident memory)
            self.norm = RMSNorm(info.hidden_size, spec.rms_norm_eps, spec.norm_offset)
            self.norm.weight = torch.nn.Parameter(t["model.norm.weight"], requires_grad=False)
        else:
            self.norm = meta_model(info.config).model.norm
            self.norm.to_empty(device=self.device)
            self.norm.load_state_dict({"weight": t["model.norm.weight"]}, assign=True)
        self.parameter_bytes += self.norm.weight.numel() * self.norm.weight.element_size()
        self.local_layers: ChunkExecutor | None = None
        if layers is not None and layers[1] > layers[0]:
            self.local_layers = ChunkExecutor(info, layers[0], layers[1], device=device, dtype=dtype,
                                              max_cached_requests=max_cached_requests, reader=self.reader,
                                              kernels=kernels, quantization=quantization)
            self.parameter_bytes += self.local_layers.parameter_bytes
        self.eos_ids = frozenset(eos_ids(info, self.tokenizer))

    @classmethod
    def for_plan(cls, plan, info: ModelInfo) -> "CoordinatorModel":
        """The coordinator's model parts for a plan (its device, dtype, kernels, quantization, layers)."""
        c = plan.coordinator
        return cls(info, device=c.device, dtype=plan.dtype, kernels=plan.kernels, quantization=plan.quantization,
                   layers=(0, c.layer_end) if c.layer_end else None)

    def encode_prompt(self, prompt: str, use_chat_template: bool, parse_special_tokens: bool = False) -> list[int]:
        """The prompt's token ids. By default special tokens written in the prompt (such as
        `<|im_start|>system`) stay plain text, so a user cannot inject turns or control tokens;
        `parse_special_tokens` makes them control tokens, as a raw tokenizer call would.
        """
        # The Rust tokenizer refuses concurrent use ("Already borrowed"): callers are serialised.
        with self._tokenizer_lock:
            return self._encode(prompt, use_chat_template, parse_special_tokens)

    def _encode(self, prompt: str, use_chat_template: bool, parse_special_tokens: bool) -> list[int]:
        tok = self.tokenizer
        if not use_chat_template:
            return tok.encode(prompt, add_special_tokens=True, split_special_tokens=not parse_special_tokens)
        if not tok.chat_template:
            raise RequestError(ErrorCode.INVALID_TEXT, "this model has no chat template; send use_chat_template=false")
        if parse_special_tokens or not any(s in prompt for s in tok.special_strings):
            return tok.encode(tok.render_chat([{"role": "user", "content": prompt}]), add_special_tokens=False)
        # The template's own text (its control tokens) is tokenized as the template means it, the
        # user's text between them with special tokens split into plain pieces.
        before, _, after = tok.render_chat([{"role": "user", "content": _CONTENT}]).partition(_CONTENT)
        return (tok.encode(before, add_special_tokens=False)
                + tok.encode(prompt, add_special_tokens=False, split_special_tokens=True)
                + tok.encode(after, add_special_tokens=False))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.embed_scale is not None:          # Gemma: embeddings times sqrt(hidden), in their dtype
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return x

    @torch.inference_mode()
    def embed_tokens(self, token_ids: list[int]) -> torch.Tensor:
        """(seq,) ids -> (1, seq, hidden) input of the first ring hop."""
        return self._embed(torch.tensor([token_ids], dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def embed_tokens_batch(self, token_ids: list[int]) -> torch.Tensor:
        """One new token per request -> (batch, 1, hidden)."""
        return self._embed(torch.tensor(token_ids, dtype=torch.long, device=self.device).unsqueeze(1))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(1, seq, hidden) ring output -> (vocab,) float32 logits of the last position."""
        return self.logits_batch(hidden[:, -1:, :])[0]

    @torch.inference_mode()
    def logits_batch(self, last: torch.Tensor) -> torch.Tensor:
        """(batch, 1, hidden) last positions -> (batch, vocab) float32 logits."""
        x = self.norm(last.to(device=self.device, dtype=self.dtype))
        return self.head(x)[:, -1].float()


def quantized_head(reader, name: str, info: ModelInfo, device: torch.device) -> torch.nn.Module:
    """The LM head of a quantized node (formats.head_format), made a slice of rows at a time from
    the file, so that neither its float values nor its unpacked integers exist whole.
    """
    rows = info.tensor_shapes[name][0]
    slices = (reader.linear_rows(name, s, min(s + ROW_SLICE, rows)) for s in range(0, rows, ROW_SLICE))
    if head_format(info.tensor_kinds.get(name, "F32")) == "int4":
        return Int4Linear((to_int4(w) for w in slices), None, device, rows=rows)
    return Int8Linear((to_int8(w, group=GROUP) for w in slices), None, device, rows=rows)


def eos_ids(info: ModelInfo, tokenizer: TextTokenizer) -> set[int]:
    """Tokens that end a generation: the model's and its generation config's eos ids, and the
    tokenizer's eos token (read from the folder's JSON files, without transformers).
    """
    ids: set[int] = set()
    sources = [info.text_config, info.raw_config]
    gen = info.path / "generation_config.json"
    if gen.is_file():
        sources.insert(0, json.loads(gen.read_text()))
    for cfg in sources:
        value = cfg.get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    eos = tokenizer.token_id(tokenizer.special_tokens.get("eos_token"))
    if eos is not None:
        ids.add(eos)
    return ids
