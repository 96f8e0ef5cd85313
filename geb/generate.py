"""Batch-1 generation on a static KV cache: one-pass prefill, a (compilable) decode step, and sampling.

Used by infer_cpu.py and the CPU decode benchmark. Prefill and decode step are the model's own forward with
logits="last" (the LM head on the last position only: a prefill needs no T x d_model x vocab product). A compiled
decode step attends over a bucket of the cache (the filled positions rounded up to a power of two, at least
MIN_BUCKET, at most the cache) with a mask, so its shapes change only when the filled length enters a new bucket:
`torch.compile` compiles it once per bucket reached, lazily (a 2048-position cache has 6 buckets).
"""

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from geb.model import GEB

MIN_BUCKET = 64  # the shortest cache length a compiled decode step attends over


def kv_bucket(filled: int, cache_len: int, min_bucket: int = MIN_BUCKET) -> int:
    """The cache positions a compiled decode step attends over when positions [0, filled) are in use: filled rounded
    up to a power of two, at least min_bucket, at most cache_len."""
    return min(cache_len, max(min_bucket, 1 << (filled - 1).bit_length()))


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> int:
    """One token id from logits (vocab,): temperature 0 is greedy; top-k then top-p (nucleus) filtering."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def fit_prompt(prompt: list[int], context: int, max_new_tokens: int) -> list[int]:
    """The prompt, cut to its last tokens (with a warning on stderr) when it leaves no room in the context."""
    if len(prompt) <= context - 1:
        return prompt
    # Keep room for the continuation, but never less than half the context of the prompt.
    keep = max(context // 2, context - max(max_new_tokens, 1))
    print(f"warning: prompt of {len(prompt)} tokens does not fit the context of {context}; "
          f"keeping its last {keep} tokens", file=sys.stderr)
    return prompt[-keep:]


@dataclass
class GenerationStats:
    """Timings of one Decoder.generate call (seconds); compile_s is the first-call cost of the compiled step's
    buckets reached (each compiles once)."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    decode_steps: int = 0
    compile_s: float = 0.0
    stop_reason: str = ""

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes from the prefill logits; decode_s covers the steps after it (and sampling).
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else 0.0


class Decoder:
    """A model with a static batch-1 KV cache and a decode step, eager or compiled (lazily, once per cache bucket:
    kv_bucket; min_bucket is for tests)."""

    def __init__(self, model: GEB, max_seq_len: int | None = None, compile: bool = False,
                 compile_mode: str | None = None, min_bucket: int = MIN_BUCKET):
        self.model = model.eval()
        self.max_seq_len = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
        dtype = model.embed_tokens.weight.dtype
        model.setup_kv_cache(1, self.max_seq_len, dtype=dtype if dtype.is_floating_point else torch.float32)
        self.compile, self.min_bucket = compile, min_bucket
        self.buckets: set[int] = set()  # the buckets the compiled step has been compiled (and run) for
        self._step: Callable = self._model_step
        if compile:
            # Inductor's C++ wrapper (instead of Python) calls the step's ~100 matrix-vector products and ~250 fused
            # kernels: 4% faster per token on our 2-core CPU, for twice the compile time. A mode replaces it.
            options = None if compile_mode else {"cpp_wrapper": True}
            self._step = torch.compile(self._model_step, mode=compile_mode, options=options, fullgraph=True,
                                       dynamic=False)
            # One graph per bucket (kv_len is a constant of each): let dynamo keep them all.
            n_buckets = len({self.bucket(n) for n in range(1, self.max_seq_len + 1)})
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n_buckets + 8)
        self.pos = 0  # cache positions [0, pos) hold the tokens fed so far (a chat's earlier turns)

    def bucket(self, filled: int) -> int:
        """The cache positions the compiled step attends over with positions [0, filled) in use."""
        return kv_bucket(filled, self.max_seq_len, self.min_bucket)

    def _model_step(self, idx: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """Logits (B, 1, vocab) of the last token of idx (B, T), whose tokens sit at input_pos (T,); attention over
        the cache's first kv_len positions (None: the filled ones)."""
        return self.model(idx, input_pos=input_pos, logits="last", kv_len=kv_len)[0]

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits (1, 1, vocab) of token at cache position pos (compiled: over the bucket of pos + 1 positions)."""
        kv_len = self.bucket(pos + 1) if self.compile else None
        return self._step(torch.tensor([[token]]), torch.tensor([pos]), kv_len)

    @torch.no_grad()
    def warmup(self, start: int = 0) -> float:
        """Run (and for --compile, compile) the decode step on positions start and start + 1 (those below the cache's
        length and, compiled, in start's bucket); seconds spent. It writes the cache there: after a prefill, start at
        the first position not yet written (a later step writes each position before it reads it)."""
        t0 = time.perf_counter()
        for pos in range(start, min(start + 2, self.max_seq_len)):  # the second call checks no recompile
            if pos == start or self.bucket(pos + 1) == self.bucket(start + 1):
                self.step(0, pos)
        self.buckets.add(self.bucket(start + 1))
        return time.perf_counter() - t0

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_id: int | None = None,
                 stats: GenerationStats | None = None, vocab_size: int | None = None,
                 start_pos: int = 0) -> Iterator[int]:
        """Yield up to max_new_tokens new ids after prompt; stops at eos_id (not yielded) or the context limit.
        vocab_size: sample only ids below it (a model's vocabulary may be padded past its tokenizer's).
        start_pos: the prompt continues the tokens already in the cache at [0, start_pos) (a chat's earlier turns;
        only the prompt is prefilled). Afterwards self.pos counts the cached tokens: the last yielded one (and an
        EOS) are not in the cache yet."""
        if not prompt:
            raise ValueError("prompt must hold at least one token (e.g. BOS)")
        if start_pos and start_pos + len(prompt) >= self.max_seq_len:
            raise ValueError(f"{start_pos} cached + {len(prompt)} prompt tokens leave no room in the context of "
                             f"{self.max_seq_len}")
        stats = stats if stats is not None else GenerationStats()
        prompt = list(prompt) if start_pos else fit_prompt(list(prompt), self.max_seq_len, max_new_tokens)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        stats.prompt_tokens = len(prompt)
        t0 = time.perf_counter()
        idx = torch.tensor([prompt], dtype=torch.long)
        logits = self._model_step(idx, torch.arange(start_pos, start_pos + len(prompt)))  # eager: its length varies
        stats.prefill_s = time.perf_counter() - t0
        pos = self.pos = start_pos + len(prompt)
        stats.stop_reason = "max_new_tokens"
        while stats.new_tokens < max_new_tokens:
            t0 = time.perf_counter()
            token = sample(logits[0, -1, :vocab_size], temperature, top_k, top_p, gen)
            stats.decode_s += time.perf_counter() - t0
            if eos_id is not None and token == eos_id:
                stats.stop_reason = "eos"
                break
            stats.new_tokens += 1
            yield token  # the consumer's time (printing) is not counted
            if stats.new_tokens == max_new_tokens:
                break
            if pos >= self.max_seq_len:
                stats.stop_reason = "context"
                break
            if self.compile and self.bucket(pos + 1) not in self.buckets:
                # Compile a bucket when the first step needs it (the first token comes from the eager prefill).
                stats.compile_s += self.warmup(start=pos)
            t0 = time.perf_counter()
            logits = self.step(token, pos)
            stats.decode_s += time.perf_counter() - t0
            stats.decode_steps += 1
            pos = self.pos = pos + 1
