"""What the rates of a step look like to a reader: the rate table and the rates by source.

Both read a :class:`~hf_dropgrad.rates.RateTable` at the current step; ``DropGrad.describe``,
``DropGrad.rate_groups`` and the Trainer layer's logs go through here.
"""

from __future__ import annotations

from hf_dropgrad.patterns import format_rate_table
from hf_dropgrad.rates import RateTable

__all__ = ["describe", "rate_groups"]


def rate_groups(table: RateTable) -> dict[str, float]:
    """Current rate by where it came from: ``{"default": r}`` for ``drop_rate``, the pattern
    for name-pattern rates, ``"params"`` for ``{parameter: rate}`` entries (their largest
    rate). What the Trainer layer logs.
    """
    out: dict[str, float] = {}
    for row in table.rows():
        if row.rate is not None:
            out[row.source] = max(row.rate, out.get(row.source, 0.0))
    return out


def describe(table: RateTable) -> str:
    """A table of which parameters got which rate (printed by the Trainer layer)."""
    return format_rate_table([(str(row.name), row.rate, row.pattern) for row in table.rows()])
