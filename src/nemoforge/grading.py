"""What eval and the GRPO accuracy reward grade: the final answer of a reply, read one documented way.

The reply's answer part (the text after its think block; a reply cut off inside ``<think>`` has none, see
:func:`nemoforge.data.reasoning.answer_part`) is graded against a reference answer in two steps.

**1. Where the final answer is** (:func:`final_answer_span`), first rule that applies:

1. the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``); a box left open (cut off) is no answer;
2. the text after the last ``answer is`` / ``answer:`` / ``answer =`` (any case) or ``####``, up to the
   end of its line or sentence (a period followed by a space);
3. otherwise the whole answer part, read as its **last** number.

A span of rule 1 or 2 is read after its last ``=`` (``\\boxed{x = 5}`` is 5) and must hold **exactly one**
number: ``The answer is 2 or 3`` and ``The answer is 1, 2`` are no answer, so hedging earns nothing.

**2. What a number is** (:func:`read_number`). Values are exact rationals (:class:`fractions.Fraction`):

- integers, decimals (``72.0``, ``.5``, ``1.5e3``), negatives (``-5``, ``−5``; a ``-`` right after a digit
  or letter is an operator: ``3-5`` reads 3 and 5), fractions ``3/4``, ``\\frac{3}{4}``, ``\\dfrac34``;
- mixed numbers ``2 2/3`` and ``2\\frac{2}{3}`` are 2 + 2/3 = 8/3, never 2;
- thousands separators make one number when every group after the first has exactly three digits and
  one separator is used throughout: ``1,234``, ``1,234,567``, ``1 234`` (space, U+00A0, U+2009,
  U+202F), LaTeX ``1{,}234``, ``1\\,234``, ``1\\ 234``, ``1\\!,\\!234``; two or more dot groups
  (``1.234.567``) are European thousands. Otherwise a comma or space separates numbers: ``1, 2`` and
  ``1,23`` are lists, and ``3,5`` is the list 3, 5, not the European decimal 3.5 (this is English-language
  data); a single dot group ``1.234`` is a decimal;
- ``$``/``\\$`` and other units around a number are ignored; ``%`` is a unit too: ``50%`` is 50, not 0.5
  (GSM8K writes percent answers as the bare number);
- ``±``/``\\pm``/``∓``/``\\mp`` name two values: a span that holds one, or a last number preceded by one,
  is no answer;
- not read: scientific notation in LaTeX (``1.5 \\times 10^3``), expressions (``2^3`` is not 8).

Two numbers are equal when both are written exactly (integers, fractions, mixed numbers) and are equal,
or, when either is written as a decimal, within a relative tolerance of ``REL_TOL`` = 1e-9:
``2021.0004`` is not 2021 (math-verify's default ``float_rounding=6`` would let much closer ones pass).

**References** (:func:`parse_reference`): a reference whose final-answer span (as above: a ``\\boxed``,
a ``####`` line, or the whole text), read after its last ``=``, is one number with only ``$``, ``%``,
braces and a final period around it is a :class:`Number`. Otherwise, if it holds a digit or a LaTeX
command other than ``\\text``/``\\mathrm``, math-verify parses it as LaTeX
(:class:`Expression`; e.g. ``\\frac{\\sqrt{3}}{2}``, ``x^2+1``) and the reply's span is compared
symbolically by math-verify with ``float_rounding=9``. Anything else (``yes``, ``N/A``, a bare letter
choice, text math-verify cannot parse) is not gradable: :func:`parse_reference` returns None, and
problem sets drop it when loaded (:func:`nemoforge.data.reasoning.math_problems`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

REL_TOL = 1e-9
"""Relative tolerance when either number is written as a decimal (exact comparison otherwise)."""


@dataclass(frozen=True)
class Number:
    """A numeric answer: its exact value and whether it was written exactly (no decimal point or exponent)."""

    value: Fraction
    exact: bool

    def equals(self, other: Number) -> bool:
        """Exact equality of two exact numbers; relative tolerance ``REL_TOL`` when either is a decimal."""
        if self.exact and other.exact:
            return self.value == other.value
        return abs(self.value - other.value) <= REL_TOL * max(abs(self.value), abs(other.value))


@dataclass(frozen=True)
class Expression:
    """A symbolic reference as math-verify parsed it (``parse`` output: sympy objects, then the source)."""

    parsed: tuple[object, ...]


Reference = Number | Expression

_LATEX_CONFIG = [LatexExtractionConfig()]
_PRED_CONFIG = [LatexExtractionConfig(), ExprExtractionConfig()]

_SPACES = re.compile(r"\\[,:; ]|~|[\u00a0\u2009\u202f]")
_PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![a-zA-Z])|∓")
_FRAC = re.compile(r"(\d\s*)?\\[dt]?frac\s*(?:\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}|(\d)(\d))")
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>-)?(?:"
    r"(?P<whole>\d+) (?P<mix_num>\d+)/(?P<mix_den>\d+)"  # mixed number
    r"|(?P<num>\d+)\s*/\s*(?P<den>\d+)"  # fraction
    r"|(?P<dotted>\d{1,3}(?:\.\d{3}){2,})"  # European thousands: 1.234.567
    r"|(?P<int>\d{1,3}(?P<sep>[, ])\d{3}(?:(?P=sep)\d{3})*|\d+)(?P<frac>\.\d+)?(?P<exp>[eE][-+]?\d+)?"
    r"|(?P<bare>\.\d+)"  # .5
    r")(?!\d)"
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MARKER = re.compile(r"\banswer\s*(?:is\b|:|=)|####", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\n|\.(?=\s|$)")
_MATH_SIGN = re.compile(r"\d|\\(?!text|mathrm)[a-zA-Z]")
_REFERENCE_RESIDUE = re.compile(r"(?:\\?[$%]|[\s{}]|\.$)*")


def _normalize(text: str) -> str:
    """LaTeX and Unicode number notation to plain text: separators, minus, ``±``, numeric ``\\frac``."""
    text = text.replace("\\!", "").replace("{,}", ",").replace("\u2212", "-")
    text = _PLUS_MINUS.sub("±", text)
    text = _SPACES.sub(" ", text)
    return _FRAC.sub(
        lambda m: f"{m[1].strip() + ' ' if m[1] else ''}{m[2] or m[4]}/{m[3] or m[5]}", text
    )


def _number(m: re.Match[str]) -> Number | None:
    """The value of one ``_NUMBER`` match (None for a zero denominator)."""
    sign = -1 if m["sign"] else 1
    if m["whole"] is not None or m["num"] is not None:
        num, den = (m["mix_num"], m["mix_den"]) if m["whole"] is not None else (m["num"], m["den"])
        if int(den) == 0:
            return None
        return Number(sign * (int(m["whole"] or 0) + Fraction(int(num), int(den))), exact=True)
    if m["dotted"] is not None:
        return Number(sign * Fraction(int(m["dotted"].replace(".", ""))), exact=True)
    if m["bare"] is not None:
        return Number(sign * Fraction(m["bare"]), exact=False)
    digits = m["int"].replace(",", "").replace(" ", "")
    decimal = (m["frac"] or "") + (m["exp"] or "")
    return Number(sign * Fraction(digits + decimal), exact=not decimal)


def _one_number(span: str) -> tuple[str, re.Match[str]] | None:
    """A marked span's text after its last ``=`` and its one number (None: ``±``, no number or several)."""
    text = _normalize(span)
    if "±" in text:
        return None
    body = text.rpartition("=")[2]
    matches = list(_NUMBER.finditer(body))
    return (body, matches[0]) if len(matches) == 1 else None


def read_number(span: str, *, marked: bool) -> Number | None:
    """The one number of a marked span, or the last number of free text (rules in the module docstring).

    Args:
        span: the text to read (LaTeX or plain).
        marked: True for a boxed or ``answer is`` span: read after its last ``=``, exactly one number, no
            ``±``; False for a whole answer part: its last number, unless ``±`` precedes it.

    Returns:
        The number, or None when there is no unambiguous one.
    """
    if marked:
        found = _one_number(span)
        return None if found is None else _number(found[1])
    text = _normalize(span)
    matches = list(_NUMBER.finditer(text))
    if not matches or text[: matches[-1].start()].rstrip().endswith("±"):
        return None
    return _number(matches[-1])


def _braced(text: str, begin: int) -> str | None:
    """The text from ``begin`` to the brace that closes the one opened just before it (None: never closed)."""
    depth = 1
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def final_answer_span(answer_part: str) -> tuple[str, bool] | None:
    """Where the final answer is: ``(span, marked)`` by the rules of the module docstring.

    Args:
        answer_part: a reply's text after its think block.

    Returns:
        ``(boxed content or the sentence after the last answer marker, True)``, ``(answer_part, False)`` when
        neither is there, or None when the last ``\\boxed{`` is never closed.
    """
    boxes = list(_BOXED.finditer(answer_part))
    if boxes:
        content = _braced(answer_part, boxes[-1].end())
        return None if content is None else (content, True)
    markers = list(_MARKER.finditer(answer_part))
    if markers:
        return _SENTENCE_END.split(answer_part[markers[-1].end() :], 1)[0], True
    return answer_part, False


@functools.lru_cache(maxsize=4096)
def parse_reference(answer: str) -> Reference | None:
    """A reference answer as a :class:`Number` or :class:`Expression`; None when it is not gradable.

    Rules in the module docstring: ``"72"``, ``"1,000"``, ``"\\frac{3}{4}"``, ``"\\boxed{-2.5}"`` are
    numbers; ``"\\frac{\\sqrt{3}}{2}"`` is an expression; ``"yes"``, ``""``, ``"N/A"`` are None.
    """
    found = final_answer_span(answer.strip())
    if found is None:
        return None
    text = found[0].strip()
    if (one := _one_number(text)) is not None:
        body, match = one
        number, residue = _number(match), body[: match.start()] + body[match.end() :]
        if number is not None and _REFERENCE_RESIDUE.fullmatch(residue.strip()):
            return number
    if not _MATH_SIGN.search(text):
        return None
    parsed = parse(f"${text}$", extraction_config=_LATEX_CONFIG)
    return Expression(tuple(parsed)) if parsed else None


def answer_matches(answer_part: str, reference: Reference) -> bool:
    """Whether the final answer in ``answer_part`` equals ``reference``.

    A :class:`Number` reference compares with :func:`read_number` of :func:`final_answer_span`; an
    :class:`Expression` compares by math-verify (``verify(..., float_rounding=9)``) with the span's text
    (the last non-empty line when nothing marks the answer).
    """
    found = final_answer_span(answer_part)
    if found is None:
        return False
    span, marked = found
    if isinstance(reference, Number):
        number = read_number(span, marked=marked)
        return number is not None and reference.equals(number)
    if not marked:
        span = next((line for line in reversed(span.splitlines()) if line.strip()), "")
    if not span.strip():
        return False
    predicted = parse(span if "$" in span else f"${span}$", extraction_config=_PRED_CONFIG)
    return bool(predicted) and verify(list(reference.parsed), predicted, float_rounding=9)
