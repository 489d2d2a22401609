"""Stage: should this run's model replace its configuration's champion (flows/registry/models.py)? The
champion is scored again, now, on exactly the images this model was scored on (the current test
split: the data may have grown), and this model replaces it only when it is at least as accurate.
The decision is applied when the run ends; a rejected model is recorded with the reason."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class CompareSummary(Summary):
    decision: str  # "promote", "keep", or "same" (this model already is the champion)
    why: str
    split: str
    images: int
    challenger: dict
    champion: dict | None = None
    champion_run: str | None = None
    difference_ci: list[float] | None = None
    warning: str | None = None  # what was wrong with the champion as recorded (this model met what was left)
    against: str = "none"  # the champion input this decision was keyed by


STAGE = Stage("compare", CompareSummary, needs=("split", "decode", "train", "evaluate"), inputs=("images", "champion"),
              uses=("device", "eval_batch_size"), reads=("seed",), outputs=("decision",))


def champion_probs(champion: dict, paths: list[str], root, runtime, batch_size: int):
    """The champion's class probabilities on these images, decoded at its own image size."""
    from pathlib import Path

    import numpy as np
    from safetensors.torch import load_file

    from agelens.tasks.core.errors import DataError
    from agelens.tasks.data.decoding import decode_one
    from agelens.tasks.model.backbones import build_model
    from agelens.tasks.model.heads import Head
    from agelens.tasks.model.inference import predict, prepare

    facts = champion["facts"]
    size = facts["image_size"]
    pictures = [decode_one(Path(root) / p, size) for p in paths]
    if any(p is None for p in pictures):
        raise DataError(f"an image the champion is to be scored on cannot be decoded now: "
                        f"{next(p for p, q in zip(paths, pictures) if q is None)}")
    model = build_model(facts["backbone"], facts["outputs"], image_size=size)
    model.load_state_dict(load_file(Path(champion["path"]) / "model.safetensors"))
    model = prepare(model, runtime).eval()
    head = Head(facts["head"], tuple(facts["classes"]))
    outputs = predict(model, np.stack(pictures), np.arange(len(paths)), runtime, batch_size, head,
                      facts["temperature"], facts["tta"])
    return head.class_probs(outputs)


def run(job: Job) -> dict:
    import numpy as np
    import pandas as pd

    from agelens.tasks.core.stage import write_json
    from agelens.tasks.model.inference import Runtime
    from agelens.tasks.model.metrics import interval

    log = logger()
    evaluate = job.summary("evaluate")
    split, metrics = evaluate.headline
    challenger = {"accuracy": metrics.accuracy, "accuracy_ci": metrics.accuracy_ci, "macro_f1": metrics.macro_f1,
                  "mae_years": metrics.mae_years}
    champion = job.inputs["champion"]
    predictions = pd.read_parquet(job.path("evaluate", "predictions"))
    mine = predictions[predictions["split"] == split].reset_index(drop=True)
    found = {"split": split, "images": len(mine), "challenger": challenger, "against": champion["sha256"]}
    if champion.get("warning"):
        log.warning("%s", champion["warning"])
        found["warning"] = champion["warning"]
    if champion["sha256"] == "none":
        found.update(decision="promote", why="the first model of this configuration" if not champion.get("warning")
                     else f"the first verified model of this configuration ({champion['warning']})")
    elif champion["model_digest"] == job.upstream["train"]["outputs"]["model"]["sha256"]:
        found.update(decision="same", champion_run=champion["run_id"], why="this model already is the champion")
    elif list(champion["facts"]["classes"]) != list(job.context["classes"]):
        found.update(decision="promote", champion_run=champion["run_id"],
                     why=f"the champion predicts other classes ({', '.join(champion['facts']['classes'])})")
    else:
        runtime = Runtime.resolve(job.settings["device"], champion["facts"]["precision"],
                                  champion["facts"]["channels_last"])
        probs = champion_probs(champion, mine["path"].tolist(), job.inputs["images"]["path"], runtime,
                               job.settings["eval_batch_size"])
        classes = list(job.context["classes"])
        ours = (mine["predicted"] == mine["actual"]).to_numpy()
        theirs = np.array(classes)[probs.argmax(1)] == mine["actual"].to_numpy()
        draws = np.random.default_rng(job.settings["seed"]).integers(0, len(mine), (1000, len(mine)))
        difference = interval(ours[draws].mean(1) - theirs[draws].mean(1))
        held = {"accuracy": float(theirs.mean())}
        better = ours.mean() >= theirs.mean()
        found.update(decision="promote" if better else "keep", champion=held, champion_run=champion["run_id"],
                     difference_ci=difference,
                     why=(f"{split} accuracy {ours.mean():.3f} {'≥' if better else '<'} the champion's "
                          f"{theirs.mean():.3f} (run {champion['run_id'][:8]}), both now on the same {len(mine)} "
                          f"{split} images (difference {ours.mean() - theirs.mean():+.3f}, 95% interval "
                          f"[{difference[0]:+.3f}, {difference[1]:+.3f}])"))
    summary = CompareSummary(**found)
    log.info("%s the champion: %s", "replaces" if summary.decision == "promote" else "does not replace", summary.why)
    with job.output() as out:
        write_json(out.path("decision.json"), summary.model_dump(mode="json"))
        out.add("decision", "decision.json")
        return out.finish(summary)


def describe(s: CompareSummary) -> str:
    return {"promote": "promoted: ", "keep": "kept the champion, because ", "same": ""}[s.decision] + s.why


def report_section(view) -> list[str]:
    from agelens.tasks.reporting.markdown import escape

    s = view.summary
    verdict = {"promote": "**Promoted** to champion of this configuration: ",
               "keep": "**Kept the champion**, because this model is worse: ", "same": "**Champion**: "}[s.decision]
    return ["## Champion", verdict + escape(s.why) + ". `agelens models` lists the champion and every rejected "
                                                     "model; `agelens promote RUN` overrides by hand.",
            *([f"**Warning**: {escape(s.warning)}."] if s.warning else [])]
