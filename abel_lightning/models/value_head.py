"""The PPO critic: a linear head on the policy's last hidden state.

Why a head on the shared trunk rather than a second LoRA adapter: one forward pass yields both the log-probs and the
values, so an update step costs one pass instead of two and the critic adds only ``hidden_size + 1`` parameters.
The price is that value-loss gradients also move the policy's LoRA weights; ``vf_coef`` (default 0.1) keeps that
pull small. docs/PPO.md gives the measured memory of both choices.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

FILENAME = "value_head.safetensors"


class ValueHead(nn.Module):
    """``values = w · h + b`` on hidden states ``[B, T, H]`` -> ``[B, T]``, computed in float32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        # Zero init: the critic starts by predicting 0, which is the expected reward of a hard problem, instead of
        # noise that GAE would turn into spurious advantages on the first steps.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)

    def save(self, folder: str | Path, module_state: dict | None = None) -> None:
        """Write ``value_head.safetensors``; ``module_state`` (keys ``value_head.*``, as a gathered checkpoint holds
        them) replaces this module's own weights when given."""
        state = {k.split(".", 1)[1]: v for k, v in module_state.items()} if module_state else self.state_dict()
        path = Path(folder) / FILENAME
        # Beside it, then one os.replace: a run killed mid-save keeps the last complete head.
        temporary = path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(temporary))
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def load(self, folder: str | Path) -> bool:
        """Load ``value_head.safetensors`` from an adapter folder; False when the folder has none."""
        path = Path(folder) / FILENAME
        if not path.exists():
            return False
        self.load_state_dict(load_file(str(path)))
        return True
