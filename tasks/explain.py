"""Stage: Grad-CAM, guided backprop and guided Grad-CAM strips, with a sanity check."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from scipy.stats import ConstantInputWarning, spearmanr

from tasks import plots
from tasks.attribution import grad_cam, guided_backprop, guided_grad_cam, resolve_layer
from tasks.decode import open_images
from tasks.evaluate import load_trained
from tasks.featuremaps import pick_per_class
from tasks.models import last_linear_name
from tasks.sources import DataError
from tasks.stage import StageKey, task_output, write_json
from tasks.train import Runtime, normalise, to_float

METHODS = ("grad_cam", "guided_backprop", "guided_grad_cam")


def explain_batch(model, x: torch.Tensor, cam_layer: str, targets: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """All three maps for a batch; targets default to the predicted classes."""
    cams, logits = grad_cam(model, x, cam_layer, targets)
    targets = logits.argmax(1) if targets is None else targets
    guided = guided_backprop(model, x, targets)
    return {"grad_cam": cams.cpu().numpy(), "guided_backprop": guided.cpu().numpy(),
            "guided_grad_cam": guided_grad_cam(guided, cams).cpu().numpy(),
            "targets": targets.cpu().numpy(), "probs": torch.softmax(logits, 1).cpu().numpy()}


def randomised_copy(model: torch.nn.Module, layer_specs: list[str], seed: int) -> torch.nn.Module:
    """A copy with the given layers re-initialised (Adebayo et al. 2018's model-parameter
    randomisation): each submodule's own `reset_parameters`, and ConvNeXt's layer scale
    (a bare Parameter) back to torchvision's initial 1e-6."""
    randomised = copy.deepcopy(model)
    torch.manual_seed(seed)
    for spec in layer_specs:
        for module in resolve_layer(randomised, spec).modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(getattr(module, "layer_scale", None), torch.nn.Parameter):
                torch.nn.init.constant_(module.layer_scale, 1e-6)
    return randomised


def _saliency(maps: np.ndarray) -> np.ndarray:
    """Per-pixel magnitude: |map| (N, H, W) for CAMs, max |gradient| over channels for gradients."""
    return np.abs(maps).max(1) if maps.ndim == 4 else np.abs(maps)


def rank_correlations(trained: dict[str, np.ndarray], randomised: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for method in METHODS:
        a, b = _saliency(trained[method]), _saliency(randomised[method])
        for i in range(len(a)):
            with warnings.catch_warnings():  # a constant map gives NaN, reported as undefined
                warnings.simplefilter("ignore", ConstantInputWarning)
                rho = spearmanr(a[i].ravel(), b[i].ravel()).statistic
            rows.append({"method": method, "image": i, "spearman": float(rho)})
    return pd.DataFrame(rows)


@task(name="explain", cache_key_fn=StageKey("explain", ("tasks.explain", "tasks.attribution", "tasks.plots")),
      persist_result=True, result_serializer="json")
def explain_model(decoded: dict, trained: dict, cam_layer: str, classes: list[str], images_per_class: int,
                  sanity_check: bool, seed: int, device: str, out: str) -> dict:
    log = get_run_logger()
    unknown = [c for c in classes if c not in trained["classes"]]
    if unknown:
        raise DataError(f"--explain-classes {unknown} are not among the model's classes {trained['classes']}")
    index, images = open_images(decoded)
    runtime = Runtime.resolve(device, "fp32", trained["settings"]["channels_last"])
    model = load_trained(trained, runtime)
    resolve_layer(model, cam_layer)
    picked = pick_per_class(index, "val", classes, images_per_class)
    for label in set(classes) - set(picked):
        log.warning("no validation image of class %s to explain", label)
    rows = np.concatenate(list(picked.values()))
    x = normalise(to_float(images[rows], runtime))
    maps = explain_batch(model, x, cam_layer)
    actual = index.loc[rows, "label"].tolist()
    predicted = [trained["classes"][t] for t in maps["targets"]]
    with task_output() as out_dir:
        strips = []
        k_of = {}
        for i, row in enumerate(rows):
            k = k_of[actual[i]] = k_of.get(actual[i], -1) + 1
            title = (f"{index.loc[row, 'path']} · actual {actual[i]} · predicted {predicted[i]} "
                     f"(p={maps['probs'][i].max():.2f}) · Grad-CAM on {cam_layer}")
            name = f"explain/{actual[i]}/strip_{k}.png"
            plots.save(plots.explanation_strip(images[row], maps["grad_cam"][i],
                                               maps["guided_backprop"][i].transpose(1, 2, 0),
                                               maps["guided_grad_cam"][i].transpose(1, 2, 0), title),
                       out_dir.path(name), dpi=90)
            np.savez_compressed(out_dir.path(f"explain/{actual[i]}/maps_{k}.npz"), image=np.asarray(images[row]),
                                **{m: maps[m][i] for m in METHODS}, target=maps["targets"][i])
            strips.append(name)
        outputs = {"strips": out_dir.final_path("explain")}
        summary = {"cam_layer": cam_layer, "classes": list(picked), "images": len(rows),
                   "predicted": dict(zip(strips, predicted))}
        if sanity_check:
            randomised = randomised_copy(model, [cam_layer, last_linear_name(model)], seed)
            random_maps = explain_batch(randomised, x, cam_layer, torch.as_tensor(maps["targets"], device=x.device))
            table = rank_correlations(maps, random_maps)
            table.to_csv(out_dir.path("sanity_per_image.csv"), index=False)
            # A constant map (e.g. a Grad-CAM that vanishes after the ReLU) has no rank correlation.
            overview = table.groupby("method", sort=False)["spearman"].agg(
                mean="mean", std="std", count="count", undefined=lambda r: int(r.isna().sum())).reset_index()
            overview.to_csv(out_dir.path("sanity.csv"), index=False)
            summary["sanity_spearman"] = {m: (None if np.isnan(v) else round(float(v), 4))
                                          for m, v in zip(overview["method"], overview["mean"])}
            outputs["sanity"] = out_dir.handle("sanity.csv")
            log.info("sanity check (rank correlation with a model whose %s and classifier are re-initialised): %s",
                     cam_layer, summary["sanity_spearman"])
        write_json(out_dir.path("summary.json"), summary)
        return {"summary": summary, "outputs": outputs, "strip_files": [out_dir.final_path(s) for s in strips]}
