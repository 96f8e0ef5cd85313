"""GEB: a grouped-query-attention decoder (Llama layout) whose every fused op goes through `kernels`."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from geb import loader
from geb.config import ModelConfig

LOGITS = ("all", "last", "none")  # what GEB.forward returns as logits
Segments = tuple[torch.Tensor, int]  # (int32 cu_seqlens of the B*T tokens, longest segment): geb.loader.segments


def rope_cos_sin(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (*positions.shape, head_dim // 2) for positions (T,) or (B, T), computed in fp32."""
    # GEB keeps positions in fp32: in bf16, positions above 256 collide and the angles repeat.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, impl: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.impl = eps, impl

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None = None):
        """norm(x); with pending, (norm(x + pending), x + pending) in one kernel. A module call either way, so that
        FSDP's hooks gather the weight (and, for the final norm, the LM head grouped with it)."""
        if pending is None:
            return kernels.rms_norm(x, self.weight, self.eps, impl=self.impl)
        return kernels.add_rms_norm(pending, x, self.weight, self.eps, impl=self.impl)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, written in place at the decoded positions."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, T, kv_heads, head_dim) at positions input_pos (T,); the whole cache (static shapes)."""
        self.k.index_copy_(1, input_pos, k)
        self.v.index_copy_(1, input_pos, v)
        return self.k, self.v


def _fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One bias-free nn.Linear whose output is the outputs of linears, concatenated."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, impl: str):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections (inference)
        self.impl = impl
        self.kv_cache: KVCache | None = None

    def fuse_projections(self) -> None:
        """Replace q/k/v_proj by one qkv_proj (inference: one matrix-vector product instead of three)."""
        if self.qkv_proj is None:
            self.qkv_proj = _fused_linear(self.q_proj, self.k_proj, self.v_proj)
            del self.q_proj, self.k_proj, self.v_proj

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of x (B, T, d_model), each (B, T, heads * head_dim), from the separate or the fused weights."""
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv_dim = self.n_kv_heads * self.head_dim
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor | None = None,
                segs: Segments | None = None, kv_len: int | None = None) -> torch.Tensor:
        """x (B, T, d_model); cos/sin (T, head_dim // 2) or per token (B, T, head_dim // 2); input_pos (T,), the
        positions written to the KV cache; segs, attention only within these segments of the B*T tokens; kv_len,
        attend over the cache's first kv_len positions only (None: the whole cache)."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        q, k = kernels.apply_rotary_qk(q, k, cos, sin, impl=self.impl)
        if segs is not None:
            cu, longest = segs
            y = kernels.flash_attn_varlen_func(q.reshape(b * t, self.n_heads, self.head_dim),
                                               k.reshape(b * t, self.n_kv_heads, self.head_dim),
                                               v.reshape(b * t, self.n_kv_heads, self.head_dim),
                                               cu, cu, longest, longest, causal=True, impl=self.impl)
        elif self.kv_cache is None:
            y = kernels.flash_attn_func(q, k, v, causal=True, impl=self.impl)
        else:
            # gpt-fast's shape: attention over the cache's first kv_len positions with a mask; a compiled step
            # passes a bucket of the filled length, so steps within a bucket have the same shapes and never
            # recompile; eager steps the filled length (GEB.forward). kernels.flash_attn_func takes no mask: SDPA.
            k, v = self.kv_cache.write(input_pos, k, v)
            if kv_len is not None:
                k, v = k[:, :kv_len], v[:, :kv_len]
            mask = torch.arange(k.shape[1], device=x.device)[None, :] <= input_pos[:, None]
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, enable_gqa=True).transpose(1, 2)
        return self.o_proj(y.reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, impl: str):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections (inference)
        self.impl = impl

    def fuse_projections(self) -> None:
        """Replace gate/up_proj by one gate_up_proj (inference: one matrix-vector product instead of two)."""
        if self.gate_up_proj is None:
            self.gate_up_proj = _fused_linear(self.gate_proj, self.up_proj)
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(kernels.swiglu(gate, up, impl=self.impl))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, impl: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps, impl)
        self.self_attn = Attention(config, impl)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps, impl)
        self.mlp = FeedForward(config, impl)
        self.dropout = nn.Dropout(config.dropout)
        self.post_norm = config.norm_position == "post"

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None = None, segs: Segments | None = None,
                kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(residual stream, pending): pre-norm, the stream is x + pending, `pending` being the previous block's
        output not yet added, so that the add and the next RMSNorm run as one kernel (add_rms_norm); post-norm
        returns the block's output and None."""
        if self.post_norm:
            x = self.input_layernorm(x + self.dropout(self.self_attn(x, cos, sin, input_pos, segs, kv_len)))
            return self.post_attention_layernorm(x + self.dropout(self.mlp(x))), None
        h, x = add_norm(pending, x, self.input_layernorm)
        y = self.self_attn(h, cos, sin, input_pos, segs, kv_len)
        h, x = add_norm(self.dropout(y), x, self.post_attention_layernorm)
        return x, self.dropout(self.mlp(h))


def add_norm(pending: torch.Tensor | None, x: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + pending), x + pending) in one kernel; (norm(x), x) when nothing is pending."""
    if pending is None:
        return norm(x), x
    return norm(x, pending)


class GEB(nn.Module):
    """Token embedding -> blocks -> final RMSNorm -> LM head. Module names follow Hugging Face Llama."""

    def __init__(self, config: ModelConfig, impl: str = "auto"):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, impl) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps, impl)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)
        for layer in self.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.mlp.down_proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> dict[str, int]:
        """Parameter counts: embedding (input and, if untied, output), non-embedding, and total."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        embedding = self.embed_tokens.weight.numel()
        if not self.config.tie_embeddings:
            embedding += self.lm_head.weight.numel()
        return {"embedding": embedding, "non_embedding": total - embedding, "total": total}

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6 per weight of every matrix product, the LM head
        included and the embedding lookup not, plus causal attention's 6 * n_layers * seq_len * n_heads * head_dim."""
        matmul_weights = self.num_params()["non_embedding"] + self.lm_head.weight.numel()
        return 6 * matmul_weights + 6 * self.config.n_layers * seq_len * self.config.n_heads * self.config.head_dim

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache in every layer (for decoding): forward then takes input_pos and writes the
        cache there; see clear_kv_cache."""
        weight = self.embed_tokens.weight
        max_seq_len = max_seq_len or self.config.max_seq_len
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, max_seq_len, self.config.n_kv_heads, self.config.head_dim,
                                               dtype or weight.dtype, weight.device)

    def fuse_projections(self) -> None:
        """For inference: fuse each layer's q/k/v and gate/up projections (fewer, larger matrix-vector products
        at batch 1). The state dict then no longer has the Hugging Face names: export before fusing."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def clear_kv_cache(self) -> None:
        """Drop the KV caches: forward goes back to full-sequence mode."""
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                *, logits: str = "all", positions: torch.Tensor | None = None, kv_len: int | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits and, when targets (B, T) are given, the mean cross-entropy over targets >= 0.

        input_pos (T,): the positions of idx's tokens (default 0..T-1); required with a KV cache, whose entries at
        input_pos are written. logits: "all" (B, T, vocab); "last" (B, 1, vocab), only the last position through the
        LM head (a prefill needs nothing more); "none": None, for a loss only, computed by
        kernels.linear_cross_entropy without materializing the logits.

        positions (B, T): packed documents (training and evaluation, no KV cache), each token's position in its
        document, 0 where one starts (geb.loader.doc_positions): RoPE rotates by them and attention stays within
        each document (kernels.flash_attn_varlen_func). Reading the segment boundaries from them is a host sync
        when they are on a GPU (one per forward).

        kv_len (with a KV cache): attend over the cache's first kv_len positions, which must hold input_pos (a
        compiled decode step passes its bucket of the filled length: geb.generate.Decoder). Default: the filled
        positions (up to input_pos) in eager mode, the whole cache when compiling.
        """
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {', '.join(map(repr, LOGITS))}, got {logits!r}")
        if logits == "last" and targets is not None:
            raise ValueError("logits='last' computes no loss: pass targets with logits='all' or 'none'")
        if logits == "none" and targets is None:
            raise ValueError("logits='none' returns only the loss: it needs targets")
        segs = None
        if positions is None:
            positions, kv_len = self._positions(idx, input_pos, kv_len)
        else:
            segs = self._segments(idx, input_pos, positions)
        x = self.dropout(self.embed_tokens(idx))
        cos, sin = rope_cos_sin(self.config.head_dim, positions, self.config.rope_theta)
        pending = None
        for layer in self.layers:
            x, pending = layer(x, pending, cos, sin, input_pos, segs, kv_len)
        if logits == "last":
            return self.lm_head(add_norm(_last(pending), x[:, -1:], self.norm)[0]), None
        h, _ = add_norm(pending, x, self.norm)
        if logits == "none":
            # The LM head and the loss fused: the (B, T, vocab) logits are never materialized. The LM head's weight
            # is read directly: under FSDP it is gathered with the final norm's (one group), called just above.
            flat = _ignore_negative(targets)
            return None, kernels.linear_cross_entropy(h, self.lm_head.weight, flat.view(targets.shape),
                                                      impl=self.norm.impl)
        out = self.lm_head(h)
        return out, (None if targets is None else cross_entropy(out, targets))

    def _positions(self, idx: torch.Tensor, input_pos: torch.Tensor | None,
                   kv_len: int | None = None) -> tuple[torch.Tensor, int | None]:
        """The (T,) positions of idx's tokens, checked against max_seq_len and the KV cache, and the number of cache
        positions attention reads: kv_len if given, else the filled ones in eager steps (a chat's 2048-position cache
        would otherwise cost more than the weights on a CPU); None, the whole cache, when compiling or without a
        cache."""
        t = idx.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.config.max_seq_len}")
        cache = self.layers[0].self_attn.kv_cache
        if input_pos is None:
            if cache is not None:
                raise ValueError("with a KV cache, pass input_pos: the (T,) positions of idx's tokens")
            if kv_len is not None:
                raise ValueError("kv_len is for decoding with a KV cache (setup_kv_cache)")
            return torch.arange(t, device=idx.device), None
        if tuple(input_pos.shape) != (t,):
            raise ValueError(f"input_pos must have shape ({t},) for {t} tokens, got {tuple(input_pos.shape)}")
        if not torch.compiler.is_compiling():  # a compiled decode step has its positions checked by its caller
            last = int(input_pos.max())
            if last >= self.config.max_seq_len:
                raise ValueError(f"position {last} exceeds max_seq_len {self.config.max_seq_len}")
            if cache is not None and last >= cache.k.shape[1]:
                raise ValueError(f"position {last} is past the KV cache of {cache.k.shape[1]} positions "
                                 "(setup_kv_cache max_seq_len)")
            if kv_len is not None and (cache is None or not last < kv_len <= cache.k.shape[1]):
                raise ValueError(f"kv_len {kv_len} must cover position {last} and fit the KV cache "
                                 f"({'none set up' if cache is None else cache.k.shape[1]} positions)")
            return input_pos, (kv_len if kv_len is not None else last + 1 if cache is not None else None)
        return input_pos, kv_len


    def _segments(self, idx: torch.Tensor, input_pos: torch.Tensor | None, positions: torch.Tensor) -> Segments:
        """The segments of packed positions (B, T), checked against idx, input_pos and the KV cache."""
        if input_pos is not None or self.layers[0].self_attn.kv_cache is not None:
            raise ValueError("positions (packed documents) is for training and evaluation: not with input_pos or a "
                             "KV cache")
        if tuple(positions.shape) != tuple(idx.shape):
            raise ValueError(f"positions must have idx's shape {tuple(idx.shape)}, got {tuple(positions.shape)}")
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds max_seq_len {self.config.max_seq_len}")
        return loader.segments(positions)


def _last(pending: torch.Tensor | None) -> torch.Tensor | None:
    """The last position of a pending block output (None stays None)."""
    return None if pending is None else pending[:, -1:]


def _ignore_negative(targets: torch.Tensor) -> torch.Tensor:
    """Flat int64 targets with every negative one set to -100 (ignored)."""
    flat = targets.reshape(-1).long()
    return flat.masked_fill(flat < 0, -100)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) of logits (B, T, vocab) over the targets (B, T) that are >= 0."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), _ignore_negative(targets), ignore_index=-100)
