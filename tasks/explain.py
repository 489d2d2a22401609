"""Stage: explanations of a few validation images per chosen class, and the evidence that they
reflect the model (tasks/attribution/): CAM methods, guided backprop and guided Grad-CAM;
deletion/insertion faithfulness against a random baseline; cascading model randomisation; the
random-logit test."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class ExplainSummary(Summary):
    cam_layer: str
    methods: list[str]
    classes: list[str]
    images: int
    predicted: dict[str, str]
    strips: list[str]
    faithfulness: list[dict]
    randomisation: list[dict] | None = None
    random_logit: list[dict] | None = None
    seconds: dict[str, float]


STAGE = Stage("explain", ExplainSummary, needs=("decode", "train"), uses=("device", "eval_batch_size"),
              reads=("cam_layer", "cam_methods", "explain_classes", "explain_images", "sanity_check",
                     "faithfulness_steps", "seed"),
              outputs=("explanations", "cam_methods", "faithfulness", "faithfulness_per_image", "faithfulness_plot",
                       "randomisation", "randomisation_per_image", "randomisation_plot", "random_logit"))


def run(job: Job) -> dict:
    import numpy as np
    import torch

    from agelens.tasks.attribution import evidence
    from agelens.tasks.attribution.layers import cam_layer_of
    from agelens.tasks.core.errors import DataError
    from agelens.tasks.data.arrays import open_decoded
    from agelens.tasks.data.picking import first_per_class
    from agelens.tasks.model.inference import head_of, load_trained, model_input, runtime_for

    log = logger()
    settings = job.settings
    classes = job.context["classes"]
    index, array = open_decoded(job)
    runtime = runtime_for(job)
    model = load_trained(job, runtime)
    cam_layer = cam_layer_of(model, settings["cam_layer"], job.context["image_size"])
    methods = list(settings["cam_methods"])
    picked = first_per_class(index, "val", settings["explain_classes"], settings["explain_images"])
    for label in set(settings["explain_classes"]) - set(picked):
        log.warning("no validation image of class %s to explain", label)
    if not picked:
        raise DataError(f"no validation image of {', '.join(settings['explain_classes'])} to explain")
    rows = np.concatenate(list(picked.values()))
    x = model_input(torch.from_numpy(array[rows]), runtime)
    clock = evidence.Clock()
    head = head_of(job.context)
    with head.scored(model) as model:  # one score per class (per year for the ages head)
        trained = evidence.explain_batch(model, x, cam_layer, methods, clock=clock, autocast=runtime.autocast)
        trained["labels"] = index.loc[rows, "label"].tolist()
        # What the maps explain is one output (a year, for the ages head); people read its decade.
        trained["predicted"] = [classes[c] for c in head.class_of_output(trained["targets"])]
        trained["class_probs"] = head.class_probs(trained["probs"])
        faithful, faith_images, faith_table = evidence.faithfulness(
            model, x, trained, methods, settings["seed"], settings["faithfulness_steps"], runtime.autocast, clock)
        with job.output() as out:
            strips = _draw_maps(out, array, index, rows, trained, methods, cam_layer)
            _draw_faithfulness(out, faithful, faith_images, faith_table)
            summary = {"cam_layer": cam_layer, "methods": methods, "classes": list(picked), "images": len(rows),
                       "predicted": dict(zip(strips, trained["predicted"])), "strips": strips,
                       "faithfulness": evidence.records(faith_table)}
            if settings["sanity_check"]:
                steps, overview = evidence.randomisation(model, x, cam_layer, methods, trained, settings["seed"], clock,
                                                         runtime.autocast)
                logit = evidence.random_logit(model, x, cam_layer, methods, trained, head.scores, clock, runtime.autocast,
                                              step=10 if head.kind == "ages" else 1)
                _draw_randomisation(out, steps, overview, logit)
                summary.update(randomisation=evidence.records(overview), random_logit=evidence.records(logit))
            for name, seconds in clock.seconds.items():
                log.info("explain: %s took %.2f s", name, seconds)
            return out.finish(ExplainSummary(**summary, seconds={n: round(s, 2) for n, s in clock.seconds.items()}))


def _draw_maps(out, array, index, rows, trained: dict, methods: list[str], cam_layer: str) -> list[str]:
    """The reference's strip and the maps per image, and one grid of every CAM method."""
    import numpy as np

    from agelens.tasks.reporting.plots import grids

    maps, labels, strips = trained["maps"], trained["labels"], []
    for i, row in enumerate(rows):
        k = labels[:i].count(labels[i])
        image = np.asarray(array[row])
        title = (f"{index.loc[row, 'path']} · actual {labels[i]} · predicted {trained['predicted'][i]} "
                 f"(p={trained['class_probs'][i].max():.2f}) · {cam_layer}")
        strip = grids.explanation_strip(image, maps[methods[0]][i], methods[0],
                                        maps["guided_backprop"][i].transpose(1, 2, 0),
                                        maps["guided_grad_cam"][i].transpose(1, 2, 0), title)
        grids.save(strip, out.path(f"explain/{labels[i]}/strip_{k}.png"))
        np.savez(out.path(f"explain/{labels[i]}/maps_{k}.npz"), image=image, target=trained["targets"][i],
                 **{m: v[i].astype(np.float16) for m, v in maps.items()})  # float16: maps, not measurements
        strips.append(f"explain/{labels[i]}/strip_{k}.png")
    grids.save(grids.method_grid([np.asarray(array[row]) for row in rows], maps, methods,
                                 [f"{index.loc[row, 'path']} ({a})" for row, a in zip(rows, labels)],
                                 f"CAM methods on {cam_layer}"), out.path("cams.png"))
    out.add("explanations", "explain")
    out.add("cam_methods", "cams.png")
    return strips


def _draw_faithfulness(out, faithful: dict, per_image, table) -> None:
    from agelens.tasks.reporting.plots import base, explanations

    per_image.to_csv(out.path("faithfulness_per_image.csv"), index=False)
    table.to_csv(out.path("faithfulness.csv"), index=False)
    means = {curve: {m: c[curve].mean(0) for m, c in faithful.items()} for curve in ("deletion", "insertion")}
    base.save(explanations.curve_panels(means, "share of pixels removed / inserted (most salient first)",
                                        "probability of the explained class",
                                        "Faithfulness: deletion (lower is better), insertion (higher is better)"),
              out.path("faithfulness.png"))
    out.add("faithfulness", "faithfulness.csv")
    out.add("faithfulness_per_image", "faithfulness_per_image.csv")
    out.add("faithfulness_plot", "faithfulness.png")


def _draw_randomisation(out, steps, overview, logit) -> None:
    from agelens.tasks.reporting.plots import base, explanations

    steps.to_csv(out.path("randomisation_per_image.csv"), index=False)
    overview.to_csv(out.path("randomisation.csv"), index=False)
    lines = {m: g["mean"].to_numpy() for m, g in overview.groupby("method", sort=False)}
    base.save(explanations.curve_panels({"cascading randomisation": lines},
                                        "layers re-initialised (top down, cumulative)",
                                        "Spearman correlation with the trained maps",
                                        "Model randomisation test (near 1 = the map ignores the model)",
                                        xticks=list(dict.fromkeys(overview["reinitialised"]))),
              out.path("randomisation.png"))
    logit.to_csv(out.path("random_logit.csv"), index=False)
    for name, file in (("randomisation", "randomisation.csv"), ("randomisation_per_image", "randomisation_per_image.csv"),
                       ("randomisation_plot", "randomisation.png"), ("random_logit", "random_logit.csv")):
        out.add(name, file)


def describe(s: ExplainSummary) -> str:
    return f"{s.images} images, methods {', '.join(s.methods)}"


def report_section(view) -> list[str]:
    from agelens.tasks.reporting.markdown import escape, image, table

    s = view.summary
    parts = [f"## Explanations on {escape(s.cam_layer)} (original | {escape(s.methods[0])} | guided backprop | "
             "guided Grad-CAM)",
             *(image(view.path("explanations").parent / strip, strip, 640) for strip in s.strips[:4]),
             "### Faithfulness",
             "Area under the deletion curve (lower is better) and the insertion curve (higher is better), per method "
             "and class; `random` is a map of random values, the baseline every method should beat.",
             table(s.faithfulness), image(view.path("faithfulness_plot"), "faithfulness curves", 720)]
    if s.randomisation:
        last = max(r["step"] for r in s.randomisation)
        parts += ["### Model randomisation",
                  "Spearman rank correlation between the trained model's maps and those of a copy re-initialised "
                  "from the top down; values near 1 mean the method does not depend on what the model learnt.",
                  image(view.path("randomisation_plot"), "cascading randomisation", 640),
                  table([{"method": r["method"], "after re-initialising everything": r["mean"]}
                         for r in s.randomisation if r["step"] == last]),
                  "Random-logit test: rank correlation between the maps for the predicted class and for the "
                  "adjacent decade (near 1 = the map is not class-specific).", table(s.random_logit)]
    return parts


def tables(view) -> list:
    from agelens.tasks.reporting.tables import Table

    s = view.summary
    found = [Table("faithfulness", s.faithfulness, "Deletion (lower is better) and insertion (higher is better) "
                                                   "areas per method and class, with a random-map baseline")]
    if s.randomisation:
        found.append(Table("randomisation", s.randomisation, "Rank correlation with the trained model's maps after "
                                                             "each cascading re-initialisation step (near 1: the "
                                                             "method ignores the model)"))
    return found
