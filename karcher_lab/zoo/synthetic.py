"""The synthetic tasks of the zoo: short string and arithmetic transformations, generated from code.

Inputs are kept short (at most ~12 characters, small alphabets) so that a character-level model with
a few hundred thousand parameters learns each one in seconds. Several tasks read the same kind of
input (lowercase words: reverse, sort, uppercase, caesar; digit pairs: addition, subtraction) and map
it differently, so their fine-tunes pull a shared base in different directions.
"""
from __future__ import annotations

import random
import string

from karcher_lab.zoo.tasks import SyntheticTask

LOWER = string.ascii_lowercase


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LOWER) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


class Addition(SyntheticTask):
    name, tag, description = "addition", "add", "add a digit to a number below 100: add:47+8= -> 55"

    def sample(self, rng):
        a, b = rng.randrange(100), rng.randrange(10)
        return f"{a}+{b}", str(a + b)


class DoubleLetters(SyntheticTask):
    name, tag, description = "double", "dbl", "write each letter twice, 2-5 letters: dbl:abc= -> aabbcc"

    def sample(self, rng):
        w = _word(rng, 2, 5)
        return w, "".join(c + c for c in w)


class SwapCase(SyntheticTask):
    name, tag, description = "swapcase", "swp", "swap the case of 3-8 mixed-case letters: swp:aBc= -> AbC"

    def sample(self, rng):
        w = _word(rng, 3, 8, string.ascii_letters)
        return w, w.swapcase()


class MaxDigit(SyntheticTask):
    name, tag, description = "maxdigit", "max", "largest digit of 3-8 digits: max:38172= -> 8"

    def sample(self, rng):
        w = _word(rng, 3, 8, string.digits)
        return w, max(w)


class Reverse(SyntheticTask):
    name, tag, description = "reverse", "rev", "reverse a word of 3-6 letters: rev:abcd= -> dcba"

    def sample(self, rng):
        w = _word(rng, 3, 6)
        return w, w[::-1]


class Sort(SyntheticTask):
    name, tag, description = "sort", "srt", "sort the letters of a word of 3-6 letters: srt:dbca= -> abcd"

    def sample(self, rng):
        w = _word(rng, 3, 6)
        return w, "".join(sorted(w))


class Uppercase(SyntheticTask):
    name, tag, description = "uppercase", "upc", "upper-case a word of 3-8 letters: upc:hello= -> HELLO"

    def sample(self, rng):
        w = _word(rng, 3, 8)
        return w, w.upper()


class Caesar(SyntheticTask):
    name, tag, description = "caesar", "rot", "Caesar shift by 3 of a word of 3-6 letters: rot:xyz= -> abc"
    shift = 3

    def sample(self, rng):
        w = _word(rng, 3, 6)
        return w, "".join(LOWER[(LOWER.index(c) + self.shift) % 26] for c in w)


class Brackets(SyntheticTask):
    name, tag, description = "brackets", "bal", "is a string of 2-12 parentheses balanced: bal:(()= -> no"

    def sample(self, rng):
        n = rng.randint(1, 6)
        if rng.random() < 0.5:  # a random balanced string
            s, depth, opens = "", 0, n
            while opens or depth:
                if opens and (depth == 0 or rng.random() < 0.5):
                    s, depth, opens = s + "(", depth + 1, opens - 1
                else:
                    s, depth = s + ")", depth - 1
        else:
            s = "".join(rng.choice("()") for _ in range(2 * n))
        return s, "yes" if _balanced(s) else "no"


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += 1 if c == "(" else -1
        if depth < 0:
            return False
    return depth == 0


class KilometresToMetres(SyntheticTask):
    name, tag, description = "units", "km", "kilometres (two decimals) to metres: km:3.25= -> 3250"

    def sample(self, rng):
        centi = rng.randrange(1000)
        return f"{centi // 100}.{centi % 100:02d}", str(centi * 10)


class DateFormat(SyntheticTask):
    name, tag, description = "dates", "dat", "ISO date to day/month/year: dat:2024-03-05= -> 05/03/2024"

    def sample(self, rng):
        y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
        return f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}"


SYNTHETIC_TASKS = (
    Addition(), Reverse(), Sort(), Uppercase(), Caesar(), SwapCase(), DoubleLetters(), MaxDigit(), Brackets(),
    KilometresToMetres(), DateFormat(),
)
