"""Sampling solutions from a policy: the one generation path that PPO, Regime W rollouts and evaluation share."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class SamplingSettings:
    """How to decode. ``temperature: 0`` means greedy decoding (then ``top_p`` is unused)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    # Text that ends a solution early, e.g. "\nQuestion:" for a base model that goes on to invent the next problem.
    stop_strings: list[str] = field(default_factory=list)

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
    ``synced_gpus`` keeps all ranks stepping together, which sharded (FSDP) models need.
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
    sampling = {} if settings.greedy else {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    output = model.generate(
        **encoded,
        do_sample=not settings.greedy,
        max_new_tokens=settings.max_new_tokens,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=settings.stop_strings or None,
        tokenizer=tokenizer if settings.stop_strings else None,
        synced_gpus=synced_gpus,
        use_cache=True,
        **sampling,
    )
    prompt_width = encoded["input_ids"].shape[1]
    completions = []
    for row, sequence in enumerate(output.tolist()):
        prompt_mask = encoded["attention_mask"][row // num_samples].tolist()
        prompt_ids = [t for t, keep in zip(sequence[:prompt_width], prompt_mask) if keep]
        response_ids, finished = _cut_at_eos(sequence[prompt_width:], tokenizer.eos_token_id, tokenizer.pad_token_id)
        text = tokenizer.decode(response_ids, skip_special_tokens=True)
        completions.append(Completion(prompt_ids, response_ids, text, finished))
    return [completions[i : i + num_samples] for i in range(0, len(completions), num_samples)]


def _cut_at_eos(tokens: list[int], eos_id: int, pad_id: int) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; drop the padding `generate` adds after a finished row."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1], True
    # pad == eos for Mistral-style tokenizers is handled above; a distinct pad only ever trails the response.
    if pad_id is not None and pad_id in tokens:
        tokens = tokens[: tokens.index(pad_id)]
    return tokens, False
