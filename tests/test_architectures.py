"""Each row of the architecture table against a tiny model of its family in the installed transformers."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForCausalLM

from abel_lightning.models.architectures import (
    ALL_PROJECTIONS,
    ARCHITECTURES,
    default_lora_targets,
    is_decoder_layer,
    packable,
)
from abel_lightning.models.decode_engine import _rms_norm, decode_engine
from abel_lightning.models.loading import LoraSettings


def tiny(model_type: str):
    config = AutoConfig.for_model(
        model_type,
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        head_dim=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_each_row_says_what_its_family_is(model_type):
    row = ARCHITECTURES[model_type]
    model = tiny(model_type)
    assert model.config.model_type == model_type
    # FSDP's unit per decoder layer finds every layer of the family, and nothing else.
    assert [m for m in model.modules() if is_decoder_layer(m)] == list(model.model.layers)
    if row.rms_norm is not None:
        norm = model.model.layers[0].input_layernorm
        assert type(norm).__name__ == row.rms_norm
        norm.weight.data.uniform_(0.5, 1.5)
        x = torch.randn(3, 5, 64)
        torch.testing.assert_close(_rms_norm(norm, x), norm(x), rtol=1e-5, atol=1e-6)
    if row.decode_engine:
        decode_engine(model)
    else:
        with pytest.raises(ValueError, match=f"model_type '{model_type}'"):
            decode_engine(model)
    assert packable(model.config) == row.packable


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_all_linear_adapts_every_projection_and_not_the_lm_head(model_type):
    """PEFT's all-linear, the table's default, is the list of projections that was the default before it."""
    assert default_lora_targets(model_type) == "all-linear"
    adapted = {
        name.rsplit(".", 1)[-1]
        for name, module in get_peft_model(tiny(model_type), LoraSettings().to_peft(model_type)).named_modules()
        if isinstance(module, LoraLayer)
    }
    projections = get_peft_model(
        tiny(model_type), LoraConfig(r=16, target_modules=list(ALL_PROJECTIONS), task_type="CAUSAL_LM")
    )
    by_name = {n.rsplit(".", 1)[-1] for n, m in projections.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == by_name == set(ALL_PROJECTIONS)


def test_a_family_outside_the_table_keeps_the_projection_names():
    assert default_lora_targets("gpt2") == ALL_PROJECTIONS
    assert default_lora_targets(None) == ALL_PROJECTIONS
    assert LoraSettings(target_modules=["q_proj"]).to_peft("llama").target_modules == {"q_proj"}
