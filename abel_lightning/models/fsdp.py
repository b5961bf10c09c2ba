"""How FSDP splits a LoRA model into units (``configs/strategy/fsdp.yaml``: ``auto_wrap_policy``)."""

from __future__ import annotations

from torch import nn

from abel_lightning.models.architectures import is_decoder_layer


def wrap_decoder_layers_and_lora(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP's auto-wrap policy: one unit per decoder layer, and one per trainable Linear inside it (LoRA's A and B).

    FSDP flattens a unit's parameters into one tensor of one dtype, and the LoRA weights are float32 beside a bf16
    base (bf16 would round away AdamW steps of the seed's learning rate: docs/DPO.md). Giving each trainable Linear
    its own unit keeps every flat tensor uniform; the value head, float32 too, becomes one as well.
    """
    if recurse:
        return True
    if is_decoder_layer(module):
        return True
    return isinstance(module, nn.Linear) and any(p.requires_grad for p in module.parameters(recurse=False))
