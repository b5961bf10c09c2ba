"""Phase 5: GSM8K Platinum evaluation. Writes one EVAL record per question to
``<output_dir>/<name>_platinum_eval.jsonl`` (resumably, see :mod:`abel_lightning.callbacks.resumable_jsonl`) and
reports the accuracy over the whole file.

    abel-lightning test --config configs/eval.yaml [--model.adapter checkpoints/abel_dpo_lora]

Inside ``fit`` (``every_n_steps > 0``) it evaluates the training module's ``policy`` greedily on a fixed subset every
N optimizer steps, writes ``<name>_step<N>_platinum_eval.jsonl`` and logs ``val/platinum_accuracy``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from torchmetrics import SumMetric

from abel_lightning.answers import ANSWER_CHECKERS, AnswerChecker
from abel_lightning.callbacks.recorder import ResumableRecorder
from abel_lightning.compat import set_callback_metric
from abel_lightning.data.gsm8k import load_questions
from abel_lightning.models.generation import Answered, SamplingSettings
from abel_lightning.schemas import EVAL

SUFFIX = "_platinum_eval.jsonl"


def eval_record(answered: Answered, checker: AnswerChecker) -> dict:
    """One question's EVAL record from its single completion."""
    if len(answered.completions) != 1:
        raise ValueError(
            f"{answered.question['question_id']}: evaluation scores one solution per question, got "
            f"{len(answered.completions)}; set model.samples_per_question: 1 and no arms"
        )
    question, completion = answered.question, answered.completions[0]
    answer = checker.extract(completion.text)
    return {
        "question_id": question["question_id"],
        "question": question["question"],
        "gold_answer": question["gold_answer"],
        "completion": completion.text,
        "answer": answer,
        "correct": checker.is_correct(answer, question["gold_answer"]),
        "num_tokens": completion.num_tokens,
    }


class PlatinumEval(ResumableRecorder):
    """Greedy GSM8K Platinum accuracy of a policy, per question on disk and as one number.

    The accuracy is a pair of ``SumMetric`` (correct, answered) that each rank updates with the questions it answered
    in this run, and rank 0 also with the records an interrupted earlier run left on disk; ``compute()`` sums over the
    ranks, so any number of ranks, and any number of restarts, report the accuracy over every question in the file.
    After ``trainer.test`` it is in ``trainer.callback_metrics["platinum_accuracy"]``, in ``self.accuracy`` and in the
    loggers.
    """

    stage = "test"
    schema = EVAL

    def __init__(
        self,
        output_dir: str = "outputs",
        name: str | None = None,
        every_n_steps: int = 0,
        dataset: str = "madrylab/gsm8k-platinum",
        split: str = "test",
        n_samples: int | None = 200,
        seed: int = 0,
        batch_size: int = 8,
        max_new_tokens: int = 512,
        prompt_template: str = "abel",
        log_every_n_batches: int = 10,
        answer_checker: str | AnswerChecker = "gsm8k",
    ):
        """
        Args:
            output_dir: where ``<name>_platinum_eval.jsonl`` (and the in-fit ``<name>_step<N>_...`` files) go.
            name: the model's name in file names; None takes ``pl_module.name`` (the adapter folder's name, or
                ``base``).
            every_n_steps: inside ``fit``, evaluate every this many optimizer steps (0: never).
            dataset: in-fit only (``test`` takes the datamodule's questions): a GSM8K-format hub id or JSONL path.
            split: in-fit only: the dataset split.
            n_samples: in-fit only: size of the fixed (seeded) subset of questions; None takes them all.
            seed: in-fit only: the subset's seed.
            batch_size: in-fit only: questions per ``generate`` call.
            max_new_tokens: in-fit only: greedy decoding length limit.
            prompt_template: in-fit only: the prompt template of the questions.
            log_every_n_batches: without a progress bar, log the rates every this many batches (0: never).
            answer_checker: what reads and judges each answer: ``gsm8k`` (the default), ``math_verify``, or a
                class_path to an ``abel_lightning.answers.AnswerChecker``.
        """
        super().__init__(log_every_n_batches)
        self.output_dir = Path(output_dir)
        self.checker: AnswerChecker = ANSWER_CHECKERS.resolve(answer_checker)
        self.name = name
        self.every_n_steps = every_n_steps
        self.dataset = dataset
        self.split = split
        self.n_samples = n_samples
        self.seed = seed
        self.batch_size = batch_size
        self.sampling = SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens)
        self.prompt_template = prompt_template
        self.accuracy: float | None = None
        self._fit_questions: list[dict] = []
        self._last_step = -1
        self._correct = SumMetric()
        self._answered = SumMetric()

    def model_name(self, pl_module: L.LightningModule) -> str:
        """``name``, else ``pl_module.name``, else the class name without ``Module`` (``PPOModule`` -> ``ppo``)."""
        if self.name is not None:
            return self.name
        name = getattr(pl_module, "name", None)
        return name if isinstance(name, str) else type(pl_module).__name__.removesuffix("Module").lower()

    def output_path(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        return self.output_dir / f"{self.model_name(pl_module)}{SUFFIX}"

    def to_records(self, answered: list[Answered]) -> list[dict]:
        return [eval_record(a, self.checker) for a in answered]

    # -- accuracy -----------------------------------------------------------------------------------------------------

    def start(self, trainer: L.Trainer, path: Path) -> None:
        super().start(trainer, path)
        device = trainer.strategy.root_device
        self._correct = SumMetric().to(device)
        self._answered = SumMetric().to(device)
        # Every rank read the same earlier records; counting them on one rank counts them once.
        if trainer.is_global_zero and self.earlier:
            self.on_records(self.earlier)

    def on_records(self, records: list[dict]) -> None:
        device = self._correct.device
        self._correct.update(torch.tensor(float(sum(r["correct"] for r in records)), device=device))
        self._answered.update(torch.tensor(float(len(records)), device=device))

    def summarize(self, trainer: L.Trainer, pl_module: L.LightningModule, merged: list[dict] | None, run: dict) -> None:
        # compute() is a collective (sums the states of all ranks): every rank must get here.
        correct, answered = self._correct.compute(), self._answered.compute()
        accuracy = correct / answered if answered > 0 else torch.tensor(float("nan"), device=correct.device)
        self.accuracy = accuracy.item()
        if trainer.training:
            metric_name = "val/platinum_accuracy"
            pl_module.log(metric_name, accuracy)
        else:
            # The test loop is over (see callbacks.recorder: the merge runs in teardown), so self.log is closed:
            # the value goes to the loggers and to callback_metrics directly.
            metric_name = "platinum_accuracy"
            set_callback_metric(trainer, metric_name, accuracy)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics({metric_name: self.accuracy}, step=trainer.global_step)
        if trainer.is_global_zero:
            Console().print(
                f"[bold]{metric_name}[/bold] {self.accuracy:.4f} ({int(correct)}/{int(answered)}) "
                f"-> {self.writer.path}; this run: {run['questions']} questions, {run['questions_per_s']:.2f} "
                f"questions/s, {run['tokens_per_s']:.0f} tokens/s"
            )

    # -- inside fit ---------------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.every_n_steps > 0:
            self._fit_questions = load_questions(
                self.dataset, self.split, self.n_samples, self.seed, self.prompt_template
            )
        super().setup(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # global_step counts optimizer steps; with gradient accumulation several batches end on the same step.
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        path = self.output_dir / f"{self.model_name(pl_module)}_step{step}{SUFFIX}"
        self.record_from_policy(trainer, pl_module, path, self._fit_questions, self.sampling, 1, self.batch_size)
