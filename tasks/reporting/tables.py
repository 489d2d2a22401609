"""Tables agelens shows (Prefect table artifacts and the report), built from stage outputs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    """A table a stage offers for publishing: `name` becomes the artifact key
    `agelens-<name>` (tasks/reporting/artifacts.py); cells are escaped when published."""

    name: str
    rows: list[dict]
    description: str


def rounded(value, digits: int = 4):
    return round(value, digits) if isinstance(value, float) else value


def rounded_rows(rows: list[dict], digits: int = 4) -> list[dict]:
    return [{k: rounded(v, digits) for k, v in row.items()} for row in rows]


def csv_rows(path) -> list[dict]:
    """A CSV's rows with numbers and booleans as such."""
    import csv

    def value(text: str):
        try:
            return int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            return {"True": True, "False": False}.get(text, text)

    with open(path) as handle:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def class_report_rows(metrics: dict) -> list[dict]:
    return [{"class": c, **{k: rounded(v) for k, v in m.items()}} for c, m in metrics["per_class"].items()]


def confusion_rows(metrics: dict, classes: list[str]) -> list[dict]:
    return [{"actual": a, **{f"predicted {p}": round(metrics["confusion"][i][j], 3) for j, p in enumerate(classes)}}
            for i, a in enumerate(classes)]


def decades(value) -> str:
    return "n/a (labels are not decades)" if value is None else f"{value:.3f}"
