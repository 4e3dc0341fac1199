"""Peak memory as a sympy expression of a dynamic sequence length, and its inverse (max_size)."""
from __future__ import annotations

import math

import sympy

from memgraph import cost_model
from memgraph.cost_model import symbolic
from memgraph.capture import capture
from memgraph.cost_model.sizing import largest_fitting

from tests.helpers import NO_REWRITES


def static_peak(model, make_ids, length: int) -> int:
    import torch._dynamo

    torch._dynamo.reset()
    ids = make_ids(length, seed=length)
    (captured,) = capture(model, options=NO_REWRITES, solvers=("none",), input_ids=ids, labels=ids.clone())
    return cost_model.estimate_partitioned(captured.graph, captured.fw, captured.bw).peak_bytes_hint


def _dynamic_estimate(model, make_ids):
    ids = make_ids(32)
    (captured,) = capture(model, options=NO_REWRITES, solvers=("none",), dynamic_dims={"input_ids": 1, "labels": 1},
                               input_ids=ids, labels=ids.clone())
    return cost_model.estimate_partitioned(captured.graph, captured.fw, captured.bw)


def test_symbolic_peak_equals_static_estimates(llama, make_ids):
    estimate = _dynamic_estimate(llama, make_ids)
    assert isinstance(estimate.peak_bytes, sympy.Expr)
    (seq,) = estimate.symbols
    assert estimate.hints[seq] == 32
    static = {length: static_peak(llama, make_ids, length) for length in (17, 100, 101)}
    for length, expected in static.items():
        assert symbolic.evaluate(estimate.peak_bytes, {seq: length}) == expected
        assert estimate.peak_at(**{str(seq): length}) == expected

    # max_size agrees with a bisection over the (exact) peak, and the static estimates bracket it.
    budget = (static[100] + static[101]) // 2
    largest = estimate.max_size(seq, budget)

    def bisect(low: int, high: int) -> int:
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if estimate.peak_at(**{str(seq): middle}) <= budget else (low, middle)
        return low

    assert largest == bisect(1, 4096) == 100
    assert estimate.max_size(seq, 10) == 0
    assert estimate.max_size(seq, 10**15) > 10**5


def test_largest_fitting_handles_a_non_monotone_max():
    s = sympy.Symbol("s", integer=True, positive=True)
    # The first piece dips below the budget again after s = 10 (a hump); the max is what must fit.
    peak = sympy.Max(1000 - (s - 5) ** 2 * 10 + 500, 30 * s)
    values = {s: 1}
    budget = 1400
    fits = [n for n in range(1, 200) if int(peak.subs(s, n)) <= budget]
    expected = next(n - 1 for n in range(1, 200) if n not in fits)
    assert largest_fitting(peak, s, budget, values) == expected
    assert largest_fitting(sympy.Integer(5) + 0 * s, s, 10, values) == math.inf


def test_upper_envelope_keeps_each_winning_piece():
    s = sympy.Symbol("s", integer=True, positive=True)
    pieces = [100 * s + 10, 10 * s + 5000, 50 * s + 100, 5 * s**2, 9 * s + 4000]
    candidates = [symbolic.to_terms(p) for p in pieces]
    envelope = symbolic.upper_envelope(candidates, {s: 10})
    kept = {symbolic.from_terms(t) for t in envelope}
    # 10s+5000 leads up to s = 32, then 5s^2; 100s+10 is below one of them everywhere.
    assert kept == {10 * s + 5000, 5 * s**2}
    peak = symbolic.max_of(envelope)
    for n in (1, 7, 60, 1000, 123457):
        assert int(peak.subs(s, n)) == max(int(p.subs(s, n)) for p in pieces)


def test_rounding_stays_exact_under_symbols():
    s = sympy.Symbol("s", integer=True, positive=True)
    assert symbolic.rounded_allocation(512 * s, 512) == 512 * s
    rounded = symbolic.rounded_allocation(4 * s, 512)
    for n in (1, 127, 128, 129, 1000):
        assert symbolic.evaluate(rounded, {s: n}) == symbolic.rounded_allocation(4 * n, 512)
