"""The `predict` flow: batch scoring of a folder with the champion of a configuration, as a Prefect
run whose results table is an artifact (`agelens predict` does the same from the command line
without Prefect; flows/predict/scoring.py)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger

from agelens.flows.registry.models import config_id
from agelens.flows.predict.scoring import load_scorer, score, write
from agelens.flows.pipeline.settings import RunSettings
from agelens.flows.service.logs import ONE_LINE, quiet_expected_errors
from agelens.tasks.core.errors import AgelensError
from agelens.tasks.reporting.artifacts import publish_run
from agelens.tasks.reporting.tables import Table


@flow(name="predict")
def predict_folder(folder: str, settings: RunSettings = RunSettings(), detect: bool = True) -> dict:
    """Score every photo below `folder` with the champion of these settings' configuration; the
    table goes to <out>/predictions/<time>.parquet and to the artifacts `agelens-predictions` and
    `agelens-predictions-skipped`."""
    log = get_run_logger()
    if not os.environ.get("AGELENS_DEBUG"):
        quiet_expected_errors()
    try:
        return _predict(folder, settings, detect, log)
    except AgelensError as error:
        log.error("%s%s", ONE_LINE, error)  # the one line a worker's log shows of it
        raise


def _predict(folder: str, settings: RunSettings, detect: bool, log) -> dict:
    from prefect.runtime import deployment

    scorer = load_scorer(settings.out, config_id(settings), device=settings.device)
    if scorer.warning:
        log.warning("%s", scorer.warning)
    rows, skipped = score([folder], scorer, detect=detect, progress=False)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = Path(settings.out).expanduser().resolve() / "predictions" / f"{stamp}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    write(rows, target)
    publish_run([Table("predictions", rows[:1000], f"{len(rows)} faces in {folder} scored by the {scorer.source}"
                                                   + (" (the first 1,000 shown)" if len(rows) > 1000 else "")),
                 Table("predictions-skipped", skipped[:1000], f"{len(skipped)} files without a face")], None,
                deployment.name)
    log.info("%d faces scored, %d files skipped; table: %s", len(rows), len(skipped), target)
    return {"faces": len(rows), "skipped": len(skipped), "table": str(target), "model": scorer.source}
