"""FSDP's units for a LoRA model: every flat tensor FSDP builds must hold one dtype."""

from __future__ import annotations

import torch

from abel_lightning.models.fsdp import wrap_decoder_layers_and_lora
from abel_lightning.models.loading import LoraSettings, attach_lora
from abel_lightning.models.tiny import build_tokenizer, random_model


def test_each_unit_is_a_decoder_layer_or_a_trainable_lora_matrix():
    tokenizer = build_tokenizer(["Tom has 3 apples. #### 3"] * 4, 300)
    model = attach_lora(random_model("tiny-llama", tokenizer).to(torch.bfloat16), LoraSettings(r=4, alpha=8), None,
                        trainable=True)
    wrapped = [name for name, module in model.named_modules() if wrap_decoder_layers_and_lora(module, False, 0)]
    layers = [n for n in wrapped if n.endswith(tuple(f"layers.{i}" for i in range(10)))]
    lora = [n for n in wrapped if ".lora_A." in n or ".lora_B." in n]
    assert len(layers) == model.config.num_hidden_layers and len(lora) + len(layers) == len(wrapped)
    # LoRA weights stay float32 beside the bf16 base, each in a unit of its own.
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert wrap_decoder_layers_and_lora(model, True, 0)  # FSDP asks before recursing: always go in
