"""The benchmarks' Markdown tables: one row format, one separator, and the
paired differences they show."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def row(cells: Iterable) -> str:
    """`| a | b |`: one table line of the cells' `str`."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(
    columns: Sequence[str], rows: Iterable[Iterable], align: str | None = None
) -> list[str]:
    """The lines of a Markdown table: header, separator, one line per row.

    Args:
        columns: The header cells.
        rows: The cells of each row, already formatted (or `str`ed here).
        align: One letter per column, `l` (`---`) or `r` (`---:`); None:
            every column `l`.

    Example:
    >>> print("\\n".join(markdown_table(["a", "b"], [[1, "x"]], "lr")))
    | a | b |
    |---|---:|
    | 1 | x |
    """
    align = align or "l" * len(columns)
    if len(align) != len(columns):
        raise ValueError(
            f"`align` needs one letter per column ({len(columns)}). "
            f"Received: align={align!r}"
        )
    separator = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return [row(columns), separator, *(row(cells) for cells in rows)]


def pairing(row: dict) -> tuple:
    """What a run shares with the runs it is paired with: its seed and the
    network it started from (`trained`, the start's fingerprint; rows that
    do not log one pair with each other only)."""
    return row["seed"], row.get("trained")


def paired_differences(runs: Iterable[dict], baselines: Iterable[dict]) -> list:
    """`deployed` minus the baseline's, for each run that has a baseline of
    the same `pairing`."""
    base = {pairing(r): r["deployed"] for r in baselines}
    return [r["deployed"] - base[pairing(r)] for r in runs if pairing(r) in base]
