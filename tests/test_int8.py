"""INT8 weights: the quantized model computes the float model with rounded weights; sizes as computed."""

import torch
from hf_reference import tiny_config

from architecture import Gemma3Model
from architecture.int8 import Int8Linear, block_linear_bytes, quantize_int8

RELATIVE_TOLERANCE = 0.05  # ||logits_int8 - logits_float|| / ||logits_float||; measured 0.028 on this model


def models():
    torch.manual_seed(0)
    model = Gemma3Model(tiny_config()).eval()
    quantized = Gemma3Model(tiny_config()).eval()
    quantized.load_state_dict(model.state_dict())
    return model, quantize_int8(quantized)


def test_every_block_linear_is_int8_with_rounding_error_within_half_a_step():
    model, quantized = models()
    int8_layers = [m for m in quantized.blocks.modules() if isinstance(m, Int8Linear)]
    assert len(int8_layers) == 7 * model.config.n_layers  # q, k, v, o, gate, up, down
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.blocks.modules())
    assert isinstance(quantized.lm_head, torch.nn.Linear)  # the head and the embedding stay as they were
    layer, original = quantized.blocks[0].mlp.up_proj, model.blocks[0].mlp.up_proj.weight
    assert layer.weight.dtype == torch.int8 and layer.scale.shape == (original.shape[0],)
    error = (layer.weight.float() * layer.scale[:, None] - original).abs()
    assert (error <= layer.scale[:, None] / 2 + 1e-7).all()


def test_int8_logits_are_close_to_float():
    model, quantized = models()
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, int8 = model(idx)[0], quantized(idx)[0]
    assert (int8 - expected).norm() / expected.norm() <= RELATIVE_TOLERANCE
    # Exactly the float model run with the dequantized weights: the error is the rounding, nothing else.
    dequantized = Gemma3Model(tiny_config()).eval()
    dequantized.load_state_dict(model.state_dict())
    for mine, theirs in zip(dequantized.blocks.modules(), quantized.blocks.modules(), strict=True):
        if isinstance(theirs, Int8Linear):
            mine.weight.data = theirs.weight.float() * theirs.scale[:, None]
    with torch.no_grad():
        torch.testing.assert_close(int8, dequantized(idx)[0], atol=1e-5, rtol=1e-5)


def test_int8_in_bfloat16_matches_float32_and_generates_with_the_cache():
    _, quantized = models()
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = quantized(idx)[0]
        quantized.to(torch.bfloat16)  # on the CPU this takes the int8-weight matmul kernel
        logits = quantized(idx)[0].float()
    assert quantized.blocks[0].attn.q_proj.weight.dtype == torch.int8  # casting the model keeps int8 weights
    assert (logits - expected).norm() / expected.norm() <= 0.02  # bfloat16 rounding only
    assert quantized.generate(idx[:, :3], 5, temperature=0).shape == (2, 8)


def test_weight_bytes_against_bfloat16_and_float32():
    model, quantized = models()
    sizes = block_linear_bytes(quantized)
    numel = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    channels = sum(m.weight.shape[0] for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    assert sizes == {"stored": numel + 4 * channels, "bfloat16": 2 * numel, "float32": 4 * numel}
    assert block_linear_bytes(model)["stored"] == 4 * numel
