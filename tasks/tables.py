"""Rows of the tables agelens shows (artifacts and the report), from stage summaries."""

from __future__ import annotations


def rounded(value, digits: int = 4):
    return round(value, digits) if isinstance(value, float) else value


def extract_rows(summary: dict) -> list[dict]:
    return [{"measure": "rows in metadata", "value": summary["rows_in"]},
            {"measure": "rows kept", "value": summary["rows_out"]},
            *({"measure": f"dropped: {reason.replace('_', ' ')}", "value": n} for reason, n in summary["dropped"].items()),
            {"measure": "identities", "value": summary["identities"]},
            {"measure": "source format", "value": summary["source_format"]}]


def split_rows(summary: dict) -> list[dict]:
    per_split = summary["per_class_per_split"]
    classes = list(next(iter(per_split.values())))
    return [{"class": c, **{split: counts[c] for split, counts in per_split.items()}} for c in classes]


def class_report_rows(metrics: dict) -> list[dict]:
    return [{"class": c, **{k: rounded(v) for k, v in m.items()}} for c, m in metrics["per_class"].items()]


def confusion_rows(metrics: dict, classes: list[str]) -> list[dict]:
    return [{"actual": a, **{f"predicted {p}": round(metrics["confusion"][i][j], 3) for j, p in enumerate(classes)}}
            for i, a in enumerate(classes)]


def decades(value) -> str:
    return "n/a (labels are not decades)" if value is None else f"{value:.3f}"
