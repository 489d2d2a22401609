"""`agelens sweep`: several settings in one flow run, compared.

The settings are a grid (options given with commas: `--lr 1e-4,3e-4 --epochs 12,24` is four
settings) or a file of settings (`--settings-file FILE`, JSON or YAML: a list of option
mappings, each over the command line's). Their runs walk the stage graph together
(flows/pipeline/runner.py `run_many`): a stage key they share (extract, split, decode) is computed once,
their trainings run concurrently on the task runner (threads, or a Dask cluster), and every stage
is cached as in any run, so a rerun is free and an added value runs only its own stages. Each
run is recorded in the run table and judged against its configuration's champion; one table and
one plot compare them (Prefect artifacts `agelens-sweep` and `agelens-sweep-plot`).
"""

from __future__ import annotations

import itertools
import json
import typing
import uuid
from pathlib import Path

from agelens.flows.pipeline.settings import RunSettings, option, parse_settings
from agelens.tasks.core.errors import ConfigError

MAX_SETTINGS = 64
LIST_FIELDS = {name for name, f in RunSettings.model_fields.items() if typing.get_origin(f.annotation) is list}
SWEEP = "sweep"


def _values(name: str, value) -> list:
    if isinstance(value, str) and "," in value and name not in LIST_FIELDS:
        parts = [p.strip() for p in value.split(",")]
        if not all(parts):
            raise ConfigError(f"{option(name)} {value!r}: an empty value in the list")
        return list(dict.fromkeys(parts))
    return [value]


def read_settings_file(path: str) -> list[dict]:
    import yaml

    file = Path(path).expanduser()
    try:
        loaded = yaml.safe_load(file.read_bytes().decode("utf-8-sig"))  # JSON is YAML too
    except OSError as error:
        raise ConfigError(f"--settings-file {file}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--settings-file {file} is not JSON or YAML: it is not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--settings-file {file} is not JSON or YAML: {str(error).splitlines()[0]}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("settings"), list):
        loaded = loaded["settings"]
    if not isinstance(loaded, list) or not loaded or not all(isinstance(e, dict) for e in loaded):
        raise ConfigError(f"--settings-file {file} must hold a non-empty list of option mappings, e.g. "
                          '[{"lr": 0.0001}, {"lr": 0.0003, "epochs": 24}]')
    known = set(RunSettings.model_fields)
    for i, entry in enumerate(loaded, 1):
        entry.update({k.replace("-", "_"): entry.pop(k) for k in list(entry) if "-" in k})
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(f"--settings-file {file}, setting {i}: no option {', '.join(unknown)}")
        for name, value in entry.items():  # YAML's true is not an epoch count
            if isinstance(value, bool) and RunSettings.model_fields[name].annotation is not bool:
                raise ConfigError(f"--settings-file {file}, setting {i}: {option(name)} {str(value).lower()} is not "
                                  "a value of that option")
    return loaded


def expand(given: dict, file_entries: list[dict] | None = None) -> list[RunSettings]:
    """Every setting of the sweep: the grid of the options given with commas, over each entry of
    the settings file (or over the options alone). Duplicates are dropped, order kept."""
    axes = {name: _values(name, value) for name, value in given.items()}
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    entries = file_entries or [{}]
    total = len(combos) * len(entries)
    if total > MAX_SETTINGS:
        raise ConfigError(f"the sweep has {total} settings; at most {MAX_SETTINGS} run in one sweep")
    found: dict[str, RunSettings] = {}
    for entry in entries:
        for combo in combos:
            merged = {**combo, **entry}
            try:
                settings = parse_settings(merged)
            except ConfigError as error:
                shown = ", ".join(f"{option(k)} {v}" for k, v in merged.items() if len(axes.get(k, [])) > 1 or k in entry)
                raise ConfigError(f"setting {shown or 'of the sweep'}: {error}") from None
            found.setdefault(json.dumps(settings.dump(), sort_keys=True), settings)
    settings = list(found.values())
    for name in ("out", "until"):
        if len({getattr(s, name) for s in settings}) > 1:
            raise ConfigError(f"every setting of a sweep has the same {option(name)}")
    return settings


def varied(settings: list[RunSettings]) -> list[str]:
    """The options whose values differ between the settings, in the settings' order."""
    dumps = [s.dump() for s in settings]
    return [name for name in RunSettings.model_fields if len({json.dumps(d[name]) for d in dumps}) > 1]


def label(settings: RunSettings, names: list[str]) -> str:
    values = settings.dump()
    return " ".join(f"{option(n)} {','.join(map(str, values[n])) if isinstance(values[n], list) else values[n]}"
                    for n in names) or "the only setting"


def comparison(settings: list[RunSettings], runners, rows: list[dict | None]) -> tuple[list[dict], int | None]:
    """One row per setting (what varied, its headline metrics with intervals, whether it trained)
    and the index of the best (highest headline accuracy)."""
    from agelens.flows.pipeline.runs import headline

    names = varied(settings)
    table, best = [], None
    for i, (s, runner, row) in enumerate(zip(settings, runners, rows)):
        values = s.dump()
        entry = {"setting": i + 1, **{n: values[n] for n in names}}
        if row is None:
            table.append({**entry, "error": runner.error})
            continue
        split, m = headline(row)
        entry.update({"split": split, "accuracy": m.get("accuracy"), "accuracy_ci": m.get("accuracy_ci"),
                      "macro_f1": m.get("macro_f1"), "within_one": m.get("within_one"), "mae_years": m.get("mae_years"),
                      "training_seconds": row.get("training_seconds"), "train": runner.states.get("train"),
                      "run": row["run_id"][:8], "error": None})
        if entry["accuracy"] is not None and (best is None or entry["accuracy"] > table[best]["accuracy"]):
            best = i
        table.append(entry)
    return table, best


def sweep_flow_fn(settings: list[RunSettings]) -> dict:
    """The body of the `agelens-sweep` flow (flows/sweep/flow.py)."""
    from prefect import get_run_logger
    from prefect.runtime import deployment, flow_run

    from agelens.flows.service import preflight
    from agelens.flows.pipeline.graph import selected
    from agelens.flows.pipeline.inputs import Inputs, open_memo
    from agelens.flows.service.locks import active_lock, locked
    from agelens.flows.pipeline.publish import finish
    from agelens.flows.pipeline.runner import Runner, run_many

    log = get_run_logger()
    flow_run_id = uuid.UUID(str(flow_run.get_id() or uuid.uuid4()))
    out = preflight.writable_out(settings[0].out)
    with locked(active_lock(out), shared=True), open_memo(out) as memo:
        runners = []
        for s in settings:
            inputs = Inputs.of(s, memo)
            preflight.check_run(s, out, inputs)
            runners.append(Runner(s, out, inputs, log))

        def after_level(runner) -> None:
            results = runner.results
            if "extract" in results and "split" not in results:
                preflight.check_classes(runner.settings, results["extract"]["meta"]["classes"], {"split"})

        run_many(runners, selected(settings[0].until), after_level, keep_going=True)
        rows = []
        for i, (s, runner) in enumerate(zip(settings, runners)):
            if runner.error is not None:
                log.error("setting %d failed: %s", i + 1, runner.error)
                rows.append(None)
                continue
            run_id = uuid.uuid5(flow_run_id, str(i)).hex  # one id per setting, distinct in its first characters
            rows.append(finish(s, out, runner.inputs, runner.results, runner.states, run_id, deployment.name,
                               publish=False))
    table, best = comparison(settings, runners, rows)
    distinct = {stage.name: len({r.results[stage.name]["key"] for r in runners if stage.name in r.results})
                for stage in selected(settings[0].until)}
    computed = {stage.name: len({r.results[stage.name]["key"] for r in runners
                                 if stage.name in r.results and r.states.get(stage.name) != "Cached"})
                for stage in selected(settings[0].until)}
    classes = next((r.results["extract"]["meta"]["classes"] for r in runners if "extract" in r.results), None)
    plot = publish_comparison(out, settings, table, best, deployment.name, 1 / len(classes) if classes else None)
    return {"out": str(out), "varied": varied(settings), "rows": table, "best": None if best is None else best + 1,
            "distinct_keys": distinct, "computed": computed, "states": [r.states for r in runners],
            "plot": None if plot is None else str(plot)}


def publish_comparison(out: Path, settings: list[RunSettings], table: list[dict], best: int | None,
                       scope: str | None, chance: float | None = None) -> Path | None:
    """The comparison as a table artifact and a markdown artifact with the plot; the plot's file."""
    from agelens.tasks.core.hashing import sha256_json
    from agelens.tasks.core.stage import atomic_write_bytes
    from agelens.tasks.reporting.artifacts import publish_markdown, publish_run
    from agelens.tasks.reporting.markdown import escape, image
    from agelens.tasks.reporting.plots import base, runs as run_plots
    from agelens.tasks.reporting.tables import Table

    names = varied(settings)
    scored = [(i, r) for i, r in enumerate(table) if r.get("accuracy") is not None]
    parts = [f"# Sweep of {len(settings)} settings", f"Varied: {escape(', '.join(option(n) for n in names) or 'nothing')}."]
    if best is not None:
        parts.append(f"Best: setting {best + 1}, {escape(label(settings[best], names))}: {table[best]['split']} accuracy "
                     f"{table[best]['accuracy']:.3f} [{table[best]['accuracy_ci'][0]:.3f}, "
                     f"{table[best]['accuracy_ci'][1]:.3f}]. Intervals that overlap do not tell the settings apart.")
    if scored:
        path = out / "sweeps" / f"sweep-{sha256_json([table, chance])[:16]}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.partial.png")
            figure = run_plots.sweep_comparison(
                [f"{i + 1}: {label(settings[i], names)}" for i, _ in scored], [r["accuracy"] for _, r in scored],
                [r["accuracy_ci"] for _, r in scored], f"{scored[0][1]['split']} accuracy",
                next((k for k, (i, _) in enumerate(scored) if i == best), None), chance)
            base.save(figure, tmp)
            atomic_write_bytes(path, tmp.read_bytes())
            tmp.unlink()
        parts.append(image(path, "accuracy per setting", 640))
    failed = [r for r in table if r.get("error")]
    if failed:
        parts.append("Failed: " + "; ".join(f"setting {r['setting']}: {escape(r['error'])}" for r in failed))
    publish_run([Table(SWEEP, table, f"{len(settings)} settings compared")], None, scope)
    publish_markdown(f"{SWEEP}-plot", "\n\n".join(parts) + "\n", "The sweep's settings compared", scope)
    return path if scored else None


def describe(result: dict) -> str:
    lines = []
    rows = result["rows"]
    names = result["varied"]
    for r in rows:
        where = " ".join(f"{option(n)} {r[n]}" for n in names)
        if r.get("error"):
            lines.append(f"setting {r['setting']}  {where}  failed: {r['error']}")
            continue
        ci = r["accuracy_ci"]
        lines.append(f"setting {r['setting']}  {where}  {r['split']} accuracy {r['accuracy']:.3f} "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}]  train {r['train'].lower()}  run {r['run']}"
                     + ("  <- best" if result["best"] == r["setting"] else ""))
    counts = ", ".join(f"{stage} {result['computed'][stage]} of {n}" for stage, n in result["distinct_keys"].items())
    lines.append(f"computed per stage, of its distinct keys (the rest cached): {counts}")
    if result.get("plot"):
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)
