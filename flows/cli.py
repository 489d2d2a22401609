"""`agelens`: run the study, ask what a run would do, inspect and clean the output folder,
deploy it. The run options are RunSettings' fields (`--per-class` sets `per_class`).

Every expected error is one line on stderr, `agelens: error: ...`, exit code 2 for a bad
option and 1 otherwise; `--debug` shows the traceback. Prefect and torch are imported only by
the commands that need them, so `agelens status` answers in about a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import typing

from flows.settings import RunSettings, option, parse_settings
from tasks.errors import AgelensError, ConfigError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (`agelens: error: ...`), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"agelens: error: {message} (see agelens {self.prog.split()[-1]} --help)\n")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """One option per RunSettings field; unset options are left to the preset and defaults."""
    for name, field in RunSettings.model_fields.items():
        kwargs: dict = {"dest": name, "default": None}
        args = [a for a in typing.get_args(field.annotation) if a is not type(None)]
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(field.annotation) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(field.annotation))
        elif typing.get_origin(field.annotation) in (typing.Union, types.UnionType) and args and \
                all(typing.get_origin(a) is typing.Literal for a in args):
            kwargs["choices"] = [v for a in args for v in typing.get_args(a)]
        else:
            kwargs["metavar"] = "PATH" if name in ("data", "images", "out") else name.upper()
        default = field.default if field.default_factory is None else field.default_factory()
        shown = ",".join(default) if isinstance(default, list) else default
        kwargs["help"] = f"{field.description + ' ' if field.description else ''}(default: {shown})"
        parser.add_argument(option(name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="agelens", description="Face-age study on CACD as a cached Prefect flow.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Prefect's own error logs")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    run = commands.add_parser("run", help="run the pipeline (on the built-in demo data unless --data is given)")
    _add_settings(run)
    run.add_argument("--json", action="store_true", help="print one JSON summary of every stage last on stdout")
    run.add_argument("--task-runner", choices=["thread", "dask"], default="thread",
                     help="run independent stages on threads (default) or on a Dask cluster")
    run.add_argument("--dask-address", metavar="ADDRESS", help="an existing Dask scheduler (default: a LocalCluster)")
    status = commands.add_parser("status", help="say, per stage, whether a run with these options would be cached "
                                                "and why not (runs nothing)")
    _add_settings(status)
    status.add_argument("--json", action="store_true")
    gc = commands.add_parser("gc", help="remove stage folders no recent run used, and leftovers of killed runs")
    gc.add_argument("--out", default="artifacts", metavar="PATH")
    gc.add_argument("--keep-last", type=int, default=5, metavar="N", help="keep what the last N runs used (default: 5)")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    table = commands.add_parser("runs", help="the table of completed runs in an output folder")
    table.add_argument("--out", default="artifacts", metavar="PATH")
    table.add_argument("--json", action="store_true")
    deploy = commands.add_parser("deploy", help="deploy age-pipeline and watch-data on your data to a Prefect server")
    _add_settings(deploy)
    deploy.add_argument("--name", default="main", help="deployment name of both (default: main)")
    deploy.add_argument("--pool", default="agelens-process", help="process work pool, created if missing")
    serve = commands.add_parser("serve", help="serve both deployments from this process (no worker needed)")
    _add_settings(serve)
    return parser


def quiet_expected_errors() -> None:
    """Drop Prefect's console logs of errors the CLI reports in one line (the API keeps them)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    def keep(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, AgelensError):
            return False
        text = record.getMessage()
        return not any(f"{cls.__name__}:" in text or f"{cls.__name__}(" in text
                       for cls in (AgelensError, *AgelensError.__subclasses__()))

    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(keep)


def settings_from(args: argparse.Namespace, parser) -> RunSettings:
    given = {name: getattr(args, name) for name in RunSettings.model_fields if getattr(args, name, None) is not None}
    try:
        return parse_settings(given)
    except ConfigError as error:
        parser.exit(2, f"agelens: error: {error}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # telemetry needs a network
    try:
        return COMMANDS[args.command](args, parser)
    except AgelensError as error:
        if args.debug:
            raise
        print(f"agelens: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1


def run_command(args, parser) -> int:
    settings = settings_from(args, parser)
    if args.dask_address and args.task_runner != "dask":
        parser.exit(2, "agelens: error: --dask-address needs --task-runner dask\n")
    from prefect.logging.configuration import setup_logging

    from flows.age_pipeline import with_task_runner

    setup_logging()
    if not args.debug:
        quiet_expected_errors()
    result = with_task_runner(args.task_runner, args.dask_address)(settings=settings)
    print(json.dumps(result, default=str) if args.json else describe(result))
    return 0


def status_command(args, parser) -> int:
    from pathlib import Path

    from flows import status
    from flows.inputs import DEMO_ROOT, Inputs, open_memo
    from tasks.hashing import HashMemo

    settings = settings_from(args, parser)
    out = Path(settings.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    data = settings.data or str(DEMO_ROOT.resolve() / "celebrity2000_meta.mat")
    if settings.data is None and not os.path.exists(data):
        rows = [{"stage": "extract", "key": None, "cached": False, "reasons": ["the demo data will be generated first"]}]
    else:  # reads only: nothing is created where nothing ran yet
        with open_memo(out) if out.is_dir() else HashMemo(None) as memo:
            rows = status.plan(settings, str(out), Inputs(data, settings.images, settings.weights_choice,
                                                          settings.backbone, memo))
    print(json.dumps(rows) if args.json else status.describe(rows, out))
    return 0


def gc_command(args, parser) -> int:
    from flows import gc

    if args.keep_last < 0:
        parser.exit(2, "agelens: error: --keep-last must be at least 0\n")
    print(gc.describe(gc.collect(args.out, args.keep_last, args.dry_run)))
    return 0


def runs_command(args, parser) -> int:
    from flows import runs

    rows = runs.read_runs(args.out)
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print(f"no completed runs recorded in {os.path.abspath(args.out)}")
    else:
        table = runs.table_rows(rows, limit=len(rows))
        widths = {k: max(len(k), *(len(_text(r[k])) for r in table)) for k in table[0]}
        print("  ".join(k.ljust(w) for k, w in widths.items()))
        for r in table:
            print("  ".join(_text(r[k]).ljust(w) for k, w in widths.items()))
    return 0


def _text(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))


def deploy_command(args, parser) -> int:
    from flows.deployments import deploy

    names = deploy(settings_from(args, parser), args.name, args.pool)
    print("deployed " + " and ".join(names) + f" to work pool {args.pool}; start a worker with:\n"
          f"  prefect worker start --pool {args.pool}")
    return 0


def serve_command(args, parser) -> int:
    from flows.deployments import serve_all

    given = any(getattr(args, name) is not None for name in RunSettings.model_fields)
    serve_all(settings_from(args, parser) if given else None)
    return 0


COMMANDS = {"run": run_command, "status": status_command, "gc": gc_command, "runs": runs_command,
            "deploy": deploy_command, "serve": serve_command}


def describe(result: dict) -> str:
    """One line per stage: state and the few numbers a person looks at first."""
    lines = []
    for name, stage in result["stages"].items():
        s = stage["summary"]
        facts = {
            "extract": lambda: f"kept {s['rows_out']} of {s['rows_in']} rows, dropped "
                               f"{ {k: v for k, v in s['dropped'].items() if v} or 'none'}",
            "split": lambda: f"drawn {sum(s['per_class'].values())} "
                             f"({ {k: sum(v.values()) for k, v in s['per_class_per_split'].items()} }), "
                             f"shared identities {s['shared_identities']}",
            "decode": lambda: f"{s['images']} images at {s['image_size']} px, {s['undecodable']} undecodable",
            "train": lambda: f"kept epoch {s['best_epoch']} of {s['epochs']} (val loss {s['best_val_loss']:.3f}, "
                             f"acc {s['best_val_acc']:.3f})",
            "evaluate": lambda: ", ".join(f"{k} acc {v['accuracy']:.3f} macro-F1 {v['macro_f1']:.3f}"
                                          for k, v in s.items() if isinstance(v, dict)),
            "embed": lambda: f"{s['images']} feature vectors of dimension {s['feature_dim']}",
            "featuremaps": lambda: f"{s['files']} grids of layers {', '.join(s['layers'])}",
            "attention": lambda: f"mean Grad-CAM on {s['cam_layer']} per class",
            "explain": lambda: f"{s['images']} images, methods {', '.join(s['methods'])}",
            "report": lambda: f"{s['images']} plots embedded",
        }.get(name, lambda: "")
        lines.append(f"{name:<12} {stage['state']:<10} {facts()}")
    lines.append(f"outputs under {result['out']}" + (" (see the run report)" if "report" in result["stages"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
