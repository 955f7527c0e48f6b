"""Progress reporting and result tables (rich).

Library code reports through the small :class:`Progress` interface and never
prints; the CLI passes a :class:`RichProgress`, tests pass nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichBar
from rich.table import Table


class Progress:
    """Receives progress from long work. The base class ignores everything."""

    def start(self, stage: str, total: int) -> None:
        """A stage of `total` units (images) begins."""

    def update(self, advance: int, **fields: Any) -> None:
        """`advance` more units are done; `fields` (loss, ...) may be shown."""

    def stop(self) -> None:
        """The current stage is over."""

    def note(self, message: str) -> None:
        """Something the user should know (a warning, a decision taken)."""


class RichProgress(Progress):
    """A rich progress bar per stage with images/s and ETA, and notes on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        # Logs and CI have no terminal: give the bar room instead of rich's 80 columns.
        self.console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 140)
        self._bar: _RichBar | None = None
        self._task = None
        self._t0 = 0.0
        self._done = 0

    def start(self, stage: str, total: int) -> None:
        self.stop()
        self._bar = _RichBar(TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[info]}"),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
                             transient=False)
        self._bar.start()
        self._task = self._bar.add_task(stage, total=total, rate="", info="")
        self._t0, self._done = time.perf_counter(), 0

    def update(self, advance: int, **fields: Any) -> None:
        if self._bar is None:
            return
        self._done += advance
        rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
        info = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._bar.update(self._task, advance=advance, rate=f"{rate:,.0f} img/s", info=info)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def note(self, message: str) -> None:
        self.console.print(f"[yellow]note:[/yellow] {message}")


def table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> Table:
    """A rich table; floats get two decimals, or three significant digits when tiny."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for row in rows:
        t.add_row(*(_cell(v) for v in row))
    return t


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and abs(v) < 0.01 else f"{v:,.2f}"
    return str(v)


def print_inspect(cache: str, summary: dict) -> None:
    """The summary of `kdcache inspect` as two tables: the cache's fields, then per-view teacher statistics."""
    console = Console()
    skip = {"per_view", "mean", "std", "crop_scale", "crop_ratio", "library_versions"}
    rows = [(k, v) for k, v in summary.items() if k not in skip]
    rows += [("mean / std", f"{summary['mean']} / {summary['std']}"),
             ("crop scale / ratio", f"{summary['crop_scale']} / {summary['crop_ratio']}")]
    console.print(table(f"cache {cache}", ["field", "value"], rows))
    console.print(table("per view (teacher vs labels)", ["view", "top-1 %", "confidence", "entropy"],
                        [(v["view"], v["top1"], v["confidence"], v["entropy"]) for v in summary["per_view"]]))
