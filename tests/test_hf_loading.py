"""Loading Hugging Face Gemma 3 checkpoints written by transformers' own save_pretrained."""

import json

import pytest
import torch
from hf_reference import random_hf_model, tiny_config
from safetensors.torch import load_file, save_file

from architecture import ConfigError, Gemma3Model, ModelConfig, WeightsError, load_weights_into

# google/gemma-3-270m's config.json as published (transformers 4 spelling).
OFFICIAL_270M_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "max_position_embeddings": 32768,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "sliding_window": 512,
    "_sliding_window_pattern": 6,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-06,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "attention_bias": False,
    "use_bidirectional_attention": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved_hf_model(request, tmp_path_factory):
    config = tiny_config(tie_embeddings=request.param)
    hf_model = random_hf_model(config)
    path = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(path)
    return hf_model, path


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def test_from_hf_gives_the_same_logits(saved_hf_model):
    hf_model, path = saved_hf_model
    model = Gemma3Model.from_hf(str(path)).eval()
    assert model.config.tie_embeddings == hf_model.config.tie_word_embeddings
    idx = torch.randint(0, 300, (2, 40))
    assert (logits_of(model, idx) - logits_of(hf_model, idx)).abs().max() <= 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    config = tiny_config()
    hf_model = random_hf_model(config)
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = Gemma3Model(config).eval()
    load_weights_into(model, tmp_path)
    idx = torch.randint(0, 300, (1, 50))
    assert (logits_of(model, idx) - logits_of(hf_model, idx)).abs().max() <= 1e-4


def write_altered_checkpoint(src, dst, alter):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    alter(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_listed_and_model_left_untouched(saved_hf_model, tmp_path):
    _, path = saved_hf_model
    write_altered_checkpoint(path, tmp_path / "bad", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    model = Gemma3Model(ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text())))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=r"missing: model\.layers\.2\.mlp\.up_proj\.weight"):
        load_weights_into(model, tmp_path / "bad")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_reshaped_and_unexpected_tensors_are_listed(saved_hf_model, tmp_path):
    _, path = saved_hf_model

    def alter(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
        tensors["model.layers.9.mlp.extra.weight"] = torch.zeros(2)

    write_altered_checkpoint(path, tmp_path / "bad", alter)
    with pytest.raises(WeightsError) as error:
        Gemma3Model.from_hf(str(tmp_path / "bad"))
    message = str(error.value)
    assert "wrong shape: model.layers.0.self_attn.k_proj.weight: checkpoint (3, 64), model (64, 64)" in message
    assert "unexpected: model.layers.9.mlp.extra.weight" in message


def test_directory_without_weights_or_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Gemma3Model.from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    with pytest.raises(WeightsError, match="neither model.safetensors nor"):
        Gemma3Model.from_hf(str(tmp_path))


def test_official_270m_config_translates():
    config = ModelConfig.from_hf_dict(OFFICIAL_270M_CONFIG)
    assert config.vocab_size == 262_144 and config.tie_embeddings
    assert (config.emb_dim, config.n_layers, config.n_heads, config.n_kv_groups) == (640, 18, 4, 1)
    assert (config.rope_base, config.rope_local_base, config.sliding_window) == (1e6, 1e4, 512)
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    with torch.device("meta"):
        assert sum(p.numel() for p in Gemma3Model(config).parameters()) == 268_098_176


def test_round_trip_through_hf_dict_and_unsupported_features():
    config = tiny_config()
    assert ModelConfig.from_hf_dict(config.to_hf_dict()).to_dict() == config.to_dict()
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        ModelConfig.from_hf_dict({**OFFICIAL_270M_CONFIG, "final_logit_softcapping": 30.0})
    with pytest.raises(ConfigError, match="multimodal"):
        ModelConfig.from_hf_dict({"model_type": "gemma3", "text_config": {}})
