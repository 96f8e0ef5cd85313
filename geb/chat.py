"""The chat template and the alignment losses: messages -> token ids with a loss mask, SFT and DPO as functions.

Template `geb-chat-v1` (role markers are plain text, see docs/alignment.md):

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{assistant}</s><|user|>\\n...

`</s>` is the tokenizer's EOS id, appended as an id (never parsed from text). The loss mask is 1 on each assistant
turn's content tokens and its EOS, 0 elsewhere. Text between two assistant contents is encoded as one run, so a
conversation encoded turn by turn (a chat loop with a KV cache) gives the same ids as encoding it whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from geb.corpus import DataError
from geb.tokenizer import Tokenizer

TEMPLATE = "geb-chat-v1"
ROLES = ("system", "user", "assistant")
MARKERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
IGNORE_INDEX = -100

Messages = Sequence[dict]


def check_messages(messages: object, *, prompt: bool = False) -> str | None:
    """Why `messages` is not a valid conversation (or, with prompt=True, a prompt ending in a user turn); None if it is.

    Valid: a non-empty list of {"role", "content": str}; roles system|user|assistant, system only first; a
    conversation has at least one assistant turn and ends with one, every assistant content non-blank.
    """
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} needs 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}, want one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"message {i} content must be a string"
        if m["role"] == "system" and i > 0:
            return f"message {i}: a system message may only come first"
        if m["role"] == "assistant" and not m["content"].strip():
            return f"message {i}: empty assistant turn"
    last = messages[-1]["role"]
    if prompt and last != "user":
        return f"a prompt must end with a user turn, not {last!r}"
    if not prompt and last != "assistant":
        return f"the conversation must end with an assistant turn, not {last!r}"
    return None


def alpaca_to_messages(record: dict) -> list[dict]:
    """An Alpaca record {"instruction", "input" (optional), "output"} as a user turn and an assistant turn."""
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _text_run(messages: Messages) -> str:
    """The template text of consecutive non-assistant turns, followed by the assistant marker."""
    return "".join(MARKERS[m["role"]] + m["content"] + "\n" for m in messages) + MARKERS["assistant"]


def encode_chat(messages: Messages, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its loss mask (1 on assistant content and its EOS)."""
    ids: list[int] = []
    mask: list[int] = []
    pending: list[dict] = []
    for m in messages:
        if m["role"] != "assistant":
            pending.append(m)
            continue
        head = tok.encode(_text_run(pending))
        body = tok.encode(m["content"]) + [tok.eos_id]
        ids += head + body
        mask += [0] * len(head) + [1] * len(body)
        pending = []
    return ids, mask


def encode_prompt(messages: Messages, tok: Tokenizer) -> list[int]:
    """Token ids of a conversation ending in a user turn, up to the assistant marker: what generation continues.

    Earlier assistant turns are encoded as in encode_chat; encoding only the new turns after a finished assistant
    answer (and its EOS) appends exactly the ids encoding the whole conversation would.
    """
    ids: list[int] = []
    start = 0
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            ids += encode_chat(messages[start:i + 1], tok)[0]
            start = i + 1
    return ids + tok.encode(_text_run(messages[start:]))


def encode_preference(prompt: str | Messages, chosen: str, rejected: str,
                      tok: Tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids: the prompt up to the assistant marker, each response ending with EOS."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return encode_prompt(messages, tok), tok.encode(chosen) + [tok.eos_id], tok.encode(rejected) + [tok.eos_id]


# --- losses -----------------------------------------------------------------------------------------------------------


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, n_tokens: int | torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over targets != -100, divided by n_tokens (the assistant tokens of the global batch)."""
    nll = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll / n_tokens


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of log p(target) over targets != -100 (the response tokens): shape (B,), fp32."""
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023) from per-pair sequence log-probs: (loss, metrics).

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged (or summed) over pairs. metrics
    (detached, means over pairs): reward_chosen = beta * (pi_c - ref_c), reward_rejected likewise, reward_accuracy
    (fraction of pairs with reward_chosen > reward_rejected), reward_margin (mean reward_chosen - reward_rejected).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen - rejected)
    loss = losses.mean() if reduction == "mean" else losses.sum()
    c, r = chosen.detach(), rejected.detach()
    metrics = {"reward_chosen": c.mean(), "reward_rejected": r.mean(), "reward_accuracy": (c > r).float().mean(),
               "reward_margin": (c - r).mean()}
    return loss, metrics


# --- multiple choice by log-likelihood (the demo's accuracy) ----------------------------------------------------------


def load_choice_set(path: str | os.PathLike) -> list[dict]:
    """A JSONL evaluation set: per line {"prompt": messages, "choices": [str, ...], "answer": index}."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            item = json.loads(line)
            ok = check_messages(item["prompt"], prompt=True) is None and 0 <= item["answer"] < len(item["choices"])
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise DataError(f"{path}:{n}: want {{\"prompt\": messages, \"choices\": [...], \"answer\": index}}")
        items.append(item)
    return items


@torch.no_grad()
def batch_choice_logps(model: torch.nn.Module, tok: Tokenizer, items: Sequence[dict]) -> list[list[float]]:
    """Per item {"prompt": messages, "choices": [...]}, log p(choice + EOS | prompt) of each choice under the template,
    all in one forward pass; a prompt's left side is cut to fit model.config.max_seq_len."""
    rows = []  # (prompt ids, answer ids) per choice of every item
    for item in items:
        prompt = encode_prompt(item["prompt"], tok)
        rows += [(prompt, tok.encode(c) + [tok.eos_id]) for c in item["choices"]]
    width = min(model.config.max_seq_len, max(len(p) + len(a) - 1 for p, a in rows))
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full_like(idx, IGNORE_INDEX)
    for r, (prompt, answer) in enumerate(rows):
        seq = (prompt + answer)[-(width + 1):]
        idx[r, :len(seq) - 1] = torch.tensor(seq[:-1])
        targets[r, len(seq) - 1 - len(answer):len(seq) - 1] = torch.tensor(answer)
    device = next(model.parameters(), torch.empty(0)).device
    logits, _ = model(idx.to(device))
    logps = sequence_logps(logits, targets.to(device)).tolist()
    out, k = [], 0
    for item in items:
        out.append(logps[k:k + len(item["choices"])])
        k += len(item["choices"])
    return out


def choice_logps(model: torch.nn.Module, tok: Tokenizer, messages: Messages, choices: Sequence[str]) -> list[float]:
    """log p(choice + EOS | prompt) for each choice of one prompt (see batch_choice_logps)."""
    return batch_choice_logps(model, tok, [{"prompt": messages, "choices": choices}])[0]


def choice_accuracy(model: torch.nn.Module, tok: Tokenizer, items: Sequence[dict], batch_size: int = 16) -> float:
    """Fraction of items whose answer has the highest log-likelihood among its choices (a tie counts as wrong).

    The demo's accuracy (`python -m geb.eval --ckpt RUN --choices DIR/source/eval.jsonl`).
    """
    correct = 0
    for lo in range(0, len(items), batch_size):
        batch = items[lo:lo + batch_size]
        for item, lp in zip(batch, batch_choice_logps(model, tok, batch), strict=True):
            best = max(range(len(lp)), key=lp.__getitem__)
            correct += best == item["answer"] and lp.count(lp[best]) == 1
    return correct / max(len(items), 1)
