"""The one place that loads a base model, its tokenizer and LoRA adapters.

A model is named by a Hugging Face hub id (``GAIR/Abel-7B-002``), a local folder, or ``builtin:toy`` (the tiny base the
package ships for the CPU testbed). The policy is always ``base + LoRA``; the reference policy is the same model with
the adapter disabled, so no second copy of the weights is ever held.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from abel_lightning.compat import has_fsdp_wrappers
from abel_lightning.errors import ActionableError
from abel_lightning.hub_ids import require_local_exists
from abel_lightning.models.architectures import default_lora_targets

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# PEFT's name for the adapter a PeftModel is created or loaded with: the one that trains and is saved.
TRAINED_ADAPTER = "default"
Quantization = Literal["4bit", "8bit"]
# A PEFT adapter folder's weights, in the format save_adapter writes or the one older PEFT versions wrote.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class ModelFolderError(ActionableError):
    """A model or adapter folder that is missing, incomplete or damaged."""


@dataclass
class LoraSettings:
    """LoRA hyperparameters (Hu et al. 2021). Defaults: r=16, alpha=32 on all attention and MLP projections.

    ``target_modules``: the module names to adapt, or PEFT's ``all-linear``; None takes the model family's default
    from :mod:`abel_lightning.models.architectures` (every attention and MLP projection).
    """

    r: int = 16
    alpha: int = 32
    target_modules: list[str] | str | None = None

    def to_peft(self, model_type: str | None = None) -> LoraConfig:
        """PEFT's config for a model of ``model_type`` (the Hugging Face config's; None: Llama's projection names)."""
        targets = self.target_modules if self.target_modules is not None else default_lora_targets(model_type)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            # No dropout: PPO's ratio and DPO's reward compare the policy with itself or a reference at equal
            # weights, and dropout noise would make them differ (TRL disables it for the same reason).
            lora_dropout=0.0,
            target_modules=targets if isinstance(targets, str) else list(targets),
            task_type="CAUSAL_LM",
        )


def resolve_model_path(name: str) -> str:
    """Map ``builtin:<name>`` to the folder shipped in the package; pass hub ids and existing local paths through."""
    if not name.startswith(BUILTIN_PREFIX):
        require_local_exists(name, "model folder", "give a model folder, builtin:toy or a hub id")
        return name
    folder = Path(__file__).resolve().parent.parent / "assets" / f"{name[len(BUILTIN_PREFIX) :]}-base"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{name}: no packaged model at {folder}; rebuild it with scripts/pretrain_toy.py")
    return str(folder)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer for generation and scoring: left padding (batched decoding), a pad token (Mistral has none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype; use bfloat16, float16 or float32")
    return dtype


def load_base(
    name: str,
    dtype: str = "bfloat16",
    quantization: Quantization | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load the frozen base model.

    ``quantization`` loads the weights with bitsandbytes (``4bit``: NF4 with double quantization and ``dtype`` compute,
    as in QLoRA; ``8bit``: LLM.int8). Quantized weights are placed on ``device`` at load time, since bitsandbytes cannot
    quantize on the CPU; otherwise the model loads on the CPU and Lightning's strategy moves it.
    """
    kwargs: dict = {"dtype": _dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = _bnb_config(quantization, _dtype(dtype))
        kwargs["device_map"] = {"": str(device if device is not None else "cuda")}
    path = resolve_model_path(name)
    with _readable_weights(path):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.requires_grad_(False)
    return model


def _bnb_config(quantization: Quantization, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401  (checked here so the error names the missing extra)
    except ImportError as error:
        raise ImportError("quantization needs bitsandbytes: pip install 'abel-lightning[quant]'") from error
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization {quantization!r}: use '4bit', '8bit' or null")


def attach_lora(
    base: PreTrainedModel,
    lora: LoraSettings | None = None,
    adapter: str | None = None,
    trainable: bool = True,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Wrap ``base`` with a LoRA adapter: a fresh one from ``lora``, or the saved one at ``adapter`` (then ``lora`` is
    ignored: the adapter folder carries its own config)."""
    if gradient_checkpointing:
        # Non-reentrant checkpointing lets gradients reach LoRA weights while the embeddings stay frozen.
        # Only active in train mode: sampling (eval mode) keeps its KV cache.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter is not None:
        check_adapter_folder(adapter)
        with _readable_weights(adapter):
            model = PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
    else:
        model = get_peft_model(base, (lora or LoraSettings()).to_peft(base.config.model_type))
    if not trainable:
        model.requires_grad_(False)
    return model


def check_adapter_folder(adapter: str) -> None:
    """Refuse an adapter that PEFT would otherwise send to the hub or fail on with a bare parser error: a local path
    that does not exist, a folder without ``adapter_config.json`` or without weights, a config that is not JSON.
    A hub id (no such local folder, ``owner/name``) passes."""
    require_local_exists(
        adapter,
        "adapter folder",
        "run the phase that writes it first, or point model.init_args.adapter at a saved PEFT adapter folder (or null)",
    )
    folder = Path(adapter)
    if not folder.exists():
        return
    config = folder / "adapter_config.json"
    if not config.exists():
        raise ModelFolderError(
            f"{adapter}: not a PEFT adapter folder (no adapter_config.json); point model.adapter at the folder a "
            "training run saved (its AdapterCheckpoint dirpath)"
        )
    if not any((folder / name).exists() for name in ADAPTER_WEIGHTS):
        raise ModelFolderError(
            f"{adapter}: no {ADAPTER_WEIGHTS[0]} (the adapter's weights): the save was interrupted or the file was "
            "not copied; copy or re-save the whole adapter folder"
        )
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelFolderError(
            f"{config}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); fix it or re-save the adapter"
        ) from error


@contextmanager
def _readable_weights(folder: str) -> Iterator[None]:
    """Name the damaged ``.safetensors`` file of ``folder`` when loading fails in safetensors' deserializer, whose
    own message names no file."""
    try:
        yield
    except SafetensorError as error:
        damaged = [str(path) for path in sorted(Path(folder).glob("*.safetensors")) if not _opens(path)]
        where = ", ".join(damaged) or f"a .safetensors file in {folder}"
        raise ModelFolderError(
            f"{where}: truncated or corrupt ({error}); re-download or re-save it (a copy or save that was cut short "
            "leaves such a file)"
        ) from error


def _opens(path: Path) -> bool:
    """Whether safetensors can read the header of ``path`` and every tensor's bytes are present."""
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except SafetensorError:
        return False


def save_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path, state_dict=None) -> Path:
    """Write a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``, tokenizer files).

    ``state_dict`` (the model's weights under the PEFT model's own names) lets a caller that gathered sharded
    weights, as under FSDP, save them without touching the sharded module. Each file replaces its namesake in one
    ``os.replace``, so a run killed mid-save leaves the folder's last complete adapter, never a torn weights file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state_dict is not None and has_fsdp_wrappers(model):
        model = _unwrapped_skeleton(model)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
    try:
        # Only the trained adapter: a module may hold others (DPO's frozen reference copy) that are not its output.
        model.save_pretrained(
            staging, state_dict=state_dict, selected_adapters=[TRAINED_ADAPTER], safe_serialization=True
        )
        tokenizer.save_pretrained(staging)
        for file in sorted(staging.iterdir()):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def meta_model(config) -> PreTrainedModel:
    """The architecture of ``config`` on the meta device, weights to be put in by the caller. Built from a copy of the
    config: ``from_config`` writes into the config it is given, which here belongs to a live model."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def _unwrapped_skeleton(model: PeftModel) -> PeftModel:
    """The same PEFT model (base architecture, every adapter) on the meta device, without FSDP's wrappers.

    PEFT picks a state dict's adapter entries by the module names of the model it saves, and FSDP inserts segments
    into those names (PEFT 0.21 strips only a leading one), so saving through the wrapped model finds no weights.
    """
    base = meta_model(model.base_model.model.config)
    with torch.device("meta"):
        configs = {name: copy.deepcopy(config) for name, config in model.peft_config.items()}
        skeleton = get_peft_model(base, configs.pop(TRAINED_ADAPTER))
        for name, config in configs.items():
            skeleton.add_adapter(name, config)
    return skeleton
