"""What the code knows about each model family, in one table (as litgpt keeps it in its ``config.py``).

The decode engine, padding-free packing, FSDP's unit per decoder layer, the fused RMSNorm and the default LoRA targets
each need a fact or two about a Hugging Face ``model_type``; they read them here. Adding a family is one row, and
``tests/test_architectures.py`` builds a tiny model of every row to check the row against the installed transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

# PEFT's shorthand for LoRA on every Linear layer of the model except the output layer (the LM head).
ALL_LINEAR = "all-linear"
# Every attention and MLP projection under Llama's names, as QLoRA recommends: the LoRA targets of a model type
# outside the table, which was the default for every model before the table.
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Hugging Face names the decoder layer of every family ``<Family>DecoderLayer``, so FSDP's unit per decoder layer
# needs no row: tests/test_architectures.py checks the name for every row.
DECODER_LAYER_SUFFIX = "DecoderLayer"


@dataclass(frozen=True)
class Architecture:
    """One model family.

    ``rms_norm``: the class name of its RMSNorm, ``weight * x / rms(x)`` in float32, which the decode engine computes
    in one fused kernel; None leaves its norms as they are.
    ``decode_engine``: the static decode engine (``models/decode_engine.py``) computes its forward exactly.
    ``packable``: its attention keeps sequences packed into one row apart (the causal mask is built from position_ids
    that restart at 0), so a batch can run without its padding (``models/sequences.py``).
    ``lora_targets``: the modules a fresh LoRA adapts by default (PEFT's ``target_modules``).
    """

    rms_norm: str | None
    decode_engine: bool
    packable: bool
    # PEFT's all-linear selects exactly ALL_PROJECTIONS in these families (tests/test_architectures.py checks it).
    lora_targets: str | tuple[str, ...] = ALL_LINEAR


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaRMSNorm", decode_engine=True, packable=True),
    "mistral": Architecture("MistralRMSNorm", decode_engine=True, packable=True),
    "qwen2": Architecture("Qwen2RMSNorm", decode_engine=True, packable=True),
    # Qwen3 normalizes queries and keys per head, which the decode engine's forward does not.
    "qwen3": Architecture(None, decode_engine=False, packable=True),
}


def architecture(config) -> Architecture | None:
    """The table's row for a Hugging Face ``config`` (by its ``model_type``), or None for a family outside it."""
    return ARCHITECTURES.get(getattr(config, "model_type", None))


def decodable_model_types() -> tuple[str, ...]:
    """The model types the decode engine can decode."""
    return tuple(name for name, row in ARCHITECTURES.items() if row.decode_engine)


def packable(config) -> bool:
    """Whether a model of ``config`` may run a batch packed into one row, without its padding."""
    row = architecture(config)
    return row is not None and row.packable


def fusable_norms() -> frozenset[str]:
    """Class names of the RMSNorms the decode engine fuses."""
    return frozenset(row.rms_norm for row in ARCHITECTURES.values() if row.rms_norm is not None)


def is_decoder_layer(module) -> bool:
    """Whether ``module`` is a Hugging Face decoder layer (of any family, in the table or not)."""
    return type(module).__name__.endswith(DECODER_LAYER_SUFFIX)


def default_lora_targets(model_type: str | None) -> str | list[str]:
    """PEFT ``target_modules`` of a fresh LoRA on a model of ``model_type`` (None: unknown, the projections)."""
    row = ARCHITECTURES.get(model_type)
    if row is None:
        return list(ALL_PROJECTIONS)
    return row.lora_targets if isinstance(row.lora_targets, str) else list(row.lora_targets)
