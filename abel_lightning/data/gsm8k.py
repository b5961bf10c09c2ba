"""GSM8K and GSM8K-Platinum questions, from the Hugging Face hub or a local JSONL file.

Every question is served as ``{question_id, question, gold_answer, prompt}``. ``question_id`` is ``"<split>/<row>"``
with the 0-based row of the source, so it is stable across runs, subsets and ranks: resumable phases key on it.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from abel_lightning.answers import extract_gold
from abel_lightning.data.toy import TOY_DATASET, toy_splits
from abel_lightning.data.train_order import TrainLoader
from abel_lightning.distributed import weights_sharded
from abel_lightning.hub_ids import require_local_exists
from abel_lightning.jsonl import EmptyJsonlError, JsonlError, iter_numbered_jsonl
from abel_lightning.prompts import format_prompt

SOURCE_ROW = {"question": str, "answer": str}
# Platinum's authors drop the questions they judged ill-posed; their release marks them so.
DROPPED_STATUSES = {"rejected"}


def load_questions(
    dataset: str,
    split: str = "train",
    n_samples: int | None = None,
    seed: int = 0,
    prompt_template: str = "abel",
    hub_config: str = "main",
) -> list[dict]:
    """Read a GSM8K-format dataset and return its questions in source order.

    ``dataset`` is a ``.jsonl`` file, a folder holding ``<split>.jsonl``, ``builtin:toy`` (the toy task, generated in
    memory: 2,000 train and 200 test problems, seed 0) or a hub id. ``n_samples`` takes a seeded
    random subset (the same rows for the same seed, kept in source order).
    """
    rows = list(_read_rows(dataset, split, hub_config))
    if not rows:
        raise EmptyJsonlError(dataset, f"split {split!r} has no questions: point data.init_args.dataset at GSM8K rows")
    questions = []
    for row_index, (row, where) in enumerate(rows):
        if row.get("cleaning_status") in DROPPED_STATUSES:
            continue
        try:
            gold = extract_gold(row["answer"])
        except ValueError as error:
            raise JsonlError(
                where[0], where[1], "answer", f"a solution ending in '#### N' ({error})", row["answer"][-40:]
            ) from None
        questions.append(
            {
                "question_id": f"{split}/{row_index}",
                "question": row["question"],
                "gold_answer": gold,
                "prompt": format_prompt(row["question"], prompt_template),
            }
        )
    if n_samples is not None and n_samples < len(questions):
        keep = sorted(random.Random(seed).sample(range(len(questions)), n_samples))
        questions = [questions[i] for i in keep]
    return questions


def _read_rows(dataset: str, split: str, hub_config: str):
    """Yield ``(row, (file, line))`` pairs; ``line`` is 1-based, for error messages."""
    if dataset == TOY_DATASET:
        splits = toy_splits()
        if split not in splits:
            raise ValueError(f"{dataset} has the splits {sorted(splits)}, not {split!r}; set data.init_args.split")
        for index, row in enumerate(splits[split]):
            yield row, (f"{dataset}[{split}]", index + 1)
        return
    path = Path(dataset)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if path.suffix == ".jsonl" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such dataset file (expected GSM8K-format JSONL: question, answer)")
        for line, row in iter_numbered_jsonl(path, SOURCE_ROW):
            yield row, (str(path), line)
        return
    instead = f"give a GSM8K-format .jsonl file, a folder of <split>.jsonl files, {TOY_DATASET} or a hub id"
    require_local_exists(dataset, "dataset", instead)
    if "/" not in dataset:  # a hub id is "<owner>/<name>"
        raise FileNotFoundError(f"{dataset}: neither a local JSONL file/folder nor a hub dataset id")
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError(
            f"loading {dataset} from the hub needs the `datasets` package: pip install datasets"
        ) from error
    for index, row in enumerate(load_dataset(dataset, hub_config, split=split)):
        yield row, (f"{dataset}[{split}]", index + 1)


# The question_id of a throw-away question: under FSDP every forward needs every rank, so a rank whose share of the
# questions has run out still decodes (a copy of the first question) while the others finish theirs. It is never
# written or scored (PolicyModule drops its answers).
FILLER_ID = "filler"


class RankShard(DistributedSampler):
    """Rows ``rank::world_size``, never repeated and possibly none; with ``even``, each rank is topped up to the
    largest share with the index ``len(dataset)``, where :func:`shard_questions` puts the filler question.

    Lightning's default sampler repeats rows to even out the shards (a repeated question would be written and counted
    twice), and its unrepeated one asserts that every rank gets a row, which a resumed run with fewer questions left
    than ranks breaks.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, even: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.own = range(rank, len(dataset), num_replicas)
        self.num_samples = len(range(0, len(dataset), num_replicas)) if even else len(self.own)

    def __iter__(self):
        return iter([*self.own, *[len(self.dataset)] * (self.num_samples - len(self.own))])


def shard_questions(questions: list[dict], world_size: int, rank: int, even: bool) -> tuple[list[dict], RankShard]:
    """What rank ``rank`` reads its share from, and the sampler that picks the share; with ``even`` (sharded weights)
    the filler question follows ``questions``, for the sampler to top the rank up with."""
    served = [*questions, {**questions[0], "question_id": FILLER_ID}] if even and questions else questions
    return served, RankShard(questions, world_size, rank, even)


def collate_questions(items: list[dict]) -> dict[str, list]:
    return {key: [item[key] for item in items] for key in items[0]}


class GSM8KDataModule(L.LightningDataModule):
    """Serves GSM8K-format questions to every stage: for ``fit`` in a seeded shuffle that a resumed run continues
    (PPO samples its own answers), in source order for ``predict``/``test``, sharded across ranks without repeats so
    that each question is answered once."""

    def __init__(
        self,
        dataset: str = "openai/gsm8k",
        split: str = "train",
        n_samples: int | None = None,
        seed: int = 0,
        batch_size: int = 4,
        prompt_template: str = "abel",
        hub_config: str = "main",
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.questions: list[dict] = []
        self._skip: set[str] = set()
        # A rank may have nothing left to answer when a resumed run has fewer questions than ranks.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.questions = load_questions(hp.dataset, hp.split, hp.n_samples, hp.seed, hp.prompt_template, hp.hub_config)

    def skip(self, question_ids: set[str]) -> None:
        """Leave out questions already answered (a resumed rollout or evaluation)."""
        self._skip = set(question_ids)

    def _pending(self) -> list[dict]:
        return [q for q in self.questions if q["question_id"] not in self._skip]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return TrainLoader(
            self._pending(),
            self.trainer,
            hp.batch_size,
            hp.seed,
            collate_fn=collate_questions,
            num_workers=hp.num_workers,
        )

    def _ordered_dataloader(self) -> DataLoader:
        pending = self._pending()
        served, sampler = pending, None
        if self.trainer is not None and self.trainer.world_size > 1:
            served, sampler = shard_questions(
                pending, self.trainer.world_size, self.trainer.global_rank, even=weights_sharded(self.trainer)
            )
        return DataLoader(
            served,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=collate_questions,
            num_workers=self.hparams.num_workers,
        )

    def predict_dataloader(self) -> DataLoader:
        return self._ordered_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._ordered_dataloader()
