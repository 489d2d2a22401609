"""`agelens run`: the flow's parameters as command-line options, one-to-one."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import typing

from flows.config import ConfigError, RunConfig


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (`agelens: error: ...`), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"agelens: error: {message} (see agelens run --help)\n")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_flow_options(parser: argparse.ArgumentParser, flow_fn) -> list[str]:
    """One option per flow parameter, typed from its annotation."""
    names = []
    hints = typing.get_type_hints(flow_fn)
    for name, param in inspect.signature(flow_fn).parameters.items():
        hint = hints.get(name, str)
        kwargs: dict = {"dest": name, "default": param.default}
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(hint))
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            kwargs["type"] = args[0] if args else hint
            kwargs["metavar"] = "PATH" if name in ("data", "images", "out") else name.upper()
        kwargs["help"] = f"(default: {param.default})"
        parser.add_argument(_option(name), **kwargs)
        names.append(name)
    return names


def build_parser(flow_fn) -> tuple[argparse.ArgumentParser, list[str]]:
    parser = OneLineParser(prog="agelens", description="Face-age study on CACD as a cached Prefect flow.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline (on the built-in demo data unless --data is given)")
    names = _add_flow_options(run, flow_fn)
    run.add_argument("--json", action="store_true", help="print one JSON summary of every stage last on stdout")
    run.add_argument("--task-runner", choices=["thread", "dask"], default="thread",
                     help="run independent stages on threads (default) or on a Dask cluster")
    run.add_argument("--dask-address", metavar="ADDRESS", help="an existing Dask scheduler (default: a LocalCluster)")
    commands.add_parser("serve", help="serve the age-pipeline and watch-sample-size deployments in this process")
    return parser, names


def main(argv: list[str] | None = None) -> int:
    from flows.age_pipeline import age_pipeline, with_task_runner
    from tasks.sources import DataError

    parser, names = build_parser(age_pipeline.fn)
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # telemetry needs a network
    if args.command == "serve":
        from flows.deployments import serve_all

        serve_all()
        return 0
    parameters = {name: getattr(args, name) for name in names}
    if args.dask_address and args.task_runner != "dask":
        parser.exit(2, "agelens: error: --dask-address needs --task-runner dask\n")
    try:
        RunConfig(**parameters)
    except ConfigError as error:
        parser.exit(2, f"agelens: error: {error}\n")
    try:
        result = with_task_runner(args.task_runner, args.dask_address)(**parameters)
    except (DataError, ConfigError) as error:
        print(f"agelens: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        print(describe(result))
    return 0


def describe(result: dict) -> str:
    """One line per stage: state and the few numbers a person looks at first."""
    lines = []
    for name, stage in result["stages"].items():
        s = stage["summary"]
        facts = {
            "demo": lambda: f"{s['images']} images",
            "extract": lambda: f"kept {s['rows_out']} of {s['rows_in']} rows, dropped "
                               f"{ {k: v for k, v in s['dropped'].items() if v} or 'none'}",
            "split": lambda: f"{ {k: sum(v.values()) for k, v in s['per_class_per_split'].items()} }, "
                             f"shared identities {s['shared_identities']}",
            "decode": lambda: f"{s['images']} images at {s['image_size']} px, {s['undecodable']} undecodable",
            "train": lambda: f"kept epoch {s['best_epoch']} of {s['epochs']} (val loss {s['best_val_loss']:.3f}, "
                             f"acc {s['best_val_acc']:.3f})",
            "evaluate": lambda: ", ".join(f"{k} acc {v['accuracy']:.3f} macro-F1 {v['macro_f1']:.3f}"
                                          for k, v in s.items() if isinstance(v, dict)),
            "embed": lambda: f"{s['images']} feature vectors of dimension {s['feature_dim']}",
            "featuremaps": lambda: f"{s['files']} grids of layers {', '.join(s['layers'])}",
            "explain": lambda: f"{s['images']} strips; sanity Spearman {s.get('sanity_spearman', 'not run')}",
            "report": lambda: f"{s['images']} plots embedded",
        }.get(name, lambda: "")
        lines.append(f"{name:<12} {stage['state']:<10} {facts()}")
    out = result["config"]["out"]
    lines.append(f"outputs under {out}" + (" (see the run report)" if "report" in result["stages"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
