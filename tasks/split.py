"""Stage: a stratified sample per class, split train/val(/test) by identity."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class SplitSummary(Summary):
    images: int
    per_class: dict[str, int]
    per_class_per_split: dict[str, dict[str, int]]
    identities_per_split: dict[str, int]
    shared_identities: int
    split_by: str
    warnings: list[str]
    test_frac: float = 0.0  # the share asked for, or 0 when the classes were too small for a test split


STAGE = Stage("split", SplitSummary, needs=("extract",), outputs=("manifest",),
              reads=("per_class", "seed", "split_by", "val_frac", "test_frac"))


def run(job: Job) -> dict:
    """Sample and split; write `manifest.parquet` (every sampled image and its split)."""
    import pandas as pd

    from agelens.tasks.data.splitting import make_manifest

    log = logger()
    settings = job.settings
    table = pd.read_parquet(job.path("extract", "metadata"))
    manifest, summary = make_manifest(table, job.context["classes"], settings["per_class"], settings["seed"],
                                      settings["split_by"], settings["val_frac"], settings["test_frac"])
    for warning in summary["warnings"]:
        log.warning(warning)
    log.info("split %d images by %s: %s%s", summary["images"], settings["split_by"],
             {s: sum(c.values()) for s, c in summary["per_class_per_split"].items()},
             f"; identities shared between splits: {summary['shared_identities']}" if settings["split_by"] == "identity"
             else "")
    with job.output() as out:
        manifest.to_parquet(out.path("manifest.parquet"), index=False)
        out.add("manifest", "manifest.parquet")
        return out.finish(SplitSummary(**summary))


def _rows(s: SplitSummary) -> list[dict]:
    return [{"class": c, **{split: counts[c] for split, counts in s.per_class_per_split.items()}} for c in s.per_class]


def describe(s: SplitSummary) -> str:
    per_split = {k: sum(v.values()) for k, v in s.per_class_per_split.items()}
    shared = f", shared identities {s.shared_identities}" if s.split_by == "identity" else ", split by image"
    return f"drawn {sum(s.per_class.values())} ({per_split}){shared}"


def report_section(view) -> list[str]:
    from agelens.tasks.reporting.markdown import escape, table

    s = view.summary
    drawn = ", ".join(f"{escape(c)} {n}" for c, n in s.per_class.items())
    shared = f" Identities shared between splits: {s.shared_identities}." if s.split_by == "identity" else \
        " Each image is its own identity: one person's photos may be in several splits."
    return ["## Data", f"Drawn per class: {drawn}; split by {escape(s.split_by)}.{shared}", table(_rows(s))]


def tables(view) -> list:
    from agelens.tasks.reporting.tables import Table

    s = view.summary
    return [Table("split-counts", _rows(s), f"Images drawn per class per split (split by {s.split_by}; identities "
                                            f"shared between splits: {s.shared_identities})")]
