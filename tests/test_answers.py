"""Answer extraction and comparison on the formats models actually write, tricky ones included."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.answers import (
    _HelperProcess,
    answers_match,
    extract_answer,
    format_answer,
    is_correct,
    last_boxed,
    normalize_answer,
    normalize_number,
    parse_number,
    too_costly,
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
    (r"\boxed{x = 5}", "5"),
    (r"\boxed{1{,}000}", "1000"),
    (r"\boxed{\text{(C)}}", "C"),
    (r"\boxed{5} or \boxed{6}", "5,6"),  # boxes joined by "or": one list answer
    (r"\boxed{1} and \boxed{-2}", "1,-2"),
    ("\\boxed{5}\n\nWait, that is wrong: \\boxed{6}", "6"),  # a correction: the last box
    (r"\boxed{}", None),
    (r"so \boxed{12", None),  # a box that never closes (a cut-off answer) is no answer
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    # "The answer is": the arithmetic world's format and variations
    ("3 + 4 = 7. The answer is 7.", "7"),
    ("the answer is: -12", "-12"),
    ("The answer is 42 because 6 * 7 = 42, not 41.", "42"),
    ("I think the answer is $\\frac{3}{4}$.", "0.75"),
    ("The answer is 1,000,000.", "1000000"),
    ("The answer is (B).", "B"),  # a choice letter, however it is dressed
    ("The answer is \u22125", "-5"),  # Unicode minus
    ("The answer is 3 - 5 = -2", "-2"),  # an equation chain: its last side
    ("Answer: 42", "42"),
    ("**Final answer:** $\\boxed{7}$", "7"),
    ("so the answer is \\(\\frac{3}{4}\\).", "0.75"),
    ("The answer is 2\u03c0.", r"2\pi"),
    ("The answer is Evelyn.", "Evelyn"),  # no math at all: the phrase is the answer as text
    # hedges and alternatives are one list answer; words before the math give no answer
    ("the answer is 5 or 6", "5,6"),
    ("The answers are 5 and 6.", "5,6"),
    ("The answer is $x = 5$ or $x = 6$.", "x=5,x=6"),
    ("The answer is not 5.", None),
    ("The answer is either 5 or 6.", None),
    ("7 7 7 7. The answer is", None),  # the marker decides: no fallback to the last number
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
    assert normalize_answer("$\\text{(B)}$") == "B"
    assert normalize_answer(r"2 \pi r") == r"2\pi r"  # a command keeps the space before a letter


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


# (completion, gold, right?): the cases, symbolic equivalence, and outputs a policy could learn to game.
GRADING = [
    # -- right answers, however they are written
    ("The answer is \u22125.", "-5", True),  # Unicode minus
    ("The answer is 3 - 5 = -2.", "-2", True),
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{y = 2x + 3}", "2x+3", True),
    (r"\boxed{1{,}000}", "1000", True),
    (r"\boxed{\sqrt{2}}", r"\sqrt2", True),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", True),
    (r"\boxed{10^{3}}", "1000", True),
    (r"\boxed{\text{(C)}}", "C", True),
    ("The answer is (C).", r"\text{(C)}", True),
    (r"$\boxed{\dfrac{3}{4}}$", "0.75", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    ("#### 1,234", "1234", True),
    ("She has 3 apples and buys 4 more, so 7 apples", "7", True),
    ("3 + 4 = 7. The answer is 7.", 7, True),
    ("so 18", "Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", True),  # gold given as a reference solution
    ("The answer is \\$18.00.", "18", True),
    ("The answer is 50%.", "50", True),
    ("The answer is 42 because 6 * 7 = 42, not 41.", "42", True),
    ("The answer is $\\frac{14}{3}$.", r"\frac{14}{3}", True),
    (r"\boxed{-2, 1}", "1,-2", True),  # a list is a set
    (r"\boxed{1} and \boxed{-2}", "1, -2", True),
    (r"\boxed{3, 5, 7}", "7, 5, 3", True),
    (r"\boxed{x^2+1}", "x^{2} + 1", True),
    (r"\boxed{2x+1}", "1 + 2x", True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", True),
    (r"\boxed{(-\infty, 2) \cup (3, \infty)}", r"(-\infty, 2) \cup (3, \infty)", True),
    (r"\boxed{\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}}", r"\begin{pmatrix} 0.2 \\ -3.6 \end{pmatrix}", True),
    (r"\boxed{90^\circ}", "90", True),
    (r"\boxed{6-5i}", "6 - 5i", True),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
    ("The answer is Evelyn.", r"\text{Evelyn}", True),
    (r"\boxed{\frac{270}7\text{ degrees}}", r"\frac{270}{7}", True),
    (r"\boxed{52_8}", "52_8", True),
    (r"\boxed{11,\! 111,\! 111,\! 100}", "11111111100", True),
    (r"\boxed{137 \frac{1}{2}}", r"137 \frac{1}{2}", True),  # a mixed number stays one (not 1371/2)
    ("The answer is 2\u03c0.", r"2\pi", True),
    (r"\boxed{\infty}", r"\infty", True),
    (r"\boxed{1.570796}", r"\frac{\pi}{2}", True),  # math-verify: a decimal to 6 places for an irrational gold
    ("\\boxed{5}\n\nWait, that is wrong: \\boxed{6}", "6", True),
    # -- wrong answers
    ("The answer is \u22125.", "5", False),
    ("The answer is 3 - 5 = -2.", "3", False),
    ("The answer is 41.", 42, False),
    ("I don't know", "42", False),
    (r"\boxed{\frac{\pi}{3}}", r"\frac{\pi}{2}", False),
    ("The answer is 1,000,000.", "1000", False),
    (r"\boxed{0.333}", r"\frac{1}{3}", False),  # two plain numbers compare exactly
    (r"\boxed{0.33}", "1/3", False),
    (r"\boxed{50\%}", "0.5", False),  # 50% is the number 50 (GSM8K writes percentages so)
    (r"\boxed{y}", "x", False),
    (r"\boxed{x}", "5", False),
    ("\\boxed{5}\n\nWait, that is wrong: \\boxed{6}", "5", False),
    # -- hedges and lists: several answers never equal one
    ("The answer is 5 or 6.", "5", False),
    ("The answer is 5 or 6.", "6", False),
    (r"\boxed{5} or \boxed{6}", "5", False),
    (r"\boxed{5, 6}", "5", False),
    (r"\boxed{5 \text{ or } 6}", "6", False),
    ("The answer is either 5 or 6.", "5", False),
    ("The answer is not 5.", "5", False),
    ("The answer is $x = 5$ or $x = 6$.", "5", False),
    ("The answers are 5 and 6.", "6", False),
    ("1 2 3 4 5 6 7 8 9 10. The answer is 1, 2, 3, 4, 5, 6, 7, 8, 9, 10", "7", False),
    ("The answer is 1 2 3 4 5.", "12345", False),
    ("7 " * 1000 + "The answer is", "7", False),  # a marker with nothing after it: no fallback
    # -- cut-off, empty and catch-all outputs
    (r"so \boxed{12", "12", False),  # the box never closes
    (r"\boxed{}", "0", False),
    (r"\boxed{\infty}", "5", False),
    (r"\boxed{\mathbb{R}}", "5", False),
    (r"\boxed{0/0}", "1", False),
    (r"\boxed{\text{any number}}", "5", False),
    # -- inputs that would make sympy hang: compared as text, at once (a false negative for the tower)
    (r"\boxed{10^{10^{10}}}", "10", False),
    (r"\boxed{2^{2^{2^{2}}}}", "65536", False),
    (r"\boxed{\binom{1000000}{500000}}", "5", False),
    (r"\boxed{(10^{6})!}", "5", False),
    (r"\boxed{9^{999999}}", "9", False),
    ("\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}", "1", False),
]


@pytest.mark.parametrize("completion, gold, right", GRADING)
def test_is_correct_table(completion, gold, right):
    assert is_correct(completion, gold) is right


def test_the_table_is_big_and_adversarial():
    assert len(GRADING) >= 60 and sum(not right for _, _, right in GRADING) >= 30


@pytest.mark.parametrize("answer", [r"10^{10^{10}}", r"2^3^4", r"(10^6)!", r"12345!", r"9^{99999}", r"x^{-1000}",
                                    r"\binom{1000000}{500000}", r"\sum_{n=1}^{10^9} n", r"\int_0^1 e^{-x^2} dx",
                                    r"\lim_{x \to 0} x", r"\prod_{k=1}^{100000} k", "(" * 9 + "1" + ")" * 9,
                                    "1" * 201])
def test_too_costly_catches_what_would_hang_sympy(answer):
    assert too_costly(answer)


@pytest.mark.parametrize("answer", [r"\left( 3, \frac{\pi}{2} \right)", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}",
                                    r"x^8 + x^7 + x^6 + x^5 + x^4 + x^3 + x^2 + x + 1", r"2^{10}", "5!", r"e^{i\pi}",
                                    r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", r"3\sqrt{13}", r"9^{999}"])
def test_too_costly_lets_math_answers_through(answer):
    assert not too_costly(answer)


def test_huge_inputs_are_linear_and_bounded():
    assert extract_answer("7 " * 500_000 + "The answer is 5.") == "5"
    assert extract_answer("\\boxed{" + "1" * 100_000 + "}") is None  # no answer is 1,000+ characters long
    assert extract_answer("9" * 100_000) is None
    assert extract_answer("\\boxed{1} " * 20_000) == ",".join(["1"] * 20)  # the run of joined boxes: 20 at most
    assert extract_answer("The answer is " + "(" * 50_000) is None
    assert not is_correct("\\boxed{" + "{" * 5_000 + "5" + "}" * 5_000 + "}", "5")


@pytest.mark.slow
def test_symbolic_checks_work_off_the_main_thread():
    """serve and thread pools grade too: there math-verify's signal.alarm cannot run, so a helper process does."""
    cases = [(r"\boxed{\pi/2}", r"\frac{\pi}{2}"), (r"\boxed{\sqrt{8}}", r"2\sqrt{2}"), (r"\boxed{\pi/3}", r"\frac{\pi}{2}"),
             (r"\boxed{10^{3}}", "1000"), ("The answer is 7.", "7")]
    with ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(lambda c: is_correct(*c), cases))
    assert verdicts == [True, True, False, True, True]


@pytest.mark.slow
def test_a_stuck_helper_process_is_killed_and_replaced():
    helper = _HelperProcess()
    try:
        assert helper.equal(r"\sqrt{4}", "2")
        first = helper._proc
        assert helper._ask(r"\frac{\pi}{2}", r"\pi/2", timeout=0.0) is None  # no verdict in time: killed
        assert first.poll() is not None and helper._proc is None
        assert helper.equal(r"\frac{\pi}{2}", r"\pi/2")  # a fresh child answers the next one
    finally:
        if helper._proc is not None:
            helper._proc.kill()
            helper._proc.wait()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(list("0123456789 -+*/^_=,.$(){}[]\\\n#:!%xyab") +
                               ["\\boxed{", "\\frac", "\\frac{1}{2}", "\\text{", "\\!", "answer is ", "####", "\u2212", " or "]),
                max_size=40).map("".join))
def test_grading_never_raises(text):
    answer = extract_answer(text)
    assert answer is None or (isinstance(answer, str) and answer and normalize_answer(answer) == answer)
    assert isinstance(is_correct(text, "5"), bool) and isinstance(is_correct("The answer is 5", text), bool)
