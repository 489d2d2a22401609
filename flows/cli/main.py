"""`agelens`: run the study, ask what a run would do, inspect and clean the output folder,
deploy it. The run options are RunSettings' fields (`--per-class` sets `per_class`).

Every expected error is one line on stderr, `agelens: error: ...` (and, with --json, a JSON
object on stdout), exit code 2 for a bad option and 1 otherwise; `--debug` shows the traceback.
What can be checked is checked before a Prefect server is started or contacted. Prefect and
torch are imported only by the commands that need them, so `agelens status` answers in about a
second. Ctrl-C or SIGTERM stops a run within seconds (flows/service/interrupt.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
import types
import typing
from contextlib import contextmanager, nullcontext

from agelens.flows.pipeline.settings import RunSettings, option, parse_settings
from agelens.tasks.core.errors import AgelensError, ConfigError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (`agelens: error: ...`), not the whole usage."""

    wants_json = False

    def error(self, message: str):
        if OneLineParser.wants_json:
            print(json.dumps({"error": message, "kind": "ConfigError", "exit_code": 2}))
        command = " ".join(self.prog.split()[1:])  # "" for agelens itself
        self.exit(2, f"agelens: error: {message} (see agelens {command + ' ' if command else ''}--help)\n")


def _add_settings(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """One option per RunSettings field; unset options are left to the preset and defaults. For a
    sweep, a value may be a comma-separated list (checked per setting)."""
    for name, field in RunSettings.model_fields.items():
        kwargs: dict = {"dest": name, "default": None}
        args = [a for a in typing.get_args(field.annotation) if a is not type(None)]
        if sweep and field.annotation is not bool:
            kwargs["metavar"] = "PATH" if name in ("data", "images", "out") else f"{name.upper()}[,...]"
        elif field.annotation is bool:
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
    sweep = commands.add_parser("sweep", help="run several settings (a grid: options with commas, or a file) and "
                                              "compare them; shared stages are computed once")
    _add_settings(sweep, sweep=True)
    sweep.add_argument("--settings-file", metavar="FILE", help="JSON or YAML list of option mappings, each over the "
                                                               "options given here")
    sweep.add_argument("--json", action="store_true", help="print the comparison as JSON last on stdout")
    sweep.add_argument("--task-runner", choices=["thread", "dask"], default="thread",
                       help="run the trainings concurrently on threads (default) or on a Dask cluster")
    sweep.add_argument("--dask-address", metavar="ADDRESS", help="an existing Dask scheduler (default: a LocalCluster)")
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
    models = commands.add_parser("models", help="each configuration's champion model and the models it kept out")
    models.add_argument("--out", default="artifacts", metavar="PATH")
    models.add_argument("--json", action="store_true")
    models.add_argument("--verify", action="store_true", help="check the weights of every stored model, not only "
                                                              "the champions (exit 1 when one is damaged)")
    promote = commands.add_parser("promote", help="make a recorded run's model its configuration's champion")
    promote.add_argument("run", metavar="RUN", help="a run id or its first characters (see agelens runs)")
    promote.add_argument("--out", default="artifacts", metavar="PATH")
    predict = commands.add_parser("predict", help="age of the faces in photos, with the champion model")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    predict.add_argument("--out", metavar="FILE", help="write one row per face to FILE.csv or FILE.parquet")
    predict.add_argument("--json", action="store_true", help="print the rows and the skipped files as JSON")
    predict.add_argument("--models", default="artifacts", metavar="PATH", help="the pipeline's --out, where the "
                                                                               "models are (default: artifacts)")
    predict.add_argument("--config", metavar="ID", help="whose champion (see agelens models; needed when there are "
                                                        "several)")
    predict.add_argument("--run", metavar="RUN", help="the model of this recorded run instead of a champion")
    predict.add_argument("--no-detect", action="store_true", help="each image is one face already (no detection)")
    predict.add_argument("--face-model", metavar="PATH", help="YuNet's ONNX file (default: $AGELENS_FACE_MODEL, else "
                                                              "the copy in the user's cache, downloaded on first use)")
    predict.add_argument("--explain", metavar="DIR", help="write a Grad-CAM overlay per face into DIR")
    predict.add_argument("--batch-size", type=int, default=64, metavar="N")
    predict.add_argument("--device", default="auto")
    fetch = commands.add_parser("fetch-models", help="download the model files agelens fetches on first use (the face "
                                                     "detector) into the cache now, for machines without internet")
    fetch.add_argument("--json", action="store_true")
    deploy = commands.add_parser("deploy", help="deploy age-pipeline and watch-data on your data to a Prefect server")
    _add_settings(deploy)
    deploy.add_argument("--name", default="main", help="deployment name of both (default: main)")
    deploy.add_argument("--pool", default="agelens-process", help="process work pool, created if missing")
    serve = commands.add_parser("serve", help="serve both deployments from this process (no worker needed)")
    _add_settings(serve)
    return parser


def settings_from(args: argparse.Namespace) -> RunSettings:
    given = {name: getattr(args, name) for name in RunSettings.model_fields if getattr(args, name, None) is not None}
    return parse_settings(given)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    OneLineParser.wants_json = "--json" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # telemetry needs a network
    if args.debug:
        os.environ["AGELENS_DEBUG"] = "1"  # the flow then keeps Prefect's tracebacks too
    from agelens.flows.service.interrupt import stop_on_signals

    # Ctrl-C or SIGTERM before the work (imports, checks, the server) ends the process at once;
    # `serve` is Prefect's to stop (it pauses its deployments on the way out).
    stops = nullcontext() if args.command == "serve" else stop_on_signals(exit_now=True)
    try:
        with stops:
            code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that closed the pipe early shows here, not at exit
        return code
    except AgelensError as error:
        if args.debug:
            raise
        return failed(args, error)
    except BrokenPipeError:  # `agelens runs | head -1`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:
        unreachable = unreachable_server(error)
        if unreachable is None or args.debug:
            raise
        return failed(args, unreachable)


def failed(args, error: AgelensError) -> int:
    code = 2 if isinstance(error, ConfigError) else 1
    if getattr(args, "json", False):
        print(json.dumps({"error": str(error), "kind": type(error).__name__, "exit_code": code}))
    print(f"agelens: error: {error}", file=sys.stderr)
    return code


def unreachable_server(error: BaseException) -> AgelensError | None:
    """One line for a Prefect server that cannot be reached, wherever it surfaced."""
    import httpx

    while error is not None:
        if isinstance(error, httpx.TransportError):
            url = getattr(getattr(error, "request", None), "url", None) if _has_request(error) else None
            where = f"{url.scheme}://{url.host}:{url.port}" if url else "the configured address"
            return AgelensError(f"cannot reach the Prefect server at {where} ({type(error).__name__}: {error}); "
                                "is it running, and is PREFECT_API_URL right?")
        error = error.__cause__ or error.__context__
    return None


def _has_request(error) -> bool:
    try:
        error.request  # noqa: B018 - httpx raises RuntimeError when the error has no request
        return True
    except RuntimeError:
        return False


@contextmanager
def prefect_api():
    """The Prefect API this command uses: the configured server (checked to answer), or the
    shared local one (flows/service/localserver.py), for as long as the block runs."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, get_current_settings, temporary_settings

    url = get_current_settings().api.url
    if url:
        check_reachable(url)
        yield url
        return
    from agelens.flows.service.localserver import shared_server

    # The local server has no UI and stops a minute after its last user: no "View at" links to it.
    with shared_server() as local, temporary_settings(updates={PREFECT_API_URL: local, PREFECT_UI_URL: ""}):
        yield local


def check_configured_server() -> None:
    """A configured server (PREFECT_API_URL, or the profile's) that does not answer is one line now."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        check_reachable(url)


def check_reachable(url: str) -> None:
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        raise ConfigError(f"cannot reach the Prefect server at {url} (PREFECT_API_URL): "
                          f"{type(error).__name__}: {error}") from None


def precheck(settings: RunSettings) -> None:
    """What can be checked without Prefect: the output folder, the data, the model settings and
    the weights (the flow checks again: deployments reach it directly)."""
    from agelens.flows.service import preflight
    from agelens.flows.pipeline.demo import DEMO_ROOT, demo_is_current, demo_stamp
    from agelens.flows.pipeline.graph import selected
    from agelens.flows.pipeline.inputs import Inputs, open_memo

    out = preflight.writable_out(settings.out)
    if settings.uses_demo and not demo_is_current(DEMO_ROOT, demo_stamp()):
        preflight.check_model_settings(settings, {s.name for s in selected(settings.until)})
        return
    with open_memo(out) as memo:
        preflight.check_run(settings, out, Inputs.of(settings, memo, make_demo=False))


def check_task_runner(args) -> None:
    if args.dask_address and args.task_runner != "dask":
        raise ConfigError("--dask-address needs --task-runner dask")
    if args.task_runner == "dask":
        import importlib.util

        if importlib.util.find_spec("prefect_dask") is None:
            raise ConfigError("--task-runner dask needs the dask extra: pip install 'agelens[dask]'")


def run_command(args) -> int:
    settings = settings_from(args)
    check_task_runner(args)
    check_configured_server()  # in a second, before the slower checks
    precheck(settings)
    from agelens.flows.pipeline.flow import with_task_runner

    result = _run_flow(args, with_task_runner(args.task_runner, args.dask_address), settings.out,
                       lambda flow: flow(settings=settings))
    print(json.dumps(result, default=str) if args.json else describe(result))
    return 0


def sweep_command(args) -> int:
    from agelens.flows.sweep.grid import expand, read_settings_file

    given = {name: getattr(args, name) for name in RunSettings.model_fields if getattr(args, name, None) is not None}
    settings = expand(given, read_settings_file(args.settings_file) if args.settings_file else None)
    from agelens.flows.pipeline.graph import STAGE_NAMES

    early = sorted({s.until for s in settings if STAGE_NAMES.index(s.until) < STAGE_NAMES.index("evaluate")})
    if early:
        raise ConfigError(f"--until {', '.join(early)}: a sweep compares the settings' accuracy, so it runs to "
                          "evaluate at least")
    check_task_runner(args)
    check_configured_server()
    for each in settings:
        precheck(each)
    from agelens.flows.sweep.grid import describe as describe_sweep
    from agelens.flows.sweep.flow import with_task_runner

    result = _run_flow(args, with_task_runner(args.task_runner, args.dask_address), settings[0].out,
                       lambda flow: flow(settings=settings))
    print(json.dumps(result, default=str) if args.json else describe_sweep(result))
    return 1 if any(r.get("error") for r in result["rows"]) else 0


def _run_flow(args, flow, out: str, call) -> dict:
    """Run a flow in this process with Prefect's logging (expected errors in one line); Ctrl-C or
    SIGTERM marks the flow run Cancelled, stops worker processes and says how to resume."""
    from prefect.logging.configuration import setup_logging

    from agelens.flows.service.interrupt import Lost, cancel_flow_run, resume_hint, run_interruptibly, stop_children

    began = time.time()
    setup_logging()
    if not args.debug:
        from agelens.flows.service.logs import quiet_expected_errors

        quiet_expected_errors(cli=True)
    started: dict = {}

    def remember_the_run(flow, run, state) -> None:  # to mark it Cancelled on an interrupt
        started["id"] = run.id

    flow = flow.with_options(on_running=[remember_the_run])

    def on_interrupt(signum: int | None) -> None:
        if signum is None:  # the server went away: the caller says so
            stop_children()
            return
        hint = resume_hint(out, began)
        print(f"\nagelens: interrupted; {hint}", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps({"error": f"interrupted; {hint}", "kind": "Interrupted", "exit_code": 128 + signum}),
                  flush=True)
        if "id" in started:
            cancel_flow_run(started["id"], f"interrupted by the user; {hint}")
        stop_children()

    with prefect_api() as url:
        refused = []

        def server_answers() -> None:
            """Two refused connections in a row: the server is gone (a slow answer is not counted)."""
            from agelens.flows.service.localserver import refuses

            refused.append(refuses(url))
            if refused[-2:] == [True, True]:
                raise Lost(f"the Prefect server at {url} stopped answering during the run; "
                           f"{resume_hint(out, began)}")

        try:
            return run_interruptibly(lambda: call(flow), on_interrupt, server_answers)
        except Lost as lost:
            # Exit now: Prefect's log and event workers would retry the dead server for minutes at exit.
            failed(args, AgelensError(str(lost)))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


def status_command(args) -> int:
    from pathlib import Path

    from agelens.flows.service import status
    from agelens.flows.pipeline.inputs import Inputs, open_memo
    from agelens.tasks.core.errors import DataError
    from agelens.tasks.core.hashing import HashMemo

    settings = settings_from(args)
    out = Path(settings.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    inputs_of = lambda memo: Inputs.of(settings, memo, make_demo=False)  # noqa: E731
    if settings.uses_demo and not Path(inputs_of(HashMemo(None)).data).exists():
        rows = [{"stage": "extract", "key": None, "cached": False, "reasons": ["the demo data will be generated first"]}]
    else:  # reads only: nothing is created where nothing ran yet
        with open_memo(out) if out.is_dir() else HashMemo(None) as memo:
            rows = status.plan(settings, str(out), inputs_of(memo), hash_file=memo.file)
    print(json.dumps(rows) if args.json else status.describe(rows, out))
    errors = [row["error"] for row in rows if "error" in row]
    if errors:
        raise DataError(errors[0])
    return 0


def gc_command(args) -> int:
    from agelens.flows.service import gc

    if args.keep_last < 0:
        raise ConfigError("--keep-last must be at least 0")
    print(gc.describe(gc.collect(args.out, args.keep_last, args.dry_run)))
    return 0


def runs_command(args) -> int:
    from agelens.flows.pipeline import runs

    rows = runs.read_runs(args.out)
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print(f"no completed runs recorded in {os.path.abspath(args.out)}")
    else:
        table = runs.compact_rows(rows)
        widths = {k: max(len(k), *(len(_text(r[k])) for r in table)) for k in table[0]}
        print("  ".join(k.ljust(w) for k, w in widths.items()))
        for r in table:
            print("  ".join(_text(r[k]).ljust(w) for k, w in widths.items()))
    return 0


def _text(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))


def models_command(args) -> int:
    from agelens.flows.pipeline.inputs import open_memo
    from agelens.flows.registry import models

    listing, damaged = [], 0
    with open_memo(args.out) if os.path.isdir(args.out) else _no_memo() as memo:
        for config in models.configs(args.out):
            served = models.serving(args.out, config, memo.file)
            entry = {"config": config, "champion": served.champion, "serving": served.record, "warning": served.warning,
                     "decisions": models.decisions(args.out, config)}
            if args.verify:
                entry["stored"] = [{**r, "problem": models.verify(args.out, config, r, memo.file)}
                                   for r in models.stored(args.out, config)]
                damaged += sum(1 for r in entry["stored"] if r["problem"])
            damaged += bool(served.warning)
            listing.append(entry)
    if args.json:
        print(json.dumps(listing))
        return 1 if args.verify and damaged else 0
    if not listing:
        print(f"no models recorded in {os.path.abspath(args.out)} (a run that reaches the compare stage records one)")
    for entry in listing:
        print(f"configuration {entry['config']}")
        champion, serving = entry["champion"], entry["serving"]
        if champion:
            print("  champion  " + _model_line(champion) + ("  DAMAGED" if entry["warning"] else ""))
        if entry["warning"]:
            print(f"  warning   {entry['warning']}")
        if serving and serving is not champion:
            print("  serving   " + _model_line(serving))
        for d in entry["decisions"]:
            if d["decision"] == "keep":
                print(f"  rejected  run {d['run_id'][:8]}  model {d['model_digest'][:12]}  {d['time']}: {d['why']}")
        for r in entry.get("stored", []):
            print(f"  stored    run {r['run_id'][:8]}  model {r['model_digest'][:12]}  "
                  + (f"DAMAGED: {r['problem']}" if r["problem"] else "verified"))
    return 1 if args.verify and damaged else 0


def _model_line(record: dict) -> str:
    where, m, facts = record.get("settings") or {}, record.get("metrics") or {}, record.get("facts") or {}
    backbone, size = where.get("backbone", facts.get("backbone")), where.get("image_size", facts.get("image_size"))
    return (f"run {record['run_id'][:8]}  model {record['model_digest'][:12]}  {backbone} {size} px  accuracy "
            f"{_text(m.get('accuracy'))}  since {record.get('promoted_at')}: {record.get('why')}")


@contextmanager
def _no_memo():
    from agelens.tasks.core.hashing import HashMemo

    with HashMemo(None) as memo:
        yield memo


def fetch_models_command(args) -> int:
    from agelens.tasks.core.downloads import MODEL_FILES, locate

    found = [{"file": model.name, "path": str(locate(model, progress=not args.json))} for model in MODEL_FILES]
    print(json.dumps(found) if args.json else "\n".join(f"{f['file']}: {f['path']}" for f in found))
    return 0


def promote_command(args) -> int:
    from agelens.flows.registry import models

    record = models.promote_by_hand(args.out, args.run)
    print(f"run {record['run_id'][:8]} (model {record['model_digest'][:12]}) is now the champion of configuration "
          f"{record['config']}")
    return 0


def predict_command(args) -> int:
    from agelens.flows.predict.scoring import main_predict

    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    return main_predict(args)


DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}")


def deploy_command(args) -> int:
    from prefect.settings import get_current_settings

    for flag, name in (("--name", args.name), ("--pool", args.pool)):
        if not DEPLOYMENT_NAME.fullmatch(name) or name != name.strip():
            raise ConfigError(f"{flag} {shlex.quote(name)}: a name is letters, digits, spaces, '.', '_' and '-', "
                              "starting with a letter or digit (at most 100 characters)")
    settings = settings_from(args)
    url = get_current_settings().api.url
    if not url:
        raise ConfigError("agelens deploy needs a running Prefect server: start one (prefect server start) and set "
                          "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    check_reachable(url)
    from agelens.flows.service.deployments import deploy

    from agelens.tasks.core.downloads import YUNET, MIRROR_ENV, source_url

    names = deploy(settings, args.name, args.pool)
    print("deployed " + ", ".join(names) + f" to work pool {args.pool} on {url}; start a worker with:\n"
          f"  prefect worker start --pool {shlex.quote(args.pool)}\nand score a folder of photos with the champion "
          f"model with:\n  prefect deployment run {shlex.quote('predict/' + args.name)} --param folder=/path/to/photos\n"
          f"The workers' face detector ({YUNET.name}) comes from ${YUNET.local_env} on the worker, else its cache "
          f"({YUNET.cached} for this user), else {source_url(YUNET)} on first use (${MIRROR_ENV} names a mirror); "
          "on workers without internet run `agelens fetch-models` first.")
    return 0


def serve_command(args) -> int:
    from agelens.flows.service.deployments import serve_all

    given = any(getattr(args, name) is not None for name in RunSettings.model_fields)
    settings = settings_from(args) if given else None
    with prefect_api():
        serve_all(settings)
    return 0


COMMANDS = {"run": run_command, "sweep": sweep_command, "status": status_command, "gc": gc_command, "runs": runs_command,
            "models": models_command, "fetch-models": fetch_models_command, "promote": promote_command,
            "predict": predict_command, "deploy": deploy_command, "serve": serve_command}


def describe(result: dict) -> str:
    """One line per stage: state and the few numbers a person looks at first."""
    from agelens.flows.pipeline.graph import BY_NAME

    lines = [f"{name:<12} {stage['state']:<10} {BY_NAME[name].describe(stage['summary'])}".rstrip()
             for name, stage in result["stages"].items()]
    lines.append(f"outputs under {result['out']}; report: {result['run']['report']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
