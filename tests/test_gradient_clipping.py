"""Gradient clipping of the LoRA weights: the gradient norm a training step takes once, for the divergence check and
for clipping, clips exactly as ``torch.nn.utils.clip_grad_norm_`` would; clipping by value and no clipping stay
Lightning's."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from abel_lightning.modules.dpo import DPOModule


@pytest.fixture
def module(tiny_model):
    module = DPOModule(tiny_model, adapter=None, dtype="float32", gradient_checkpointing=False)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    for parameter in module.trainable_parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    return module


def grads(module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.trainable_parameters()]


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # scaled down; left alone (the scale is capped at 1)
def test_clipping_by_norm_matches_torch(module, max_norm):
    expected = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads(module)]
    for parameter, grad in zip(expected, grads(module)):
        parameter.grad = grad
    torch.nn.utils.clip_grad_norm_(expected, max_norm)
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=1.0)

    module.configure_gradient_clipping(optimizer, max_norm, "norm")

    assert_close(grads(module), [p.grad for p in expected])
    if max_norm == 0.5:
        assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads(module)])) == pytest.approx(0.5)


def test_clipping_by_value_clamps_and_no_value_leaves_the_gradients(module):
    before = grads(module)
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=1.0)
    module.configure_gradient_clipping(optimizer, None, None)
    assert_close(grads(module), before)

    module.configure_gradient_clipping(optimizer, 0.1, "value")
    assert_close(grads(module), [g.clamp(-0.1, 0.1) for g in before])
