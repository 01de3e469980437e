"""Numeric arguments of stage 1: allowed values written as intervals, "[1, inf)", "(0, 1]" (dpo/limits.py's
notation), so that each check and the message naming the allowed range come from the same string.

Used by `refcache precompute` (its own arguments and the backends' Flag.limits) and `refcache verify`.
"""

import math
import numbers

from dpo import limits


def inside(value, spec: str, whole: bool = False) -> bool:
    """`value` is a number (a whole number if `whole`; never a bool) in the interval `spec`. NaN never is."""
    kind = numbers.Integral if whole else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        return False
    return limits.within(int(value) if whole else float(value), spec)


def allowed(spec: str, whole: bool = False, finite_first: bool = False) -> str:
    """What a message says the value must be: 'a whole number >= 1', 'a number in (0, 1]', 'a number > 0 and
    finite'; with finite_first (verify's wording) 'a finite number > 0'."""
    if whole:
        return f"a whole number {limits.describe(spec)}"
    if not math.isinf(limits.parse(spec)[1]):
        return f"a number {limits.describe(spec)}"
    return f"a finite number {limits.describe(spec)}" if finite_first else f"a number {limits.describe(spec)} and finite"
