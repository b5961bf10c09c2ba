"""DPO's reference log-probs, computed once before training and kept beside the pairs file.

``ReferenceLogprobs.load_or_compute`` returns the summed log-probs of every pair's chosen and rejected response under
the starting policy: read from ``<pairs>.ref-<key>.jsonl`` when a run with the same ``key`` wrote it, otherwise
computed (each rank a shard of the pairs), gathered and written by rank 0. ``lookup(index)`` then serves a batch.
``<key>`` hashes everything the numbers depend on (docs/DPO.md), so a changed pairs file or adapter gets new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from abel_lightning.data.preferences import EncodedPair, collate_pairs
from abel_lightning.distributed import in_wrapped_forward, trainer_precision
from abel_lightning.fingerprints import update_with_file
from abel_lightning.jsonl import read_jsonl, write_jsonl_atomic
from abel_lightning.models.sequences import SequenceBatch

log = logging.getLogger(__name__)

# One line per pair: its index in the pairs file and the reference's summed log-probs of its two responses.
REFERENCE_ROW = {"index": int, "chosen": float, "rejected": float}

# (sequences [2B rows: chosen, then rejected]) -> summed log-probs [2B], under the reference.
Scorer = Callable[[SequenceBatch], Tensor]


class ReferenceLogprobs:
    """``logps``: ``[max index + 1, 2]`` float32, row = pair index, columns (chosen, rejected); NaN for indices the
    run does not serve (pairs of a kind it filtered out). ``path``: the cache file it came from or went to."""

    def __init__(self, logps: Tensor, path: Path):
        self.logps = logps
        self.path = path

    def lookup(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Summed reference log-probs ``[B]`` of the chosen and the rejected responses of pairs ``index`` ``[B]``."""
        rows = self.logps[index]
        return rows[:, 0], rows[:, 1]

    def to(self, device: torch.device | str) -> ReferenceLogprobs:
        return ReferenceLogprobs(self.logps.to(device), self.path)

    @classmethod
    def load_or_compute(
        cls,
        module: L.LightningModule,
        pairs: list[EncodedPair],
        pairs_path: Path,
        identity: dict,
        score: Scorer,
        batch_size: int,
    ) -> ReferenceLogprobs:
        """The reference log-probs of ``pairs``, loaded or computed with ``score`` before the first step.

        ``identity``: what the numbers depend on besides the pairs (model, adapter, precision...), hashed into the
        file name. ``score`` runs inside the strategy's wrapped forward and the precision plugin's context, as the
        training steps do, so FSDP's sharded weights are gathered and the numbers match the step-0 policy's.
        """
        trainer = module.trainer
        path = pairs_path.with_name(f"{pairs_path.name}.ref-{_key(identity)}.jsonl")
        # Rank 0 reads and broadcasts, so ranks agree even where the file is not on a shared file system.
        loaded = _read(path) if trainer.is_global_zero and path.exists() else None
        loaded = trainer.strategy.broadcast(loaded)
        if loaded is not None:
            log.info("reference log-probs: loaded %s", path)
            return cls(loaded, path)
        if trainer.ckpt_path is not None:
            raise FileNotFoundError(
                f"{path}: resuming from {trainer.ckpt_path} needs the reference cache written when this run started "
                "(it cannot be recomputed from trained weights); restore it, restart without --ckpt_path, or set "
                "model.init_args.reference: adapter"
            )
        started = time.perf_counter()
        world_size, rank = trainer.world_size, trainer.global_rank
        shard = pairs[rank::world_size]
        # Shards differ in length by at most one. Every rank scores the same number of pairs (repeating one, index
        # -1), so all_gather gets equal sizes and sharded (FSDP) weights are gathered in the same forward passes.
        width = math.ceil(len(pairs) / world_size)
        padded = shard + pairs[:1] * (width - len(shard))
        rows = in_wrapped_forward(trainer, module, lambda: cls._score_rows(module, padded, score, batch_size))
        rows[len(shard) :, 0] = -1
        rows = module.all_gather(rows).reshape(-1, 3).cpu()
        rows = rows[rows[:, 0] >= 0]
        logps = torch.full((int(rows[:, 0].max()) + 1, 2), float("nan"))
        logps[rows[:, 0].long()] = rows[:, 1:].float()
        if trainer.is_global_zero:
            _write(path, logps)
            log.info(
                "reference log-probs of %d pairs in %.0f s: saved %s",
                rows.shape[0],
                time.perf_counter() - started,
                path,
            )
        return cls(logps, path)

    @staticmethod
    @torch.no_grad()
    def _score_rows(module: L.LightningModule, pairs: list[EncodedPair], score: Scorer, batch_size: int) -> Tensor:
        """``[len(pairs), 3]`` float64 rows ``(index, chosen log-prob, rejected log-prob)``."""
        rows = [torch.empty(0, 3, dtype=torch.float64, device=module.device)]
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start : start + batch_size], module.tokenizer.pad_token_id)
            with trainer_precision(module.trainer):
                chosen, rejected = score(batch.sequences.to(module.device)).chunk(2)
            rows.append(torch.stack([batch.index.to(module.device).double(), chosen.double(), rejected.double()], -1))
        return torch.cat(rows)


def hash_files(paths: list[Path]) -> str:
    """sha256 over the names and contents of ``paths``, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        update_with_file(digest, path)
    return digest.hexdigest()


def _key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path) -> Tensor:
    records = read_jsonl(path, REFERENCE_ROW)
    index = torch.tensor([record["index"] for record in records])
    logps = torch.full((int(index.max()) + 1, 2), float("nan"))
    logps[index] = torch.tensor([[record["chosen"], record["rejected"]] for record in records])
    return logps


def _write(path: Path, logps: Tensor) -> None:
    # JSON floats round-trip float32 exactly. JSON has no NaN or infinity: rows of unserved indices (NaN) and
    # non-finite ones are left out, so they read back as NaN and a step that uses one stops with its pair named.
    kept = logps.isfinite().all(-1).nonzero().flatten().tolist()
    records = ({"index": i, "chosen": logps[i, 0].item(), "rejected": logps[i, 1].item()} for i in kept)
    write_jsonl_atomic(path, records, REFERENCE_ROW)
