"""Stage: explanations of a few validation images per chosen class, and the evidence that they
reflect the model: CAM methods, guided backprop and guided Grad-CAM; deletion/insertion
faithfulness against a random baseline; cascading model randomisation; the random-logit test."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pandas as pd
import torch

from tasks.plots import base, explanations
from tasks.arrays import open_decoded
from tasks.attribution import cam_layer_of, cam_maps, guided_backprop, guided_grad_cam
from tasks.errors import DataError
from tasks.faithfulness import RANDOM, area, curves, random_saliency
from tasks.inference import load_trained, model_input, runtime_for
from tasks.picking import first_per_class
from tasks.randomisation import cascade, rank_correlation, saliency
from tasks.stage import Job, logger

FAITHFULNESS_BATCH = 16  # ConvNeXt-Tiny in bf16 on a CPU: 55 images/s at 16, 40 at 64


class Clock:
    """Seconds spent per method, summed over the stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, began: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began


def explain_batch(model, x: torch.Tensor, cam_layer: str, methods: list[str], targets: torch.Tensor | None = None,
                  clock: Clock | None = None, autocast=contextlib.nullcontext) -> dict[str, np.ndarray]:
    """Every map for a batch (targets default to the predicted classes): the CAM methods,
    guided backprop and guided Grad-CAM (guided backprop times the first CAM method's map).
    `autocast`: the precision the model was trained in (maps are combined in fp32)."""
    clock = clock or Clock()
    began = time.perf_counter()
    with autocast():
        cams, logits, targets = cam_maps(model, x, cam_layer, methods, targets)
    clock.add("CAM methods (one shared gradient pass" + (" + ScoreCAM" if "score_cam" in methods else "") + ")", began)
    began = time.perf_counter()
    with autocast():
        guided = guided_backprop(model, x, targets)
    clock.add("guided_backprop", began)
    maps = {m: v.cpu().numpy() for m, v in cams.items()}
    maps["guided_backprop"] = guided.cpu().numpy()
    maps["guided_grad_cam"] = guided_grad_cam(guided, cams[methods[0]]).cpu().numpy()
    return {"maps": maps, "targets": targets.cpu().numpy(), "probs": torch.softmax(logits, 1).cpu().numpy()}


def adjacent_classes(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """The neighbouring decade of each target: the next one, or the previous for the last."""
    return np.where(targets + 1 < n_classes, targets + 1, targets - 1)


def faithfulness_tables(result: dict, labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per image, per method and class) deletion and insertion areas."""
    rows = [{"method": method, "image": i, "class": labels[i], "deletion_auc": float(d), "insertion_auc": float(a)}
            for method, c in result.items() for i, (d, a) in enumerate(zip(area(c["deletion"]), area(c["insertion"])))]
    per_image = pd.DataFrame(rows)
    overview = per_image.groupby(["method", "class"], sort=False).agg(
        deletion_auc=("deletion_auc", "mean"), insertion_auc=("insertion_auc", "mean"), images=("image", "count"))
    return per_image, overview.reset_index()


def randomisation_table(model, x, cam_layer: str, methods: list[str], trained: dict, seed: int, clock: Clock,
                        autocast) -> pd.DataFrame:
    rows = []
    targets = torch.as_tensor(trained["targets"], device=x.device)
    for step, (name, randomised) in enumerate(cascade(model, seed), start=1):
        began = time.perf_counter()
        maps = explain_batch(randomised, x, cam_layer, methods, targets, autocast=autocast)["maps"]
        clock.add("cascading randomisation", began)
        for method, values in maps.items():
            for i, rho in enumerate(rank_correlation(trained["maps"][method], values)):
                rows.append({"step": step, "reinitialised": name, "method": method, "image": i, "spearman": rho})
    return pd.DataFrame(rows)


def run(job: Job) -> dict:
    log = logger()
    settings = job.settings
    classes = job.upstream["train"]["meta"]["classes"]
    unknown = [c for c in settings["explain_classes"] if c not in classes]
    if unknown:
        raise DataError(f"--explain-classes {', '.join(unknown)} not among the model's classes {', '.join(classes)}")
    index, array = open_decoded(job)
    runtime = runtime_for(job)
    model = load_trained(job, runtime)
    cam_layer = cam_layer_of(model, settings["cam_layer"])
    methods = list(settings["cam_methods"])
    picked = first_per_class(index, "val", settings["explain_classes"], settings["explain_images"])
    for label in set(settings["explain_classes"]) - set(picked):
        log.warning("no validation image of class %s to explain", label)
    if not picked:
        raise DataError(f"no validation image of {', '.join(settings['explain_classes'])} to explain")
    rows = np.concatenate(list(picked.values()))
    x = model_input(torch.from_numpy(array[rows]), runtime)
    clock = Clock()
    trained = explain_batch(model, x, cam_layer, methods, clock=clock, autocast=runtime.autocast)
    maps = trained["maps"]
    actual = index.loc[rows, "label"].tolist()
    predicted = [classes[t] for t in trained["targets"]]

    began = time.perf_counter()
    saliencies = {m: saliency(v) for m, v in maps.items()}
    saliencies[RANDOM] = random_saliency(saliencies[methods[0]].shape, settings["seed"])
    faithful = curves(model, x, saliencies, torch.as_tensor(trained["targets"], device=x.device),
                      settings["faithfulness_steps"], runtime.autocast, FAITHFULNESS_BATCH)
    clock.add("faithfulness (deletion + insertion)", began)
    faith_images, faith_table = faithfulness_tables(faithful, actual)

    with job.output() as out:
        strips = []
        for i, row in enumerate(rows):
            k = sum(1 for a in actual[:i] if a == actual[i])
            image = np.asarray(array[row])
            title = f"{index.loc[row, 'path']} · actual {actual[i]} · predicted {predicted[i]} (p={trained['probs'][i].max():.2f})"
            base.save(explanations.explanation_strip(image, maps[methods[0]][i], maps["guided_backprop"][i].transpose(1, 2, 0),
                                               maps["guided_grad_cam"][i].transpose(1, 2, 0), f"{title} · {cam_layer}"),
                       out.path(f"explain/{actual[i]}/strip_{k}.png"), dpi=90)
            np.savez(out.path(f"explain/{actual[i]}/maps_{k}.npz"), image=image, target=trained["targets"][i],
                     **{m: v[i].astype(np.float16) for m, v in maps.items()})  # float16: maps, not measurements
            strips.append(f"explain/{actual[i]}/strip_{k}.png")
        base.save(explanations.method_grid([np.asarray(array[row]) for row in rows], maps, methods,
                                           [f"{index.loc[row, 'path']} ({a})" for row, a in zip(rows, actual)],
                                           f"CAM methods on {cam_layer}"), out.path("cams.png"), dpi=70, tight=False)
        out.add("explanations", "explain")
        out.add("cam_methods", "cams.png")
        faith_images.to_csv(out.path("faithfulness_per_image.csv"), index=False)
        faith_table.to_csv(out.path("faithfulness.csv"), index=False)
        means = {curve: {m: c[curve].mean(0) for m, c in faithful.items()} for curve in ("deletion", "insertion")}
        base.save(explanations.curve_panels(means, "share of pixels removed / inserted (most salient first)",
                                      "probability of the explained class",
                                      "Faithfulness: deletion (lower is better), insertion (higher is better)"),
                   out.path("faithfulness.png"))
        out.add("faithfulness", "faithfulness.csv")
        out.add("faithfulness_per_image", "faithfulness_per_image.csv")
        out.add("faithfulness_plot", "faithfulness.png")
        summary = {"cam_layer": cam_layer, "methods": methods, "classes": list(picked), "images": len(rows),
                   "predicted": dict(zip(strips, predicted)), "strips": strips,
                   "faithfulness": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                    for r in faith_table.to_dict("records")]}
        if settings["sanity_check"]:
            steps = randomisation_table(model, x, cam_layer, methods, trained, settings["seed"], clock, runtime.autocast)
            steps.to_csv(out.path("randomisation_per_image.csv"), index=False)
            overview = steps.groupby(["step", "reinitialised", "method"], sort=False)["spearman"].agg(
                mean="mean", undefined=lambda r: int(r.isna().sum())).reset_index()
            overview.to_csv(out.path("randomisation.csv"), index=False)
            lines = {m: g["mean"].to_numpy() for m, g in overview.groupby("method", sort=False)}
            base.save(explanations.curve_panels({"cascading randomisation": lines}, "layers re-initialised (top down, cumulative)",
                                          "Spearman correlation with the trained maps",
                                          "Model randomisation test (near 1 = the map ignores the model)",
                                          xticks=list(dict.fromkeys(overview["reinitialised"]))),
                       out.path("randomisation.png"))
            began = time.perf_counter()
            other = adjacent_classes(trained["targets"], len(classes))
            swapped = explain_batch(model, x, cam_layer, methods, torch.as_tensor(other, device=x.device),
                                    autocast=runtime.autocast)["maps"]
            clock.add("random-logit test", began)
            logit = pd.DataFrame([{"method": m, "spearman": float(pd.Series(rank_correlation(maps[m], swapped[m])).mean()),
                                   "mean_abs_difference": float(np.abs(saliency(maps[m]) - saliency(swapped[m])).mean())}
                                  for m in maps])
            logit.to_csv(out.path("random_logit.csv"), index=False)
            for name, file in (("randomisation", "randomisation.csv"), ("randomisation_plot", "randomisation.png"),
                               ("random_logit", "random_logit.csv")):
                out.add(name, file)
            summary["randomisation"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                        for r in overview.to_dict("records")]
            summary["random_logit"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                       for r in logit.to_dict("records")]
        summary["seconds"] = {name: round(s, 2) for name, s in clock.seconds.items()}
        for name, seconds in clock.seconds.items():
            log.info("explain: %s took %.2f s", name, seconds)
        return out.finish(summary)
