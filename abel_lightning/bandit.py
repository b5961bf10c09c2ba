"""Regime W's k-armed bandit: the arms (sampling strategies) and how each question's k samples are shared among them.

An :class:`Arm` is one way of sampling a solution: its own temperature, top_p, length and stop strings
(``SamplingSettings``) and optionally its own prompt template. An allocation decides, per question, which arm draws
each of the question's k samples:

- ``uniform`` (default): sample ``j`` goes to arm ``j mod n``, so k = n gives one trajectory per arm and k = 2n two;
- ``ucb``: UCB1 (Auer, Cesa-Bianchi & Fischer 2002, "Finite-time analysis of the multiarmed bandit problem") on
  the mean Regime W reward of each arm's trajectories so far: arm ``a`` scores
  ``mean_reward_a + c * sqrt(ln(N) / n_a)`` (N trajectories observed in all, ``n_a`` of arm ``a``; an arm never
  observed comes first); the k samples of one question are handed out one at a time, each counted as observed
  at the arm's current mean, so that one question's samples spread over the best few arms;
- ``thompson``: Thompson sampling (Thompson 1933; Chapelle & Li 2011) on each arm's accuracy: per sample, draw
  ``theta_a ~ Beta(1 + correct_a, 1 + wrong_a)`` for every arm and give it to the largest.

Every allocation learns only from :meth:`ArmAllocation.observe` (the rollout collector calls it with each written
record) and its random draws are seeded by ``(seed, question_id)``, so a run is reproducible from its seed, and its
state after a kill is rebuilt exactly by observing the records already on disk (its statistics are sums).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from abel_lightning.models.generation import SamplingSettings  # noqa: E402
from abel_lightning.regime_w import majority_answer  # noqa: E402
from abel_lightning.registry import Registry  # noqa: E402


@dataclass
class Arm:
    """One sampling strategy of Regime W's bandit: its own decoding settings and, optionally, prompt template (a
    name in ``prompts.TEMPLATES`` or a literal with ``{question}``; None: the question's prompt as served)."""

    name: str | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    prompt_template: str | None = None


class ArmAllocation:
    """Which arm draws each of a question's k samples; learns from observed trajectories. Subclass and override
    :meth:`choose` for a new rule (register it in :data:`ALLOCATIONS`, or select it by ``class_path``)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.reset(0)

    def reset(self, num_arms: int) -> None:
        """Forget everything observed; ``num_arms`` arms."""
        self.samples = [0] * num_arms
        self.correct = [0] * num_arms
        self.reward_sum = [0.0] * num_arms

    def observe(self, arm: int, correct: bool, reward: float) -> None:
        """One trajectory's outcome."""
        self.samples[arm] += 1
        self.correct[arm] += int(correct)
        self.reward_sum[arm] += reward

    def allocate(self, question_id: str, k: int) -> list[int]:
        """The arm of each of the question's ``k`` samples, ascending (a question's trajectories come arm by arm)."""
        return sorted(self.choose(random.Random(f"{self.seed}:{question_id}"), k))

    def choose(self, rng: random.Random, k: int) -> list[int]:
        raise NotImplementedError

    def state(self) -> dict:
        """What the allocation has learned: per arm, trajectories observed, correct ones and summed reward."""
        return {"samples": list(self.samples), "correct": list(self.correct), "reward_sum": list(self.reward_sum)}


ALLOCATIONS: Registry[type[ArmAllocation]] = Registry("arm allocation")


@ALLOCATIONS.register("uniform")
class Uniform(ArmAllocation):
    """Sample ``j`` to arm ``j mod n``: every arm the same share, learning nothing (the seed's Regime W)."""

    def choose(self, rng: random.Random, k: int) -> list[int]:
        return [j % len(self.samples) for j in range(k)]


@ALLOCATIONS.register("ucb")
class UCB(ArmAllocation):
    """UCB1 on each arm's mean reward (see the module docstring); ``exploration`` is ``c``."""

    def __init__(self, seed: int = 0, exploration: float = 1.0):
        super().__init__(seed)
        self.exploration = exploration

    def choose(self, rng: random.Random, k: int) -> list[int]:
        counts = list(self.samples)
        means = [s / n if n else 0.0 for s, n in zip(self.reward_sum, self.samples)]
        chosen = []
        for _ in range(k):
            total = sum(counts)

            def score(arm: int, total: int = total) -> float:
                if counts[arm] == 0:
                    return math.inf
                return means[arm] + self.exploration * math.sqrt(math.log(total) / counts[arm])

            # max picks the first of equal scores: ties (unobserved arms above all) go to the lower index.
            arm = max(range(len(counts)), key=score)
            chosen.append(arm)
            counts[arm] += 1
        return chosen


@ALLOCATIONS.register("thompson")
class Thompson(ArmAllocation):
    """Thompson sampling on each arm's accuracy with a uniform Beta(1, 1) prior (see the module docstring)."""

    def choose(self, rng: random.Random, k: int) -> list[int]:
        chosen = []
        for _ in range(k):
            draws = [rng.betavariate(1 + c, 1 + n - c) for c, n in zip(self.correct, self.samples)]
            chosen.append(max(range(len(draws)), key=draws.__getitem__))
        return chosen


def arm_statistics(records: list[dict]) -> list[dict]:
    """Per arm, over ROLLOUT records: ``arm``, ``name``, ``temperature``, ``samples`` (trajectories it drew),
    ``accuracy``, ``mean_reward``, ``mean_tokens`` and ``majority_share`` (the fraction of its trajectories whose
    answer is their group's most common answer). Arms in index order; only arms that drew a sample appear.

    Example: one group with answers ``18`` (arm 0), ``18`` (arm 1), ``20`` (arm 1) -> arm 0 share 1.0, arm 1 0.5.
    """
    arms: dict[int, dict] = {}
    for record in records:
        majority = majority_answer([t["answer"] for t in record["trajectories"]])
        for t in record["trajectories"]:
            row = arms.setdefault(
                t["arm"],
                {
                    "arm": t["arm"],
                    "name": t.get("arm_name", f"arm{t['arm']}"),
                    "temperature": t.get("temperature"),
                    "samples": 0,
                    "correct": 0,
                    "reward": 0.0,
                    "tokens": 0,
                    "majority": 0,
                },
            )
            row["samples"] += 1
            row["correct"] += int(t["correct"])
            row["reward"] += t["reward"]
            row["tokens"] += t["num_tokens"]
            row["majority"] += int(majority is not None and t["answer"] == majority)
    return [
        {
            "arm": row["arm"],
            "name": row["name"],
            "temperature": row["temperature"],
            "samples": row["samples"],
            "accuracy": row["correct"] / row["samples"],
            "mean_reward": row["reward"] / row["samples"],
            "mean_tokens": row["tokens"] / row["samples"],
            "majority_share": row["majority"] / row["samples"],
        }
        for _, row in sorted(arms.items())
    ]


def arm_statistics_markdown(stats: list[dict]) -> list[str]:
    """The per-arm table as Markdown lines."""
    lines = [
        "| arm | temperature | samples | accuracy | mean reward | mean tokens | majority share |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in stats:
        temperature = "" if row["temperature"] is None else f"{row['temperature']:g}"
        lines.append(
            f"| {row['arm']} {row['name']} | {temperature} | {row['samples']} | {row['accuracy']:.1%} | "
            f"{row['mean_reward']:.4f} | {row['mean_tokens']:.1f} | {row['majority_share']:.1%} |"
        )
    return lines


def plot_arm_statistics(stats: list[dict], png) -> None:
    """Accuracy, mean reward, mean tokens and samples given, one bar per arm, into ``png``."""
    panels = [
        ("accuracy", "accuracy"),
        ("mean_reward", "mean reward"),
        ("mean_tokens", "mean tokens"),
        ("majority_share", "majority share"),
        ("samples", "samples given"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    labels = [row["name"] for row in stats]
    for axis, (key, title) in zip(axes, panels):
        axis.bar(range(len(stats)), [row[key] for row in stats])
        axis.set_xticks(range(len(stats)), labels, rotation=60, fontsize=7)
        axis.set_title(title)
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle("Regime W arms")
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
