"""What the ``bgsave`` command prints: tables (rich when installed, plain text otherwise), JSON records, cells.

Everything a run directory supplies (sidecar values, file names, error text) is data from a possibly
untrusted source, so every cell, title and note is sanitised before it reaches the terminal: control
characters are escaped (a sidecar cannot move the cursor or retitle the window), and rich gets
:class:`~rich.text.Text`, never markup (a sidecar's ``"[bold]"`` is printed as written).
JSON has no NaN or Infinity: a non-finite metric is ``null`` there (it is never "best" anyway).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

__all__ = (
    "clean",
    "fmt",
    "fmt_age",
    "fmt_duration",
    "fmt_size",
    "message",
    "print_json",
    "print_table",
    "record",
)


# ---- JSON ---------------------------------------------------------------------------------------
def record(
    sidecar: Mapping[str, Any], path: str, size: int, committed: bool, mtime: float | None, *, trainer_state: bool
) -> dict[str, Any]:
    """One checkpoint as JSON: the sidecar's keys, then path, size, committed, mtime, trainer_state; file facts win.

    ``mtime`` is ISO 8601 in UTC, or None where the backend gives none. An uncommitted checkpoint's
    "sidecar" is just its epoch, from the file name.
    """
    out = {str(key): _json_value(value) for key, value in sidecar.items()}
    out["path"] = path
    out["size"] = size
    out["committed"] = committed
    out["mtime"] = datetime.fromtimestamp(mtime, tz=timezone.utc).isoformat() if mtime is not None else None
    out["trainer_state"] = trainer_state  # whether trainer_{epoch}.pt is beside it
    return out


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # YAML dates and the like, from sidecars bgsave did not write


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (non-ASCII kept: json escapes control characters itself)."""
    print(json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False))


# ---- messages -----------------------------------------------------------------------------------
def message(text: str) -> None:
    """``bgsave: text`` on stderr: an error, or a note such as a deprecation; sanitised line by line."""
    print("bgsave: " + "\n".join(clean(line) for line in text.split("\n")), file=sys.stderr)


# ---- tables -------------------------------------------------------------------------------------
def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str], *, right: Collection[int]
) -> None:
    """Print a table with rich when it is installed, else as plain aligned text; all text is sanitised first.

    Args:
        title: The line above the table.
        headers: Column names.
        rows: One list of cells (already formatted strings) per row.
        notes: Lines printed under the table.
        right: Indexes of the columns aligned right (numbers).
    """
    title = clean(title)
    cells = [[clean(cell) for cell in row] for row in rows]
    notes = [clean(line) for line in notes]
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        _print_plain(title, list(headers), cells, notes, right)
        return
    table = Table(
        title=Text(title),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
        pad_edge=False,
    )
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i in right else "left", overflow="fold")
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))
    console = Console(highlight=False)
    console.print(table)
    for line in notes:
        console.print(Text(line), soft_wrap=True)


def _print_plain(
    title: str, headers: list[str], rows: list[list[str]], notes: list[str], right: Collection[int]
) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(title)
    for cells in [headers, *rows]:
        print(line(cells))
    for text in notes:
        print(text)


def clean(text: str) -> str:
    """``text`` with control characters escaped, so a sidecar cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ---- cells --------------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    """A sidecar value in a cell: "-" for None, floats to 6 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def fmt_size(size: int) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def fmt_duration(seconds: Any) -> str:
    """A sidecar's ``total_time`` as 12.5s, 3m05s or 2h07m (anything else as :func:`fmt` shows it)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return fmt(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_age(mtime: float | None, now: float) -> str:
    """How long before ``now`` the file was modified, in its largest whole unit (d, h, m, s); "-" if unknown."""
    if mtime is None:
        return "-"
    age = max(0.0, now - mtime)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= span:
            return f"{int(age // span)}{unit}"
    return f"{int(age)}s"
