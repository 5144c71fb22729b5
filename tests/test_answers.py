"""Answer extraction and comparison on the formats models actually write, tricky ones included."""

import pytest

from lmforge.answers import (
    answers_match,
    extract_answer,
    format_answer,
    is_correct,
    last_boxed,
    normalize_answer,
    normalize_number,
    parse_number,
)


@pytest.mark.parametrize("text, expected", [
    # GSM8K marker: spaces, commas, dollars, the last marker wins, prose after the number
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("so the total is\n####1,234", "1234"),
    ("#### $1,234.00", "1234"),
    ("#### 5\nwait, recount\n#### 6", "6"),
    ("#### -3 degrees", "-3"),
    # \boxed: nested braces, the last box, LaTeX fractions, \boxed without braces, units in \text
    (r"So $x = \boxed{\frac{1}{2}}$.", "0.5"),
    (r"first \boxed{3}, then corrected: \boxed{5}", "5"),
    (r"\boxed{x^{2}+1}", "x^{2}+1"),
    (r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"The area is \boxed 12 square units", "12"),
    (r"\boxed{5\text{ apples}}", "5"),
    (r"\fbox{7}", "7"),
    # "The answer is": the arithmetic world's format and variations
    ("3 + 4 = 7. The answer is 7.", "7"),
    ("the answer is: -12", "-12"),
    ("The answer is 42 because 6 * 7 = 42, not 41.", "42"),
    ("I think the answer is $\\frac{3}{4}$.", "0.75"),
    ("The answer is 1,000,000.", "1000000"),
    ("The answer is (B).", "(B)"),
    ("The answer is 3. Actually no, the answer is 4.", "4"),
    # fallback: the last number, never one glued inside a word
    ("She has 3 apples and buys 4 more, so 7 apples", "7"),
    ("Ratio of H2O to CO2 is 10", "10"),
    ("x2 = 5 and y3", "5"),
    ("It costs $2.50", "2.5"),
    ("the 3rd value is 8.", "8"),
    ("half is 1/2", "0.5"),
    ("so x = \\frac{1}{3}", "1/3"),
    ("temperature fell to -4", "-4"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("1,234.50", "1234.5"), ("1234", "1234"), ("3.0", "3"), ("3.", "3"), ("0.500", "0.5"), (".5", "0.5"),
    ("$5", "5"), ("\\$5.00", "5"), ("50%", "50"), ("50\\%", "50"), ("-7", "-7"), ("-0", "0"), ("-1,000", "-1000"),
    ("3/4", "0.75"), ("6/8", "0.75"), ("4/2", "2"), ("1/3", "1/3"), ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{1}{2}", "0.5"), ("\\dfrac12", "0.5"), ("100", "100"), ("1e5", None), ("abc", None), ("1,23", None),
    ("1/0", None), ("", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_numbers_compare_exactly_as_fractions():
    assert parse_number("0.1") + parse_number("0.2") == parse_number("0.3")  # no float error
    assert answers_match("\\frac{1}{2}", "0.5") and answers_match("1/2", "0.50") and answers_match("2/4", "1/2")
    assert not answers_match("0.333", "1/3")
    assert answers_match("x^{2} + 1", "x^{2}+1") and not answers_match("x+1", "x+2")
    assert normalize_answer("$\\text{(B)}$") == "(B)"


def test_is_correct_against_plain_and_marked_gold():
    assert is_correct("6 * 7 = 42. The answer is 42.", 42)
    assert is_correct("6 * 7 = 42. The answer is 42.", "42")
    assert is_correct("... #### 1,234", "Step one... #### 1234")
    assert is_correct(r"\boxed{\frac{1}{2}}", "0.5")
    assert is_correct("The answer is 0.5", r"\frac{1}{2}")  # plain gold is the answer itself, not scanned
    assert is_correct("so 7", format_answer(7))
    assert not is_correct("The answer is 41.", 42)
    assert not is_correct("I don't know", 42)


def test_format_answer_round_trips():
    for n in (0, 7, -13, 1234, "3/4"):
        assert extract_answer("3 + 4 = 7. " + format_answer(n)) == normalize_answer(str(n))


def test_last_boxed_handles_unbalanced_and_missing():
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{1 + {2}") is None
    assert last_boxed(r"\boxed{a{b}c} and \boxed{d}") == "d"
