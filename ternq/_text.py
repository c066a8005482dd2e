"""Plain-text output shared by `ternq.report` and the ``ternq`` command: aligned tables, byte sizes, printable text."""
from __future__ import annotations

from collections.abc import Collection, Sequence


def printable(text: str) -> str:
    """`text` safe to print on any terminal: control characters (an ANSI escape, a newline in a name) and lone
    surrogates shown as Python escapes, everything else as is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else repr(c)[1:-1] for c in text)


def human_bytes(n: float) -> str:
    """``123 B``, ``4.56 KiB`` ... ``7.89 GiB`` (binary units; GiB is the largest)."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def aligned_table(header: Sequence[str], body: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """Header, rule, one line per body row, rule; columns padded to their widest cell, those in `right`
    right-aligned, trailing spaces dropped."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return [line(header), rule, *(line(row) for row in body), rule]
