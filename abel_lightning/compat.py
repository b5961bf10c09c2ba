"""Every use of another library's internals, behind a named function: what it reads, why no public API does, and the
versions it was checked on.

``tests/test_compat.py`` exercises each function against the installed libraries, so an upgrade that renames a field
or moves a module fails there, by name, rather than deep inside a training run. Checked on torch 2.13, transformers
5.25, peft 0.21.2 and lightning 2.6.6 (the project supports torch 2.11-2.14, transformers 5.17-5.25, peft 0.21,
lightning 2.6); after an upgrade, run ``tests/test_compat.py`` first.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch import Tensor, nn
from transformers.generation.stopping_criteria import StopStringCriteria

# transformers 5.25: the rotary embedding of Llama, Mistral and Qwen2 (their modeling files import this one), public
# in the module but not in the package's API.
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: F401  (re-exported on purpose)

# -- torch ------------------------------------------------------------------------------------------------------------

# torch 2.13 (``torch.distributed.fsdp._common_utils.FSDP_WRAPPED_MODULE``): the attribute FSDP keeps each unit's
# module under. It appears inside module and parameter names (``layers.0._fsdp_wrapped_module.mlp``), never in the
# state dict's keys.
FSDP_WRAPPER = "_fsdp_wrapped_module"


def unwrapped_name(name: str) -> str:
    """A module's or parameter's name as the state dict has it: without FSDP's wrapper segments."""
    return name.replace(f"{FSDP_WRAPPER}.", "")


def has_fsdp_wrappers(model: nn.Module) -> bool:
    """Whether FSDP has wrapped units inside ``model`` (its module names then carry the wrapper's segment)."""
    return any(FSDP_WRAPPER in name for name, _ in model.named_modules())


def share_tensors(target: nn.Module, source: nn.Module) -> None:
    """Make ``target``'s own parameters and buffers (not its children's) the very tensors of ``source``'s, in place.

    torch 2.13: ``nn.Module._parameters`` and ``_buffers`` are the dicts ``register_parameter`` and
    ``register_buffer`` fill. Writing into them keeps a buffer a buffer and a non-persistent buffer non-persistent,
    which ``setattr`` would not, and shares a tied weight as the one tensor it is.
    """
    for key in target._parameters:
        target._parameters[key] = source._parameters[key]
    for key in target._buffers:
        target._buffers[key] = source._buffers[key]


# -- transformers -----------------------------------------------------------------------------------------------------


def stop_criterion_on(criterion: StopStringCriteria, device: torch.device) -> StopStringCriteria:
    """Move ``criterion``'s tables to ``device`` once, so that a CUDA graph that calls it finds them at one address.

    transformers 5.25: ``StopStringCriteria.embedding_vec`` and ``target_lens`` are the tensors its ``__call__``
    moves to the input's device at every call (a copy a graph cannot replay).
    """
    criterion.embedding_vec = criterion.embedding_vec.to(device)
    criterion.target_lens = criterion.target_lens.to(device)
    return criterion


def stop_window(criterion: StopStringCriteria) -> int:
    """How many of a row's last tokens ``criterion`` reads (transformers 5.25: ``maximum_token_len``)."""
    return criterion.maximum_token_len


def stop_blank_token(criterion: StopStringCriteria) -> int:
    """A token id that ``criterion`` never matches, to fill a window that is longer than the row so far.

    transformers 5.25: ids are clamped to the last row of ``embedding_vec``, which is all padding (no stop string
    ends there).
    """
    return criterion.embedding_vec.shape[0] - 1


def decoder_layout_missing(model: nn.Module) -> str | None:
    """What ``model`` lacks of the module layout the decode engine computes with, or None when it has it all.

    transformers 5.25, Llama, Mistral and Qwen2: ``model.model`` holds ``embed_tokens``, ``rotary_emb``, ``layers``
    and ``norm``, beside ``model.lm_head``; each layer holds ``input_layernorm``, ``self_attn`` (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``, ``head_dim``, ``scaling``), ``post_attention_layernorm`` and ``mlp``. Not an API: the
    modeling files may rename any of them.
    """
    body = getattr(model, "model", None)
    for owner, where, names in (
        (model, "", ("lm_head",)),
        (body, "model.", ("embed_tokens", "rotary_emb", "layers", "norm")),
    ):
        missing = [name for name in names if owner is None or not hasattr(owner, name)]
        if missing:
            return f"{type(model).__name__} is not a causal LM with {', '.join(where + name for name in missing)}"
    for index, layer in enumerate(body.layers):
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, name):
                return f"{type(model).__name__}: model.layers.{index} has no {name}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"):
            if not hasattr(layer.self_attn, name):
                return f"{type(model).__name__}: model.layers.{index}.self_attn has no {name}"
    return None


def rope_type(model: nn.Module) -> str:
    """The rotary variant of ``model``'s rotary embedding (transformers 5.25: ``model.model.rotary_emb.rope_type``)."""
    return getattr(model.model.rotary_emb, "rope_type", "default")


def rms_norm_eps(norm: nn.Module) -> float:
    """The epsilon of a Hugging Face RMSNorm (transformers 5.25: ``variance_epsilon``, where torch's says ``eps``)."""
    return norm.variance_epsilon


# -- peft -------------------------------------------------------------------------------------------------------------


def tuner_layer_state(layer) -> tuple:
    """How a PEFT tuner layer computes now: merged or not, adapters disabled or not, and which are active.

    peft 0.21.2: ``BaseTunerLayer.merged``, ``disable_adapters`` and ``active_adapters`` are properties without a
    documented promise.
    """
    return layer.merged, layer.disable_adapters, tuple(layer.active_adapters)


def lora_uses_dora(layer) -> bool:
    """Whether any adapter of a LoRA layer is DoRA (peft 0.21.2: the per-adapter ``use_dora`` flags)."""
    return any(layer.use_dora.values())


def lora_deltas(layer) -> Iterator[Tensor]:
    """The weight delta ``scale * B @ A`` of each active adapter of a LoRA layer, in the base weight's layout.

    peft 0.21.2: ``LoraLayer.get_delta_weight(adapter)`` (what its own merge adds), ``lora_A`` (the adapters the layer
    holds) and ``active_adapters``.
    """
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            yield layer.get_delta_weight(adapter)


# -- lightning --------------------------------------------------------------------------------------------------------


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer ``module`` is attached to, or None (lightning 2.6.6: ``LightningModule.trainer`` raises when there is
    none, ``_trainer`` is the attribute behind it)."""
    return module._trainer


def fit_batch_index(trainer: L.Trainer) -> int:
    """The 0-based index of the training batch being run (or just run), counted over the whole fit: across epochs
    and across a resume (lightning 2.6.6: ``trainer.fit_loop.total_batch_idx``, a property of a private loop)."""
    return trainer.fit_loop.total_batch_idx


def set_callback_metric(trainer: L.Trainer, name: str, value: Tensor) -> None:
    """Put ``value`` in ``trainer.callback_metrics`` after the loop's logging has closed (``self.log`` refuses then).

    lightning 2.6.6: ``callback_metrics`` returns the logger connector's own dict, so a write into it is what later
    readers see.
    """
    trainer.callback_metrics[name] = value


_BAR_DESCRIPTIONS = {"predict": "Predicting", "test": "Testing"}


def show_on_progress_bar(trainer: L.Trainer, stage: str, text: str) -> bool:
    """Put ``text`` on the running loop's bar (TQDM: postfix; Rich: description); False when there is no such bar
    (progress bar disabled, rank > 0, or sampling inside ``fit``, which has no bar for it).

    lightning 2.6.6: ``TQDMProgressBar.predict_progress_bar``/``test_progress_bar``, and ``RichProgressBar.progress``
    with its ``predict_progress_bar_id``/``test_progress_bar_id`` tasks; none is documented.
    """
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    callback = trainer.progress_bar_callback
    if callback is None or not callback.is_enabled or trainer.state.fn != stage or stage not in _BAR_DESCRIPTIONS:
        return False
    if isinstance(callback, TQDMProgressBar):
        bar = callback.predict_progress_bar if stage == "predict" else callback.test_progress_bar
        bar.set_postfix_str(text, refresh=False)
        return True
    if isinstance(callback, RichProgressBar):
        task = getattr(callback, f"{stage}_progress_bar_id", None)
        if callback.progress is None or task is None:
            return False
        callback.progress.update(task, description=f"{_BAR_DESCRIPTIONS[stage]} · {text}")
        return True
    return False
