"""GSM8K final-answer extraction and comparison on tricky cases (commas, units, negatives, decimals, ...)."""

from __future__ import annotations

import pytest

from mora_train.data.math import strip_calculator_annotations
from mora_train.evaluation.answers import (
    answer_span,
    answers_match,
    cut_at_stop,
    extract_answer,
)


@pytest.mark.parametrize(
    "completion,gold",
    [
        ("She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,080", "1080"),  # thousands separator
        ("The total is 1,450,000 dollars.", "1450000"),
        ("The answer is: -3", "-3"),  # negative, MetaMathQA style
        ("He is short by \u22127 dollars.", "-7"),  # Unicode minus sign
        ("So the loss is -$3.50", "-3.5"),  # minus before the currency sign, trailing zero
        ("The answer is 12.5 hours.", "12.5"),  # decimal with a unit
        ("It costs $0.50 each.", ".5"),
        ("The answer is 5%", "5"),  # percent vs bare number
        ("#### 18.00", "18"),
        ("Therefore the answer is $\\boxed{\\frac{3}{4}}$.", "0.75"),
        ("First 12, then 30 more, so 42 apples.", "42"),  # no marker: the last number
        ("#### 7\n#### 9", "7"),  # the first #### wins
    ],
)
def test_extracted_answer_matches_gold(completion: str, gold: str) -> None:
    prediction = extract_answer(completion)
    assert prediction is not None
    assert answers_match(prediction, extract_answer(gold)), (prediction.text, gold)


@pytest.mark.parametrize(
    "completion,gold",
    [
        ("#### 180", "18"),
        ("The answer is 1234567", "1234568"),
        ("The answer is -3", "3"),  # the sign matters
        ("The answer is 3.5", "35"),
        ("#### 18", "1,800"),
    ],
)
def test_wrong_answers_do_not_match(completion: str, gold: str) -> None:
    assert not answers_match(extract_answer(completion), extract_answer(gold))


def test_no_answer_is_none_and_never_correct() -> None:
    assert extract_answer("I do not know.") is None
    assert extract_answer("#### ") is None
    assert not answers_match(None, extract_answer("3"))


def test_gsm8k_gold_answers_and_annotations() -> None:
    reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert extract_answer(reference).text == "72"
    assert (
        strip_calculator_annotations(reference)
        == "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"
    )
    assert answer_span("blah\n#### 1,234\nmore") == "1,234"
    assert answer_span("So the answer is: 5.\nQuestion: 7") == "5."


def test_cut_at_stop_takes_the_earliest_stop() -> None:
    text = " 3 + 4 = 7\n#### 7\nQuestion: what is 8 + 9?\nAnswer: 17"
    assert cut_at_stop(text, ["\nQuestion:", "\n\n\n"]) == " 3 + 4 = 7\n#### 7"
    assert extract_answer(cut_at_stop("The answer is 4\n\n\nThe answer is 5", ["\n\n\n"])).text == "4"
    assert cut_at_stop("abc", []) == "abc"
