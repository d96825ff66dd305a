"""Model FLOPs utilisation: the FLOP count against a hand count, the GPU peak table by device name, and the MFU in
the training log when the device's peak is known (faked here: no GPU)."""

import json

import pytest
import torch
from test_training import TINY_MODEL, run_config

from architecture import DEFAULT_MODEL_CONFIG, Gemma3Model, ModelConfig
from training import run_logger
from training.config import load_training_config
from training.metrics import flops_per_token, peak_flops_by_name
from training.trainer import train


def test_flops_per_token_of_the_seed_config_by_hand():
    with torch.device("meta"):
        model = Gemma3Model(ModelConfig.from_json(DEFAULT_MODEL_CONFIG))
    # One block: q 640x1024, k and v 640x256 each, o 1024x640, gate/up/down 3 x 640x2048, four norms of 640 and
    # the q/k norms of 256. N: 18 blocks, the final norm and the separate 50,257 x 640 head (the lookup is free).
    block = 640 * 1024 + 2 * 640 * 256 + 1024 * 640 + 3 * 640 * 2048 + 4 * 640 + 2 * 256
    n = 18 * block + 640 + 50257 * 640
    assert n == 132_490_496 and n + 50257 * 640 == sum(p.numel() for p in model.parameters())
    # Attention: 12 x heads x head_dim x span per layer; at 128 tokens every span is 128 (inside the 512 window).
    assert flops_per_token(model, 128) == 6 * n + 12 * 18 * 4 * 256 * 128 == 823_254_528
    # At 1,024 tokens the 15 sliding layers attend over 512 keys, the 3 full ones over 1,024.
    assert flops_per_token(model, 1024) == 6 * n + 12 * 4 * 256 * (15 * 512 + 3 * 1024) == 927_063_552


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("NVIDIA RTX A6000", 155e12),
        ("Tesla T4", None),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_by_device_name(name, peak):
    assert peak_flops_by_name(name) == peak


def test_the_log_reports_mfu_when_the_peak_is_known(tmp_path, monkeypatch, capsys):
    fake_peak = 1e9  # a CPU is far from any GPU's peak: a small one keeps the figure readable
    monkeypatch.setattr(run_logger, "peak_flops", lambda device: fake_peak)
    config = load_training_config(run_config(tmp_path, max_iters=3, eval_interval=3, gradient_accumulation_steps=1))
    train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["kind"] == "train"]
    assert [row["iter"] for row in train_rows] == [1, 2, 3]
    with torch.device("meta"):
        flops_per_iter = flops_per_token(Gemma3Model(TINY_MODEL), config.block_size) * config.tokens_per_iter
    for row in train_rows:
        assert row["mfu"] == pytest.approx(flops_per_iter / (row["ms_per_iter"] / 1e3) / fake_peak, rel=1e-6)
    assert f"MFU {train_rows[-1]['mfu']:.1%}" in capsys.readouterr().out
