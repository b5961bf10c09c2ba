"""Sampling solutions from a policy: the one generation path that PPO, Regime W rollouts and evaluation share."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.stopping_criteria import StopStringCriteria

from abel_lightning.models.decode_engine import DecodeEngine, decode_engine, nucleus_tail

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
class Answered:
    """A question with its sampled completions: ``completions[i]`` came from arm ``arms[i]`` (its index in the
    sampler's arms), named ``arm_names[i]``, at ``temperatures[i]``."""

    question: dict
    completions: list[Completion]
    arms: list[int]
    arm_names: list[str]
    temperatures: list[float]


@torch.no_grad()
def generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    settings: SamplingSettings | Sequence[SamplingSettings],
    samples_per_question: int = 1,
    max_batch_rows: int | None = None,
    synced_gpus: bool = False,
) -> list[list[Completion]]:
    """Sample ``samples_per_question`` completions for each prompt; returns one list of completions per prompt.

    ``settings`` is one setting for every prompt, or one per prompt (``settings[i]`` decodes prompt ``i``): rows of
    different temperatures, ``top_p``, lengths and stop strings then decode side by side in one batch, which is how
    Regime W's arms share a decode. Each completion is cut at its own setting's ``max_new_tokens``.
    Prompts are decoded in chunks of at most ``max_batch_rows`` rows (prompts x samples). When the GPU runs out of
    memory the chunk is halved and retried, and the smaller size is kept for the rest of the call.
    ``synced_gpus`` keeps all ranks stepping together, which sharded (FSDP) models need: it implies ``model.generate``.
    ``settings.engine`` picks the decoder: on a GPU, by default, the static decode engine (``decode_engine``), whose
    completions are those ``model.generate`` would give (token for token under greedy decoding).
    """
    per_prompt = [settings] * len(prompts) if isinstance(settings, SamplingSettings) else list(settings)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"generate got {len(prompts)} prompts but {len(per_prompt)} sampling settings: give one each")
    rows_per_chunk = max_batch_rows or len(prompts) * samples_per_question
    prompts_per_chunk = max(1, rows_per_chunk // samples_per_question)
    results: list[list[Completion]] = []
    start = 0
    while start < len(prompts):
        chunk = slice(start, start + prompts_per_chunk)
        try:
            results.extend(
                _generate_chunk(model, tokenizer, prompts[chunk], per_prompt[chunk], samples_per_question, synced_gpus)
            )
        except torch.OutOfMemoryError:
            if prompts_per_chunk == 1:
                raise
            prompts_per_chunk //= 2
            torch.cuda.empty_cache()
            log.warning("out of memory while generating: retrying with %d prompts per batch", prompts_per_chunk)
            continue
        start += len(prompts[chunk])
    return results


def _generate_chunk(model, tokenizer, prompts, per_prompt, samples_per_question, synced_gpus) -> list[list[Completion]]:
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(device)
    prompt_width = encoded["input_ids"].shape[1]
    # One setting for all rows decodes exactly as before per-row settings existed (and as model.generate does).
    settings = per_prompt[0] if all(s == per_prompt[0] for s in per_prompt) else per_prompt
    lead = per_prompt[0]
    for other in per_prompt:
        if (other.engine, other.cuda_graphs) != (lead.engine, lead.cuda_graphs):
            raise ValueError("the sampling settings decoded in one batch must agree on engine and cuda_graphs")
    max_new_tokens = max(s.max_new_tokens for s in per_prompt)
    engine = _static_engine(model, lead, synced_gpus, device, prompt_width + max_new_tokens)
    if engine is not None:
        # model.generate pads with EOS when the tokenizer has no pad token; so does the engine.
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        new_tokens = engine.decode(
            encoded["input_ids"],
            encoded["attention_mask"],
            settings,
            samples_per_question,
            eos_token_ids=[tokenizer.eos_token_id],
            pad_token_id=pad_id,
            tokenizer=tokenizer,
            cuda_graphs=lead.cuda_graphs,
        )
    else:
        generated = _hf_generate(model, tokenizer, encoded, settings, samples_per_question, synced_gpus)
        new_tokens = generated[:, prompt_width:]
    prompt_rows = [
        [t for t, keep in zip(ids, mask) if keep]
        for ids, mask in zip(encoded["input_ids"].tolist(), encoded["attention_mask"].tolist())
    ]
    completions = []
    for row, response in enumerate(new_tokens.tolist()):
        prompt = row // samples_per_question
        limit = per_prompt[prompt].max_new_tokens
        response_ids, finished = _cut_at_eos(response[:limit], tokenizer.eos_token_id, tokenizer.pad_token_id)
        text = tokenizer.decode(response_ids, skip_special_tokens=True)
        completions.append(Completion(prompt_rows[prompt], response_ids, text, finished))
    return [completions[i : i + samples_per_question] for i in range(0, len(completions), samples_per_question)]


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


def _hf_generate(model, tokenizer, encoded, settings, samples_per_question, synced_gpus) -> torch.Tensor:
    """``model.generate`` with one setting, or with one per prompt through :class:`RowSampling` and
    :class:`RowStopping` (``generate`` itself takes one temperature, top_p, length and stop list for the batch)."""
    common = {
        "num_return_sequences": samples_per_question,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "synced_gpus": synced_gpus,
        "use_cache": True,
    }
    if isinstance(settings, SamplingSettings):
        sampling = {} if settings.greedy else {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        return model.generate(
            **encoded,
            do_sample=not settings.greedy,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens or None,
            stop_strings=settings.stop_strings or None,
            tokenizer=tokenizer if settings.stop_strings else None,
            **common,
            **sampling,
        )
    rows = [s for s in settings for _ in range(samples_per_question)]
    device = encoded["input_ids"].device
    prompt_width = encoded["input_ids"].shape[1]
    return model.generate(
        **encoded,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max(s.max_new_tokens for s in rows),
        logits_processor=LogitsProcessorList([RowSampling(rows, prompt_width, tokenizer.eos_token_id, device)]),
        stopping_criteria=StoppingCriteriaList([RowStopping(rows, prompt_width, tokenizer, device)]),
        **common,
    )


class RowSampling(LogitsProcessor):
    """Each row's own temperature, top_p (0 temperature: greedy) and min_new_tokens, for ``model.generate`` run with
    ``do_sample=True, temperature=1, top_p=1, top_k=0``: the scores it returns are then sampled as they are."""

    def __init__(self, rows: list[SamplingSettings], prompt_width: int, eos_id: int, device):
        self.greedy = torch.tensor([s.greedy for s in rows], device=device)
        self.temperature = torch.tensor([[1.0 if s.greedy else s.temperature] for s in rows], device=device)
        self.top_p = torch.tensor([[s.top_p] for s in rows], device=device)
        self.nucleus = any(s.top_p < 1 and not s.greedy for s in rows)
        self.min_new_tokens = torch.tensor([s.min_new_tokens for s in rows], device=device)
        self.prompt_width, self.eos_id = prompt_width, eos_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        early = input_ids.shape[1] - self.prompt_width < self.min_new_tokens
        scores[:, self.eos_id] = scores[:, self.eos_id].masked_fill(early, float("-inf"))
        best = scores.argmax(-1, keepdim=True)
        scores = scores / self.temperature
        if self.nucleus:
            scores = scores.masked_fill(nucleus_tail(scores, self.top_p), float("-inf"))
        # A greedy row keeps only its best token, so the draw is that token.
        only_best = torch.full_like(scores, float("-inf")).scatter(-1, best, 0.0)
        return torch.where(self.greedy[:, None], only_best, scores)


class RowStopping(StoppingCriteria):
    """Ends each row at its own stop strings and its own ``max_new_tokens``."""

    def __init__(self, rows: list[SamplingSettings], prompt_width: int, tokenizer, device):
        self.limits = torch.tensor([s.max_new_tokens for s in rows], device=device)
        self.stops = []
        for strings in {tuple(s.stop_strings) for s in rows if s.stop_strings}:
            mask = torch.tensor([tuple(s.stop_strings) == strings for s in rows], device=device)
            self.stops.append((StopStringCriteria(tokenizer, list(strings)), mask))
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        ended = input_ids.shape[1] - self.prompt_width >= self.limits
        for criterion, mask in self.stops:
            ended = ended | (criterion(input_ids, scores) & mask)
        return ended


def _cut_at_eos(tokens: list[int], eos_id: int, pad_id: int) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; drop the padding `generate` adds after a finished row."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1], True
    # pad == eos for Mistral-style tokenizers is handled above; a distinct pad only ever trails the response.
    if pad_id is not None and pad_id in tokens:
        tokens = tokens[: tokens.index(pad_id)]
    return tokens, False
