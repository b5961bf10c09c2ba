"""FSDP over gloo CPU processes, so that CI (no GPU) runs the sharded code paths through the real CLI.

Import-time patches, test-only: Lightning refuses FSDP on a CPU accelerator (this subclass is not the class it
checks), torch's FSDP needs ``device_id=cpu`` where Lightning passes None, and ``offload_to_cpu`` of tensors already
on the CPU frees the gathered weights under the state dict (a segfault), so the full state dict is built without it.
"""

from __future__ import annotations

import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
from torch.distributed.fsdp.api import FullOptimStateDictConfig

_init = FullyShardedDataParallel.__init__


def _init_on_cpu(self, *args, device_id=None, **kwargs):
    _init(self, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


def _full_state_dict_in_place(module, world_size, rank0_only=True):
    return FullyShardedDataParallel.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


FullyShardedDataParallel.__init__ = _init_on_cpu
lightning_fsdp._get_full_state_dict_context = _full_state_dict_in_place


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, unchanged, on CPU processes."""
