"""What a module must do differently when the strategy shards its weights over ranks (FSDP), in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import lightning as L

T = TypeVar("T")


def weights_sharded(trainer: L.Trainer | None) -> bool:
    """Whether ``trainer`` shards the model's weights over ranks (FSDP). Then every rank must run the same forward
    passes (``synced_gpus`` while generating), or their all-gathers stop matching and the ranks hang."""
    from lightning.pytorch.strategies import FSDPStrategy

    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


def in_wrapped_forward(trainer: L.Trainer, module: L.LightningModule, fn: Callable[[], T]) -> T:
    """``fn()``, run as the forward of the strategy's wrapper around ``module`` when the weights are sharded.

    FSDP arms its backward hooks (the gradient reduce-scatter, and the final callback that hands the sharded
    gradients to the optimizer) on the outputs of its root unit's forward, and its weights are whole only inside a
    forward. Lightning runs ``training_step`` there; a loss that a module builds and backpropagates itself (PPO's
    minibatches) or a forward pass outside the loop (DPO's reference cache) must go through it too: without it,
    backward leaves FSDP's units mid-backward and saving the adapter fails. Unsharded (one device, DDP), ``fn``
    simply runs.
    """
    wrapper = trainer.strategy.model
    if not weights_sharded(trainer) or wrapper is module:
        return fn()
    had_own_forward = "forward" in vars(module)
    forward = module.forward

    def redirected():
        # Restore first, so that whatever fn calls sees the module as it was.
        _restore(module, forward, had_own_forward)
        return fn()

    module.forward = redirected
    try:
        return wrapper()
    finally:
        _restore(module, forward, had_own_forward)


def _restore(module, forward, had_own_forward: bool) -> None:
    if had_own_forward:
        module.forward = forward
    else:
        vars(module).pop("forward", None)
