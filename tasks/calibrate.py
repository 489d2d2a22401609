"""Stage: one temperature, fitted on validation, that makes the model's probabilities honest
(tasks/model/calibration.py). Everything that outputs probabilities divides the logits by it."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class CalibrateSummary(Summary):
    temperature: float
    val_images: int
    nll_before: float
    nll_after: float


STAGE = Stage("calibrate", CalibrateSummary, needs=("decode", "train"), uses=("device", "eval_batch_size"),
              outputs=("calibration",))


def run(job: Job) -> dict:
    from agelens.tasks.core.stage import write_json
    from agelens.tasks.data.arrays import open_decoded, rows_of
    from agelens.tasks.model.calibration import fit_temperature, nll
    from agelens.tasks.model.inference import head_of, load_trained, predict_logits, runtime_for

    log = logger()
    index, array = open_decoded(job)
    runtime = runtime_for(job)
    model = load_trained(job, runtime)
    head = head_of(job.context)
    rows = rows_of(index, "val")
    logits = predict_logits(model, array, rows, runtime, job.settings["eval_batch_size"], job.context["tta"])
    labels = index.loc[rows, "class_index"].to_numpy()
    temperature = fit_temperature(logits, labels, head)
    summary = CalibrateSummary(temperature=round(temperature, 4), val_images=len(rows),
                               nll_before=nll(logits, labels, head, 1.0), nll_after=nll(logits, labels, head, temperature))
    log.info("temperature %.3f: validation NLL %.4f -> %.4f", temperature, summary.nll_before, summary.nll_after)
    with job.output() as out:
        write_json(out.path("calibration.json"), {"temperature": summary.temperature})
        out.add("calibration", "calibration.json")
        return out.finish(summary, meta={"temperature": summary.temperature})


def describe(s: CalibrateSummary) -> str:
    return f"temperature {s.temperature:.2f} (val NLL {s.nll_before:.3f} -> {s.nll_after:.3f})"
