"""A researcher's own components, in a module outside the package, selected by ``class_path`` in YAML: ``abel-lightning
fit`` trains the tiny configs with them and no file of the package changes (docs/EXTENDING.md).

The module (``mylab``) is written into ``tmp_path`` and reaches the command only through ``PYTHONPATH``; each component
appends its name to a marker file when called, so the test sees that it ran, and the custom reward's value shows in the
logged ``reward``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_dpo_module import write_pairs

ROOT = Path(__file__).resolve().parents[1]

MYLAB = {
    "losses.py": '''
        """A DPO loss of my own: a Huber penalty pulling the margin beta*h towards a target."""
        import torch
        from abel_lightning.losses.dpo import DPOLoss, PairLogps


        class HuberMargin(DPOLoss):
            def __init__(self, beta: float = 0.1, target: float = 1.0, marker: str = "markers.txt"):
                super().__init__(beta)
                self.target, self.marker = target, marker

            def pair_losses(self, x: PairLogps) -> torch.Tensor:
                with open(self.marker, "a") as file:
                    file.write(f"dpo_loss {tuple(x.policy_chosen.shape)}\\n")
                return torch.nn.functional.huber_loss(
                    self.beta * x.margin, torch.full_like(x.margin, self.target), reduction="none"
                )
    ''',
    "objectives.py": '''
        """A policy objective of my own: the unclipped importance-weighted policy gradient."""
        import torch
        from abel_lightning.losses.objectives import PolicyObjective, policy_stats


        class Unclipped(PolicyObjective):
            def __init__(self, marker: str = "markers.txt"):
                self.marker = marker

            def __call__(self, logprobs, old_logprobs, advantages, mask):
                with open(self.marker, "a") as file:
                    file.write(f"objective {tuple(logprobs.shape)}\\n")
                log_ratio = logprobs - old_logprobs
                ratio = torch.exp(log_ratio)
                never_clipped = torch.zeros_like(mask, dtype=torch.bool)
                return -advantages * ratio, policy_stats(log_ratio, ratio, never_clipped, mask)
    ''',
    "advantages.py": '''
        """An advantage estimator of my own: each score minus the batch's mean score, on every response token."""
        from abel_lightning.losses.advantages import AdvantageEstimator, AdvantageInputs


        class BatchMeanBaseline(AdvantageEstimator):
            kl_in = "loss"

            def __init__(self, scale: float = 1.0, marker: str = "markers.txt"):
                self.scale, self.marker = scale, marker

            def __call__(self, inputs: AdvantageInputs):
                with open(self.marker, "a") as file:
                    file.write(f"advantage {tuple(inputs.scores.shape)} {tuple(inputs.mask.shape)}\\n")
                scores = inputs.penalised_scores()
                return inputs.per_token(self.scale * (scores - scores.mean())), None
    ''',
    "rewards.py": '''
        """A group reward of my own: 1 for the even-numbered completions of a group, 0 for the others."""
        from abel_lightning.rewards import GroupReward


        class EveryOther(GroupReward):
            def __init__(self, marker: str = "markers.txt"):
                self.marker = marker

            def __call__(self, question, completions, num_tokens, gold):
                with open(self.marker, "a") as file:
                    file.write(f"reward {len(completions)}\\n")
                return [float(i % 2 == 0) for i in range(len(completions))]
    ''',
}


def write_mylab(root: Path) -> Path:
    package = root / "mylab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, source in MYLAB.items():
        (package / name).write_text(textwrap.dedent(source).lstrip())
    return root


def fit(tmp_path: Path, *args: str) -> None:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path / "lab"), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-m", "abel_lightning.cli", "fit", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def logged(folder: Path, column: str) -> list[float]:
    rows = [row for path in sorted(folder.rglob("metrics.csv")) for row in csv.DictReader(path.open())]
    return [float(row[column]) for row in rows if row.get(column)]


def package_state() -> str:
    """What git sees of the package: the test must leave it as it found it."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--", "abel_lightning"], cwd=ROOT, capture_output=True, text=True
    ).stdout


def test_own_loss_objective_estimator_and_reward_train_the_tiny_configs_by_class_path(
    tiny_model, shared_data, tmp_path
):
    before = package_state()
    write_mylab(tmp_path / "lab")
    marker = str(tmp_path / "markers.txt")
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]

    ppo = tmp_path / "mylab_ppo.yaml"
    ppo.write_text(
        textwrap.dedent(
            f"""
            model:
              init_args:
                model: {tiny_model}
                sampling: {{temperature: 1.0, top_p: 1.0, max_new_tokens: 8}}
                samples_per_question: 2
                reward: {{class_path: mylab.rewards.EveryOther, init_args: {{marker: {marker}}}}}
                advantage:
                  class_path: mylab.advantages.BatchMeanBaseline
                  init_args: {{scale: 2.0, marker: {marker}}}
                policy_objective: {{class_path: mylab.objectives.Unclipped, init_args: {{marker: {marker}}}}}
                learning_rate: 1.0e-2
                ppo_epochs: 1
                minibatch_size: 4
                target_kl: null
            data:
              init_args: {{dataset: {shared_data / "gsm8k/train.jsonl"}, n_samples: 4, batch_size: 2}}
            trainer:
              logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path / "ppo"}}}}}
              callbacks:
                - class_path: abel_lightning.callbacks.adapter_checkpoint.AdapterCheckpoint
                  init_args: {{dirpath: {tmp_path / "ppo_lora"}, save_every: 20}}
            """
        )
    )
    fit(tmp_path, "--config", str(ROOT / "configs/tiny/ppo.yaml"), "--config", str(ppo), *quiet)
    lines = Path(marker).read_text().splitlines()
    # 2 iterations of 2 questions x 2 samples: 4 rows a rollout, one minibatch of 4 a step.
    assert lines.count("reward 2") == 4, lines
    assert sum(line.startswith("advantage (4,) (4, ") for line in lines) == 2, lines
    assert sum(line.startswith("objective (4, ") for line in lines) == 2, lines
    assert logged(tmp_path / "ppo", "reward") == [0.5, 0.5]  # EveryOther's mean, not correctness's
    assert (tmp_path / "ppo_lora" / "adapter_model.safetensors").exists()

    Path(marker).unlink()
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    dpo = tmp_path / "mylab_dpo.yaml"
    dpo.write_text(
        textwrap.dedent(
            f"""
            model:
              init_args:
                model: {tiny_model}
                adapter: null
                loss: {{class_path: mylab.losses.HuberMargin, init_args: {{beta: 0.5, target: 2.0, marker: {marker}}}}}
                learning_rate: 1.0e-2
            data:
              init_args: {{pairs: {pairs}, rollouts: null, val_fraction: 0.0}}
            trainer:
              max_steps: 2
              logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path / "dpo"}}}}}
              callbacks:
                - class_path: abel_lightning.callbacks.adapter_checkpoint.AdapterCheckpoint
                  init_args: {{dirpath: {tmp_path / "dpo_lora"}, save_every: 20}}
            """
        )
    )
    fit(tmp_path, "--config", str(ROOT / "configs/tiny/dpo.yaml"), "--config", str(dpo), *quiet)
    lines = Path(marker).read_text().splitlines()
    # max_steps 2 with accumulate_grad_batches 2: 4 training batches of 2 pairs (the reference cache's pass calls no
    # loss).
    assert lines == ["dpo_loss (2,)"] * 4, lines
    losses = logged(tmp_path / "dpo", "train/loss")
    # Huber(0.5 * 0 - 2) = 1.5 at the start, where the policy is the reference; HuberMargin's value, not log 2.
    assert losses and abs(losses[0] - 1.5) < 1e-4, losses
    assert (tmp_path / "dpo_lora" / "adapter_model.safetensors").exists()
    assert package_state() == before


def test_the_examples_of_docs_extending_run_on_the_shapes_it_states(tmp_path, monkeypatch):
    """Each ``# mylab/<file>.py`` block of docs/EXTENDING.md, written out and called as PPO/DPO would call it."""
    import importlib
    import random
    import re

    import torch

    from abel_lightning.losses.advantages import AdvantageInputs
    from abel_lightning.losses.dpo import PairLogps
    from abel_lightning.regime_w import S_CF

    doc = (ROOT / "docs/EXTENDING.md").read_text()
    blocks = re.findall(r"```python\n# (mylab/\w+\.py)\n(.*?)```", doc, flags=re.S)
    assert {name for name, _ in blocks} >= {f"mylab/{m}.py" for m in ("losses", "objectives", "advantages", "rewards")}
    (tmp_path / "mylab").mkdir()
    (tmp_path / "mylab/__init__.py").write_text("")
    for name, source in blocks:
        (tmp_path / name).write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    # The example registers a score; the registry gets back its own entries afterwards.
    monkeypatch.setattr(S_CF, "_entries", dict(S_CF._entries))
    lab = {m: importlib.import_module(f"mylab.{m}") for m in ("losses", "objectives", "aggregations", "advantages")}
    lab |= {m: importlib.import_module(f"mylab.{m}") for m in ("kl", "rewards", "cf", "arms")}

    B, T = 4, 5
    logps = [torch.randn(B, requires_grad=True) for _ in range(2)] + [torch.randn(B) for _ in range(2)]
    pairs = PairLogps(logps[0], logps[1], torch.full((B,), 3.0), torch.full((B,), 4.0), logps[2], logps[3])
    out = lab["losses"].HuberMargin(beta=0.5, target=2.0)(pairs)
    assert out.losses.shape == (B,) and out.loss.requires_grad

    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    logprobs, old = torch.randn(B, T, requires_grad=True), torch.randn(B, T)
    per_token, stats = lab["objectives"].Unclipped()(logprobs, old, torch.randn(B, T), mask)
    loss = lab["aggregations"].SeqSumMean()(per_token, mask)
    assert per_token.shape == (B, T) and loss.ndim == 0 and stats.clip_fraction == 0

    inputs = AdvantageInputs(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.zeros(B, T), 0.0, None, mask, 2, old, old)
    advantages, returns = lab["advantages"].BatchMeanBaseline(scale=2.0)(inputs)
    assert returns is None and advantages[1, 0] == -1.5 and advantages[0, 4] == 0

    assert lab["kl"].AbsK1(clamp=10.0)(logprobs, old).shape == (B, T)
    rewards = lab["rewards"].CorrectAndShort(per_token=0.1)("q", ["#### 7", "x #### 7", "#### 3"], [2, 4, 2], "7")
    assert rewards == pytest.approx([1.0, 0.8, 0.0])
    assert "all_answered" in S_CF
    greedy = lab["arms"].Greedy(seed=0)
    greedy.reset(3)
    greedy.observe(0, True, 1.0)
    greedy.observe(1, False, 0.2)
    assert greedy.allocate("q", 2) == [2, 2]  # arm 2 never observed comes first
    greedy.observe(2, False, 0.1)
    assert greedy.choose(random.Random(0), 2) == [0, 0]
