"""The GEB model on the PyTorch reference kernels: causality, GQA, learning, parameter count, config checks."""

import pytest
import torch

from geb.config import ModelConfig, preset
from geb.model import GEB


def small_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


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


def test_embedding_grad_scale_shrinks_only_the_gradient():
    torch.manual_seed(5)
    model = GEB(small_config(), impl="torch")
    idx = torch.randint(0, 97, (2, 16))
    logits_full, loss = model(idx, idx)
    loss.backward()
    grad_full = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    model.embedding_grad_scale = 0.1
    logits_scaled, loss = model(idx, idx)
    loss.backward()
    torch.testing.assert_close(logits_scaled, logits_full)
    torch.testing.assert_close(model.embed_tokens.weight.grad, 0.1 * grad_full)


def test_kv_cache_forward_matches_full_forward():
    torch.manual_seed(6)
    model = GEB(small_config(), impl="torch").eval()
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_kv_cache(batch_size=1)
        prefix, _ = model(idx[:, :12], start_pos=0)
        steps = [model(idx[:, i:i + 1], start_pos=i)[0] for i in range(12, 20)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat([prefix] + steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, value, fragment", [
    ("n_kv_heads", 3, "n_kv_heads"),
    ("n_heads", 5, "n_heads"),
    ("d_model", 36, "head dim"),
    ("norm_position", "middle", "norm_position"),
    ("dropout", 1.5, "dropout"),
    ("vocab_size", 0, "vocab_size"),
    ("norm_eps", -1.0, "norm_eps"),
])
def test_bad_config_names_the_field(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        small_config(**{field: value})


def test_preset_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope")
    with pytest.raises(ValueError, match="n_layer"):
        preset("tiny", n_layer=3)
    assert preset("stlm-50m", n_kv_heads=4).n_kv_heads == 4


def test_sequence_longer_than_context_is_refused():
    model = GEB(small_config(max_seq_len=16), impl="torch")
    with pytest.raises(ValueError, match="max_seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
