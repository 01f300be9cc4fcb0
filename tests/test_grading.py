"""Final-answer extraction and comparison (nemoforge.grading): one regression class per parametrized test."""

from __future__ import annotations

from fractions import Fraction

import pytest

from nemoforge.grading import (
    Expression,
    Number,
    answer_matches,
    final_answer_span,
    parse_reference,
    read_number,
)


def grade(reply_answer_part: str, reference: str) -> bool:
    ref = parse_reference(reference)
    assert ref is not None, reference
    return answer_matches(reply_answer_part, ref)


@pytest.mark.parametrize(
    ("text", "span"),
    [
        (r"I got 3, so \boxed{7}. The answer is 9.", ("7", True)),  # boxed wins over a marker
        (r"\boxed{1} then \boxed{2}", ("2", True)),  # the last box
        (r"\boxed{\frac{1}{2}}", (r"\frac{1}{2}", True)),  # nested braces
        ("So the answer is 18. Then 5 more.", (" 18", True)),  # the sentence after the marker
        ("The answer is 4\nanswer: 5\n6", (" 5", True)),  # the last marker, its line only
        ("work\n#### 72", (" 72", True)),
        ("48 + 24 = 72", ("48 + 24 = 72", False)),  # no marker: the whole part
    ],
)
def test_final_answer_span(text, span):
    assert final_answer_span(text) == span


def test_box_left_open_is_no_answer():
    assert final_answer_span(r"The answer is \boxed{12") is None
    assert not grade(r"The answer is \boxed{12", "12")


@pytest.mark.parametrize(
    ("reply", "gold", "ok"),
    [
        # the final answer, not any number in the text
        ("I first thought 4, but it is 5.", "4", False),
        ("I first thought 4, but it is 5.", "5", True),
        ("The answer is 4. Check: 2 + 2 = 4 and 3 more is 7", "4", True),
        ("The answer is 7. I considered 4 before.", "4", False),
        (r"Maybe 4? \boxed{5}", "4", False),
        # a marked span holds exactly one number: hedging earns nothing
        ("The answer is 2 or 3", "2", False),
        ("The answer is 2 or 3", "3", False),
        (r"\boxed{2, 3}", "3", False),
        (r"\boxed{x = 5}", "5", True),
        ("The answer is 18 apples.", "18", True),
        ("Answer: 72", "72", True),
        ("the final ANSWER IS 72", "72", True),
        ("#### 72", "72", True),
        ("no number here", "5", False),
        ("", "5", False),
    ],
)
def test_the_final_answer_is_graded(reply, gold, ok):
    assert grade(reply, gold) is ok


@pytest.mark.parametrize(
    ("reply", "gold", "ok"),
    [
        ("2 2/3", "2", False),
        ("The answer is 2 2/3", "2", False),
        (r"\boxed{2\frac{2}{3}}", "2", False),
        ("2 2/3", "8/3", True),  # a mixed number is whole + fraction
        (r"\boxed{2\frac{2}{3}}", r"\frac{8}{3}", True),
        ("The answer is -1 1/2", "-1.5", True),
        ("The answer is 2 2/3", "2/3", False),
        ("5 0/0", "5", False),  # zero denominator: no number
    ],
)
def test_mixed_numbers(reply, gold, ok):
    assert grade(reply, gold) is ok


@pytest.mark.parametrize(
    "reply",
    [
        r"\pm 2021",
        r"$\pm 2021$",
        "The answer is ±2021",
        "The answer is ± 2021.",
        r"\boxed{\pm 2021}",
        r"x = \mp 2021",
        "x = ∓2021",
        "2021 ± 1",  # a marked or free span with ± before its last number
        "5±2021",
        "The answer is 2021 ± 0",
    ],
)
def test_plus_minus_is_never_one_number(reply):
    assert not grade(reply, "2021")


@pytest.mark.parametrize(
    ("reply", "gold", "ok"),
    [
        ("2021.0004", "2021", False),
        ("2021.00000001", "2021", True),  # 5e-12 relative: within 1e-9
        ("2021.0", "2021", True),
        ("The answer is 72.00", "72", True),
        ("0.333333333333", "1/3", True),  # decimal vs rational: within 1e-9 relative
        ("0.3333", "1/3", False),
        ("0.1", "0.100000001", False),  # both decimals: 1e-8 relative is beyond 1e-9
        ("1.5e3", "1500", True),
        (".5", "1/2", True),
        ("1000001", "1000000", False),  # integers compare exactly, whatever their size
        ("123456789012345678", "123456789012345679", False),
    ],
)
def test_tight_numeric_tolerance(reply, gold, ok):
    assert grade(reply, gold) is ok


def test_decimal_tolerance_is_relative_1e9():
    a = Number(Fraction(2021), exact=True)
    assert a.equals(Number(Fraction("2021.00001"), exact=False)) is False  # 4.9e-9 relative
    assert a.equals(Number(Fraction("2021.000001"), exact=False)) is True  # 4.9e-10 relative
    assert a.equals(Number(Fraction(2021) + Fraction(1, 10**6), exact=True)) is False  # exact: no tolerance


@pytest.mark.parametrize(
    "reply",
    [
        "1,234",
        "The answer is 1,234.",
        "1 234",
        "1\u00a0234",  # no-break space
        "1\u2009234",  # thin space
        "1\u202f234",  # narrow no-break space
        "$1{,}234$",
        r"1\,234",
        r"1\ 234",
        r"1\!,\!234",
        r"\boxed{1{,}234}",
        "$1,234",
        r"\$1,234.00",
    ],
)
def test_thousands_separators_make_one_number(reply):
    assert grade(reply, "1234")
    assert not grade(reply, "234") and not grade(reply, "1")


@pytest.mark.parametrize(
    ("reply", "value"),
    [
        ("1,234,567", 1234567),
        ("1 234 567", 1234567),
        ("1.234.567", 1234567),  # two or more dot groups: European thousands
        ("-1,234", -1234),
        ("1.234", Fraction("1.234")),  # one dot group: a decimal
        ("1,234 567", 567),  # mixed separators: not one number
        ("1,2345", 2345),  # a group of four digits: not a separator
    ],
)
def test_grouped_numbers_read_by_value(reply, value):
    number = read_number(reply, marked=False)
    assert number is not None and number.value == value


@pytest.mark.parametrize(
    ("reply", "gold", "ok"),
    [
        ("1, 2", "12", False),  # a list, not twelve
        ("1, 2", "2", True),  # free text: its last number
        ("The answer is 1, 2", "2", False),  # a marked span with two numbers: no answer
        ("3,5", "3.5", False),  # no European decimal comma
        ("3,5", "35", False),
        ("The answer is 3,5", "5", False),
        ("1,23", "123", False),
    ],
)
def test_lists_are_not_one_number(reply, gold, ok):
    assert grade(reply, gold) is ok


@pytest.mark.parametrize(
    ("reply", "gold", "ok"),
    [
        ("The answer is -5", "-5", True),
        ("The answer is −5", "-5", True),  # U+2212
        ("The answer is -5", "5", False),
        ("x = -5", "-5", True),
        ("3-5", "5", True),  # a minus after a digit is an operator
        ("3/4", "0.75", True),
        (r"\frac{3}{4}", "3/4", True),
        (r"\dfrac34", "0.75", True),
        (r"-\frac{3}{4}", "-0.75", True),
        (r"\frac{-3}{4}", "-3/4", True),
        ("3 / 4", "3/4", True),
        ("3/4", "4", False),
        ("The answer is 50%", "50", True),  # % is a unit
        (r"The answer is 50\%", "50", True),
        ("50%", "0.5", False),
        (r"The answer is \$18.", "18", True),
        ("It costs $18.50 in total.", "18.5", True),
        ("18 dollars", "18", True),
        ("x2", "2", False),  # a digit glued to a word is not a number
    ],
)
def test_signs_fractions_percent_and_units(reply, gold, ok):
    assert grade(reply, gold) is ok


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("72", Number(Fraction(72), exact=True)),
        ("1,000", Number(Fraction(1000), exact=True)),
        (r"\boxed{-2.5}", Number(Fraction(-5, 2), exact=False)),
        (r"\frac{3}{4}", Number(Fraction(3, 4), exact=True)),
        (r"\$18", Number(Fraction(18), exact=True)),
        (r"50\%", Number(Fraction(50), exact=True)),
        ("x = 5", Number(Fraction(5), exact=True)),
        ("work\n#### 72", Number(Fraction(72), exact=True)),
        ("", None),
        ("N/A", None),
        ("yes", None),
        ("B", None),
        (r"\text{(B)}", None),
        (r"\boxed{5", None),  # a box never closed
    ],
)
def test_parse_reference(answer, expected):
    assert parse_reference(answer) == expected


@pytest.mark.parametrize(
    ("reply", "gold", "ok"),
    [
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", True),
        (r"The answer is $\frac{\sqrt{3}}{2}$.", r"\frac{\sqrt{3}}{2}", True),
        ("0.866025403784", r"\frac{\sqrt{3}}{2}", True),
        ("0.8660254", r"\frac{\sqrt{3}}{2}", False),  # float_rounding=9, not math-verify's 6
        (r"\boxed{\pm\sqrt{2}}", r"\sqrt{2}", False),
        (r"The answer is $1 + x^2$", "x^2+1", True),
        (r"\boxed{2}", "2x", False),
        ("I am not sure", r"\sqrt{2}", False),
    ],
)
def test_symbolic_references_by_math_verify(reply, gold, ok):
    assert isinstance(parse_reference(gold), Expression)
    assert grade(reply, gold) is ok
