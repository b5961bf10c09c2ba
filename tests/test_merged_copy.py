"""The merged copy PPO samples from: the policy's outputs, the base left as it was, and weights shared or updated in
place."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from abel_lightning.models.loading import LoraSettings, attach_lora, load_base
from abel_lightning.models.merged_copy import MergedCopy
from abel_lightning.models.tiny import randomize_lora

IDS = torch.tensor([[1, 5, 9, 13, 7, 2]])


def lora_policy(tiny_model: str):
    policy = attach_lora(load_base(tiny_model, "float32"), LoraSettings(r=4, alpha=8), None, trainable=True).eval()
    return randomize_lora(policy, 0.1, torch.Generator().manual_seed(0))


@torch.no_grad()
def test_the_copy_computes_the_policy_and_leaves_the_base_as_it_was(tiny_model):
    policy = lora_policy(tiny_model)
    with policy.disable_adapter():
        base_logits = policy(IDS).logits
    copy = MergedCopy(policy).refresh()
    torch.testing.assert_close(copy(IDS).logits, policy(IDS).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(copy(IDS).logits, base_logits, atol=1e-3)  # the adapter matters here
    with policy.disable_adapter():
        torch.testing.assert_close(policy(IDS).logits, base_logits, rtol=0, atol=0)


@torch.no_grad()
def test_only_adapted_weights_are_copied_and_a_refresh_rewrites_them_in_place(tiny_model):
    policy = lora_policy(tiny_model)
    merged = MergedCopy(policy)
    copy = merged.refresh()
    policy_storage = {p.data_ptr() for p in policy.parameters()}
    own = [name for name, p in copy.named_parameters() if p.data_ptr() not in policy_storage]
    adapted_layers = [name for name, module in policy.named_modules() if isinstance(module, LoraLayer)]
    assert len(own) == len(merged.adapted) == len(adapted_layers) > 0 and all(n.endswith("proj.weight") for n in own)

    addresses = [p.data_ptr() for p in copy.parameters()]
    for name, parameter in policy.named_parameters():  # an optimizer step on the LoRA weights
        if "lora_" in name:
            parameter.add_(0.05)
    assert merged.refresh() is copy and [p.data_ptr() for p in copy.parameters()] == addresses
    torch.testing.assert_close(copy(IDS).logits, policy(IDS).logits, rtol=0, atol=1e-5)
