"""How FSDP splits a LoRA model into units (``configs/strategy/fsdp.yaml``: ``auto_wrap_policy``)."""

from __future__ import annotations

from torch import nn

# The attribute FSDP keeps each unit's module under: it appears inside module and parameter names
# (``layers.0._fsdp_wrapped_module.mlp``), never in the state dict's keys.
FSDP_WRAPPER = "_fsdp_wrapped_module"


def unwrapped_name(name: str) -> str:
    """A module's or parameter's name as the state dict has it: without FSDP's wrapper segments."""
    return name.replace(f"{FSDP_WRAPPER}.", "")


def wrap_decoder_layers_and_lora(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP's auto-wrap policy: one unit per decoder layer, and one per trainable Linear inside it (LoRA's A and B).

    FSDP flattens a unit's parameters into one tensor of one dtype, and the LoRA weights are float32 beside a bf16
    base (bf16 would round away AdamW steps of the seed's learning rate: docs/DPO.md). Giving each trainable Linear
    its own unit keeps every flat tensor uniform; the value head, float32 too, becomes one as well.
    """
    if recurse:
        return True
    if type(module).__name__.endswith("DecoderLayer"):
        return True
    return isinstance(module, nn.Linear) and any(p.requires_grad for p in module.parameters(recurse=False))
