"""train.py's alignment stages end to end on the session's tiny model: SFT's global-batch normalization, a synthetic
task learned to high held-out accuracy, DPO's frozen reference and rising margin, exact resume, 2-rank Gloo runs,
bad flag combinations."""

import io
import json
import os
import random
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import WORDS

import train as train_py
from geb.align_loader import PreferenceLoader, SFTLoader, preference_eval_batches
from geb.chat import IGNORE_INDEX, choice_accuracy, sequence_logps
from geb.checkpoint import load_model
from geb.data import prepare_aligned

ROOT = Path(__file__).resolve().parent.parent
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
KEYS = ("red", "blue", "green", "cold", "warm", "sun", "rock", "rain", "snow", "wind")  # the first half answer yes
PLAIN = [w for w in WORDS if w not in KEYS]
QUESTION = "Is the last word good: "


def items(n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """n balanced (sentence, label) items, none of whose sentences is in exclude: three filler words and a key word
    last, labelled by the key."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        key = rng.choice(KEYS[:5] if len(out) % 2 == 0 else KEYS[5:])
        s = " ".join(rng.sample(PLAIN, 3) + [key])
        if s not in exclude:
            out.append((s, "yes" if len(out) % 2 == 0 else "no"))
    return out


def user(s: str) -> list[dict]:
    return [{"role": "user", "content": QUESTION + s}]
@pytest.fixture(scope="module")
def task(tmp_path_factory, tokenizer_file) -> dict:
    """The synthetic task's chat and preference directories and held-out multiple-choice items."""
    root = tmp_path_factory.mktemp("align")
    sft, pairs = items(240, seed=1), items(160, seed=2)
    (root / "sft.jsonl").write_text("".join(json.dumps({"messages": user(s) + [{"role": "assistant", "content": a}]})
                                            + "\n" for s, a in sft))
    # rejected: an off-task word, a preference a few DPO steps can learn (the task itself takes SFT ~100 steps)
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": QUESTION + s, "chosen": a, "rejected": "bread"})
                                              + "\n" for s, a in pairs))
    prepare_aligned(root / "sft", "chat", [root / "sft.jsonl"], tokenizer_file, val_fraction=0.05)
    prepare_aligned(root / "dpo", "preference", [root / "pairs.jsonl"], tokenizer_file, val_fraction=0.05)
    seen = {s for s, _ in sft + pairs}
    held_out = [{"prompt": user(s), "choices": ["yes", "no"], "answer": int(a == "no")}
                for s, a in items(60, seed=3, exclude=seen)]
    return {"sft": root / "sft", "dpo": root / "dpo", "held_out": held_out}


def train(data: Path, out: Path, *extra: str, nproc: int = 1, check: bool = True) -> SimpleNamespace:
    """Run train.py with small-run flags: under torchrun when nproc > 1, else its main in this process (no start-up
    cost); returns returncode, stdout and stderr."""
    args = ["--data", str(data), "--out", str(out), "--batch-size", "2", "--seq-len", "64", "--log-every", "1",
            "--warmup-steps", "2", "--lr", "1e-3", "--eval-every", "100", "--save-every", "100", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
        proc = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, env=CPU_ENV, timeout=300)
    else:
        proc = run_main(args)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_main(args: list[str]) -> SimpleNamespace:
    """train.main(args) in this process, its output captured; threads and signal handlers restored after."""
    threads, handlers = torch.get_num_threads(), {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            train_py.main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]


def test_sft_loss_is_normalized_over_the_global_batch(task, tiny_run, tmp_path, one_thread):
    # one global batch of 4 rows: 2 ranks x 2 rows, 1 rank x 2 rows x 2 micro-batches, 1 rank x 4 rows
    runs = {"ranks": (2, ["--batch-size", "2"]), "accum": (1, ["--batch-size", "2", "--grad-accum", "2"]),
            "whole": (1, ["--batch-size", "4"])}
    for name, (nproc, flags) in runs.items():
        proc = train(task["sft"], tmp_path / name, "--stage", "sft", "--init", str(tiny_run.run_dir),
                     "--max-steps", "3", "--seq-len", "128", *flags, nproc=nproc)
        assert (nproc == 2) <= ("weights identical across 2 ranks: True" in proc.stdout)
    # the first step's loss by hand: the init model's summed cross-entropy over the 4 rows' packed examples, each run
    # through the model alone (so attention must not cross examples) / their assistant tokens
    inputs, targets, positions = next(SFTLoader(task["sft"], "train", 128, 4, seed=1337))
    model, _ = load_model(tiny_run.run_dir)
    nll, examples = 0.0, 0
    for row in range(inputs.shape[0]):
        starts = (positions[row] == 0).nonzero().flatten().tolist() + [inputs.shape[1]]
        for lo, hi in zip(starts[:-1], starts[1:], strict=True):
            if (targets[row, lo:hi] != IGNORE_INDEX).any():
                with torch.no_grad():
                    logits, _ = model(inputs[row:row + 1, lo:hi])
                nll += F.cross_entropy(logits[0], targets[row, lo:hi], ignore_index=IGNORE_INDEX, reduction="sum")
                examples += 1
    assert examples > inputs.shape[0], "the rows should pack several examples each"
    expected = (nll / (targets != IGNORE_INDEX).sum()).item()
    whole = losses(tmp_path / "whole")
    assert abs(whole[0][1] - expected) <= 1e-5 * expected
    assert metrics(tmp_path / "whole")[0]["assistant_tokens"] == (targets != IGNORE_INDEX).sum().item()
    for name in ("ranks", "accum"):  # the same gradient, so the same losses at every later step too
        for (s, a), (_, b) in zip(losses(tmp_path / name), whole, strict=True):
            assert abs(a - b) <= 1e-5 * b, (name, s, a, b)


def test_sft_learns_a_synthetic_task_to_high_held_out_accuracy(task, tiny_run, tokenizer, tmp_path, one_thread):
    model, _ = load_model(tiny_run.run_dir)
    before = choice_accuracy(model.eval(), tokenizer, task["held_out"])
    out = tmp_path / "sft"
    proc = train(task["sft"], out, "--stage", "sft", "--init", str(tiny_run.run_dir), "--max-steps", "100",
                 "--batch-size", "4", "--lr", "3e-3", "--eval-every", "50", "--save-every", "50")
    assert "val_loss" in proc.stdout
    val = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert len(val) == 2 and val[1] < min(val[0], 0.5)
    state = torch.load(out / "ckpt-0000100.pt", weights_only=False)
    assert state["stage"] == "sft" and json.loads((out / "config.json").read_text())["stage"] == "sft"
    after = choice_accuracy(load_model(out)[0].eval(), tokenizer, task["held_out"])
    assert after >= 0.9 and after > before + 0.2, (before, after)


@pytest.fixture(scope="module")
def dpo_full(tiny_run, task, tmp_path_factory) -> Path:
    """A 2-rank DPO run of 6 steps from the session's tiny model."""
    out = tmp_path_factory.mktemp("dpo") / "full"
    proc = train(task["dpo"], out, "--stage", "dpo", "--init", str(tiny_run.run_dir), "--max-steps", "6",
                 "--lr", "3e-3", nproc=2)
    assert "weights identical across 2 ranks: True" in proc.stdout
    return out


def test_dpo_logs_rewards_and_raises_the_margin_on_its_training_pairs(dpo_full, task, tiny_run, one_thread):
    records = [r for r in metrics(dpo_full) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in train_py.DPO_METRICS:
        assert all(key in r for r in records)
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the first step
    policy, _ = load_model(dpo_full)
    reference, _ = load_model(tiny_run.run_dir)
    margins = []
    with torch.no_grad():
        for inputs, targets, n in preference_eval_batches(task["dpo"], "train", 64, 16):
            p, r = sequence_logps(policy(inputs)[0], targets), sequence_logps(reference(inputs)[0], targets)
            b = inputs.shape[0] // 2
            margins.append(((p[:b] - r[:b]) - (p[b:] - r[b:]))[:n])
    margins = torch.cat(margins)
    assert margins.mean() > 0.5 and (margins > 0).float().mean() > 0.8, margins


def test_dpo_resume_is_bit_identical_on_two_ranks(dpo_full, task, tiny_run, tmp_path):
    out = tmp_path / "parts"
    flags = ["--stage", "dpo", "--init", str(tiny_run.run_dir), "--max-steps", "6", "--lr", "3e-3"]
    train(task["dpo"], out, *flags, "--run-steps", "3", nproc=2)
    proc = train(task["dpo"], out, *flags, nproc=2)
    assert "resuming from" in proc.stdout
    full = [r for r in metrics(dpo_full) if "loss" in r]
    parts = [r for r in metrics(out) if "loss" in r]
    for a, b in zip(parts, full, strict=True):
        assert {k: a[k] for k in ("step", "loss", *train_py.DPO_METRICS)} == \
            {k: b[k] for k in ("step", "loss", *train_py.DPO_METRICS)}


def test_sft_resume_is_bit_identical(task, tiny_run, tmp_path):
    flags = ["--stage", "sft", "--init", str(tiny_run.run_dir), "--max-steps", "6", "--batch-size", "2"]
    train(task["sft"], tmp_path / "full", *flags)
    train(task["sft"], tmp_path / "parts", *flags, "--run-steps", "3")
    proc = train(task["sft"], tmp_path / "parts", *flags[:2], "--init", "/nonexistent", *flags[4:])
    assert "is ignored" in proc.stdout  # resuming takes the weights from the checkpoint
    assert losses(tmp_path / "parts") == losses(tmp_path / "full")
    proc = train(task["dpo"], tmp_path / "parts", "--stage", "dpo", "--init", str(tiny_run.run_dir), "--max-steps",
                 "8", check=False)
    assert proc.returncode != 0 and "checkpoint is from --stage sft, this run is --stage dpo" in proc.stderr


def test_reference_model_gets_no_gradient_and_never_changes(task, tiny_run, one_thread):
    cfg = train_py.TrainConfig(stage="dpo", data=str(task["dpo"]), batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1)
    policy, _ = load_model(tiny_run.run_dir)
    reference, _ = load_model(tiny_run.run_dir)
    reference.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    loader = PreferenceLoader(task["dpo"], "train", 64, 2, seed=0)
    run = train_py.Run(cfg, model=policy, raw_model=policy, optimizer=train_py.build_optimizer(policy, cfg),
                       loader=loader, seq_len=64, reference=reference)
    assert not any(p is q for p in run.optimizer.param_groups[0]["params"] for q in reference.parameters())
    policy_before = [p.detach().clone() for p in policy.parameters()]
    for _ in range(3):
        record = train_py.train_step(run)
        assert all(p.grad is None for p in reference.parameters())
    assert record["reward_margin"] != 0.0
    assert not reference.training
    for k, v in reference.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), policy_before, strict=True))


@pytest.mark.parametrize("flags, message", [
    (["--stage", "sft"], "--stage sft needs --init"),
    (["--stage", "rlhf"], "--stage 'rlhf' is unknown"),
    (["--stage", "dpo", "--init", "RUN", "--fsdp"], "--fsdp is not supported with --stage dpo"),
    (["--stage", "sft", "--init", "RUN", "--dpo-beta", "0"], "--dpo-beta must be positive"),
    (["--stage", "sft", "--init", "RUN", "--d-model", "32"], "--d-model: model overrides do not apply"),
    (["--stage", "sft", "--init", "/nonexistent"], "--init /nonexistent"),
    (["--stage", "dpo", "--init", "RUN"], "format 'geb-chat-v1', expected 'geb-preference-v1'"),
    (["--stage", "pretrain", "--init", "RUN"], "--init is for --stage sft or dpo"),
])
def test_bad_flag_combinations_exit_with_one_line(task, tiny_run, tmp_path, flags, message):
    flags = [str(tiny_run.run_dir) if f == "RUN" else f for f in flags]
    proc = train(task["sft"], tmp_path / "out", *flags, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_empty_val_split_skips_evaluation_with_a_note(task, tiny_run, tmp_path, tokenizer_file):
    data = tmp_path / "noval"
    prepare_aligned(data, "chat", [task["sft"].parent / "sft.jsonl"], tokenizer_file, val_fraction=0.0)
    proc = train(data, tmp_path / "out", "--stage", "sft", "--init", str(tiny_run.run_dir), "--max-steps", "2",
                 "--eval-every", "1")
    assert proc.stdout.count("has an empty val split; evaluation is skipped") == 1
    assert not any("val_loss" in r for r in metrics(tmp_path / "out"))
