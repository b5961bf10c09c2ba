"""Small models built offline: the toy tokenizer, named model shapes, and random-weight checkpoints.

Nothing here touches the Hugging Face hub. Tests use ``tiny-*`` presets, the CPU testbed uses the shipped
``toy-llama`` base (``assets/toy-base``, made by ``scripts/pretrain_toy.py``), and GPU benchmarks use
``mistral-7b``: Mistral-7B's shape with random weights, which is all a throughput measurement needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from abel_lightning.data.toy import make_problems
from abel_lightning.prompts import format_prompt

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; it prepends ``<s>`` like Llama's and decodes losslessly.

    Digits are split one per token so that arithmetic is done digit by digit, as in Llama's tokenizer.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, UNK],
        # Every byte is in the vocabulary, so any text encodes, even characters never seen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=512
    )


def _small(config_class: type[PretrainedConfig]) -> Callable[[int], PretrainedConfig]:
    return lambda vocab_size: config_class(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )


PRESETS: dict[str, Callable[[int], PretrainedConfig]] = {
    "toy-llama": lambda vocab_size: LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=688,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "tiny-llama": _small(LlamaConfig),
    "tiny-mistral": _small(MistralConfig),
    # Mistral-7B-v0.1's shape. The vocabulary stays 32000 whatever tokenizer rides along: the benchmarks need the
    # real embedding and LM-head sizes, and a smaller tokenizer's ids are all valid rows of the larger table.
    "mistral-7b": lambda vocab_size: MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        max_position_embeddings=32768,
        rope_theta=10000.0,
        sliding_window=None,
    ),
}


def toy_base_path() -> Path:
    """The folder of the shipped toy base model and its tokenizer."""
    return Path(__file__).resolve().parent.parent / "assets" / "toy-base"


def _default_tokenizer() -> PreTrainedTokenizerFast:
    if (toy_base_path() / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(toy_base_path())
    return build_tokenizer(format_prompt(p["question"]) + p["answer"] for p in make_problems(2000, seed=0))


def random_model(
    preset: str,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """A ``preset`` model with seeded random weights and ``tokenizer``'s special-token ids, built on ``device``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset](len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@torch.no_grad()
def randomize_lora(model: torch.nn.Module, std: float, generator: torch.Generator | None = None) -> torch.nn.Module:
    """Draw ``model``'s LoRA B matrices from N(0, ``std``) and return ``model``: PEFT starts B at zero, where an adapter
    computes exactly its base and a test or a benchmark of the adapter's path proves nothing."""
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.normal_(0.0, std, generator=generator)
    return model


def build_random_model(
    preset: str,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Path:
    """Save a randomly initialised ``preset`` model and its tokenizer to ``out_dir`` and return it.

    The folder loads offline with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    ``tokenizer`` defaults to the shipped toy tokenizer. Initialise ``mistral-7b`` with ``device="cuda"``: on CPU
    it takes minutes.
    """
    tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
    out_dir = Path(out_dir)
    random_model(preset, tokenizer, seed, dtype, device).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
