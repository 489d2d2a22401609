"""Progress artifacts that stages update while they work (decode, train). Kept apart from the
run's published artifacts (tasks/artifacts.py), so that editing a report table never changes
the code version of a stage that takes hours."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact

DECODE = "agelens-decode-progress"
TRAINING = "agelens-training-progress"


class Progress:
    """A progress artifact, updated at most every `every` seconds (and at the end)."""

    def __init__(self, key: str, description: str, total: int, every: float = 2.0):
        self.total, self.every, self.last = max(total, 1), every, 0.0
        self.id = create_progress_artifact(progress=0.0, key=key, description=description)

    def __call__(self, done: int, description: str) -> None:
        now = time.monotonic()
        if done >= self.total or now - self.last >= self.every:
            self.last = now
            update_progress_artifact(self.id, progress=100.0 * min(done, self.total) / self.total,
                                     description=description)
