"""Wall time and memory of each stage of a rewrite (match, calibrate, fit, emit, save), for the report, and
the progress bars shown while they run."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stages:
    """``with stages("fit"): ...`` records the stage's seconds and the peak memory reached by its end."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started + self.rows.get(name, {}).get("seconds", 0.0)
            self.rows[name] = {"seconds": round(seconds, 3), "peak_rss_mib": round(peak_rss_mib(), 1)}


def progress_bar(enabled: bool, description: str, total: int | None, unit: str) -> tqdm:
    """A tqdm bar on stderr (tqdm itself stays silent when stderr is not a terminal)."""
    return tqdm(total=total, desc=description, unit=unit, disable=None if enabled else True, leave=False)
