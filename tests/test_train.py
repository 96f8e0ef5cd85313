"""train.py end to end on a tiny model (DDP and FSDP2 over Gloo, exact resume, sharded checkpoints across world sizes,
elastic restarts after a killed rank, signals, spikes, accumulation, bad flags, the final checkpoint before the final
evaluation) and its embedding-gradient shrink hook."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, small_config

from geb.checkpoint import load_model
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
          script: list[str] | None = None, torchrun: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run train.py, or SCRIPT taking the same flags (under torchrun with its extra flags when nproc > 1, else
    `python SCRIPT...`), and return the finished process."""
    args = ["--data", str(data_dir), "--out", str(out), "--batch-size", "2", "--seq-len", "32", "--log-every", "1",
            "--eval-tokens", "1024", "--warmup-steps", "2", "--lr", "1e-3", *TINY, *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *(torchrun or []), *(script or ["train.py"])]
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


FSDP_RUN = ["--max-steps", "20", "--save-every", "4", "--eval-every", "100", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank FSDP run of 20 steps (checkpoints every 4 steps)."""
    out = tmp_path_factory.mktemp("fsdp") / "full"
    proc = train(data_dir, out, *FSDP_RUN, "--fsdp", nproc=2)
    assert "saved" in proc.stdout and (out / "ckpt-0000020" / ".metadata").is_file()
    return out


@pytest.mark.parametrize("tied", ["true", "false"])  # the embedding in the root group, or in groups of its own
def test_fsdp_matches_ddp(data_dir, fsdp_run, tmp_path, tied):
    out, fsdp_out = tmp_path / "ddp", tmp_path / "fsdp"
    train(data_dir, out, *FSDP_RUN, "--ac", "selective", "--tie-embeddings", tied, nproc=2)  # AC changes no loss
    if tied == "true":
        fsdp_out = fsdp_run
    else:
        train(data_dir, fsdp_out, *FSDP_RUN, "--fsdp", "--tie-embeddings", tied, nproc=2)
    ddp, fsdp = train_losses(out), train_losses(fsdp_out)
    assert [s for s, _ in fsdp] == list(range(1, 21))
    for (_, a), (_, b) in zip(fsdp, ddp, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (fsdp, ddp)  # fp32, another reduction order
    ddp_model, _ = load_model(out)
    fsdp_model, tokenizer = load_model(fsdp_out)  # the sharded checkpoint, read in this one process
    assert tokenizer == fsdp_out / "tokenizer.model"
    assert (fsdp_model.lm_head.weight is fsdp_model.embed_tokens.weight) == (tied == "true")
    for (name, a), b in zip(fsdp_model.state_dict().items(), ddp_model.state_dict().values(), strict=True):
        # AdamW divides by sqrt(v): where a gradient is near zero, reduction-order round-off in it moves that weight
        # by a visible fraction of lr (seen: 1.3e-5 in one embedding element of the untied model); a wrong shard or
        # a missed reduction moves weights by ~lr * steps = 2e-2.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=name)


def test_fsdp_resume_is_bit_identical_on_two_ranks_and_continues_on_one(data_dir, fsdp_run, tmp_path):
    parts = tmp_path / "parts"
    train(data_dir, parts, *FSDP_RUN, "--fsdp", "--run-steps", "10", nproc=2)  # saves at 4, 8 and 10
    one_rank = tmp_path / "one"
    shutil.copytree(parts, one_rank)
    proc = train(data_dir, parts, *FSDP_RUN, "--fsdp", nproc=2)
    assert "resuming from" in proc.stdout and "ckpt-0000010 (step 10)" in proc.stdout
    assert train_losses(parts) == train_losses(fsdp_run)  # exact float equality, step by step
    proc = train(data_dir, one_rank, *FSDP_RUN, "--fsdp", "--run-steps", "2", "--ac", "full")
    assert "checkpoint was written by 2 ranks" in proc.stdout and "saved" in proc.stdout
    losses = train_losses(one_rank)
    assert losses[:10] == train_losses(fsdp_run)[:10] and [s for s, _ in losses] == list(range(1, 13))
    proc = subprocess.run([sys.executable, "infer_cpu.py", "--ckpt", str(one_rank / "ckpt-0000012"), "--prompt",
                           "the", "--max-new-tokens", "5", "--seed", "0"], cwd=ROOT, capture_output=True, text=True,
                          env=CPU_ENV, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]


KILL_RANK_1 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
step = train.train_step
def train_step(run):
    if run.rank == 1 and run.state.step == 10 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return step(run)
train.train_step = train_step
train.main()
"""


def test_killed_rank_costs_one_restart_and_changes_nothing(data_dir, fsdp_run, tmp_path):
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1.format(root=str(ROOT)))
    for attempt in range(3):
        out = tmp_path / f"elastic{attempt}"
        proc = train(data_dir, out, *FSDP_RUN, "--fsdp", nproc=2, torchrun=["--max-restarts", "1"],
                     script=[str(script)])
        assert "ckpt-0000008 (step 8)" in proc.stdout  # one restart, from the last checkpoint
        assert train_losses(out) == train_losses(fsdp_run)


def test_fsdp_and_zero_are_exclusive(data_dir, tmp_path):
    proc = train(data_dir, tmp_path / "bad", "--max-steps", "2", "--fsdp", "--zero", check=False)
    assert proc.returncode != 0 and "--fsdp and --zero are exclusive" in proc.stderr
    assert "Traceback" not in proc.stderr


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


def test_doc_mask_run_is_recorded_and_resumes_exactly(data_dir, tmp_path):
    """--doc-mask: recorded in config.json and the checkpoint, evaluated, and a resumed run repeats the losses."""
    common = ["--max-steps", "4", "--save-every", "100", "--eval-every", "4", "--doc-mask"]
    train(data_dir, tmp_path / "full", *common)
    train(data_dir, tmp_path / "parts", *common, "--run-steps", "2")
    proc = train(data_dir, tmp_path / "parts", *common)
    assert "resuming from" in proc.stdout
    assert train_losses(tmp_path / "parts") == train_losses(tmp_path / "full")
    assert len(train_losses(tmp_path / "full")) == 4
    assert any("val_bpb" in r for r in metrics(tmp_path / "parts"))
    assert json.loads((tmp_path / "full" / "config.json").read_text())["train"]["doc_mask"] is True
    assert torch.load(tmp_path / "full" / "ckpt-0000004.pt", weights_only=False)["train_config"]["doc_mask"] is True


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


def test_full_logits_loss_trains_like_the_fused_one(data_dir, tmp_path):
    common = ["--max-steps", "3", "--save-every", "100", "--eval-every", "100"]
    train(data_dir, tmp_path / "fused", *common)
    train(data_dir, tmp_path / "full", *common, "--loss", "full")
    fused, full = train_losses(tmp_path / "fused"), train_losses(tmp_path / "full")
    assert len(fused) == 3
    for (_, a), (_, b) in zip(fused, full, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (fused, full)


@pytest.mark.parametrize("flags, message", [
    (["--preset", "nope"], "--preset 'nope' is unknown"),
    (["--loss", "nope"], "--loss 'nope' is unknown"),
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
