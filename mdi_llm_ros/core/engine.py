"""The coordinator's model parts: tokenizer, embedding, head, detokenisation.

The coordinator owns what sits at both ends of the ring: the tokenizer and
chat template, the token embedding (plus any first layers it holds itself),
the final norm and the LM head. Chunk nodes hold everything in between.
"""
from __future__ import annotations

import functools
import math
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

import torch

from .chunk import ChunkExecutor
from .codec import DTYPES
from .decoder import NATIVE_MODEL_TYPES, RMSNorm
from .errors import ErrorCode, RequestError
from .kernels import PackedHead, check_kernels
from .models import ModelInfo, TensorReader, meta_model
from .sampling import SamplingParams

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64
MAX_PROMPT_CHARS = 1_000_000


@dataclass(frozen=True)
class GenerateParams:
    """One request as the service/action/CLI give it."""

    prompt: str
    use_chat_template: bool = False
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = -1
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)


def validate_params(p: GenerateParams, max_context: int) -> None:
    """Reject a request whose fields are out of range, with a code naming the field."""
    if not isinstance(p.prompt, str) or not p.prompt.strip():
        raise RequestError(ErrorCode.EMPTY_PROMPT, "prompt is empty; send some text to continue")
    if len(p.prompt) > MAX_PROMPT_CHARS:
        raise RequestError(ErrorCode.PROMPT_TOO_LONG, f"prompt has {len(p.prompt)} characters (max {MAX_PROMPT_CHARS})")
    if "\ufffd" in p.prompt or any(0xD800 <= ord(ch) <= 0xDFFF for ch in p.prompt):
        raise RequestError(ErrorCode.INVALID_TEXT, "prompt contains invalid UTF-8 (replacement or surrogate characters)")
    bad = [ch for ch in p.prompt if unicodedata.category(ch) == "Cc" and ch not in "\n\r\t"]
    if bad:
        raise RequestError(ErrorCode.INVALID_TEXT,
                           f"prompt contains control character {bad[0]!r}; only \\n, \\r and \\t are allowed")
    if not isinstance(p.max_new_tokens, int) or p.max_new_tokens < 1 or p.max_new_tokens > max_context:
        raise RequestError(ErrorCode.INVALID_MAX_NEW_TOKENS,
                           f"max_new_tokens must be in 1..{max_context} (the model context), got {p.max_new_tokens}")
    if not math.isfinite(p.temperature) or p.temperature < 0:
        raise RequestError(ErrorCode.INVALID_TEMPERATURE,
                           f"temperature must be a finite number >= 0 (0 = greedy), got {p.temperature}")
    if p.top_k < 0:
        raise RequestError(ErrorCode.INVALID_TOP_K, f"top_k must be >= 0 (0 = off), got {p.top_k}")
    if not math.isfinite(p.top_p) or not 0 < p.top_p <= 1:
        raise RequestError(ErrorCode.INVALID_TOP_P, f"top_p must be in (0, 1] (1 = off), got {p.top_p}")
    if p.seed < -1:
        raise RequestError(ErrorCode.INVALID_SEED, f"seed must be >= 0, or -1 for a random seed, got {p.seed}")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise RequestError(ErrorCode.INVALID_STOP, f"{len(p.stop)} stop strings; at most {MAX_STOP_STRINGS}")
    for s in p.stop:
        if not s or len(s) > MAX_STOP_LENGTH:
            raise RequestError(ErrorCode.INVALID_STOP,
                               f"stop string {s[:20]!r} must have 1..{MAX_STOP_LENGTH} characters")


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

    def encode_prompt(self, prompt: str, use_chat_template: bool) -> list[int]:
        # The Rust tokenizer refuses concurrent use ("Already borrowed"): callers are serialised.
        with self._tokenizer_lock:
            return self._encode(prompt, use_chat_template)

    def _encode(self, prompt: str, use_chat_template: bool) -> list[int]:
        if use_chat_template:
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError(ErrorCode.INVALID_TEXT,
                                   "this model has no chat template; send use_chat_template=false")
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):   # BatchEncoding in some versions
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

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


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character,
    and holds back text that could be the start of a stop string."""

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
