"""Number formats shared by the summary table, the sweep table and the run report, so that the
same figure reads the same everywhere ("n/a" where a value is missing)."""
from __future__ import annotations


def pct(x) -> str:
    """A fraction as a percentage with one decimal: 0.4567 -> "45.7%"."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ci(bounds) -> str:
    """A (low, high) fraction interval in percentage points: (0.1, 0.25) -> "[10.0, 25.0]"."""
    return "n/a" if bounds[0] is None else f"[{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"


def pval(p) -> str:
    """A p-value with four significant digits."""
    return "n/a" if p is None else f"{p:.4g}"
