"""Saving the trained adapter: a save killed midway leaves the folder's last complete adapter (and value head), not
a torn weights file in place of the good one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abel_lightning.models.loading import LoraSettings, attach_lora, load_base, load_tokenizer, save_adapter
from abel_lightning.models.tiny import randomize_lora
from abel_lightning.models.value_head import ValueHead


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def killed_midway(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 64)  # the first bytes of the write, then the kill
    raise KeyboardInterrupt


def test_a_save_killed_midway_keeps_the_last_complete_adapter(tiny_model, tmp_path, monkeypatch):
    policy = attach_lora(load_base(tiny_model, "float32"), LoraSettings(r=2, alpha=4))
    tokenizer = load_tokenizer(tiny_model)
    folder = save_adapter(randomize_lora(policy, 0.1, torch.Generator().manual_seed(0)), tokenizer, tmp_path / "out")
    saved = files(folder)

    randomize_lora(policy, 0.1, torch.Generator().manual_seed(1))  # a later step's weights
    with monkeypatch.context() as patch:
        patch.setattr("peft.peft_model.safe_save_file", killed_midway)
        with pytest.raises(KeyboardInterrupt):
            save_adapter(policy, tokenizer, folder)
    assert files(folder) == saved
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left of the attempt

    save_adapter(policy, tokenizer, folder)
    assert files(folder).keys() == saved.keys()
    assert files(folder)["adapter_model.safetensors"] != saved["adapter_model.safetensors"]


def test_a_value_head_save_killed_midway_keeps_the_last_head(tmp_path, monkeypatch):
    head = ValueHead(8)
    head.save(tmp_path)
    saved = files(tmp_path)
    torch.nn.init.ones_(head.linear.weight)
    monkeypatch.setattr("abel_lightning.models.value_head.save_file", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        head.save(tmp_path)
    assert files(tmp_path) == saved
