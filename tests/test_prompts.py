import pytest

from abel_lightning.prompts import ABEL_TEMPLATE, TEMPLATES, format_prompt


def test_default_is_abel_format():
    assert TEMPLATES["abel"] is ABEL_TEMPLATE
    assert format_prompt("What is 2+3?") == "Question:\nWhat is 2+3?\nAnswer:\nLet's think step by step.\n"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("plain", "What is 2+3?\n"), ("gsm8k", "Question: What is 2+3?\nAnswer:")],
)
def test_registered_templates(name, expected):
    assert format_prompt("What is 2+3?", name) == expected


def test_literal_template_keeps_other_braces():
    assert format_prompt("Is {x} = 3?", "Q: {question} {json}\nA:") == "Q: Is {x} = 3? {json}\nA:"


def test_unknown_template_lists_the_names():
    with pytest.raises(ValueError, match=r"\['abel', 'gsm8k', 'plain'\]"):
        format_prompt("2+3?", "alpaca")
