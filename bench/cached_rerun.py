"""A fully cached rerun of the whole demo flow against a flow of as many trivial cached tasks.

What a cached rerun costs beyond Prefect's own per-task overhead is our cache keys: listing
the image folder, hashing inputs (large files once per content, then by size and mtime) and
reading the manifest. Both flows run in one process, warmed up once, then timed alternately;
this is done in ephemeral mode and against a running `prefect server`. Target (issue 5): <= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = dict(backbone="convnext_narrow", image_size=64, epochs=12, lr=3e-4)


def measure(out: str, repeats: int) -> dict:
    from prefect import flow, task

    from flows.age_pipeline import age_pipeline

    first = age_pipeline(out=out, **DEMO)
    n_tasks = len(first["stages"])

    @task(cache_key_fn=lambda context, parameters: f"trivial/{parameters['i']}", persist_result=True,
          result_storage=Path(out), result_serializer="json")
    def trivial(i: int) -> dict:
        return {"i": i}

    @flow(name="trivial-cached")
    def trivial_flow(n: int) -> list[str]:
        futures = [trivial.submit(i) for i in range(n)]
        for future in futures:
            future.wait()
        return [future.state.name for future in futures]

    trivial_flow(n_tasks)
    ours, baseline = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        result = age_pipeline(out=out, **DEMO)
        ours.append(time.perf_counter() - began)
        assert {s["state"] for s in result["stages"].values()} == {"Cached"}, result["stages"]
        began = time.perf_counter()
        trivial_flow(n_tasks)
        baseline.append(time.perf_counter() - began)
    return {"tasks": n_tasks, "ours": statistics.median(ours), "baseline": statistics.median(baseline)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="artifacts", help="output folder of the demo run (reused)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(measure(args.out, args.repeats)))
        return

    from flows.server import PrefectServer

    results = {}
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_LOGGING_LEVEL="ERROR", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    inner = [sys.executable, __file__, "--inner", "--out", args.out, "--repeats", str(args.repeats)]
    proc = subprocess.run(inner, env=env, capture_output=True, text=True, check=True)
    results["ephemeral"] = json.loads(proc.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as home, PrefectServer(Path(home)) as server:
        proc = subprocess.run(inner, env={**env, "PREFECT_API_URL": server.url}, capture_output=True, text=True,
                              check=True)
        results["server"] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"compared: a fully cached rerun of the demo flow ({DEMO}) vs a flow of the same number of trivial "
          f"cached tasks; median of {args.repeats} alternating runs after one warm-up each")
    for mode, r in results.items():
        ratio = r["ours"] / r["baseline"]
        print(f"{mode:>9}: agelens {r['ours']:.3f} s, trivial {r['baseline']:.3f} s ({r['tasks']} tasks) -> "
              f"ratio {ratio:.2f}x (target <= 1.2x: {'met' if ratio <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
