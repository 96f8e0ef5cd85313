"""geb.config: every bad field is refused with its name, presets, and the dict round trip checkpoints rely on."""

import pytest
from helpers import small_config

from geb.config import PRESETS, ModelConfig, preset


@pytest.mark.parametrize("field, value, fragment", [
    ("n_kv_heads", 3, "n_kv_heads"),
    ("n_heads", 5, "n_heads"),
    ("d_model", 36, "head dim"),
    ("norm_position", "middle", "norm_position"),
    ("dropout", 1.5, "dropout"),
    ("vocab_size", 0, "vocab_size"),
    ("norm_eps", -1.0, "norm_eps"),
    ("rope_theta", 0.0, "rope_theta"),
    ("max_seq_len", 2.5, "max_seq_len"),
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
    assert PRESETS["stlm-50m"].n_kv_heads == 16  # the preset itself is untouched


def test_dict_round_trip_and_unknown_fields():
    for name, config in PRESETS.items():
        d = config.to_dict()
        assert ModelConfig.from_dict(d) == config, name
        assert config.head_dim * config.n_heads == config.d_model
    with pytest.raises(ValueError, match=r"unknown model config fields \['n_layer'\]"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "n_layer": 3})
