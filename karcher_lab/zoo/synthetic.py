"""The synthetic tasks of the zoo: short string and digit transformations, generated from code.

Each task is a pure function ``solve(input) -> answer`` and a seeded input distribution
``random_input(rng)``. Inputs are short (at most 12 characters, small alphabets) so that a
character-level model with a few hundred thousand parameters learns each task in seconds. Several tasks
read the same kind of input and map it differently (lowercase words: reverse, sort, uppercase,
caesar, double; digit strings: addition, maxdigit, units), so their fine-tunes pull a shared base
in different directions.
"""
from __future__ import annotations

import random
import string

from karcher_lab.zoo.tasks import SyntheticTask

LOWER = string.ascii_lowercase


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LOWER) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


class Addition(SyntheticTask):
    name, tag = "addition", "add"
    description = "add a digit to a number below 100: add:47+8= -> 55"

    def random_input(self, rng):
        return f"{rng.randrange(100)}+{rng.randrange(10)}"

    def solve(self, text):
        a, b = text.split("+")
        return str(int(a) + int(b))


class Reverse(SyntheticTask):
    name, tag = "reverse", "rev"
    description = "reverse a word of 3-6 letters: rev:abcd= -> dcba"

    def random_input(self, rng):
        return _word(rng, 3, 6)

    def solve(self, text):
        return text[::-1]


class Sort(SyntheticTask):
    name, tag = "sort", "srt"
    description = "sort the letters of a word of 3-6 letters: srt:dbca= -> abcd"

    def random_input(self, rng):
        return _word(rng, 3, 6)

    def solve(self, text):
        return "".join(sorted(text))


class Uppercase(SyntheticTask):
    name, tag = "uppercase", "upc"
    description = "upper-case a word of 3-8 letters: upc:hello= -> HELLO"

    def random_input(self, rng):
        return _word(rng, 3, 8)

    def solve(self, text):
        return text.upper()


class Caesar(SyntheticTask):
    name, tag = "caesar", "rot"
    description = "Caesar shift by 3 of a word of 3-6 letters: rot:xyz= -> abc"

    def random_input(self, rng):
        return _word(rng, 3, 6)

    def solve(self, text):
        return "".join(LOWER[(LOWER.index(c) + 3) % 26] for c in text)


class SwapCase(SyntheticTask):
    name, tag = "swapcase", "swp"
    description = "swap the case of 3-8 mixed-case letters: swp:aBc= -> AbC"

    def random_input(self, rng):
        return _word(rng, 3, 8, string.ascii_letters)

    def solve(self, text):
        return text.swapcase()


class DoubleLetters(SyntheticTask):
    name, tag = "double", "dbl"
    description = "write each letter twice, 2-5 letters: dbl:abc= -> aabbcc"

    def random_input(self, rng):
        return _word(rng, 2, 5)

    def solve(self, text):
        return "".join(c + c for c in text)


class MaxDigit(SyntheticTask):
    name, tag = "maxdigit", "max"
    description = "largest digit of 3-8 digits: max:38172= -> 8"

    def random_input(self, rng):
        return _word(rng, 3, 8, string.digits)

    def solve(self, text):
        return max(text)


class Brackets(SyntheticTask):
    name, tag = "brackets", "bal"
    description = "is a string of 2-12 parentheses balanced: bal:(()= -> no"

    def random_input(self, rng):
        n = rng.randint(1, 6)
        if rng.random() >= 0.5:
            return "".join(rng.choice("()") for _ in range(2 * n))
        s, depth, opens = "", 0, n  # a random balanced string, so that half the answers are "yes"
        while opens or depth:
            if opens and (depth == 0 or rng.random() < 0.5):
                s, depth, opens = s + "(", depth + 1, opens - 1
            else:
                s, depth = s + ")", depth - 1
        return s

    def solve(self, text):
        depth = 0
        for c in text:
            depth += 1 if c == "(" else -1
            if depth < 0:
                return "no"
        return "yes" if depth == 0 else "no"


class KilometresToMetres(SyntheticTask):
    name, tag = "units", "km"
    description = "kilometres (two decimals) to metres: km:3.25= -> 3250"

    def random_input(self, rng):
        centi = rng.randrange(1000)
        return f"{centi // 100}.{centi % 100:02d}"

    def solve(self, text):
        whole, cents = text.split(".")
        return str(int(whole) * 1000 + int(cents) * 10)


class DateFormat(SyntheticTask):
    name, tag = "dates", "dat"
    description = "ISO date to day/month/year: dat:2024-03-05= -> 05/03/2024"

    def random_input(self, rng):
        return f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"

    def solve(self, text):
        y, m, d = text.split("-")
        return f"{d}/{m}/{y}"


SYNTHETIC_TASKS = (
    Addition(), Reverse(), Sort(), Uppercase(), Caesar(), SwapCase(), DoubleLetters(), MaxDigit(), Brackets(),
    KilometresToMetres(), DateFormat(),
)
