"""Allowed values of a number, written as an interval: "[0, 0.5)", "(0, inf)", "[1, inf)".

One notation for the limits of every numeric setting (training config fields, loss parameters, stage 1's
arguments and its backends' flags, verify's), so the check and the one-line message that names the allowed
range come from the same string. NaN is never inside. `within`/`describe` check and word a value; `inside`/
`allowed` add stage 1's typing rule (a whole number, never a bool) and wording.
"""

import math
import numbers


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


def inside(value, spec: str, whole: bool = False) -> bool:
    """`value` is a number (a whole number if `whole`; never a bool) in the interval `spec`. NaN never is."""
    kind = numbers.Integral if whole else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        return False
    return within(int(value) if whole else float(value), spec)


def allowed(spec: str, whole: bool = False, finite_first: bool = False) -> str:
    """What a message says the value must be: 'a whole number >= 1', 'a number in (0, 1]', 'a number > 0 and
    finite'; with finite_first (verify's wording) 'a finite number > 0'."""
    if whole:
        return f"a whole number {describe(spec)}"
    if not math.isinf(parse(spec)[1]):
        return f"a number {describe(spec)}"
    return f"a finite number {describe(spec)}" if finite_first else f"a number {describe(spec)} and finite"
