"""Progress that long stages (decode, train) show while they work: in the terminal, the log and
a Prefect progress artifact. Kept apart from the run's published artifacts
(tasks/reporting/artifacts.py), so that editing a report table never changes the code version
of a stage that takes hours."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

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


class DecodeProgress:
    """Images/s and the time left, in the terminal (tqdm), the log and the Prefect UI."""

    def __init__(self, total: int, log, every: float = 30.0):
        self.total, self.log, self.every = total, log, every
        self.began = self.logged = time.monotonic()
        self.bar = tqdm(total=total, desc="decode", unit="img", disable=None)
        self.artifact = Progress(DECODE, f"Decoding {total:,} images", total)

    def __call__(self, done: int) -> None:
        self.bar.update(done - self.bar.n)
        elapsed = time.monotonic() - self.began
        rate = done / max(elapsed, 1e-9)
        text = f"decoded {done:,} of {self.total:,} images ({rate:,.0f}/s, {(self.total - done) / max(rate, 1e-9):,.0f} s left)"
        self.artifact(done, text)
        if done == self.total or time.monotonic() - self.logged >= self.every:
            self.logged = time.monotonic()
            self.log.info(text)

    def close(self) -> None:
        self.bar.close()


class TrainingProgress:
    """The Prefect progress artifact, updated after every epoch."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.artifact = Progress(TRAINING, f"Training progress ({epochs} epochs)", epochs, every=0)

    def __call__(self, epoch: int, row: dict) -> None:
        self.artifact(epoch, f"epoch {epoch}/{self.epochs}: val loss {row['val_loss']:.4f}, val acc {row['val_acc']:.3f}")
