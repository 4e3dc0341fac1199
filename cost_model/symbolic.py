"""Byte counts that are ints when shapes are static and sympy expressions when Dynamo made a size dynamic.

A live-memory total is a sum of many storage sizes. Adding sympy expressions one by one is quadratic, so
totals are kept as ``Terms``: a ``{monomial: coefficient}`` dict (``{1: c}`` for the constant part), added
and subtracted in O(#monomials). Monomials are products of size symbols (``s0``, ``s0*s1``, ``s0**2``) or
opaque atoms such as ``ceiling(5*s0/128)`` (allocator rounding); all of them are >= 0 for valid sizes,
which is what makes the coefficient-wise dominance test in ``upper_envelope`` sound.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import numpy as np
import sympy

from memgraph import _compat

Size = Any  # int | sympy.Expr
Terms = dict  # {sympy monomial (sympy.Integer(1) for constants): int coefficient}

_ONE = sympy.Integer(1)


def is_symbolic(value: Any) -> bool:
    return isinstance(value, sympy.Basic) and not value.is_Number


def as_size(value: Any) -> Size:
    """An int, or a sympy expression for a SymInt (``s0*64``)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    expr = _compat.symint_expr(value)
    if expr is not None:
        return int(expr) if expr.is_Number else expr
    if isinstance(value, sympy.Basic):
        return int(value) if value.is_Number else value
    return int(value)


def rounded_allocation(nbytes: Size, granularity: int) -> Size:
    """What an allocator charges for ``nbytes``: CUDA's caching allocator rounds every block up to 512 bytes."""
    if granularity <= 1:
        return nbytes
    if isinstance(nbytes, int):
        return 0 if nbytes == 0 else -(-nbytes // granularity) * granularity
    # sympy simplifies ceiling(k*s0) to k*s0 for integer k, so common sizes stay polynomials.
    return granularity * sympy.ceiling(nbytes / granularity)


def evaluate(value: Size, hints: Mapping[sympy.Symbol, int]) -> int:
    """The value at concrete sizes (``hints`` maps every free symbol to an int)."""
    if isinstance(value, int):
        return value
    result = value.xreplace({s: sympy.Integer(v) for s, v in hints.items()})
    if not result.is_Number:
        missing = sorted(str(s) for s in result.free_symbols)
        raise ValueError(f"no value for size symbol(s) {missing} in {value}")
    return int(result)


def to_terms(value: Size) -> Terms:
    if isinstance(value, int):
        return {_ONE: value} if value else {}
    return dict(_expr_terms(value))


@functools.lru_cache(maxsize=65536)
def _expr_terms(value: sympy.Expr) -> tuple:
    terms: Terms = {}
    for monomial, coefficient in sympy.expand(value).as_coefficients_dict().items():
        terms[monomial] = terms.get(monomial, 0) + int(coefficient)
    return tuple((m, c) for m, c in terms.items() if c)


def add_terms(total: Terms, terms: Terms, sign: int = 1) -> None:
    for monomial, coefficient in terms.items():
        value = total.get(monomial, 0) + sign * coefficient
        if value:
            total[monomial] = value
        else:
            total.pop(monomial, None)


def from_terms(terms: Terms) -> Size:
    if not terms:
        return 0
    if set(terms) == {_ONE}:
        return int(terms[_ONE])
    return sympy.Add(*(c * m for m, c in terms.items()))


def upper_envelope(candidates: Iterable[Terms], hints: Mapping[sympy.Symbol, int]) -> list[Terms]:
    """The candidates that can be the maximum: a compact, exact-where-sampled ``Max`` of the timeline.

    1. Coefficient-wise dominance: every monomial is >= 0 for valid sizes, so a candidate whose every
       coefficient is <= another's never exceeds it (sound, also with ``ceiling`` atoms).
    2. The survivors are evaluated on a grid of sizes (every size up to 2048, then ~1% steps up to 2**22,
       and the traced sizes) and only those that are the maximum somewhere are kept. Between grid points a
       dropped candidate can exceed the kept ones only through allocator rounding (``ceiling`` terms, at most
       ``granularity`` bytes per tensor).
    """
    unique = list({frozenset(t.items()): t for t in candidates}.values())
    if len(unique) <= 1:
        return unique or [{}]
    monomials = sorted({m for t in unique for m in t}, key=str)
    column = {m: j for j, m in enumerate(monomials)}
    coefficients = np.zeros((len(unique), len(monomials)))
    for i, terms in enumerate(unique):
        for monomial, coefficient in terms.items():
            coefficients[i, column[monomial]] = coefficient
    symbols = sorted(set().union(*(m.free_symbols for m in monomials)), key=str)
    at_hints = np.array([float(evaluate(m, hints)) for m in monomials])
    survivors = _not_dominated(coefficients, coefficients @ at_hints)
    samples = _sample_grid(symbols, hints)
    at_samples = _monomial_values(monomials, symbols, samples)  # (monomials, samples)
    values = coefficients[survivors] @ at_samples
    winners = set(survivors[np.argmax(values, axis=0)].tolist())
    return [unique[i] for i in sorted(winners)]


def _not_dominated(coefficients: np.ndarray, order_key: np.ndarray) -> np.ndarray:
    kept: list[int] = []
    for i in np.argsort(-order_key, kind="stable"):
        if kept and np.any(np.all(coefficients[kept] >= coefficients[i], axis=1)):
            continue
        kept.append(int(i))
    return np.array(kept)


def _sample_grid(symbols: list[sympy.Symbol], hints: Mapping[sympy.Symbol, int]) -> np.ndarray:
    """Points (samples x symbols): dense for one symbol, a coarser product grid for several."""
    dense_up_to, ratio, top = (2048, 1.01, 2**22) if len(symbols) <= 1 else (64, 1.1, 2**20)
    values = set(range(1, dense_up_to + 1))
    x = float(dense_up_to)
    while x < top:
        x *= ratio
        values.add(int(x))
    axes = [sorted(values | {int(hints.get(s, 1))}) for s in symbols]
    if not axes:
        return np.zeros((1, 0))
    mesh = np.meshgrid(*[np.array(a, dtype=float) for a in axes], indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


# sympy functions of torch's shape environment (integer division and rounding of SymInts), as numpy sees them.
_NUMPY_FUNCTIONS = {
    "ceiling": np.ceil, "floor": np.floor,
    "FloorDiv": lambda a, b: np.floor(a / b), "CeilDiv": lambda a, b: np.ceil(a / b),
    "IntTrueDiv": lambda a, b: a / b, "FloatTrueDiv": lambda a, b: a / b,
    "PythonMod": np.mod, "Mod": np.mod, "ModularIndexing": lambda a, b, c: np.mod(np.floor(a / b), c),
    "CeilToInt": np.ceil, "FloorToInt": np.floor, "TruncToInt": np.trunc, "RoundToInt": np.round,
}


def _monomial_values(monomials: list[sympy.Expr], symbols: list[sympy.Symbol], samples: np.ndarray) -> np.ndarray:
    rows = []
    for monomial in monomials:
        if monomial.is_Number:
            rows.append(np.full(samples.shape[0], float(monomial)))
            continue
        function = sympy.lambdify(symbols, monomial, modules=[_NUMPY_FUNCTIONS, "numpy"])
        rows.append(np.broadcast_to(np.asarray(function(*samples.T), dtype=float), samples.shape[:1]))
    return np.array(rows)


def max_of(front: list[Terms]) -> Size:
    exprs = [from_terms(t) for t in front]
    if len(exprs) == 1:
        return exprs[0]
    return sympy.Max(*exprs)
