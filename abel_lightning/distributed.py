"""The one seam between the modules and the strategy: what a module, a datamodule or a callback needs of device,
precision and distribution, asked for by intent.

Device, precision and distribution belong to the Trainer and its strategy, not to a LightningModule. A module that
must differ when the weights are sharded (FSDP) says what it needs here (``weights_sharded``, ``in_wrapped_forward``,
``clip_gradients``, ``trainer_precision``) and this file alone knows how the strategy does it. Reductions over ranks
stay the strategy's own one-liners (``trainer.strategy.reduce``, ``self.all_gather``): they already say what they do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TypeVar

import lightning as L
import torch

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


@torch.no_grad()
def clip_gradients(
    module: L.LightningModule,
    optimizer,
    grads: list[torch.Tensor],
    norm: torch.Tensor,
    max_norm: float | None,
    algorithm: str | None = None,
) -> None:
    """Clip ``grads`` (the module's trainable ones) as ``Trainer(gradient_clip_val=...)`` would, given ``norm``, their
    :func:`global_norm`, which the caller has taken already (it checks it for divergence): by norm here, scaling by
    ``max_norm / (norm + 1e-6)`` capped at 1 as ``torch.nn.utils.clip_grad_norm_`` does, so one norm serves both and
    sharded weights need no path of their own (Lightning's FSDP precision plugin refuses norm clipping, and FSDP's
    ``clip_grad_norm_`` insists on running outside the root module's forward, where PPO's in-step updates are); by
    value through Lightning."""
    if not max_norm:
        return
    if algorithm == "value":
        module.clip_gradients(optimizer, max_norm, algorithm)
        return
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))


@torch.no_grad()
def global_norm(trainer: L.Trainer, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of ``tensors`` taken together (float32): over all ranks' shards when the weights are sharded, where
    each rank holds a disjoint part (the square root of the local squared norms summed over ranks), else this rank's,
    which every rank holds whole."""
    local = sum((t.float().pow(2).sum() for t in tensors), torch.zeros((), device=trainer.strategy.root_device))
    if weights_sharded(trainer):
        local = trainer.strategy.reduce(local, reduce_op="sum")
    return local.sqrt()


def trainer_precision(trainer: L.Trainer) -> AbstractContextManager:
    """The Trainer's precision (autocast under ``bf16-mixed``, say) for a forward pass that a module runs outside
    the loop's steps, such as DPO's reference pass before training, so that it computes what a training step would."""
    return trainer.precision_plugin.forward_context()
