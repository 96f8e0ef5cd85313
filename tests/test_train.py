"""train.py end to end on a tiny model (DDP over Gloo, exact resume, signals, spikes, accumulation, bad flags, the
final checkpoint before the final evaluation) and its embedding-gradient shrink hook."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, small_config

from geb.data import prepare
from geb.model import GEB
from train import EmbeddingGradShrink

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--ffn-dim", "128",
        "--max-seq-len", "64"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer_file) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(out, corpus=[str(CORPUS)], tokenizer=tokenizer_file)
    return out


# The runs are CPU tests (gloo, fp32) even on a GPU machine, where two ranks would otherwise share one GPU.
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def train(data_dir: Path, out: Path, *extra: str, nproc: int = 1, check: bool = True,
          script: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run train.py (under torchrun when nproc > 1, or `python SCRIPT...` taking the same flags) and return the
    finished process."""
    args = ["--data", str(data_dir), "--out", str(out), "--batch-size", "2", "--seq-len", "32", "--log-every", "1",
            "--eval-tokens", "1024", "--warmup-steps", "2", "--lr", "1e-3", *TINY, *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    else:
        cmd = [sys.executable, *(script or ["train.py"])]
    proc = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, env=CPU_ENV, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]


def test_ddp_two_ranks_on_gloo(data_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = train(data_dir, out, "--max-steps", "4", "--save-every", "4", "--eval-every", "4", nproc=2)
    assert "first batch differs across ranks: True" in proc.stdout
    assert "weights identical across 2 ranks: True" in proc.stdout
    assert (out / "ckpt-0000004.pt").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    records = metrics(out)
    assert [s for s, _ in train_losses(out)] == [1, 2, 3, 4]
    assert any("val_bpb" in r and r["val_bpb"] > 0 for r in records)


def test_zero_sharded_optimizer_saves_and_resumes(data_dir, tmp_path):
    out = tmp_path / "zero"
    common = ["--max-steps", "4", "--save-every", "2", "--eval-every", "100", "--zero"]
    train(data_dir, out, *common, "--run-steps", "2", nproc=2)
    proc = train(data_dir, out, *common, nproc=2)
    assert "resuming from" in proc.stdout and "weights identical across 2 ranks: True" in proc.stdout
    assert [s for s, _ in train_losses(out)] == [1, 2, 3, 4]


def test_exact_resume_is_bit_identical(data_dir, tmp_path):
    common = ["--max-steps", "8", "--save-every", "100", "--eval-every", "100", "--dropout", "0.1"]
    train(data_dir, tmp_path / "full", *common)
    train(data_dir, tmp_path / "parts", *common, "--run-steps", "3")
    assert train_losses(tmp_path / "parts")[-1][0] == 3
    train(data_dir, tmp_path / "parts", *common, "--run-steps", "3")
    proc = train(data_dir, tmp_path / "parts", *common)
    assert "resuming from" in proc.stdout
    full, parts = train_losses(tmp_path / "full"), train_losses(tmp_path / "parts")
    assert len(full) == 8
    assert parts == full  # exact float equality, step by step


def test_sigterm_saves_and_exits_zero(data_dir, tmp_path):
    out = tmp_path / "sig"
    args = ["--data", str(data_dir), "--out", str(out), "--batch-size", "2", "--seq-len", "32", "--log-every", "1",
            "--max-steps", "100000", "--save-every", "100000", "--eval-every", "100000", *TINY]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CPU_ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by signal" in stdout
    saved = sorted(out.glob("ckpt-*.pt"))
    assert len(saved) == 1
    step = torch.load(saved[0], weights_only=True)["step"]
    assert 3 <= step < 100000


def test_corrupt_checkpoint_falls_back_to_previous(data_dir, tmp_path):
    out = tmp_path / "corrupt"
    train(data_dir, out, "--max-steps", "6", "--run-steps", "4", "--save-every", "2", "--eval-every", "100")
    newest = out / "ckpt-0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    proc = train(data_dir, out, "--max-steps", "6", "--save-every", "2", "--eval-every", "100")
    assert f"{newest}: unreadable checkpoint" in proc.stderr
    assert "resuming from" in proc.stdout and "ckpt-0000002.pt (step 2)" in proc.stdout
    assert [s for s, _ in train_losses(out)] == [1, 2, 3, 4, 5, 6]


def test_bad_batch_is_replaced_and_counted(data_dir, tmp_path):
    out = tmp_path / "spike"
    train(data_dir, out, "--max-steps", "5", "--save-every", "100", "--eval-every", "100",
          "--debug-bad-batch-steps", "1,3")
    records = [r for r in metrics(out) if "loss" in r]
    assert records[-1]["spikes_replaced"] == 2
    assert records[-1]["steps_skipped"] == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_bad_batch_replaced_under_ddp(data_dir, tmp_path):
    out = tmp_path / "spike-ddp"
    proc = train(data_dir, out, "--max-steps", "3", "--save-every", "100", "--eval-every", "100",
                 "--debug-bad-batch-steps", "1", "--grad-accum", "2", nproc=2)
    assert "weights identical across 2 ranks: True" in proc.stdout
    assert [r for r in metrics(out) if "loss" in r][-1]["spikes_replaced"] == 2  # one per rank


def test_grad_accumulation_matches_larger_batch(data_dir, tmp_path):
    common = ["--max-steps", "3", "--save-every", "100", "--eval-every", "100"]
    train(data_dir, tmp_path / "accum", *common, "--grad-accum", "3")
    train(data_dir, tmp_path / "big", *common, "--batch-size", "6")
    accum, big = train_losses(tmp_path / "accum"), train_losses(tmp_path / "big")
    assert [s for s, _ in accum] == [1, 2, 3]
    for (_, a), (_, b) in zip(accum, big, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (accum, big)


@pytest.mark.parametrize("flags, message", [
    (["--preset", "nope"], "--preset 'nope' is unknown"),
    (["--seq-len", "65"], "--seq-len 65 exceeds the model's context"),
    (["--n-kv-heads", "3"], "n_heads (4) must be divisible by n_kv_heads (3)"),
    (["--batch-size", "0"], "--batch-size must be positive"),
])
def test_bad_flags_exit_with_one_line(data_dir, tmp_path, flags, message):
    proc = train(data_dir, tmp_path / "bad", "--max-steps", "2", *flags, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_dir_without_manifest(tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    proc = train(empty, tmp_path / "o", "--max-steps", "2", check=False)
    assert proc.returncode != 0 and "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr


def test_vocab_mismatch_on_resume(data_dir, tmp_path):
    out = tmp_path / "vocab"
    train(data_dir, out, "--max-steps", "2", "--save-every", "2", "--eval-every", "100")
    state = torch.load(out / "ckpt-0000002.pt", weights_only=True)
    state["model_config"]["vocab_size"] += 1
    torch.save(state, out / "ckpt-0000002.pt")
    proc = train(data_dir, out, "--max-steps", "4", check=False)
    assert proc.returncode != 0 and "vocab" in proc.stderr and "Traceback" not in proc.stderr


def test_final_checkpoint_is_saved_before_the_final_evaluation(data_dir, tmp_path):
    out = tmp_path / "evalfails"
    failing_eval = ("import sys, train\n"
                    "def bits_per_byte(*args, **kwargs):\n"
                    "    raise RuntimeError('evaluation failed on purpose')\n"
                    "train.bits_per_byte = bits_per_byte\n"
                    "train.main(sys.argv[1:])\n")
    proc = train(data_dir, out, "--max-steps", "3", "--save-every", "100", "--eval-every", "100", check=False,
                 script=["-c", failing_eval])
    assert proc.returncode != 0 and "evaluation failed on purpose" in proc.stderr
    assert [p.name for p in out.glob("ckpt-*.pt")] == ["ckpt-0000003.pt"]
    assert torch.load(out / "ckpt-0000003.pt", weights_only=True)["step"] == 3
    assert [s for s, _ in train_losses(out)] == [1, 2, 3]


@pytest.mark.parametrize("scale", [0.1, 0.5])
def test_embedding_grad_shrink_scales_only_the_embedding_gradient(one_thread, scale):
    config = small_config(dropout=0.0, tie_embeddings=False)
    torch.manual_seed(0)
    plain = GEB(config, impl="torch")
    hooked = GEB(config, impl="torch")
    hooked.load_state_dict(plain.state_dict())
    shrink = EmbeddingGradShrink(hooked)
    shrink.scale = scale
    idx = torch.randint(0, config.vocab_size, (3, 17))
    targets = torch.randint(0, config.vocab_size, (3, 17))
    plain_logits, plain_loss = plain(idx, targets)
    hooked_logits, hooked_loss = hooked(idx, targets)
    torch.testing.assert_close(hooked_logits, plain_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(hooked_loss, plain_loss, rtol=0, atol=1e-6)
    plain_loss.backward()
    hooked_loss.backward()
    plain_grads, hooked_grads = dict(plain.named_parameters()), dict(hooked.named_parameters())
    embedding = plain_grads["embed_tokens.weight"].grad
    assert embedding.abs().max() > 0
    torch.testing.assert_close(hooked_grads["embed_tokens.weight"].grad, scale * embedding)
    for name, p in plain_grads.items():
        if name != "embed_tokens.weight":
            torch.testing.assert_close(hooked_grads[name].grad, p.grad, msg=name)
    shrink.scale = 1.0  # off: the hook changes nothing
    hooked.zero_grad()
    hooked(idx, targets)[1].backward()
    torch.testing.assert_close(hooked.embed_tokens.weight.grad, embedding)
