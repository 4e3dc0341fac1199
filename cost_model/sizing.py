"""Inverting a symbolic peak: the largest size (sequence length, batch) whose predicted peak fits a budget."""
from __future__ import annotations

import math
from typing import Callable, Mapping

import sympy

from memgraph.cost_model.symbolic import Size, evaluate

_SEARCH_LIMIT = 2**40


def largest_fitting(peak: Size, symbol: sympy.Symbol, budget_bytes: int, values: Mapping[sympy.Symbol, int],
                    lower: int = 1, *, peak_at: Callable[[int], int] | None = None):
    """Largest n >= lower with ``peak(m) <= budget`` for every integer m in [lower, n] (others fixed by
    ``values``); 0 if ``lower`` does not fit, ``math.inf`` if the peak never exceeds the budget.

    ``peak_at(n)``, when given, is the exact peak at n (it decides); ``peak`` (a Max of pieces) supplies the
    points where feasibility can change. When every piece is a polynomial in ``symbol`` the feasibility can only
    change at real roots of ``piece - budget``, so checking the integers around those roots is exact even
    when the peak is not monotone. Otherwise (opaque atoms such as ``ceiling``) an exponential + binary
    search assumes the peak is non-decreasing in the size, which holds for sums of tensor sizes.
    """
    others = {s: sympy.Integer(v) for s, v in values.items() if s != symbol}

    def fits(n: int) -> bool:
        value = peak_at(n) if peak_at is not None else evaluate(peak, {**values, symbol: n})
        return value <= budget_bytes

    if not fits(lower):
        return 0
    if isinstance(peak, int) or symbol not in peak.free_symbols:
        return math.inf
    pieces = list(peak.args) if isinstance(peak, sympy.Max) else [peak]
    boundaries = _crossings(pieces, symbol, budget_bytes, others)
    if boundaries is not None:
        for point in sorted(p for p in boundaries if p > lower):
            if not fits(point):
                return point - 1
        return math.inf
    return _monotone_search(fits, lower)


def _crossings(pieces, symbol, budget_bytes, others) -> set[int] | None:
    points: set[int] = set()
    for piece in pieces:
        expr = sympy.expand(piece.xreplace(others)) - budget_bytes
        try:
            roots = sympy.Poly(expr, symbol).real_roots()
        except (sympy.PolynomialError, sympy.GeneratorsNeeded, NotImplementedError):
            return None
        for root in roots:
            value = float(root)
            if value < _SEARCH_LIMIT:
                points.update({math.floor(value), math.floor(value) + 1, math.ceil(value)})
    return points


def _monotone_search(fits, lower: int):
    high = max(lower, 1)
    while fits(high):
        if high >= _SEARCH_LIMIT:
            return math.inf
        high *= 2
    low = lower  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low
