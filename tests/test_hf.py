"""Hugging Face interop: exported models load in transformers and give the same logits."""

import pytest
import torch

from geb.config import ModelConfig
from geb.hf import export_hf, load_hf
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


def test_cli_exports_a_training_checkpoint(tmp_path):
    from geb.checkpoint import save_checkpoint
    from geb.hf import main

    torch.manual_seed(8)
    config = ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    model = GEB(config, impl="torch").eval()
    save_checkpoint(tmp_path / "run", 5, {"model": model.state_dict(), "model_config": config.to_dict(), "step": 5})
    main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    idx = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert (model(idx)[0] - hf_model(idx).logits).abs().max().item() < 1e-4
    with pytest.raises(SystemExit, match="no such checkpoint"):
        main(["export", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
