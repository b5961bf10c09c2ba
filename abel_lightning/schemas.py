"""Schemas of the project's JSONL records (docs/FORMATS.md describes each with an example).

A schema is a ``dict[str, FieldType]`` naming the required fields; extra fields are allowed. A FieldType is
- a Python type: ``str``, ``int``, ``float`` or ``bool`` (``float`` accepts ints; ``int`` and ``float`` never accept
  bools; ``bool`` accepts only bools);
- a tuple of types for a union, e.g. ``(str, type(None))`` for "string or null";
- a one-element list ``[SUBSCHEMA]`` for a list of objects, each checked against SUBSCHEMA;
- a ``frozenset`` of allowed values, e.g. ``frozenset({"correctness", "coherence"})``.

:func:`abel_lightning.jsonl.validate` checks a record against a schema.
"""

from __future__ import annotations

FieldType = type | tuple[type, ...] | list["Schema"] | frozenset
Schema = dict[str, FieldType]

PAIR_KINDS = ("correctness", "coherence")

# One GSM8K question as the data modules serve it (``prompt`` is added there, from the template).
QUESTION: Schema = {"question_id": str, "question": str, "gold_answer": str}

# One sampled completion of a Phase 2 rollout. ``full_text`` is the completion only, without the prompt.
TRAJECTORY: Schema = {
    "full_text": str,
    "answer": (str, type(None)),
    "num_tokens": int,
    "reward": float,
    "correct": bool,
    "arm": int,
}

# One question's Phase 2 rollout: the k trajectories and the group's Regime W scores.
ROLLOUT: Schema = {
    "question_id": str,
    "question": str,
    "prompt": str,
    "gold_answer": str,
    "s_end": float,
    "s_path": float,
    "s_cf": float,
    "s_wm": float,
    "trajectories": [TRAJECTORY],
}

# One Phase 3 preference pair; TRL's DPO trainer reads prompt/chosen/rejected as they are.
PAIR: Schema = {
    "question_id": str,
    "prompt": str,
    "chosen": str,
    "rejected": str,
    "kind": frozenset(PAIR_KINDS),
    "reward_gap": float,
}

# One Phase 5 evaluation answer.
EVAL: Schema = {
    "question_id": str,
    "question": str,
    "gold_answer": str,
    "completion": str,
    "answer": (str, type(None)),
    "correct": bool,
    "num_tokens": int,
}
