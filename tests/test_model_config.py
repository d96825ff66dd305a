"""ModelConfig: the shipped JSON, and one test per validation rule, each naming its field."""

import json

import pytest

from architecture import DEFAULT_MODEL_CONFIG, ConfigError, ModelConfig

SEED_VALUES = {
    "vocab_size": 50257,
    "context_length": 32768,
    "emb_dim": 640,
    "n_heads": 4,
    "n_layers": 18,
    "hidden_dim": 2048,
    "head_dim": 256,
    "qk_norm": True,
    "n_kv_groups": 1,
    "query_pre_attn_scalar": 256,
    "rope_local_base": 10000,
    "rope_base": 1000000,
    "sliding_window": 512,
    "dtype": "bfloat16",
    "tie_embeddings": False,
    "rms_norm_eps": 1e-6,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
}


def test_shipped_json_holds_the_seed_values():
    on_disk = json.loads(DEFAULT_MODEL_CONFIG.read_text())
    assert on_disk == SEED_VALUES
    assert ModelConfig.from_json(DEFAULT_MODEL_CONFIG) == ModelConfig()  # the dataclass defaults are the same model


def test_shipped_json_is_complete_and_equals_the_dataclass_defaults():
    # Every key, as users edit it; the same values, so a changed default cannot silently disagree with the file.
    assert json.loads(DEFAULT_MODEL_CONFIG.read_text()) == ModelConfig().to_dict()


def config_file(tmp_path, **changes):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**SEED_VALUES, **changes}))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layer_types": ["full_attention"] * 17}, r"'layer_types' has 17 entries but 'n_layers' is 18"),
        ({"layer_types": ["sliding_attention"] * 17 + ["global"]}, r"'layer_types'\[17\] is 'global'"),
        ({"n_kv_groups": 3}, r"'n_heads' \(4\) must be divisible by 'n_kv_groups' \(3\)"),
        ({"sliding_window": 32768}, r"'sliding_window' \(32768\) must be smaller than 'context_length'"),
        ({"emb_dim": 0}, r"'emb_dim' must be positive"),
        ({"n_heads": -4}, r"'n_heads' must be positive"),
        ({"head_dim": 255}, r"'head_dim' must be even"),
        ({"dtype": "bf16"}, r"'dtype' is 'bf16'; use one of float32, bfloat16, float16"),
        ({"n_layers": 18.5}, r"'n_layers' must be an integer, got 18.5"),
        ({"qk_norm": "yes"}, r"'qk_norm' must be true or false"),
        ({"vocab_size": True}, r"'vocab_size' must be an integer"),
    ],
)
def test_invalid_value_is_named(tmp_path, changes, message):
    path = config_file(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as error:
        ModelConfig.from_json(path)
    assert str(path) in str(error.value)


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'n_kv_group'; did you mean 'n_kv_groups'\?"):
        ModelConfig.from_json(config_file(tmp_path, n_kv_group=1))
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'; valid keys: vocab_size, "):
        ModelConfig.from_json(config_file(tmp_path, zzz=1))


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        ModelConfig.from_json(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"emb_dim": 640,}')
    with pytest.raises(ConfigError, match=r"not valid JSON .* line 1"):
        ModelConfig.from_json(broken)


def test_omitted_keys_take_defaults_and_floats_accept_ints(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"n_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}))
    config = ModelConfig.from_json(path)
    assert config.n_layers == 2 and config.emb_dim == 640
    assert isinstance(config.rope_base, float)


def test_parameter_count_is_the_models():
    from architecture import Gemma3Model

    small = {"emb_dim": 32, "hidden_dim": 64, "head_dim": 16, "n_layers": 2, "context_length": 128}
    small |= {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}
    for extra in ({}, {"tie_embeddings": True}, {"qk_norm": False, "n_heads": 4, "n_kv_groups": 2}):
        config = ModelConfig(**small, **extra)
        assert config.parameter_count == sum(p.numel() for p in Gemma3Model(config).parameters())
    assert ModelConfig().parameter_count == 164_654_976  # the 164.7M of the README


def test_a_model_that_cannot_fit_in_memory_is_refused_naming_its_sizes():
    with pytest.raises(ConfigError, match=r"'vocab_size' 1,000,000,000,000, 'emb_dim' 640 make a model of .* GiB"):
        ModelConfig(vocab_size=10**12)
    with pytest.raises(ConfigError, match=r"'n_layers' 18, 'hidden_dim' 100,000,000,000 make a model"):
        ModelConfig(hidden_dim=10**11)
