"""Stage: the study's report, one markdown page with the plots embedded and where every file is.

Each stage it needs contributes its own section (its module's `report_section`), so the
report follows the graph; a stage without one is listed with its summary."""

from __future__ import annotations

from agelens.tasks.core.stage import EARLIER, Job, Stage, Summary


class ReportSummary(Summary):
    images: int
    bytes: int


STAGE = Stage("report", ReportSummary, needs=EARLIER, outputs=("report",), presents=True)


def study_report(job: Job) -> str:
    """The markdown of the report. Every user string is escaped."""
    from pathlib import Path

    from agelens.tasks.core.stage import View, spec
    from agelens.tasks.reporting.markdown import escape, table

    parts = ["# agelens run report"]
    for name in job.upstream:  # in graph order
        view = View(Path(job.out), job.upstream[name], job.context)
        section = spec(name).presentation("report_section")
        if section is not None:
            parts += section(view)
        else:
            parts += [f"## {escape(name)}", table([{"measure": k, "value": v if isinstance(v, (int, float)) else str(v)}
                                                    for k, v in job.upstream[name]["summary"].items()])]
    parts.append("## Where the outputs are (under the output folder)")
    for name in job.upstream:
        result = job.upstream[name]
        for output, entry in result["outputs"].items():
            location = f"{name}/{result['key']}/{entry['file']}"
            parts.append(f"- {name} {escape(output)}: {escape(location)}")
    return "\n\n".join(p for p in parts if p) + "\n"


def run(job: Job) -> dict:
    markdown = study_report(job)
    with job.output() as out:
        out.path("report.md").write_text(markdown)
        out.add("report", "report.md")
        return out.finish(ReportSummary(images=markdown.count("data:image/png;base64,"), bytes=len(markdown)))


def describe(s: ReportSummary) -> str:
    return f"{s.images} plots embedded"
