"""The GEB model on the PyTorch reference kernels: causality, GQA, learning, parameter count, config checks, and
the one forward path: logits "all"/"last"/"none", positions, and KV-cache decoding against full forwards."""

import pytest
import torch
from helpers import packed_batch, run_alone, small_config

import kernels.cross_entropy
from geb.config import preset
from geb.model import GEB, rope_cos_sin


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_causality(norm_position):
    torch.manual_seed(0)
    model = GEB(small_config(norm_position=norm_position), impl="torch").eval()
    idx = torch.randint(0, 97, (2, 40))
    t = 23
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, 97, (2, 40 - t - 1))
    assert not torch.equal(changed, idx)
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_gqa_equals_repeated_kv_mha():
    torch.manual_seed(1)
    gqa = GEB(small_config(n_heads=8, n_kv_heads=2), impl="torch").eval()
    mha = GEB(small_config(n_heads=8, n_kv_heads=8), impl="torch").eval()
    state = gqa.state_dict()
    group, head_dim = 4, 64 // 8
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = value.view(2, head_dim, 64)
            state[key] = heads.repeat_interleave(group, dim=0).reshape(8 * head_dim, 64)
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (3, 33))
    with torch.no_grad():
        torch.testing.assert_close(mha(idx)[0], gqa(idx)[0], rtol=0, atol=2e-6)


def test_overfits_one_batch():
    torch.manual_seed(2)
    model = GEB(small_config(), impl="torch")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 97, (4, 33))
    losses = []
    for _ in range(200):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_ignored_targets_and_loss_matches_manual():
    torch.manual_seed(3)
    model = GEB(small_config(), impl="torch")
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[0, :5] = -1
    logits, loss = model(idx, targets)
    keep = targets >= 0
    manual = torch.nn.functional.cross_entropy(logits[keep].double(), targets[keep]).float()
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-6)


def test_tied_embeddings_share_weight_and_init_scale():
    model = GEB(small_config(tie_embeddings=True), impl="torch")
    assert model.lm_head.weight is model.embed_tokens.weight
    counts = model.num_params()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == 97 * 64
    torch.manual_seed(4)
    big = GEB(small_config(d_model=256, n_layers=8, ffn_dim=512), impl="torch")
    assert abs(big.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(big.layers[0].self_attn.o_proj.weight.std().item() - 0.02 / 4) < 0.0005


def test_geb_1_3b_parameter_count_on_meta():
    with torch.device("meta"):
        model = GEB(preset("geb-1.3b"))
    counts = model.num_params()
    assert 1.30e9 <= counts["total"] <= 1.40e9
    assert counts["total"] == 1_348_044_800  # LlamaForCausalLM of the same shape
    assert counts["embedding"] == 2 * 64896 * 2048


def test_kv_cache_forward_matches_full_forward():
    """A prefill, a 3-token chunk and one-token steps through the cache, positions as tensors, equal one full
    forward (the chunk checks the mask inside a chunk that starts past position 0)."""
    torch.manual_seed(6)
    model = GEB(small_config(), impl="torch").eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_kv_cache(batch_size=2, max_seq_len=24)
        chunks = [(0, 12), (12, 15)] + [(i, i + 1) for i in range(15, 20)]
        got = [model(idx[:, a:b], input_pos=torch.arange(a, b))[0] for a, b in chunks]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_last_logits_match_full_forward():
    """The decoder's calls: a prefill and one-token steps with logits="last" give the full forward's rows."""
    torch.manual_seed(5)
    model = GEB(small_config(), impl="torch").eval()
    idx = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_kv_cache(1, 40)
        prefill, _ = model(idx[:, :10], input_pos=torch.arange(10), logits="last")
        steps = [model(idx[:, t:t + 1], input_pos=torch.tensor([t]), logits="last")[0] for t in range(10, 30)]
    assert prefill.shape == (1, 1, 97)
    torch.testing.assert_close(prefill[:, 0], full[:, 9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 10:], rtol=1e-5, atol=1e-5)


def test_last_logits_are_the_last_row_and_only_it_reaches_the_lm_head():
    torch.manual_seed(10)
    model = GEB(small_config(), impl="torch").eval()
    idx = torch.randint(0, 97, (3, 17))
    head_inputs = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_inputs.append(tuple(args[0].shape)))
    with torch.no_grad():
        full, _ = model(idx)
        last, loss = model(idx, logits="last")
    assert head_inputs == [(3, 17, 64), (3, 1, 64)]  # a prefill does not pay T x d_model x vocab
    assert last.shape == (3, 1, 97) and loss is None
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)


def test_loss_only_equals_loss_of_all_logits_with_the_same_gradients():
    torch.manual_seed(11)
    model = GEB(small_config(), impl="torch")
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[1, 3:9] = -1
    logits, loss = model(idx, targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    none, loss_only = model(idx, targets, logits="none")
    loss_only.backward()
    assert none is None and logits.shape == (2, 16, 97)
    # The fused loss (kernels.linear_cross_entropy, chunked) sums in another order: fp32 rounding apart, equal.
    torch.testing.assert_close(loss_only, loss, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-8, msg=name)


def _train_losses(logits: str, steps: int) -> list[float]:
    """Losses of `steps` AdamW steps of a tiny fp32 model from a fixed seed, with the loss computed as `logits`."""
    torch.manual_seed(21)
    # 32 tokens a step: the fused loss runs in two chunks of 16, so chunking is exercised.
    model = GEB(small_config(vocab_size=1000), impl="torch")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 1000, (4, 2, 17), generator=torch.Generator().manual_seed(22))
    losses = []
    for step in range(steps):
        batch = data[step % len(data)]  # four batches over and over: the model learns them
        targets = batch[:, 1:].clone()
        targets[0, :4] = -1  # ignored, as a packed sequence's padding would be
        _, loss = model(batch[:, :-1], targets, logits=logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fused_loss_trains_like_the_unfused_one(one_thread, monkeypatch):
    """50 AdamW steps with the fused linear cross-entropy (logits="none") and with F.cross_entropy on full logits
    (logits="all"): every loss within 1e-5 relative (no drift from the chunked gradients)."""
    monkeypatch.setattr(kernels.cross_entropy, "MIN_CHUNK", 16)
    fused, unfused = _train_losses("none", 50), _train_losses("all", 50)
    assert unfused[-1] < unfused[0] - 2  # the run does learn, so the comparison means something
    for step, (a, b) in enumerate(zip(fused, unfused, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: fused {a} vs unfused {b}"


def test_input_pos_drives_rope_without_a_cache():
    """Rotary attention depends on position differences only: shifting every position changes (almost) nothing,
    stretching them changes the logits."""
    torch.manual_seed(12)
    model = GEB(small_config(), impl="torch").eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        default, _ = model(idx)
        given, _ = model(idx, input_pos=torch.arange(20))
        shifted, _ = model(idx, input_pos=torch.arange(20) + 37)
        stretched, _ = model(idx, input_pos=2 * torch.arange(20))
    torch.testing.assert_close(given, default, rtol=0, atol=0)
    torch.testing.assert_close(shifted, default, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stretched[:, 1:], default[:, 1:], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(stretched[:, 0], default[:, 0])  # the first token attends to itself alone


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(logits="first"), "logits must be one of 'all', 'last', 'none', got 'first'"),
    (dict(logits="last", targets=True), "logits='last' computes no loss"),
    (dict(logits="none"), "logits='none' returns only the loss: it needs targets"),
    (dict(input_pos=torch.arange(7)), r"input_pos must have shape \(8,\) for 8 tokens, got \(7,\)"),
    (dict(input_pos=torch.arange(8) + 20), "position 27 exceeds max_seq_len 24"),
])
def test_bad_forward_arguments_are_named(kwargs, fragment):
    model = GEB(small_config(max_seq_len=24), impl="torch")
    idx = torch.randint(0, 97, (1, 8))
    if kwargs.pop("targets", None):
        kwargs["targets"] = idx
    with pytest.raises(ValueError, match=fragment):
        model(idx, **kwargs)


def test_kv_cache_needs_positions_inside_it():
    model = GEB(small_config(), impl="torch").eval()
    model.setup_kv_cache(1, 16)
    idx = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="with a KV cache, pass input_pos"):
        model(idx)
    with pytest.raises(ValueError, match="position 17 is past the KV cache of 16 positions"):
        model(idx, input_pos=torch.arange(14, 18))
    model.clear_kv_cache()
    assert model(idx)[0].shape == (1, 4, 97)  # back to full-sequence mode


def test_sequence_longer_than_context_is_refused():
    model = GEB(small_config(max_seq_len=16), impl="torch")
    with pytest.raises(ValueError, match="sequence of 17 tokens exceeds max_seq_len 16"):
        model(torch.randint(0, 97, (1, 17)))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_packed_documents_equal_each_document_alone(norm_position, monkeypatch):
    """positions: RoPE restarts and attention stays within each document, so the packed rows give the logits, the
    loss and the gradients of the documents run one by one."""
    torch.manual_seed(5)
    model = GEB(small_config(norm_position=norm_position), impl="torch")
    idx, targets, positions = packed_batch([[5, 1, 17, 30, 4], [40, 20]])
    tables = []
    rotary = kernels.apply_rotary_qk
    monkeypatch.setattr(kernels, "apply_rotary_qk", lambda q, k, cos, sin, **kw: (tables.append(cos),
                                                                                  rotary(q, k, cos, sin, **kw))[1])
    logits, loss = model(idx, targets, positions=positions)
    # RoPE is relative, so within-document attention alone would hide rotating by the row's positions: check the
    # tables are the per-token ones (angles as small as when each document runs alone).
    assert len(tables) == 2 and torch.equal(tables[0], rope_cos_sin(16, positions, 10000.0)[0])
    monkeypatch.undo()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    alone_logits, alone_loss = run_alone(model, idx, targets, positions)
    alone_loss.backward()
    torch.testing.assert_close(logits, alone_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, alone_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        assert grads[name].abs().max() > 0, f"{name}: no gradient"
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    _, fused = model(idx, targets, logits="none", positions=positions)
    torch.testing.assert_close(fused, loss, rtol=1e-5, atol=1e-6)
    plain, _ = model(idx)  # without positions: one causal sequence per row, the documents see each other
    assert not torch.allclose(plain[:, 6:], logits[:, 6:], atol=1e-3)


def test_packed_documents_under_torch_compile():
    """A compiled model (train.py --compile) with positions gives the eager loss and gradients; the segments and
    the per-document attention run eagerly between its graphs."""
    torch.manual_seed(6)
    model = GEB(small_config(), impl="torch")
    idx, targets, positions = packed_batch([[5, 1, 17, 30, 4], [40, 20]])
    _, loss = model(idx, targets, positions=positions)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    _, compiled_loss = torch.compile(model, backend="aot_eager")(idx, targets, positions=positions)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(positions=torch.arange(8)[None].expand(2, 8)), r"positions must have idx's shape \(1, 8\)"),
    (dict(positions=torch.arange(8)[None] + 1), "0 at the start of every row"),
    (dict(positions=torch.arange(8)[None], input_pos=torch.arange(8)), "not with input_pos or a KV cache"),
])
def test_bad_positions_are_named(kwargs, fragment):
    model = GEB(small_config(max_seq_len=24), impl="torch")
    with pytest.raises(ValueError, match=fragment):
        model(torch.randint(0, 97, (1, 8)), **kwargs)
    model.setup_kv_cache(1, 16)
    with pytest.raises(ValueError, match="not with input_pos or a KV cache"):
        model(torch.randint(0, 97, (1, 8)), positions=torch.arange(8)[None])
