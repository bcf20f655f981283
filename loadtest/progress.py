"""A rich progress bar over a runner's steps (one step = one load generator run), drawn on stderr.

The runners print their own lines to stderr while it runs; rich redirects them above the bar. When stderr
is not a terminal (a pipe, CI), rich draws nothing live and the lines pass through as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def steps(total: int, what: str) -> Iterator[Callable[[str], None]]:
    """Yields `advance(done_what)`: one step done, the bar's label says what was done last."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(what, total=total)

        def advance(done_what: str) -> None:
            bar.update(task, advance=1, description=f"{what}: {done_what}")

        yield advance
