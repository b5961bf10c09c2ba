"""The frozen policy that answers questions for Regime W rollouts (``predict``) and Platinum evaluation (``test``).

The module only samples; what is kept of the samples is the business of the callbacks (``RegimeWCollector``,
``PlatinumEval``), so the same module serves both phases and any other sampling a researcher wants to record.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from abel_lightning.data.gsm8k import FILLER_ID
from abel_lightning.models.generation import Answered, Arm, Completion, SamplingSettings, generate
from abel_lightning.models.loading import Quantization, attach_lora, load_base, load_tokenizer
from abel_lightning.compat import attached_trainer
from abel_lightning.distributed import weights_sharded
from abel_lightning.prompts import format_prompt


class PolicyModule(L.LightningModule):
    """Base model + optional LoRA adapter, frozen, sampling ``samples_per_question`` solutions per question.

    With ``arms`` set, each question gets one solution per arm instead (``samples_per_question`` is then unused).
    The adapter is merged into the weights for sampling, which decodes as fast as the base alone; a quantized base
    cannot be merged and keeps the adapter beside it.
    """

    def __init__(
        self,
        model: str = "GAIR/Abel-7B-002",
        adapter: str | None = None,
        dtype: str = "bfloat16",
        quantization: Quantization | None = None,
        sampling: SamplingSettings | None = None,
        samples_per_question: int = 1,
        arms: list[Arm] | None = None,
        max_batch_rows: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.sampling = sampling or SamplingSettings()
        self.arms = arms or []
        self.policy = None
        self.tokenizer = load_tokenizer(model)
        self.tokens_generated = 0
        self.seconds_generating = 0.0

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        base = load_base(hp.model, hp.dtype, hp.quantization, device=self.trainer.strategy.root_device)
        if hp.adapter is not None:
            model = attach_lora(base, lora=None, adapter=hp.adapter, trainable=False)
            base = model if hp.quantization else model.merge_and_unload()
        self.policy = base.eval()

    @property
    def name(self) -> str:
        """What the outputs are called: the adapter folder's name, or ``base``."""
        return Path(self.hparams.adapter).name if self.hparams.adapter else "base"

    def answer(self, batch: dict) -> list[Answered]:
        questions = [dict(zip(batch, values)) for values in zip(*batch.values())]
        started = time.perf_counter()
        if self.arms:
            per_arm = [self._sample(questions, arm.sampling, 1, arm.prompt_template) for arm in self.arms]
            answered = [
                Answered(q, [per_arm[a][i][0] for a in range(len(self.arms))], list(range(len(self.arms))))
                for i, q in enumerate(questions)
            ]
        else:
            k = self.hparams.samples_per_question
            groups = self._sample(questions, self.sampling, k, None)
            answered = [Answered(q, group, [0] * k) for q, group in zip(questions, groups)]
        self.seconds_generating += time.perf_counter() - started
        answered = [a for a in answered if a.question["question_id"] != FILLER_ID]
        self.tokens_generated += sum(len(c.response_ids) for a in answered for c in a.completions)
        return answered

    def _sample(self, questions, sampling, k, template) -> list[list[Completion]]:
        prompts = [q["prompt"] if template is None else format_prompt(q["question"], template) for q in questions]
        return generate(
            self.policy, self.tokenizer, prompts, sampling, k, self.hparams.max_batch_rows,
            synced_gpus=weights_sharded(attached_trainer(self)),
        )

    def predict_step(self, batch: dict, batch_idx: int) -> list[Answered]:
        return self.answer(batch)

    def test_step(self, batch: dict, batch_idx: int) -> list[Answered]:
        return self.answer(batch)
