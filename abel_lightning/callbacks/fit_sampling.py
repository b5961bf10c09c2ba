"""Sampling from a training module's policy inside ``fit``, where no predict/test loop serves the questions."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L

from abel_lightning.data.gsm8k import shard_questions
from abel_lightning.distributed import weights_sharded
from abel_lightning.models.generation import Answered, SamplingSettings, generate


def answer_with_policy(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    questions: list[dict],
    sampling: SamplingSettings,
    samples_per_question: int,
    batch_size: int,
) -> Iterator[list[Answered]]:
    """Sample from a training module's ``policy``/``tokenizer`` on this rank's share of ``questions``, batch by batch.

    For sampling inside ``fit`` (after PPO, or evaluating every N steps), where no predict/test loop serves the
    questions. Rank r takes ``questions[r::world_size]``. Under FSDP the decoding is synchronized across ranks, so a
    share shorter than the largest is topped up with the filler question (the recorder drops its answers): every rank
    then makes the same ``generate`` calls. The policy is put in eval mode (no dropout) and returned to its previous
    mode afterwards.
    """
    sharded = weights_sharded(trainer)
    served, shard = shard_questions(questions, trainer.world_size, trainer.global_rank, even=sharded)
    share = [served[i] for i in shard]
    policy = pl_module.policy
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, len(share), batch_size):
            chunk = share[start : start + batch_size]
            groups = generate(
                policy,
                pl_module.tokenizer,
                [q["prompt"] for q in chunk],
                sampling,
                samples_per_question,
                synced_gpus=sharded,
            )
            k = samples_per_question
            yield [Answered(q, g, [0] * k, ["default"] * k, [sampling.temperature] * k) for q, g in zip(chunk, groups)]
    finally:
        policy.train(was_training)
