"""Preference pairs for DPO, tokenized with the policy's own tokenizer and served as one concatenated batch.

A pairs file is JSONL in the PAIR schema (``question_id, prompt, chosen, rejected, kind, reward_gap``), as Phase 3
(:func:`abel_lightning.preferences.write_preferences`) writes it. Each pair is identified by its ``index``: its 0-based
position among the file's records, the key of the reference log-prob cache (:mod:`abel_lightning.modules.dpo`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from abel_lightning.data.train_order import TrainLoader
from abel_lightning.fingerprints import update_with_file
from abel_lightning.jsonl import EmptyJsonlError, JsonlError, iter_numbered_jsonl
from abel_lightning.models.sequences import SequenceBatch, pack
from abel_lightning.preferences import pair_problem, write_preferences
from abel_lightning.schemas import PAIR, PAIR_KINDS

log = logging.getLogger(__name__)

Tokens = tuple[list[int], list[int]]


@dataclass
class EncodedPair:
    """One pair as token ids; ``chosen`` and ``rejected`` are ``(prompt ids, response ids)`` each."""

    index: int
    question_id: str
    chosen: Tokens
    rejected: Tokens


@dataclass
class PreferenceBatch:
    """``sequences``: ``2B`` rows, the ``B`` chosen responses then the ``B`` rejected ones, so that both go through
    one forward pass; ``index``: ``[B]``, the pairs' indices in the pairs file."""

    sequences: SequenceBatch
    index: Tensor


def encode_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_prompt_length: int, max_length: int
) -> Tokens:
    """Token ids of ``prompt`` and ``response`` as the model reads them one after the other.

    The two are tokenized together and split where the prompt's own tokens stop matching: tokenized alone, a
    SentencePiece response would gain a word-start marker on its first token that the model never generated after the
    prompt. EOS ends the response (the generator stopped there, and DPO should learn where to stop). The prompt is cut
    from the left to ``max_prompt_length`` tokens (the question's end and the template's cue stay), the response from
    the right so that the whole fits in ``max_length``.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + response)["input_ids"]
    split = 0
    while split < min(len(prompt_ids), len(full_ids)) and prompt_ids[split] == full_ids[split]:
        split += 1
    prompt_part = full_ids[:split][-max_prompt_length:]
    response_part = (full_ids[split:] + [tokenizer.eos_token_id])[: max_length - len(prompt_part)]
    return prompt_part, response_part


def encode_pairs(
    records: list[dict], indices: list[int], tokenizer: PreTrainedTokenizerBase, max_prompt_length: int, max_length: int
) -> list[EncodedPair]:
    return [
        EncodedPair(
            index=index,
            question_id=record["question_id"],
            chosen=encode_response(tokenizer, record["prompt"], record["chosen"], max_prompt_length, max_length),
            rejected=encode_response(tokenizer, record["prompt"], record["rejected"], max_prompt_length, max_length),
        )
        for index, record in zip(indices, records)
    ]


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> PreferenceBatch:
    sides = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    return PreferenceBatch(
        sequences=pack([prompt for prompt, _ in sides], [response for _, response in sides], pad_id),
        index=torch.tensor([pair.index for pair in pairs], dtype=torch.long),
    )


def held_out_questions(question_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the distinct questions (at least one when ``fraction > 0``), all of whose pairs go to
    validation: pairs of one question share their prompt, so splitting by pair would leak it into training."""
    distinct = sorted(set(question_ids))
    if fraction <= 0 or len(distinct) < 2:
        return set()
    count = min(len(distinct) - 1, max(1, math.ceil(fraction * len(distinct))))
    return set(random.Random(seed).sample(distinct, count))


class PreferenceDataModule(L.LightningDataModule):
    """Serves a pairs file to DPO: a seeded held-out slice for validation, the rest shuffled for training.

    Tokenization needs the policy's tokenizer, so ``setup`` takes it from the LightningModule (``tokenizer``
    attribute) rather than loading one by name: the module already loads it with the model, and the two can then never
    disagree. Batches stay tensors only, so ``training_step`` reads like the algorithm.
    """

    def __init__(
        self,
        pairs: str = "data/abel_coherence_preferences.jsonl",
        rollouts: str | None = "data/abel_regime_w_rollouts.jsonl",
        threshold: float = 0.01,
        kinds: list[str] | None = None,
        max_prompt_length: int = 512,
        max_length: int = 1024,
        batch_size: int = 2,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
    ):
        """
        Args:
            pairs: the preference pairs (JSONL, PAIR schema).
            rollouts: Regime W rollouts to build ``pairs`` from when that file does not exist yet; None never builds.
            threshold: minimum reward gap of a coherence pair, when building.
            kinds: train on these kinds only (``correctness``, ``coherence``); None keeps all.
            max_prompt_length: prompt tokens kept (from the end).
            max_length: prompt + response tokens kept (the response is cut at the end).
            batch_size: pairs per device and step; each pair is two sequences.
            val_fraction: share of the questions held out for validation; 0 disables validation.
            seed: seed of the held-out slice and of the training order.
            num_workers: DataLoader workers.
        """
        super().__init__()
        self.save_hyperparameters()
        if kinds is not None and not set(kinds) <= set(PAIR_KINDS):
            raise ValueError(f"kinds {kinds}: each must be one of {list(PAIR_KINDS)}")
        if max_length <= max_prompt_length:
            raise ValueError(f"max_length ({max_length}) must exceed max_prompt_length ({max_prompt_length})")
        self.pairs_path = Path(pairs)
        self.pad_id: int | None = None
        # sha256 of what fixes the served token sequences (set in setup): the reference cache's key includes it.
        self.fingerprint: str | None = None
        self.train_pairs: list[EncodedPair] = []
        self.val_pairs: list[EncodedPair] = []

    def prepare_data(self) -> None:
        rollouts = self.hparams.rollouts
        if not self.pairs_path.exists() and rollouts is not None and Path(rollouts).exists():
            write_preferences(rollouts, self.pairs_path, self.hparams.threshold)

    def setup(self, stage: str) -> None:
        if self.train_pairs or self.val_pairs:
            return
        hp = self.hparams
        if not self.pairs_path.exists():
            raise FileNotFoundError(
                f"{self.pairs_path}: no preference pairs, and no rollouts to build them from ({hp.rollouts}); run "
                "`abel-lightning preferences` or point data.init_args.pairs at a pairs file"
            )
        records = read_pairs(self.pairs_path)
        self.fingerprint = _fingerprint(self.pairs_path, hp.kinds, hp.max_prompt_length, hp.max_length)
        kept = [i for i, record in enumerate(records) if hp.kinds is None or record["kind"] in hp.kinds]
        if not kept:
            raise ValueError(f"{self.pairs_path}: no pairs of kinds {hp.kinds} among its {len(records)} pairs")
        tokenizer = self.trainer.lightning_module.tokenizer
        self.pad_id = tokenizer.pad_token_id
        encoded = encode_pairs([records[i] for i in kept], kept, tokenizer, hp.max_prompt_length, hp.max_length)
        held_out = held_out_questions([pair.question_id for pair in encoded], hp.val_fraction, hp.seed)
        self.train_pairs = [pair for pair in encoded if pair.question_id not in held_out]
        self.val_pairs = [pair for pair in encoded if pair.question_id in held_out]
        log.info("%s: %d training and %d validation pairs", self.pairs_path, len(self.train_pairs), len(self.val_pairs))

    @property
    def all_pairs(self) -> list[EncodedPair]:
        """Training and validation pairs: everything the reference log-probs are needed for."""
        return self.train_pairs + self.val_pairs

    def train_dataloader(self) -> DataLoader:
        # TrainLoader: 2 devices x 1 pair train exactly like 1 device x 2 pairs, and a resume goes on from its place.
        hp = self.hparams
        return TrainLoader(
            self.train_pairs,
            self.trainer,
            hp.batch_size,
            hp.seed,
            collate_fn=self._collate(),
            num_workers=hp.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_pairs:
            return []
        hp = self.hparams
        return DataLoader(
            self.val_pairs, batch_size=hp.batch_size, collate_fn=self._collate(), num_workers=hp.num_workers
        )

    def _collate(self) -> partial:
        # A partial, not a bound method: worker processes then need not pickle the datamodule and its trainer.
        return partial(collate_pairs, pad_id=self.pad_id)


def read_pairs(path: Path) -> list[dict]:
    """The pairs of a pairs file (the PAIR schema), refusing an empty file and any pair DPO cannot learn from
    (:func:`abel_lightning.preferences.pair_problem`: a blank response, chosen equal to rejected)."""
    records = []
    for line, record in iter_numbered_jsonl(path, PAIR):
        problem = pair_problem(record)
        if problem is not None:
            field, expected = problem
            raise JsonlError(path, line, field, expected, record[field])
        records.append(record)
    if not records:
        raise EmptyJsonlError(path, "run Phase 3 (`abel-lightning preferences`) on rollouts that have pairs to give")
    return records


def _fingerprint(path: Path, kinds: list[str] | None, max_prompt_length: int, max_length: int) -> str:
    """sha256 of the pairs file's bytes, the kinds kept and the truncation lengths."""
    digest = hashlib.sha256()
    update_with_file(digest, path)
    settings = {"kinds": kinds, "max_prompt_length": max_prompt_length, "max_length": max_length}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()
