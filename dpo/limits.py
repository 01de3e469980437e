"""Allowed values of a number, written as an interval: "[0, 0.5)", "(0, inf)", "[1, inf)".

One notation for the limits of every numeric setting (training config fields and loss parameters), so the check
and the one-line message that names the allowed range come from the same string. NaN is never inside.
"""

import math


def parse(spec: str) -> tuple[float, float, bool, bool]:
    """'[0, 0.5)' -> (0.0, 0.5, True, False): low, high, low included, high included."""
    s = spec.strip()
    lo, hi = (float(x) for x in s[1:-1].split(","))
    return lo, hi, s[0] == "[", s[-1] == "]"


def within(value: float, spec: str) -> bool:
    lo, hi, lo_in, hi_in = parse(spec)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return False
    above = value >= lo if lo_in else value > lo
    below = value <= hi if hi_in else value < hi
    return above and below


def describe(spec: str) -> str:
    """How a message says it: '> 0', '>= 1', 'in [0, 0.5)'."""
    lo, hi, lo_in, _ = parse(spec)
    if math.isinf(hi) and not math.isinf(lo):
        return f"{'>=' if lo_in else '>'} {lo:g}"
    if math.isinf(lo) and math.isinf(hi):
        return "a finite number"
    return f"in {spec}"
