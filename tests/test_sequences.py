"""The padding-free forward: a batch's real tokens packed into one row must score exactly as the padded batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import abel_lightning.models.sequences as sequences
from abel_lightning.models.loading import LoraSettings, attach_lora
from abel_lightning.models.sequences import pack, packing_pays, response_forward
from abel_lightning.models.tiny import build_tokenizer, random_model, randomize_lora


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral"])
def test_packed_forward_matches_the_padded_one_with_gradients(preset, monkeypatch):
    tokenizer = build_tokenizer(["Tom has 3 apples. #### 3"] * 4, 300)
    torch.manual_seed(0)
    policy = attach_lora(random_model(preset, tokenizer), LoraSettings(r=4, alpha=8), None, trainable=True)
    randomize_lora(policy, 0.1)
    # Unequal prompts and responses, one of them empty: padding on both sides.
    batch = pack([[1, 5, 7], [2, 9], [4, 8, 12, 16, 20]], [[4, 6, 8, 10], [3, 11], []], pad_id=0)

    def run():
        policy.zero_grad()
        out = response_forward(policy, batch, temperature=0.7, with_hidden=True)
        out.logprobs.sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return out, grads

    packed, packed_grads = run()
    monkeypatch.setattr(sequences, "packable", lambda config: False)
    padded, padded_grads = run()

    assert policy.config.model_type in ("llama", "mistral") and packing_pays(batch.attention_mask.bool(), policy.config)
    for field in ("logprobs", "entropy", "hidden"):
        torch.testing.assert_close(getattr(packed, field), getattr(padded, field), rtol=1e-5, atol=1e-5)
    assert packed.logprobs.shape == batch.response_mask.shape
    assert (packed.logprobs[batch.response_mask == 0] == 0).all() and (
        packed.logprobs[batch.response_mask == 1] < 0
    ).all()
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 0
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6)


def test_packing_pays_only_where_padding_outweighs_the_longer_attention():
    mistral = SimpleNamespace(hidden_size=4096, intermediate_size=14336)
    full = torch.ones(4, 416, dtype=torch.bool)
    assert not packing_pays(full, mistral)  # nothing to drop, and one row of 1,664 attends over 4x the pairs
    ragged = full.clone()
    ragged[::2, :150] = False  # a third of the grid is padding
    assert packing_pays(ragged, mistral)
    # Sixty-four short sequences: the padding is small beside one 6,000-token row's attention.
    many = torch.ones(64, 100, dtype=torch.bool)
    many[:, :5] = False
    assert not packing_pays(many, mistral)
