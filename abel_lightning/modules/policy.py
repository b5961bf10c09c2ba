"""The frozen policy that answers questions for Regime W rollouts (``predict``) and Platinum evaluation (``test``).

The module only samples; what is kept of the samples is the business of the callbacks (``RegimeWCollector``,
``PlatinumEval``), so the same module serves both phases and any other sampling a researcher wants to record.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from abel_lightning.bandit import ALLOCATIONS, Arm, ArmAllocation
from abel_lightning.compat import attached_trainer
from abel_lightning.distributed import weights_sharded
from abel_lightning.models.generation import Answered, SamplingSettings, generate
from abel_lightning.models.loading import Quantization, attach_lora, load_base, load_tokenizer
from abel_lightning.prompts import format_prompt


class PolicyModule(L.LightningModule):
    """Base model + optional LoRA adapter, frozen, sampling ``samples_per_question`` (k) solutions per question.

    Without ``arms`` every sample uses ``sampling`` (one arm, named ``default``; k defaults to 1). With ``arms``
    (Regime W's bandit, docs/REGIME_W.md) k defaults to one per arm, ``allocation`` decides which arm draws each of
    a question's k samples (``uniform``: round robin, so k = 2 x arms gives two each), and all arms of a batch's
    questions decode in one batch, each row with its arm's settings and prompt.
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
        samples_per_question: int | None = None,
        arms: list[Arm] | None = None,
        allocation: str | ArmAllocation = "uniform",
        seed: int = 0,
        max_batch_rows: int | None = None,
    ):
        """
        Args:
            sampling: the decoding settings without ``arms``.
            samples_per_question: k; None: one per arm (1 without arms).
            arms: Regime W's sampling strategies; an arm without a name is called ``arm<index>``.
            allocation: ``uniform``, ``ucb``, ``thompson`` or a class_path to an ``ArmAllocation``.
            seed: the allocation's seed (its random draws depend on it and the question id only).
            max_batch_rows: cap on rows (questions x samples) decoded at once, halved on out-of-memory.
        """
        super().__init__()
        self.save_hyperparameters()
        self.sampling = sampling or SamplingSettings()
        given = arms or [Arm("default", self.sampling)]
        self.arms = [Arm(arm.name or f"arm{i}", arm.sampling, arm.prompt_template) for i, arm in enumerate(given)]
        self.samples_per_question = samples_per_question or (len(arms) if arms else 1)
        if self.samples_per_question < 1:
            raise ValueError(f"PolicyModule: samples_per_question must be at least 1, got {samples_per_question}")
        self.allocation = ALLOCATIONS.resolve(allocation, seed=seed)
        self.allocation.reset(len(self.arms))
        self.policy = None
        self.tokenizer = load_tokenizer(model)

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
        """Each question's k samples, the arms given by the allocation, all decoded in one ``generate`` call."""
        questions = [dict(zip(batch, values)) for values in zip(*batch.values())]
        choices = [self.allocation.allocate(q["question_id"], self.samples_per_question) for q in questions]
        rows = [(q, self.arms[a]) for q, chosen in zip(questions, choices) for a in chosen]
        prompts = [
            q["prompt"] if arm.prompt_template is None else format_prompt(q["question"], arm.prompt_template)
            for q, arm in rows
        ]
        completions = generate(
            self.policy,
            self.tokenizer,
            prompts,
            [arm.sampling for _, arm in rows],
            1,
            self.hparams.max_batch_rows,
            synced_gpus=weights_sharded(attached_trainer(self)),
        )
        k = self.samples_per_question
        answered = []
        for i, (question, chosen) in enumerate(zip(questions, choices)):
            arms = [self.arms[a] for a in chosen]
            answered.append(
                Answered(
                    question,
                    [group[0] for group in completions[i * k : (i + 1) * k]],
                    chosen,
                    [arm.name for arm in arms],
                    [arm.sampling.temperature for arm in arms],
                )
            )
        return answered

    def observe(self, records: list[dict]) -> None:
        """Teach the allocation the outcome of written ROLLOUT records (the collector calls this per batch, and with
        the records already on disk when a run resumes)."""
        for record in records:
            for trajectory in record["trajectories"]:
                arm, name = trajectory["arm"], trajectory.get("arm_name")
                if arm >= len(self.arms) or (name is not None and name != self.arms[arm].name):
                    raise ValueError(
                        f"{record['question_id']}: a trajectory of arm {arm} ({name!r}) does not match this run's arms "
                        f"{[a.name for a in self.arms]}: resume with the arms that wrote the file, or write to a new "
                        "one"
                    )
                self.allocation.observe(arm, trajectory["correct"], trajectory["reward"])

    def restore_allocation(self, records: list[dict]) -> None:
        """The allocation's state after ``records``, from scratch: what a killed run had learned, from its file."""
        self.allocation.reset(len(self.arms))
        self.observe(records)

    def predict_step(self, batch: dict, batch_idx: int) -> list[Answered]:
        return self.answer(batch)

    def test_step(self, batch: dict, batch_idx: int) -> list[Answered]:
        return self.answer(batch)
