"""Checkpoints: atomic save, keep-last-K, latest-with-fallback, and loading a model from any supported source.

A run directory holds checkpoints named by their step, zero-padded to 7 digits, and `tokenizer.model`. A checkpoint
is either one file, `ckpt-NNNNNNN.pt`, a dict with at least `model` (the state dict) and `model_config`
(ModelConfig.to_dict()), to which train.py adds the optimizer, loader and RNG state, `step`, `tokenizer_sha256` and
`data_dir`; or a sharded directory, `ckpt-NNNNNNN/` (train.py --fsdp), written by every rank with
torch.distributed.checkpoint: the model and optimizer state in DCP's shard files and `.metadata`, the rest of the
dict in `train_state.pt`. Both are written under a temporary name and renamed into place when complete.
"""

import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from geb.config import ModelConfig
from geb.files import atomic_path, file_sha256, remove_temp_files
from geb.hf import load_hf
from geb.model import GEB

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)(\.pt)?$")
TOKENIZER_FILE = "tokenizer.model"
SHARDED_STATE_FILE = "train_state.pt"  # a sharded checkpoint's non-tensor state (config, step, loader, RNG)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not a geb checkpoint."""


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """OUT/ckpt-STEP.pt, the step zero-padded to 7 digits."""
    return Path(out_dir) / f"ckpt-{step:07d}.pt"


def sharded_checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """OUT/ckpt-STEP, the directory of a sharded checkpoint."""
    return Path(out_dir) / f"ckpt-{step:07d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in out_dir (files and sharded directories), oldest first."""
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
    prune_checkpoints(out_dir, keep)
    return path


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0 keeps all)."""
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            remove_path(old)


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree; a directory is renamed to a temporary name first, so a crash midway
    leaves no half-deleted checkpoint under its real name."""
    if path.is_dir():
        doomed = path.with_name(f".{path.name}.tmpdel")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_sharded_checkpoint(out_dir: str | os.PathLike, step: int, tensors: dict, state: dict | None,
                            keep: int = 3) -> Path:
    """Write OUT/ckpt-STEP/ with torch.distributed.checkpoint (call on every rank; each writes its shards of
    `tensors`, e.g. {"model": ..., "optimizer": ...} from get_state_dict) and rank 0's `state` (the rest) to
    train_state.pt, all in a temporary directory that rank 0 renames into place once complete; keep the newest
    `keep`. The output directory must be shared by every rank (one filesystem across nodes)."""
    path = sharded_checkpoint_path(out_dir, step)
    tmp = path.with_name(f".{path.name}.tmp")  # the same name on every rank
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_temp_files(path.parent)  # leftovers of a save that was killed
        tmp.mkdir()
    _barrier()
    import torch.distributed.checkpoint as dcp  # here, not at the top: its import costs CPU inference 1.4 s a start

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: no collectives
        dcp.save(tensors, checkpoint_id=tmp)
    if _rank() == 0:
        with atomic_path(tmp / SHARDED_STATE_FILE) as f:
            torch.save(state, f)
        _fsync_tree(tmp)
        if path.exists():
            remove_path(path)
        os.replace(tmp, path)
        prune_checkpoints(out_dir, keep)
    _barrier()
    return path


def _fsync_tree(directory: Path) -> None:
    """fsync every file of a directory and the directory itself, so the rename publishes complete data."""
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_sharded_tensors(path: str | os.PathLike, tensors: dict, single_process: bool = False) -> None:
    """Fill `tensors` (a state dict of plain tensors or DTensors, any world size) in place from a sharded
    checkpoint; collective on every rank unless single_process."""
    import torch.distributed.checkpoint as dcp  # here, not at the top: its import costs CPU inference 1.4 s a start

    single_process = single_process or not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, checkpoint_id=Path(path), no_dist=single_process)


def _read_sharded(path: Path, weights: bool) -> dict:
    """A sharded checkpoint's state dict: train_state.pt, plus the full model state (one process) with weights."""
    if not (path / ".metadata").is_file() or not (path / SHARDED_STATE_FILE).is_file():
        raise CheckpointError(f"{path}: incomplete sharded checkpoint (no .metadata or {SHARDED_STATE_FILE})")
    state = torch.load(path / SHARDED_STATE_FILE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model_config" not in state:
        raise CheckpointError(f"{path}: not a geb checkpoint (no 'model_config' in {SHARDED_STATE_FILE})")
    if weights:
        model = GEB(ModelConfig.from_dict(state["model_config"]), impl="torch")
        tensors = {"model": model.state_dict()}
        load_sharded_tensors(path, tensors, single_process=True)
        state["model"] = tensors["model"]
    return state


def load_checkpoint(path: str | os.PathLike, weights: bool = True) -> dict:
    """Read a checkpoint file or sharded directory (weights=False: a sharded one's state without the tensors, which
    train.py loads sharded itself); any failure is a CheckpointError naming the file."""
    path = Path(path)
    try:
        if path.is_dir():
            return _read_sharded(path, weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except CheckpointError:
        raise
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path}: not a geb checkpoint (no 'model' / 'model_config' entries)")
    return state


def load_latest(out_dir: str | os.PathLike, weights: bool = True) -> tuple[Path, dict] | None:
    """The newest readable checkpoint in out_dir; unreadable ones are reported and skipped."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return path, load_checkpoint(path, weights)
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
    """A model and its tokenizer path from a run dir (latest checkpoint), a checkpoint file or sharded checkpoint
    directory (read in this one process), or an HF directory."""
    source = Path(source)
    if source.is_dir() and (source / "config.json").is_file() and not list_checkpoints(source):
        tokenizer = source / TOKENIZER_FILE
        return load_hf(source, impl=impl), tokenizer if tokenizer.is_file() else None
    if source.is_dir() and CKPT_PATTERN.match(source.name):
        path, state = source, load_checkpoint(source)  # one sharded checkpoint
    elif source.is_dir():
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
