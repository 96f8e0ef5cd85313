"""Hugging Face interop: exported models load in transformers and give the same logits; exports are atomic;
configs geb cannot represent are refused by name."""

import json

import pytest
import torch
from helpers import small_config

from geb.config import ModelConfig
from geb.hf import config_from_hf, export_hf, hf_config, load_hf
from geb.model import GEB

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("n_kv_heads, tie", [(4, False), (2, False), (1, True), (2, True)],
                         ids=["mha", "gqa", "mqa-tied", "gqa-tied"])
def test_export_matches_transformers_and_round_trips(tmp_path, n_kv_heads, tie):
    torch.manual_seed(n_kv_heads + 10 * tie)
    config = ModelConfig(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=96,
                         max_seq_len=64, rope_theta=5000.0, norm_eps=1e-5, tie_embeddings=tie)
    model = GEB(config, impl="torch").eval()
    for p in model.parameters():  # non-trivial norm weights so a missing norm shows
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    out = export_hf(model, tmp_path / "hf")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    idx = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf_model(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    loaded = load_hf(out, impl="torch")
    assert loaded.config == config
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_load_hf_reads_a_transformers_saved_model(tmp_path):
    torch.manual_seed(7)
    hf_config = transformers.LlamaConfig(vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                         rope_theta=20000.0, rms_norm_eps=1e-6)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "llama")
    model = load_hf(tmp_path / "llama", impl="torch").eval()
    idx = torch.randint(0, 89, (1, 21))
    with torch.no_grad():
        assert (model(idx)[0] - hf_model(idx).logits).abs().max().item() < 1e-4


def test_post_norm_refuses_export(tmp_path):
    model = GEB(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                            norm_position="post"), impl="torch")
    with pytest.raises(ValueError, match="norm_position='post'"):
        export_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_load_hf_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)


def test_export_writes_the_tokenizer_and_replaces_atomically(tmp_path, tokenizer_file):
    torch.manual_seed(3)
    first = GEB(small_config(), impl="torch")
    out = export_hf(first, tmp_path / "hf", tokenizer_file)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == tokenizer_file.read_bytes()
    assert json.loads((out / "config.json").read_text()) == hf_config(first.config)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    second = GEB(small_config(), impl="torch")
    with pytest.raises(FileNotFoundError, match="missing.model"):  # fails after the weights are written
        export_hf(second, out, tmp_path / "missing.model")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # and no temporary directory is left behind

    export_hf(second, out)  # a successful export replaces the whole directory (no stale tokenizer.model)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_hf(out, impl="torch")
    for k, v in second.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type is 'mistral', only 'llama'"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope type 'yarn' is not supported"),
    ({"head_dim": 8}, "head_dim 8 x 4 heads != hidden_size 64"),
], ids=["arch", "attn-bias", "mlp-bias", "rope", "head-dim"])
def test_config_from_hf_refuses_what_geb_cannot_represent(change, message):
    config = small_config(rope_theta=5000.0, tie_embeddings=True)
    assert config_from_hf(hf_config(config)) == config
    with pytest.raises(ValueError, match=f"^some/config.json: {message}"):
        config_from_hf({**hf_config(config), **change}, "some/config.json")


def test_load_hf_refuses_weights_that_do_not_match_the_config(tmp_path):
    torch.manual_seed(4)
    out = export_hf(GEB(small_config(), impl="torch"), tmp_path / "hf")
    (out / "config.json").write_text(json.dumps(hf_config(small_config(n_layers=3))))
    with pytest.raises(ValueError, match=r"weights do not match the config \(missing \['layers\.2\."):
        load_hf(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors in .*hf \(pytorch_model\.bin is not supported\)"):
        load_hf(out)
