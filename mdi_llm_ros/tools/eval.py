"""`mdi-llm eval`: the quality of a quantized ring, measured on a fixed text.

The ring's own code computes the text teacher-forced: the coordinator's embedding, every chunk
node's layers as the config's plan assigns them (loaded as the nodes load them, with the
configured quantization), the final norm and the head, in one process. The reference is
float32 `transformers` on the same model (for a GGUF, its de-quantized values: what
`quantization: none` serves). Reported: the ring's perplexity, the reference's, and top-1
agreement, the share of positions where the ring's most likely next token is the reference's.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "eval_text.txt"
WINDOW = 1024           # tokens per forward (the text is cut into windows of this many)
SLICE = 256             # positions whose logits are computed at once (a 262k vocabulary is large)


@dataclass
class EvalResult:
    quantization: str
    tokens: int
    nll: float
    ref_nll: float
    agree: int
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def ref_ppl(self) -> float:
        return math.exp(self.ref_nll / self.tokens)

    @property
    def agreement(self) -> float:
        return self.agree / self.tokens

    def line(self) -> str:
        return (f"eval: quantization={self.quantization} ppl={self.ppl:.4f} ref_ppl={self.ref_ppl:.4f} "
                f"top1_agreement={self.agreement:.4f} tokens={self.tokens}")


def _scores(logits_of, ids, window: list[int]):
    """(summed NLL of each next token, argmax per position) over one window, SLICE positions at a time."""
    import torch
    nll, best = 0.0, []
    for start in range(0, len(window) - 1, SLICE):
        end = min(start + SLICE, len(window) - 1)
        logits = logits_of(start, end).float()                            # (end - start, vocab)
        target = torch.tensor(window[start + 1:end + 1])
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        best.append(logits.argmax(-1))
    return nll, torch.cat(best)


def evaluate(config_path: str | None, text_path: Path, quantization: str | None = None,
             log=lambda s: print(s, file=sys.stderr, flush=True)) -> EvalResult:
    import torch

    from ..core.config import load_config
    from ..core.coordinator_model import CoordinatorModel
    from ..core.chunk import ChunkExecutor
    from ..core.models import load_model_info, reference_dir
    from ..core.plan import make_plan

    cfg = load_config(config_path) if config_path else _default_config()
    if quantization is not None:
        from dataclasses import replace
        cfg = replace(cfg, model=replace(cfg.model, quantization=quantization))
    info = load_model_info(cfg.model.name)
    plan = make_plan(cfg, info)
    t0 = time.monotonic()
    log(f"[eval] {info.source}: the ring's parts ({len(plan.chunks)} chunks, {plan.quantization} weights)")
    model = CoordinatorModel.for_plan(plan, info)
    chunks = [ChunkExecutor.for_plan(plan, n, info) for n in plan.chunks]
    ids = model.tokenizer.encode(text_path.read_text())
    windows = [ids[i:i + WINDOW + 1] for i in range(0, len(ids) - 1, WINDOW)]       # each >= 2 tokens
    log(f"[eval] {len(ids)} tokens of {text_path.name} in {len(windows)} windows")
    ring_nll, ring_best = 0.0, []
    with torch.inference_mode():
        for w, window in enumerate(windows):
            hidden = model.embed_tokens(window[:-1])                                      # (1, seq, hidden)
            position = 0
            if model.local_layers is not None:
                hidden = model.local_layers.forward(w, 0, position, hidden, prefill=True)
            for chunk in chunks:
                hidden = chunk.forward(w, 0, position, hidden, prefill=True)
                chunk.release(w)
            normed = model.norm(hidden[0].to(model.dtype))                               # (seq, hidden)
            nll, best = _scores(lambda a, b, head=model.head, x=normed: head(x[a:b]), ids, window)
            ring_nll += nll
            ring_best.append(best)
            log(f"[eval] ring: window {w + 1}/{len(windows)}")
    del chunks, model
    ref = reference_dir(cfg.model.name, log=log)
    log(f"[eval] reference: float32 transformers from {ref}")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    ref_nll, agree, tokens = 0.0, 0, 0
    with torch.inference_mode():
        for w, window in enumerate(windows):
            inputs = torch.tensor([window[:-1]])
            hidden = hf.model(inputs).last_hidden_state[0]                                 # (seq, hidden)
            nll, best = _scores(lambda a, b: hf.lm_head(hidden[a:b]), ids, window)
            ref_nll += nll
            agree += int((best == ring_best[w]).sum())
            tokens += len(window) - 1
            log(f"[eval] reference: window {w + 1}/{len(windows)}")
    return EvalResult(plan.quantization, tokens, ring_nll, ref_nll, agree, time.monotonic() - t0)


def _default_config():
    from ..core.config import default_config_path, load_config
    return load_config(default_config_path())


def run_eval(config_path: str | None, text: str | None, quantization: str | None) -> int:
    """`mdi-llm eval`: prints the result; its last line is machine-readable."""
    path = Path(text) if text else DEFAULT_TEXT
    if not path.is_file():
        from ..core.errors import ConfigError
        raise ConfigError(f"--text {path}: no such file; give a UTF-8 text file")
    r = evaluate(config_path, path, quantization)
    print(f"[eval] {r.tokens} tokens in {r.seconds:.0f} s: the ring's perplexity {r.ppl:.3f} against "
          f"{r.ref_ppl:.3f} for float32 transformers ({100 * (r.ppl / r.ref_ppl - 1):+.2f}%), "
          f"top-1 agreement {100 * r.agreement:.2f}%", file=sys.stderr)
    print(r.line())
    return 0
