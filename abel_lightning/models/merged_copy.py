"""A merged copy of a LoRA policy, to sample from: each adapted layer holds ``W + scale * B A`` in a tensor of its own,
every other weight is the base's own tensor, shared.

At PPO's few rows a decode step is bound by reading the weights, and an unmerged LoRA layer adds two small matrix
products and an add to each of them: on an H100 a 7B step of 4 rows took 13.8 ms unmerged and 8.5 ms merged
(docs/PERFORMANCE.md). Merging in place would round the bf16 base a little differently at every iteration, so the
copy keeps the base untouched; it costs one more copy of the adapted weights (about 13 GB for a 7B base with LoRA on
every projection). ``refresh`` rewrites the merged tensors in place, so a decode engine's captured graphs, which read
weights by address, stay valid across iterations.

The sampled tokens come from the merged weights, the log-probs PPO trains on from the policy itself: the two differ
by rounding only, which PPO's probability ratio (new over old log-probs, both from the policy) never sees.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel

from abel_lightning.compat import lora_deltas, lora_uses_dora, share_tensors
from abel_lightning.models.loading import meta_model


class MergedCopy:
    """``model``: the merged copy of ``policy`` (a PEFT LoRA model), in eval mode; ``refresh()`` brings it up to date
    with the policy's current LoRA weights and returns it."""

    def __init__(self, policy: PeftModel):
        base = policy.get_base_model()
        if getattr(base.config, "quantization_config", None) is not None:
            raise ValueError("a quantized base cannot be merged into: sample from the policy itself")
        model = meta_model(base.config)
        self.adapted: list[tuple[LoraLayer, nn.Linear]] = []
        for name, module in model.named_modules():
            source = base.get_submodule(name)
            if isinstance(source, LoraLayer):
                if lora_uses_dora(source):
                    raise ValueError(f"{name}: DoRA layers are not merged here: sample from the policy itself")
                layer = source.get_base_layer()
                module.weight = nn.Parameter(torch.empty_like(layer.weight), requires_grad=False)
                module.bias = layer.bias
                self.adapted.append((source, module))
                continue
            # Everything else is the base's own tensor (the tied embedding stays tied: both names give one tensor).
            share_tensors(module, source)
            for key, value in list(vars(module).items()):  # plain tensor attributes (a rotary embedding's, say)
                if isinstance(value, torch.Tensor) and value.is_meta:
                    setattr(module, key, getattr(source, key))
        if not self.adapted:
            raise ValueError("the policy has no LoRA layers to merge")
        self.model: PreTrainedModel = model.eval()
        self.model.generation_config = base.generation_config

    @torch.no_grad()
    def refresh(self) -> PreTrainedModel:
        for lora, linear in self.adapted:
            weight = lora.get_base_layer().weight
            merged = weight.to(torch.float32, copy=True)  # never the base's own tensor, even when it is float32
            for delta in lora_deltas(lora):
                merged += delta.float()
            linear.weight.copy_(merged)
        return self.model
