"""Sampling solutions from a policy: the one generation path that PPO, Regime W rollouts and evaluation share."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from abel_lightning.models.decode_engine import DecodeEngine, decode_engine

log = logging.getLogger(__name__)


@dataclass
class SamplingSettings:
    """How to decode. ``temperature: 0`` means greedy decoding (then ``top_p`` is unused)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    # Text that ends a solution early, e.g. "\nQuestion:" for a base model that goes on to invent the next problem.
    stop_strings: list[str] = field(default_factory=list)
    # EOS cannot end a solution before this many tokens. Throughput benchmarks set it to max_new_tokens: random
    # weights would otherwise stop rows at random lengths.
    min_new_tokens: int = 0
    # "static": the decode engine (abel_lightning.models.decode_engine); "hf": Hugging Face's model.generate;
    # "auto": static on a GPU when the model allows it, and not under FSDP (synced_gpus); hf otherwise.
    engine: Literal["auto", "static", "hf"] = "auto"
    # The static engine on a GPU replays its decode step as a CUDA graph; false runs it eagerly (to compare, to debug).
    cuda_graphs: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled solution.

    ``response_ids`` are the generated tokens, the EOS included when the model emitted one (it is an action the
    policy took); ``num_tokens`` counts the generated tokens without the EOS, as Regime W's length terms do.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids) - int(self.finished)


@dataclass
class Arm:
    """One sampling strategy of Regime W's k-armed bandit: its own decoding settings and, optionally, prompt."""

    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    prompt_template: str | None = None


@dataclass
class Answered:
    """A question with its sampled completions; ``arms[i]`` is the arm that produced ``completions[i]``."""

    question: dict
    completions: list[Completion]
    arms: list[int]


@torch.no_grad()
def generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    settings: SamplingSettings,
    num_samples: int = 1,
    max_batch_rows: int | None = None,
    synced_gpus: bool = False,
) -> list[list[Completion]]:
    """Sample ``num_samples`` completions for each prompt; returns one list of completions per prompt.

    Prompts are decoded in chunks of at most ``max_batch_rows`` rows (prompts x samples). When the GPU runs out of
    memory the chunk is halved and retried, and the smaller size is kept for the rest of the call.
    ``synced_gpus`` keeps all ranks stepping together, which sharded (FSDP) models need: it implies ``model.generate``.
    ``settings.engine`` picks the decoder: on a GPU, by default, the static decode engine (``decode_engine``), whose
    completions are those ``model.generate`` would give (token for token under greedy decoding).
    """
    rows_per_chunk = max_batch_rows or len(prompts) * num_samples
    prompts_per_chunk = max(1, rows_per_chunk // num_samples)
    results: list[list[Completion]] = []
    start = 0
    while start < len(prompts):
        chunk = prompts[start : start + prompts_per_chunk]
        try:
            results.extend(_generate_chunk(model, tokenizer, chunk, settings, num_samples, synced_gpus))
        except torch.OutOfMemoryError:
            if prompts_per_chunk == 1:
                raise
            prompts_per_chunk //= 2
            torch.cuda.empty_cache()
            log.warning("out of memory while generating: retrying with %d prompts per batch", prompts_per_chunk)
            continue
        start += len(chunk)
    return results


def _generate_chunk(model, tokenizer, prompts, settings, num_samples, synced_gpus) -> list[list[Completion]]:
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(device)
    prompt_width = encoded["input_ids"].shape[1]
    engine = _static_engine(model, settings, synced_gpus, device, prompt_width + settings.max_new_tokens)
    if engine is not None:
        # model.generate pads with EOS when the tokenizer has no pad token; so does the engine.
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        new_tokens = engine.decode(
            encoded["input_ids"], encoded["attention_mask"], settings, num_samples,
            eos_token_ids=[tokenizer.eos_token_id], pad_token_id=pad_id, tokenizer=tokenizer,
            cuda_graphs=settings.cuda_graphs,
        )
    else:
        new_tokens = _hf_generate(model, tokenizer, encoded, settings, num_samples, synced_gpus)[:, prompt_width:]
    prompt_rows = [
        [t for t, keep in zip(ids, mask) if keep]
        for ids, mask in zip(encoded["input_ids"].tolist(), encoded["attention_mask"].tolist())
    ]
    completions = []
    for row, response in enumerate(new_tokens.tolist()):
        prompt_ids = prompt_rows[row // num_samples]
        response_ids, finished = _cut_at_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)
        text = tokenizer.decode(response_ids, skip_special_tokens=True)
        completions.append(Completion(prompt_ids, response_ids, text, finished))
    return [completions[i : i + num_samples] for i in range(0, len(completions), num_samples)]


# Each reason to fall back to model.generate is logged once per process, not once per batch.
_REFUSALS_LOGGED: set[str] = set()


def _static_engine(model, settings, synced_gpus, device, context) -> DecodeEngine | None:
    """The decode engine if ``settings.engine`` asks for it, or, under "auto", if it applies; else None (HF)."""
    if settings.engine == "hf":
        return None
    if settings.engine == "auto" and (synced_gpus or device.type != "cuda"):
        return None
    if synced_gpus:
        raise ValueError("sampling.engine 'static' cannot decode a sharded (FSDP) model: set it to auto or hf")
    try:
        engine = decode_engine(model)
        engine.check_context(context)
    except ValueError as refusal:
        if settings.engine == "static":
            raise
        if str(refusal) not in _REFUSALS_LOGGED:
            _REFUSALS_LOGGED.add(str(refusal))
            log.warning("%s; sampling with model.generate instead", refusal)
        return None
    return engine


def _hf_generate(model, tokenizer, encoded, settings, num_samples, synced_gpus) -> torch.Tensor:
    sampling = {} if settings.greedy else {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    return model.generate(
        **encoded,
        do_sample=not settings.greedy,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens or None,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=settings.stop_strings or None,
        tokenizer=tokenizer if settings.stop_strings else None,
        synced_gpus=synced_gpus,
        use_cache=True,
        **sampling,
    )


def _cut_at_eos(tokens: list[int], eos_id: int, pad_id: int) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; drop the padding `generate` adds after a finished row."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1], True
    # pad == eos for Mistral-style tokenizers is handled above; a distinct pad only ever trails the response.
    if pad_id is not None and pad_id in tokens:
        tokens = tokens[: tokens.index(pad_id)]
    return tokens, False
