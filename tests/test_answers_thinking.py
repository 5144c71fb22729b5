"""Answers inside a think block never count; the answer after it does."""

from lmforge.answers import extract_answer, is_correct, strip_thinking


def test_answer_after_the_think_block_counts_and_the_one_inside_does_not():
    text = "<think>\nc1 1+7=8 8\nThe answer is 99.\n</think>\nThe answer is 8."
    assert extract_answer(text) == "8"
    assert not is_correct(text, "99") and is_correct(text, "8")


def test_an_unclosed_think_block_gives_no_answer():
    text = "<think>\nc1 3+4=7 7\nso the answer is 7"  # thinking cut off before it closed
    assert strip_thinking(text) == ""
    assert extract_answer(text) is None and not is_correct(text, "7")


def test_a_block_the_prompt_opened_is_cut_at_its_close():
    assert extract_answer("c1 3+4=7 7 so 7\n</think>\nThe answer is 8.") == "8"  # the prompt held "<think>"
    assert extract_answer("the answer is 5 </think>") is None


def test_text_before_an_unclosed_block_and_text_without_one_are_kept():
    assert extract_answer("The answer is 12. <think> but maybe 13") == "12"
    assert strip_thinking("The answer is 4.") == "The answer is 4."
    assert extract_answer("<think></think><think>x</think> #### 42") == "42"
