"""Prompt templates: how a GSM8K question is shown to the policy.

A template is a string with one ``{question}`` placeholder. The default is GAIR's Abel format, the one the Abel
checkpoints were trained on; using another template with an Abel model costs accuracy.
"""

from __future__ import annotations

ABEL_TEMPLATE = "Question:\n{question}\nAnswer:\nLet's think step by step.\n"

TEMPLATES: dict[str, str] = {
    "abel": ABEL_TEMPLATE,
    "plain": "{question}\n",
    "gsm8k": "Question: {question}\nAnswer:",
}


def format_prompt(question: str, template: str = "abel") -> str:
    """Fill a template with a question.

    ``template`` is a name in :data:`TEMPLATES` or a literal template containing ``{question}``, e.g.
    ``format_prompt("What is 2+3?", "gsm8k")`` -> ``"Question: What is 2+3?\\nAnswer:"`` and
    ``format_prompt("2+3?", "Q: {question}\\nA:")`` -> ``"Q: 2+3?\\nA:"``.
    Raises ValueError when ``template`` is neither.
    """
    if template in TEMPLATES:
        template = TEMPLATES[template]
    elif "{question}" not in template:
        raise ValueError(
            f"unknown prompt template {template!r}: use one of {sorted(TEMPLATES)} or a literal template containing "
            "'{question}'"
        )
    # replace, not str.format: questions and literal templates may contain other braces (LaTeX, JSON snippets).
    return template.replace("{question}", question)
