"""Errors memgraph raises for the user to fix (bad input); anything else inside the pipeline is a bug that
is logged and falls back to an unplanned graph."""


class MemgraphError(ValueError):
    """Bad input: an option, a budget or a model memgraph cannot work with, with what to do instead."""


class InfeasibleBudgetError(MemgraphError):
    """No plan fits the memory budget; the message names the smallest feasible peak and what dominates it."""
