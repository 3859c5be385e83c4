"""Our model equals transformers' on the same tiny checkpoints (float32)."""

import pytest
import torch

from brownout.config import ModelLoadConfig
from brownout.runner.loader import load_model

FAMILIES = ["qwen2_moe", "mixtral", "qwen3_moe"]


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_models, family):
    path = tiny_models[family]
    ours = load_model(ModelLoadConfig(model=str(path), device="cpu", dtype="float32")).model
    ref = _hf(path)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = ours.forward_full(ids)
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-4, rel


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    with pytest.raises(ValueError, match="supported: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM"):
        load_model(ModelLoadConfig(model=str(tmp_path), device="cpu"))
