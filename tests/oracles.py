"""Plain-Python reference computations the tests check SQL and numpy results against."""


def levenshtein(a, b) -> int:
    """Token edit distance, the textbook dynamic programme (independent of the SQL macro)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]
