"""Search-space distributions: checked in a sweep's spec, turned into Tune's domains by its runner."""

from __future__ import annotations

from typing import Any

# name -> what its list holds (the error message says it too).
DISTRIBUTIONS = {
    "choice": "values to pick from", "grid": "values to try, every one",
    "uniform": "[low, high]", "loguniform": "[low, high], low > 0", "randint": "[low, high), integers",
    "quniform": "[low, high, step]", "qloguniform": "[low, high, step], low > 0", "normal": "[mean, std]",
}


def distribution_problem(distribution: dict[str, Any]) -> str | None:
    if len(distribution) != 1 or next(iter(distribution)) not in DISTRIBUTIONS:
        names = ", ".join(f"{name} ({args})" for name, args in DISTRIBUTIONS.items())
        given = ", ".join(map(str, distribution)) or "nothing"
        return f"expected one distribution, got {given}; one of: {names}"
    kind, args = next(iter(distribution.items()))
    if not isinstance(args, list) or not args:
        return f"{kind} takes a list: {DISTRIBUTIONS[kind]}"
    if kind in ("choice", "grid"):
        return None
    expected = 3 if kind.startswith("q") else 2
    if len(args) != expected or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        return f"{kind} takes {expected} numbers: {DISTRIBUTIONS[kind]}"
    if kind != "normal" and args[0] >= args[1]:
        return f"{kind}: low must be below high, got {args[0]} >= {args[1]}"
    if "log" in kind and args[0] <= 0:
        return f"{kind}: low must be > 0, got {args[0]}"
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        return "randint takes two integers"
    return None


def sample_values(distribution: dict[str, Any]) -> list[Any]:
    """Values that stand for a distribution when checking a path: every choice, or both bounds."""
    kind, args = next(iter(distribution.items()))
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [args[0]] if kind == "normal" else [args[0], args[1]]
