"""infer_cpu.py end to end: streaming equals the one-shot decode, user errors are one line, Ctrl-C exits 0, --bench."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_config

import infer_cpu
from geb.chat import encode_prompt
from geb.checkpoint import list_checkpoints, save_checkpoint
from geb.files import file_sha256
from geb.generate import Decoder
from geb.model import GEB
from geb.tokenizer import EOS_ID

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """infer_cpu.py caches converted weights in geb's cache dir: a test's go to its own."""
    monkeypatch.setenv("GEB_CACHE", str(tmp_path / "geb-cache"))


def make_run(run_dir: Path, tokenizer_file: Path, max_seq_len: int = 128, copy_tokenizer: bool = True,
             sha: str | None = None, mute_eos: bool = False) -> GEB:
    """A random-init run dir as train.py writes it: ckpt-*.pt (with the tokenizer's sha256) and tokenizer.model, for
    what the session's tiny_run is not (a missing or wrong tokenizer, a long context). mute_eos: EOS gets logit 0,
    the median of a random model's logits, so top-k sampling with a small k never stops at EOS."""
    torch.manual_seed(0)
    config = small_config(vocab_size=512, max_seq_len=max_seq_len)
    model = GEB(config).eval()
    if mute_eos:
        with torch.no_grad():
            model.lm_head.weight[EOS_ID] = 0.0
    state = {"model": model.state_dict(), "model_config": config.to_dict(), "step": 10,
             "tokenizer_sha256": sha or file_sha256(tokenizer_file), "data_dir": None}
    save_checkpoint(run_dir, 10, state)
    if copy_tokenizer:
        shutil.copyfile(tokenizer_file, run_dir / "tokenizer.model")
    return model


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """infer_cpu.main in this process (fast); returns (exit code, stdout, stderr)."""
    code = 0
    try:
        infer_cpu.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    finally:
        torch.set_num_threads(1)  # main() sets --threads (default: all cores) for the whole process
    out, err = capsys.readouterr()
    return code, out, err


def test_streamed_output_equals_one_shot_decode(tiny_run, tiny_model, tokenizer, capsys):
    prompt = "When shall we three meet 新华社"
    code, out, err = run_main(["--ckpt", str(tiny_run.run_dir), "--prompt", prompt, "--greedy",
                               "--max-new-tokens", "40", "--threads", "1"], capsys)
    assert code == 0, err
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    expected = list(Decoder(tiny_model).generate(ids, 40, temperature=0.0, eos_id=tokenizer.eos_id))
    assert len(expected) == 40  # no early EOS: the whole stream is compared
    assert out == tokenizer.decode(expected) + "\n"
    stats = err.strip().splitlines()[-1]
    for key in ("prompt", "prefill", "decode", "tok/s", "peak RSS"):
        assert key in stats


def test_sampling_seed_and_empty_prompt(tiny_run, capsys):
    argv = ["--ckpt", str(list_checkpoints(tiny_run.run_dir)[-1]), "--prompt", "", "--max-new-tokens", "20",
            "--top-p", "0.9", "--seed"]
    code, a, err = run_main(argv + ["7"], capsys)
    assert code == 0, err
    assert "prompt 1 tokens" in err  # an empty prompt starts a new document from EOS
    code, b, _ = run_main(argv + ["7"], capsys)
    assert code == 0 and a == b and a.strip()
    code, c, _ = run_main(argv + ["8"], capsys)
    assert code == 0 and c != a  # another seed, another sample


def test_no_checkpoint_says_how_to_train(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["--prompt", "hi"], capsys)
    assert code != 0
    assert "torchrun --standalone --nproc_per_node=2 train.py" in err and "python train.py" in err
    assert "Traceback" not in err
    code, _, err = run_main(["--ckpt", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert code != 0 and "--ckpt" in err and "nope" in err


def test_missing_or_mismatched_tokenizer(tmp_path, tokenizer_file, capsys):
    make_run(tmp_path / "a", tokenizer_file, copy_tokenizer=False)
    code, _, err = run_main(["--ckpt", str(tmp_path / "a"), "--prompt", "hi"], capsys)
    assert code != 0 and "tokenizer.model" in err and len(err.strip().splitlines()) == 1
    make_run(tmp_path / "b", tokenizer_file, sha="0" * 64)
    code, _, err = run_main(["--ckpt", str(tmp_path / "b"), "--prompt", "hi"], capsys)
    assert code != 0 and "does not match" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("quant, extra", [("int8", []), ("int4", []), ("int8", ["--huge-pages"])])
def test_bench_json_line(capsys, quant, extra):
    code, out, err = run_main(["--bench", "--preset", "tiny", "--max-new-tokens", "8", "--threads", "1",
                               "--quant", quant, *extra], capsys)
    assert code == 0, err
    row = json.loads(out.strip())
    for key in ("preset", "quant", "compile", "threads", "prefill_tokens_per_s", "decode_tokens_per_s",
                "peak_rss_mb", "load_s", "compile_s"):
        assert key in row
    assert row["preset"] == "tiny" and row["quant"] == quant and row["new_tokens"] == 8
    assert row["decode_tokens_per_s"] > 0


def test_ctrl_c_flushes_and_exits_zero(tmp_path, tokenizer_file):
    # A long context and no EOS, so generation is still running when the signal arrives.
    make_run(tmp_path / "run", tokenizer_file, max_seq_len=4096, mute_eos=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "infer_cpu.py"), "--ckpt", str(tmp_path / "run"),
                             "--prompt", "Thunder", "--max-new-tokens", "4000", "--top-k", "20", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
                            # A runner started in the background (`cmd &`) passes SIGINT on as ignored, and Python
                            # then installs no KeyboardInterrupt handler: give the child the default disposition.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.read(1)  # generation has started once text arrives
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert first and "stop: interrupted" in err.decode()
    assert "Traceback" not in err.decode()


def test_warm_start_maps_the_cached_int4_weights(tiny_run, tmp_path):
    """Two fresh processes on one checkpoint: the first converts and caches, the second starts from the cache (the
    kernel built and loaded there too) and prints the same greedy continuation."""
    cmd = [sys.executable, str(ROOT / "infer_cpu.py"), "--ckpt", str(tiny_run.run_dir), "--prompt", "Thunder and",
           "--greedy", "--max-new-tokens", "12", "--threads", "1", "--quant", "int4"]
    env = {**os.environ, "GEB_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    assert "(converted, cached)" in runs[0].stderr and "(cache)" in runs[1].stderr, runs[1].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()
    assert "first token" in runs[1].stderr


def test_chat_one_turn_equals_greedy_continuation_of_the_template(tiny_run, tiny_model, tokenizer, capsys):
    system, user = "You answer briefly.", "When shall we three meet again?"
    code, out, err = run_main(["--ckpt", str(tiny_run.run_dir), "--chat", "--system", system, "--prompt", user,
                               "--greedy", "--max-new-tokens", "20", "--threads", "1"], capsys)
    assert code == 0, err
    ids = encode_prompt([{"role": "system", "content": system}, {"role": "user", "content": user}], tokenizer)
    expected = list(Decoder(tiny_model).generate(ids, 20, temperature=0.0, eos_id=tokenizer.eos_id))
    assert expected and out == tokenizer.decode(expected) + "\n"
    assert f"turn {len(ids)} new tokens" in err


def test_chat_loop_keeps_earlier_turns_in_the_cache(tiny_run, tiny_model, tokenizer, capsys, monkeypatch):
    turns = ["Fair is foul", "新华社北京"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n\n"))
    code, out, err = run_main(["--ckpt", str(tiny_run.run_dir), "--chat", "--greedy", "--max-new-tokens", "12",
                               "--threads", "1"], capsys)
    assert code == 0, err
    # the reference re-reads the whole conversation each turn; the loop prefills only the new turn
    history, answers = [], []
    for user in turns:
        ids = history + encode_prompt([{"role": "user", "content": user}], tokenizer)
        answer = list(Decoder(tiny_model).generate(ids, 12, temperature=0.0, eos_id=tokenizer.eos_id))
        history, answers = ids + answer + [tokenizer.eos_id], answers + [answer]
    assert out == "".join(tokenizer.decode(a) + "\n" for a in answers)
    # turn 2 prefills the first answer's last token when it was cut (never fed back), its EOS and the new turn
    new_tokens = [int(n) for n in re.findall(r"\[turn (\d+) new tokens", err)]
    first, second = (encode_prompt([{"role": "user", "content": t}], tokenizer) for t in turns)
    assert new_tokens == [len(first), (len(answers[0]) == 12) + 1 + len(second)]


@pytest.mark.parametrize("flags, message", [(["--system", "x"], "--system needs --chat"),
                                            (["--huge-pages"], "--huge-pages needs --quant int8, q8_0 or int4"),
                                            (["--chat", "--bench"], "--chat and --bench are exclusive")])
def test_chat_bad_flags(flags, message, capsys):
    code, _, err = run_main(flags, capsys)
    assert code == 2 and message in err
