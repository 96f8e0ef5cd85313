"""Model configuration: one dataclass and a few named presets."""

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a GEB model; every field is checked on construction (the error names the field)."""

    vocab_size: int = 64896
    d_model: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    n_kv_heads: int = 4  # 1 = multi-query, n_heads = multi-head
    ffn_dim: int = 5632
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    norm_position: str = "pre"  # "pre": pre-norm blocks + final norm (Llama layout); "post": true post-norm blocks
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model / n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        """Plain dict for JSON and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of to_dict; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # GEB-1.3B: the paper gives layers/heads/vocab; width, KV heads and FFN are chosen so the total is ~1.35B.
    "geb-1.3b": ModelConfig(),
    # Super Tiny LM baseline (arXiv 2405.14159, Table 1). Multi-head (16 KV heads) as in their baseline.
    "stlm-50m": ModelConfig(vocab_size=50304, d_model=512, n_layers=10, n_heads=16, n_kv_heads=16, ffn_dim=1536,
                            max_seq_len=512, tie_embeddings=True, dropout=0.1),
    # Small enough to train on 2 CPU cores in minutes; the default of train.py.
    "tiny": ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=704,
                        max_seq_len=256, tie_embeddings=True),
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """A named preset with any fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model config fields {unknown}; known: {sorted(known)}")
    return replace(PRESETS[name], **overrides)
