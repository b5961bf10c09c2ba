"""Prompt + response token batches and their per-token log-probabilities under a model.

Layout (as ``generate`` produces it): prompts left-padded to a common width P, responses right-padded to a common
width R. Every per-token tensor of the algorithms is ``[batch, R]``: entry t scores response token t, predicted from
the logits at position P + t - 1. Padding lives only at the right of a response, which is what GAE expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.helpers import disable_input_dtype_casting
from torch import Tensor

from abel_lightning.models.architectures import packable
from abel_lightning.models.generation import Completion


@dataclass
class SequenceBatch:
    """``input_ids``/``attention_mask``: ``[B, P + R]``; ``response_mask``: ``[B, R]``, 1 on generated tokens."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_width: int

    @property
    def position_ids(self) -> Tensor:
        # Positions count real tokens only, as `generate` numbers them under left padding; without this the
        # training forward would see shifted positions and the PPO ratio would not start at 1.
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device), self.prompt_width
        )

    def select(self, rows: Tensor | slice) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows], self.prompt_width
        )


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SequenceBatch:
    """Left-pad prompts and right-pad responses into one ``SequenceBatch``."""
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(r) for r in responses))
    rows, attention, response_mask = [], [], []
    for prompt, response in zip(prompts, responses):
        left, right = width_p - len(prompt), width_r - len(response)
        rows.append([pad_id] * left + prompt + response + [pad_id] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        response_mask.append([1] * len(response) + [0] * right)
    return SequenceBatch(
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(attention, dtype=torch.long),
        torch.tensor(response_mask, dtype=torch.float32),
        width_p,
    )


def pack_completions(completions: list[Completion], pad_id: int) -> SequenceBatch:
    return pack([c.prompt_ids for c in completions], [c.response_ids for c in completions], pad_id)


@dataclass
class ForwardOutput:
    """``logprobs``, ``entropy``: ``[B, R]``; ``hidden``: ``[B, R, H]``, the last hidden state that predicts each
    response token (what a value head reads), or None when not asked for."""

    logprobs: Tensor
    entropy: Tensor
    hidden: Tensor | None


def packing_pays(real: Tensor, config) -> bool:
    """Whether one packed row of the real tokens of ``real`` [B, T] costs fewer FLOPs than the padded batch.

    Packing drops the padding but attends over the whole row: the attention kernel takes the block mask but still
    computes every query-key pair, N^2 of them against B x T^2 padded. Per token, a layer's weights cost about
    2 x (4 d^2 + 3 d f) FLOP (d hidden, f MLP width), and each query-key pair 4 d. With equal lengths packing never
    pays; on the 7B DPO bench's pairs of 50-100% lengths it ran 1.65x the padded forward (docs/PERFORMANCE.md).
    """
    d, f = config.hidden_size, config.intermediate_size
    pair = 4 * d / (2 * (4 * d * d + 3 * d * f))  # one query-key pair, in units of one token through the weights
    rows, width = real.shape
    n = int(real.sum())
    return n + pair * n * n < rows * width + pair * rows * width * width


def response_forward(model, batch: SequenceBatch, temperature: float = 1.0, with_hidden: bool = False) -> ForwardOutput:
    """One forward pass: log-probs (of logits / ``temperature``, the distribution that was sampled), entropy, and
    optionally hidden states, over the response tokens only.

    Padding-free where it pays (:func:`packing_pays`): the batch's real tokens run as one packed row (positions
    restarting at each sequence, which the model's causal mask turns into one block per sequence), and the LM head and
    the softmax run only at the positions that predict a response token. Architectures not marked ``packable`` in
    :mod:`abel_lightning.models.architectures` run padded.

    Under autocast (bf16-mixed), LoRA layers take their inputs as they come and autocast casts them once: PEFT would
    first cast the bf16 activations to the float32 of the LoRA weights and autocast would cast them straight back,
    two copies of every LoRA layer's input in the forward and two in the backward (docs/PERFORMANCE.md measures them).
    """
    real = batch.attention_mask.bool()
    responses = batch.response_mask.bool()
    start, width = batch.prompt_width - 1, responses.shape[1]
    # The position that predicts each real response token: the last prompt token, then the response tokens before it.
    predicting = torch.zeros_like(real)
    predicting[:, start : start + width] = responses
    packed = packable(model.config) and packing_pays(real, model.config)
    with disable_input_dtype_casting(model, active=torch.is_autocast_enabled(batch.input_ids.device.type)):
        if packed:
            keep = (real.flatten().cumsum(0) - 1).view_as(real)[predicting]  # their indices in the packed row
            inputs = {
                "input_ids": batch.input_ids[real][None],
                "position_ids": batch.position_ids[real][None],
                "logits_to_keep": keep,
            }
        else:
            inputs = {
                "input_ids": batch.input_ids,
                "attention_mask": batch.attention_mask,
                "position_ids": batch.position_ids,
            }
        output = model(**inputs, output_hidden_states=with_hidden, use_cache=False)
    # Each predicting position's logits (and last hidden state), in row-major order.
    logits = (output.logits[0] if packed else output.logits[predicting]).float()
    hidden = None
    if with_hidden:
        hidden = output.hidden_states[-1][0, keep] if packed else output.hidden_states[-1][predicting]
    if temperature > 0:
        logits = logits / temperature
    targets = batch.input_ids[:, start + 1 : start + 1 + width][responses]
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    with torch.no_grad():  # entropy is logged, never optimised: keep its [N, V] intermediates out of autograd
        entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return ForwardOutput(
        _on_grid(logprobs, responses),
        _on_grid(entropy, responses),
        _on_grid(hidden, responses) if with_hidden else None,
    )


def _on_grid(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` [N, ...], one per True of ``mask`` [B, R] in row-major order, laid out as [B, R, ...], 0 elsewhere."""
    mask = mask.view(*mask.shape, *[1] * (values.dim() - 1))
    return values.new_zeros(*mask.shape[:2], *values.shape[1:]).masked_scatter(mask, values)


def sequence_logprobs(model, batch: SequenceBatch) -> Tensor:
    """Sum of response-token log-probs per row (``[B]``), the quantity DPO compares."""
    return response_forward(model, batch).logprobs.sum(-1)
