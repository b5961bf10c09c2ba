"""Model text is untrusted input: whatever a completion holds, rollouts, evaluation and the PPO rewards end with a
defined record for every question, within a bounded time (issue: a rollout run died in predict with a RecursionError
after four records when one completion held 1,000 '-' before '3 + 4 = 7')."""

from __future__ import annotations

from dataclasses import replace

from conftest import must_finish_within
from policy_phase_script import K, eval_parts, rollout_parts, trainer

from abel_lightning.jsonl import read_jsonl
from abel_lightning.rewards import REWARDS
from abel_lightning.schemas import EVAL, ROLLOUT

N = 4
HOSTILE = [
    "-" * 1000 + "3 + 4 = 7",
    "(" * 400 + "3 + 4" + ")" * 400 + " = 7",
    "The answer is " + "9" * 5000,
    "<<12*34=408>>" * 15_000,  # 195 kB (tests/test_arithmetic.py has ten times more)
    "\\boxed{" * 14_000,
    "1+" * 50_000 + "1 = 50001",
    "The answer is 0." + "3" * 100_000,
]


def write_hostile_text(module) -> None:
    """Make ``module`` answer with HOSTILE texts in place of what its model wrote, one per trajectory in turn."""
    answer = module.answer
    texts = iter(HOSTILE * 100)

    def hostile(batch):
        return [
            replace(answered, completions=[replace(c, text=next(texts)) for c in answered.completions])
            for answered in answer(batch)
        ]

    module.answer = hostile


def test_rollouts_record_every_question_whatever_the_model_writes(tiny_model, shared_data, tmp_path):
    output = tmp_path / "rollouts.jsonl"
    module, datamodule, collector = rollout_parts(tiny_model, str(shared_data / "gsm8k/train.jsonl"), N, str(output))
    write_hostile_text(module)
    with must_finish_within(120):
        trainer([collector]).predict(module, datamodule=datamodule, return_predictions=False)
    records = read_jsonl(output, ROLLOUT)
    assert len(records) == N
    trajectories = [t for record in records for t in record["trajectories"]]
    assert len(trajectories) == N * K
    assert {t["full_text"] for t in trajectories} == set(HOSTILE)
    by_text = {t["full_text"]: t for t in trajectories}
    assert by_text[HOSTILE[0]]["answer"] == "7"
    assert by_text[HOSTILE[2]]["answer"] is None  # 5,000 digits: no answer
    assert all(0.0 <= record["s_cf"] <= 1.0 for record in records)


def test_evaluation_records_every_question_whatever_the_model_writes(tiny_model, shared_data, tmp_path):
    module, datamodule, evaluation = eval_parts(tiny_model, str(shared_data / "gsm8k/train.jsonl"), N, str(tmp_path))
    write_hostile_text(module)
    with must_finish_within(120):
        trainer([evaluation]).test(module, datamodule=datamodule)
    records = read_jsonl(next(tmp_path.glob("*.jsonl")), EVAL)
    assert len(records) == N and not any(record["correct"] for record in records)


def test_ppo_rewards_are_finite_for_hostile_completions():
    with must_finish_within(60):
        for name in ("correctness", "regime_w"):
            rewards = REWARDS.resolve(name)("Q", HOSTILE, [512] * len(HOSTILE), "7")
            assert len(rewards) == len(HOSTILE)
            assert all(isinstance(r, float) and abs(r) < 10 for r in rewards)
