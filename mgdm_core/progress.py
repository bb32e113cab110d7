"""Progress of long loops (training steps, images sampled), for whoever runs the stage to show.

The core only calls `report(task, done, total)`; a front door that wants to display progress
installs a reporter for the duration of a stage with `reporting(fn)` (the Prefect flow turns it
into a progress artifact). Nothing is installed by default, so `report` costs one lookup.
The reporter lives in a context variable: it follows the thread (or task) that installed it, so
two stages running side by side in threads each report to their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator

Reporter = Callable[[str, int, int], None]  # (task, done, total)

_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("mgdm_progress", default=None)
log = logging.getLogger(__name__)


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Send `report` calls made in this context to `reporter`."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def report(task: str, done: int, total: int) -> None:
    """`done` of `total` units of `task` (e.g. "train_diffusion", 250, 1000) are complete.

    A failing reporter never stops the stage: progress is a display, not a result."""
    reporter = _reporter.get()
    if reporter is None or total <= 0:
        return
    try:
        reporter(task, done, total)
    except Exception as exc:  # noqa: BLE001 - a display must not fail the stage
        log.debug("progress reporter failed: %s", exc)
