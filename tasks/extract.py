"""Stage: metadata -> one validated Parquet row per image."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class ExtractSummary(Summary):
    rows_in: int
    rows_out: int
    dropped: dict[str, int]
    dropped_examples: dict[str, list[str]]
    classes: list[str]
    per_class: dict[str, int]
    identities: int
    identity_source: str
    source_format: str
    skipped_names: list[str] = []  # file names that are not UTF-8 (escaped), never read
    skipped_name_count: int = 0


STAGE = Stage("extract", ExtractSummary, inputs=("source", "listing"), outputs=("metadata",))


def run(job: Job) -> dict:
    """Read the metadata, validate it against the image folder, write `metadata.parquet`."""
    from pathlib import Path

    from agelens.tasks.data.sources import list_images, read_source
    from agelens.tasks.data.validation import validate

    log = logger()
    source, listing = job.inputs["source"], job.inputs["listing"]
    found = list_images(Path(listing["path"]), exclude=listing.get("exclude", ()))
    raw = read_source(Path(source["path"]), source["format"], found)
    table, summary = validate(raw, found)
    if summary["skipped_name_count"]:
        log.warning("skipped %d files whose names are not UTF-8 (e.g. %s)", summary["skipped_name_count"],
                    ", ".join(summary["skipped_names"][:3]))
    for reason, count in summary["dropped"].items():
        if count:
            log.warning("dropped %d rows: %s (e.g. %s)", count, reason.replace("_", " "),
                        ", ".join(summary["dropped_examples"][reason][:3]))
    log.info("kept %d of %d rows, %d classes, %d identities", summary["rows_out"], summary["rows_in"],
             len(summary["classes"]), summary["identities"])
    with job.output() as out:
        table.to_parquet(out.path("metadata.parquet"), index=False)
        out.add("metadata", "metadata.parquet")
        return out.finish(ExtractSummary(**summary, source_format=source["format"]),
                          meta={"classes": summary["classes"]})


def describe(s: ExtractSummary) -> str:
    dropped = {k: v for k, v in s.dropped.items() if v}
    return f"kept {s.rows_out} of {s.rows_in} rows, dropped {dropped or 'none'}"


def tables(view) -> list:
    from agelens.tasks.reporting.tables import Table

    s = view.summary
    rows = [{"measure": "rows in metadata", "value": s.rows_in}, {"measure": "rows kept", "value": s.rows_out},
            *({"measure": f"dropped: {reason.replace('_', ' ')}", "value": n} for reason, n in s.dropped.items()),
            {"measure": "identities", "value": s.identities}, {"measure": "source format", "value": s.source_format}]
    return [Table("extract-summary", rows, "Metadata extraction: rows kept and dropped by reason")]
