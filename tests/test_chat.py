"""geb.chat: the template's ids and loss mask, prompt encoding for a chat loop, and the SFT/DPO losses and the
multiple-choice log-likelihood checked against hand computations."""

import math
import random

import pytest
import torch
from helpers import WORDS, small_config

from geb.chat import (
    IGNORE_INDEX,
    MARKERS,
    alpaca_to_messages,
    batch_choice_logps,
    check_messages,
    choice_accuracy,
    choice_logps,
    dpo_loss,
    encode_chat,
    encode_preference,
    encode_prompt,
    sequence_logps,
    sft_loss,
)
from geb.model import GEB


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversation(rng: random.Random) -> list[dict]:
    msgs = [{"role": "system", "content": words(rng, 4)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        msgs += [{"role": "user", "content": words(rng, rng.randint(1, 8)) + " 你好"},
                 {"role": "assistant", "content": words(rng, rng.randint(1, 8)) + " 世界"}]
    return msgs


def test_template_round_trip(tokenizer):
    rng = random.Random()
    for _ in range(5):
        msgs = conversation(rng)
        ids, mask = encode_chat(msgs, tokenizer)
        assert len(ids) == len(mask) and set(mask) <= {0, 1}
        # the masked runs are exactly the assistant contents, each ending with EOS
        runs, cur = [], []
        for t, m in zip(ids, mask, strict=True):
            if m:
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        runs += [cur] if cur else []
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert [r[-1] for r in runs] == [tokenizer.eos_id] * len(answers)
        assert [tokenizer.decode(r[:-1]) for r in runs] == answers
        assert tokenizer.eos_id not in [t for t, m in zip(ids, mask, strict=True) if not m]
        # the unmasked text is the template around them
        text = "".join(MARKERS[m["role"]] + (m["content"] + "\n" if m["role"] != "assistant" else m["content"])
                       for m in msgs)
        for m in msgs:
            if m["role"] == "assistant":
                text = text.replace(MARKERS["assistant"] + m["content"], MARKERS["assistant"], 1)
        assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m]) == text


def test_prompt_encoding_is_incremental(tokenizer):
    rng = random.Random()
    msgs = conversation(rng) + [{"role": "user", "content": words(rng, 5)}]
    full = encode_prompt(msgs, tokenizer)
    # a chat loop: history ids (with the generated answers and EOS) + only the new user turn
    history = encode_chat(msgs[:-1], tokenizer)[0]
    assert full == history + encode_prompt(msgs[-1:], tokenizer)
    assert tokenizer.decode(full).endswith(msgs[-1]["content"] + "\n" + MARKERS["assistant"])
    p, c, r = encode_preference("hi there", "yes", "no", tokenizer)
    assert p == encode_prompt([{"role": "user", "content": "hi there"}], tokenizer)
    assert c[-1] == r[-1] == tokenizer.eos_id and tokenizer.decode(c) == "yes"


def test_alpaca_and_checks():
    assert alpaca_to_messages({"instruction": "Add", "input": "1 2", "output": "3"}) == [
        {"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert alpaca_to_messages({"instruction": "Hi", "output": "Hello"})[0]["content"] == "Hi"
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert check_messages(ok) is None and "end with a user" in check_messages(ok, prompt=True)
    assert "role 'bot'" in check_messages([{"role": "bot", "content": "a"}])
    assert "empty assistant" in check_messages([ok[0], {"role": "assistant", "content": "  "}])
    assert "system" in check_messages([ok[0], {"role": "system", "content": "s"}, ok[1]])
    assert "needs 'role'" in check_messages([{"content": "a"}])


def test_sft_loss_matches_hand_computation():
    torch.manual_seed(random.randrange(1 << 30))
    B, T, V = 2, 5, 7
    logits = torch.randn(B, T, V, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    targets[torch.rand(B, T) < 0.4] = IGNORE_INDEX
    targets[0, 0] = 3
    n_global = int((targets != IGNORE_INDEX).sum()) + 5  # other micro-batches/ranks hold 5 more assistant tokens
    total = 0.0
    for b in range(B):
        for t in range(T):
            y = int(targets[b, t])
            if y != IGNORE_INDEX:
                row = logits[b, t].tolist()
                total += math.log(sum(math.exp(v) for v in row)) - row[y]
    assert sft_loss(logits, targets, n_global).item() == pytest.approx(total / n_global, rel=1e-6)
    lp = sequence_logps(logits, targets)
    for b in range(B):
        hand = sum(float(torch.log_softmax(logits[b, t], -1)[targets[b, t]]) for t in range(T)
                   if targets[b, t] != IGNORE_INDEX)
        assert lp[b].item() == pytest.approx(hand, rel=1e-6)


def test_dpo_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    pc, pr, rc, rr = (-20 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.1
    loss, m = dpo_loss(pc, pr, rc, rr, beta)
    rew_c = [beta * (a - b) for a, b in zip(pc.tolist(), rc.tolist(), strict=True)]
    rew_r = [beta * (a - b) for a, b in zip(pr.tolist(), rr.tolist(), strict=True)]
    hand = [math.log(1 + math.exp(-(c - r))) for c, r in zip(rew_c, rew_r, strict=True)]
    assert loss.item() == pytest.approx(sum(hand) / 6, rel=1e-9)
    assert dpo_loss(pc, pr, rc, rr, beta, reduction="sum")[0].item() == pytest.approx(sum(hand), rel=1e-9)
    assert m["reward_chosen"].item() == pytest.approx(sum(rew_c) / 6, rel=1e-9)
    assert m["reward_rejected"].item() == pytest.approx(sum(rew_r) / 6, rel=1e-9)
    assert m["reward_margin"].item() == pytest.approx((sum(rew_c) - sum(rew_r)) / 6, rel=1e-9)
    assert m["reward_accuracy"].item() == pytest.approx(sum(c > r for c, r in zip(rew_c, rew_r, strict=True)) / 6)
    pc.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta)[0].backward()
    assert (pc.grad < 0).all()  # raising a chosen log-prob lowers the loss


def test_choice_logps_match_the_model(tokenizer, one_thread):
    torch.manual_seed(0)
    model = GEB(small_config(vocab_size=tokenizer.vocab_size), impl="torch").eval()
    msgs = [{"role": "user", "content": "is the sun warm?"}]
    choices = ["yes", "no way"]
    got = choice_logps(model, tokenizer, msgs, choices)
    prompt = encode_prompt(msgs, tokenizer)
    for c, lp in zip(choices, got, strict=True):
        seq = prompt + tokenizer.encode(c) + [tokenizer.eos_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0][0].double(), -1)
        hand = sum(float(logp[i - 1, seq[i]]) for i in range(len(prompt), len(seq)))
        assert lp == pytest.approx(hand, abs=1e-4)
    items = [{"prompt": msgs, "choices": choices, "answer": int(got[1] > got[0])},
             {"prompt": msgs, "choices": choices, "answer": int(got[1] <= got[0])}]
    assert choice_accuracy(model, tokenizer, items) == 0.5
    # batched items of other lengths (right padding) score as they do alone
    other = {"prompt": [{"role": "user", "content": "a much longer question about the cold blue river?"}],
             "choices": ["no", "yes it is", "maybe"]}
    both = batch_choice_logps(model, tokenizer, [other, {"prompt": msgs, "choices": choices}])
    assert both[1] == pytest.approx(got, abs=1e-4)
    assert both[0] == pytest.approx(choice_logps(model, tokenizer, other["prompt"], other["choices"]), abs=1e-4)
