"""Checkpoints: names, save/load, keep-last-K, fallback past unreadable files, atomic saves, the tokenizer lookup and
load_model from a run dir, a checkpoint file and a Hugging Face directory."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_config

from geb import checkpoint
from geb.checkpoint import (
    TOKENIZER_FILE,
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    load_model,
    save_checkpoint,
    save_sharded_checkpoint,
    sharded_checkpoint_path,
)
from geb.files import file_sha256
from geb.hf import export_hf
from geb.model import GEB

pytestmark = pytest.mark.usefixtures("one_thread")


def random_state(seed: int, **extra) -> dict:
    """A checkpoint dict of a small random model, as train.py would save it (model + model_config + extras)."""
    torch.manual_seed(seed)
    config = small_config()
    return {"model": GEB(config, impl="torch").state_dict(), "model_config": config.to_dict(), **extra}


def names(path, message: str) -> str:
    """A pattern for an error that starts with path, then message (both literal)."""
    return "^" + re.escape(f"{path}{message}")


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_names():
    assert checkpoint_path("out/run", 42).as_posix() == "out/run/ckpt-0000042.pt"
    assert checkpoint_path("out", 1234567).name == "ckpt-1234567.pt"
    assert TOKENIZER_FILE == "tokenizer.model"


def test_save_and_load_round_trip(tmp_path):
    state = random_state(1, step=42, counters={"tokens": 12345}, tokenizer_sha256="ab" * 32)
    path = save_checkpoint(tmp_path / "new" / "run", 42, state)
    assert path == tmp_path / "new" / "run" / "ckpt-0000042.pt" and path.is_file()
    loaded = load_checkpoint(path)
    assert_same_state(loaded["model"], state["model"])
    assert loaded["model_config"] == state["model_config"]
    assert loaded["step"] == 42 and loaded["counters"] == {"tokens": 12345}
    assert loaded["tokenizer_sha256"] == "ab" * 32


def test_list_checkpoints_orders_by_step_and_ignores_other_files(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    for step in (1000, 5, 10_000_000, 40):
        checkpoint_path(tmp_path, step).write_bytes(b"x")
    for name in ("ckpt-abc.pt", ".ckpt-0000009.pt.tmp123", "ckpt-0000007.pt.bak", "notes.txt", "tokenizer.model"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-0000005.pt", "ckpt-0000040.pt", "ckpt-0001000.pt", "ckpt-10000000.pt"]


def test_keep_last_k(tmp_path):
    state = random_state(2)
    for step in range(1, 6):
        save_checkpoint(tmp_path / "k3", step * 10, {**state, "step": step * 10}, keep=3)
        save_checkpoint(tmp_path / "all", step * 10, {**state, "step": step * 10}, keep=0)
    assert sorted(p.name for p in (tmp_path / "k3").iterdir()) == [
        "ckpt-0000030.pt", "ckpt-0000040.pt", "ckpt-0000050.pt"]
    assert len(list_checkpoints(tmp_path / "all")) == 5
    assert load_latest(tmp_path / "k3")[1]["step"] == 50


def test_unreadable_checkpoints_are_named_and_skipped(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"ckpt-0000009\.pt: no such checkpoint"):
        load_checkpoint(tmp_path / "ckpt-0000009.pt")
    assert load_latest(tmp_path / "missing") is None and load_latest(tmp_path) is None

    good = save_checkpoint(tmp_path, 10, random_state(3, step=10))
    truncated = checkpoint_path(tmp_path, 20)
    truncated.write_bytes(good.read_bytes()[:1000])
    foreign = checkpoint_path(tmp_path, 30)
    torch.save({"weights": torch.ones(3)}, foreign)
    with pytest.raises(CheckpointError, match=names(truncated, ": unreadable checkpoint (")):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match=names(foreign, ": not a geb checkpoint")):
        load_checkpoint(foreign)

    path, state = load_latest(tmp_path)
    assert path == good and state["step"] == 10
    err = capsys.readouterr().err
    assert f"warning: {foreign}: not a geb checkpoint" in err and f"warning: {truncated}: unreadable" in err
    assert err.count("falling back to the previous checkpoint") == 2
    good.write_bytes(b"not a zip file")
    assert load_latest(tmp_path) is None


@pytest.mark.parametrize("failure", ["writer dies", "unpicklable state"])
def test_failed_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch, failure):
    previous = random_state(4, step=10)
    save_checkpoint(tmp_path, 10, previous, keep=1)
    if failure == "writer dies":
        def dying_save(obj, f):  # a disk that fills up halfway through the write
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(checkpoint.torch, "save", dying_save)
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(tmp_path, 20, random_state(5, step=20), keep=1)
    else:
        with pytest.raises(Exception, match="lambda|pickle"):
            save_checkpoint(tmp_path, 20, random_state(5, step=20, hook=lambda: None), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000010.pt"]  # no temp file, old one not pruned
    path, state = load_latest(tmp_path)
    assert path.name == "ckpt-0000010.pt" and state["step"] == 10
    assert_same_state(state["model"], previous["model"])


def test_tokenizer_lookup(tmp_path, tokenizer_file):
    sha = file_sha256(tokenizer_file)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copyfile(tokenizer_file, data_dir / TOKENIZER_FILE)
    run = tmp_path / "run"
    ckpt = save_checkpoint(run, 1, random_state(6, tokenizer_sha256=sha, data_dir=str(data_dir)))
    assert load_model(run, impl="torch")[1] == data_dir / TOKENIZER_FILE  # none beside it: the recorded data dir's
    shutil.copyfile(tokenizer_file, run / TOKENIZER_FILE)
    assert load_model(ckpt, impl="torch")[1] == run / TOKENIZER_FILE  # beside the checkpoint first

    (run / TOKENIZER_FILE).write_bytes(b"another tokenizer")
    with pytest.raises(CheckpointError, match=names(run / TOKENIZER_FILE, " does not match the checkpoint's")):
        load_model(run, impl="torch")

    bare = tmp_path / "bare"
    save_checkpoint(bare, 1, random_state(6))
    assert load_model(bare, impl="torch")[1] is None
    shutil.copyfile(tokenizer_file, bare / TOKENIZER_FILE)  # no recorded sha256: any tokenizer beside it is taken
    assert load_model(bare, impl="torch")[1] == bare / TOKENIZER_FILE


def test_load_model_from_a_run_dir_and_a_checkpoint_file(tiny_run, tmp_path, capsys):
    path = checkpoint_path(tiny_run.run_dir, 60)
    reference = torch.load(path, map_location="cpu", weights_only=True)
    for source in (tiny_run.run_dir, path, str(path)):
        model, tokenizer_path = load_model(source, impl="torch")
        assert isinstance(model, GEB) and model.config == tiny_run.config
        assert_same_state(model.state_dict(), reference["model"])
        assert tokenizer_path == tiny_run.tokenizer_file

    run = tmp_path / "run"  # the latest readable checkpoint of a run dir, even one that has a config.json
    save_checkpoint(run, 10, random_state(7))
    newest = random_state(8)
    save_checkpoint(run, 20, newest)
    (run / "config.json").write_text("{}")
    assert_same_state(load_model(run, impl="torch")[0].state_dict(), newest["model"])
    checkpoint_path(run, 30).write_bytes(b"truncated")
    assert_same_state(load_model(run, impl="torch")[0].state_dict(), newest["model"])
    assert "ckpt-0000030.pt: unreadable checkpoint" in capsys.readouterr().err


def test_load_model_from_a_hugging_face_dir(tiny_run, tiny_model, tmp_path):
    hf_dir = export_hf(tiny_model, tmp_path / "hf", tiny_run.tokenizer_file)
    model, tokenizer_path = load_model(hf_dir, impl="torch")
    assert model.config == tiny_run.config and tokenizer_path == hf_dir / TOKENIZER_FILE
    assert_same_state(model.state_dict(), tiny_model.state_dict())
    idx = torch.randint(0, tiny_run.config.vocab_size, (2, 23))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], tiny_model(idx)[0])
    (hf_dir / TOKENIZER_FILE).unlink()
    assert load_model(hf_dir, impl="torch")[1] is None


def test_load_model_errors_name_the_source(tmp_path):
    with pytest.raises(CheckpointError, match=names(tmp_path / "nowhere", ": no such checkpoint file or directory")):
        load_model(tmp_path / "nowhere")
    no_model = ": no readable checkpoint (ckpt-*.pt) and no Hugging Face config.json"
    with pytest.raises(CheckpointError, match=names(tmp_path, no_model)):
        load_model(tmp_path)
    checkpoint_path(tmp_path, 1).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match=r"ckpt-0000001\.pt: unreadable checkpoint"):
        load_model(checkpoint_path(tmp_path, 1))


def save_sharded(out, step: int, seed: int, keep: int = 3) -> dict:
    """A sharded checkpoint of a small random model written by this one process; returns its model state."""
    state = random_state(seed, step=step)
    model = state.pop("model")
    save_sharded_checkpoint(out, step, {"model": model}, state, keep=keep)
    return model


def test_sharded_checkpoint_round_trip_and_keep_last(tmp_path):
    models = {step: save_sharded(tmp_path, step, seed=step) for step in (2, 4, 6)}
    save_sharded(tmp_path, 8, seed=8, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000004", "ckpt-0000006", "ckpt-0000008"]
    assert sharded_checkpoint_path(tmp_path, 6).is_dir()
    state = load_checkpoint(tmp_path / "ckpt-0000006")
    assert state["step"] == 6
    for name, tensor in models[6].items():
        assert torch.equal(state["model"][name], tensor), name
    assert "model" not in load_checkpoint(tmp_path / "ckpt-0000006", weights=False)
    model, _ = load_model(tmp_path / "ckpt-0000004")  # one sharded checkpoint, and the run dir's newest
    assert torch.equal(model.embed_tokens.weight, models[4]["embed_tokens.weight"])
    assert load_latest(tmp_path)[1]["step"] == 8


KILLED_SAVE = """
import os, signal, sys
import torch
import torch.distributed.checkpoint as dcp
sys.path[:0] = [{root!r}, {tests!r}]
from geb import checkpoint
from test_checkpoint import save_sharded
def killed(tensors, checkpoint_id):
    torch.save(tensors, os.path.join(checkpoint_id, "__0_0.distcp"))  # a shard half-way, then the process dies
    os.kill(os.getpid(), signal.SIGKILL)
dcp.save = killed  # geb.checkpoint imports dcp where it saves
save_sharded({out!r}, 4, seed=4)
"""


def test_kill_during_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    model = save_sharded(tmp_path, 2, seed=2)
    tests = Path(__file__).parent
    script = KILLED_SAVE.format(root=str(tests.parent), tests=str(tests), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / ".ckpt-0000004.tmp").is_dir()  # the killed save's leftover, under a temporary name
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000002"]
    path, state = load_latest(tmp_path)
    assert path.name == "ckpt-0000002" and torch.equal(state["model"]["norm.weight"], model["norm.weight"])
    save_sharded(tmp_path, 4, seed=4)  # the next save clears the leftover
    assert not (tmp_path / ".ckpt-0000004.tmp").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000002", "ckpt-0000004"]


def test_incomplete_sharded_checkpoint_falls_back(tmp_path, capsys):
    save_sharded(tmp_path, 2, seed=2)
    save_sharded(tmp_path, 4, seed=4)
    (tmp_path / "ckpt-0000004" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=names(tmp_path / "ckpt-0000004", ": incomplete sharded checkpoint")):
        load_checkpoint(tmp_path / "ckpt-0000004")
    assert load_latest(tmp_path)[1]["step"] == 2
    assert "falling back" in capsys.readouterr().err
