"""Checkpoints: atomic save, keep-last-K, latest-with-fallback, and loading a model from any supported source.

A run directory holds `ckpt-NNNNNNN.pt` files (the step, zero-padded to 7 digits) and `tokenizer.model`. A
checkpoint is a dict with at least `model` (the state dict) and `model_config` (ModelConfig.to_dict()); train.py
adds the optimizer, loader and RNG state, `step`, `tokenizer_sha256` and `data_dir`.
"""

import os
import re
import sys
from pathlib import Path

import torch

from geb.config import ModelConfig
from geb.files import atomic_path, file_sha256
from geb.hf import load_hf
from geb.model import GEB

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
TOKENIZER_FILE = "tokenizer.model"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not a geb checkpoint."""


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """OUT/ckpt-STEP.pt, the step zero-padded to 7 digits."""
    return Path(out_dir) / f"ckpt-{step:07d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(out_dir: str | os.PathLike, step: int, state: dict, keep: int = 3) -> Path:
    """Write state to OUT/ckpt-STEP.pt through a temporary file and rename; keep the newest `keep`."""
    path = checkpoint_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file; any failure is a CheckpointError naming the file."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path}: not a geb checkpoint (no 'model' / 'model_config' entries)")
    return state


def load_latest(out_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest readable checkpoint in out_dir; unreadable ones are reported and skipped."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            print(f"warning: {e}; falling back to the previous checkpoint", file=sys.stderr)
    return None


def _find_tokenizer(ckpt_dir: Path, state: dict) -> Path | None:
    """tokenizer.model next to the checkpoint, else in its recorded data dir; one with another sha256 is refused."""
    expected = state.get("tokenizer_sha256")
    candidates = [ckpt_dir / TOKENIZER_FILE]
    if state.get("data_dir"):
        candidates.append(Path(state["data_dir"]) / TOKENIZER_FILE)
    for path in candidates:
        if path.is_file():
            if expected and file_sha256(path) != expected:
                raise CheckpointError(f"{path} does not match the checkpoint's tokenizer (sha256 {expected[:12]}...)")
            return path
    return None


def load_model(source: str | os.PathLike, impl: str = "auto") -> tuple[GEB, Path | None]:
    """A model and its tokenizer path from a run dir (latest checkpoint), a checkpoint file, or an HF directory."""
    source = Path(source)
    if source.is_dir() and (source / "config.json").is_file() and not list_checkpoints(source):
        tokenizer = source / TOKENIZER_FILE
        return load_hf(source, impl=impl), tokenizer if tokenizer.is_file() else None
    if source.is_dir():
        latest = load_latest(source)
        if latest is None:
            raise CheckpointError(f"{source}: no readable checkpoint (ckpt-*.pt) and no Hugging Face config.json")
        path, state = latest
    elif source.is_file():
        path, state = source, load_checkpoint(source)
    else:
        raise CheckpointError(f"{source}: no such checkpoint file or directory")
    model = GEB(ModelConfig.from_dict(state["model_config"]), impl=impl)
    model.load_state_dict(state["model"])
    return model, _find_tokenizer(path.parent, state)
