"""A fully cached rerun as a user types it, against the least any Prefect flow costs.

ours:     `agelens run --preset demo` on an output folder where every stage is cached, as a
          fresh process (imports, Prefect's start, keys, cache records, artifacts, run table);
baseline: a fresh process running a Prefect flow of as many trivial tasks, each cached the same
          way (a cache-key function and a persisted JSON record).
Both are run alternately, first in Prefect's ephemeral mode (each process starts its own
temporary server, as `make demo` does) and then against a running `prefect server`. Also timed:
`agelens status` (no Prefect, no torch). Targets: ratio <= 1.2; status <= 2 s.

    .venv/bin/python bench/cached_rerun.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import machine, spread  # noqa: E402
from tests.harness import PrefectServer  # noqa: E402

BASELINE = '''
import sys
from pathlib import Path
from prefect import flow, task

STORE = Path(sys.argv[2])

@task(cache_key_fn=lambda context, parameters: f"trivial/{parameters['i']}/record", persist_result=True,
      result_serializer="json", result_storage=STORE)
def trivial(i: int) -> dict:
    return {"i": i}

@flow(name="trivial-cached")
def trivial_flow(n: int) -> list:
    futures = [trivial.submit(i) for i in range(n)]
    return [future.result() for future in futures]

trivial_flow(int(sys.argv[1]))
'''


def timed(command: list[str], env: dict) -> tuple[float, str]:
    began = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def measure(env: dict, out: Path, baseline: Path, store: Path, repeats: int) -> dict:
    agelens = str(Path(sys.executable).with_name("agelens"))
    ours_command = [agelens, "run", "--preset", "demo", "--out", str(out), "--json"]
    _, stdout = timed(ours_command, env)  # computes what is missing, then everything is cached
    stages = json.loads(stdout.strip().splitlines()[-1])["stages"]
    baseline_command = [sys.executable, str(baseline), str(len(stages)), str(store)]
    timed(baseline_command, env)
    ours, theirs, status = [], [], []
    for _ in range(repeats):
        seconds, stdout = timed(ours_command, env)
        cached = {s["state"] for s in json.loads(stdout.strip().splitlines()[-1])["stages"].values()}
        assert cached == {"Cached"}, cached
        ours.append(seconds)
        theirs.append(timed(baseline_command, env)[0])
        status.append(timed([agelens, "status", "--preset", "demo", "--out", str(out)], env)[0])
    return {"tasks": len(stages), "ours": ours, "baseline": theirs, "status": status}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="the demo's output folder (reused)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 repeats, ephemeral mode only")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        baseline, store = Path(tmp) / "trivial_flow.py", Path(tmp) / "store"
        baseline.write_text(BASELINE)
        results["ephemeral"] = measure({**env, "PREFECT_HOME": str(Path(tmp) / "home")}, args.out, baseline, store,
                                       repeats)
        if not args.quick:
            with PrefectServer(Path(tmp)) as server:
                results["server"] = measure(server.env, args.out, baseline, store, repeats)
    print(f"machine:  {machine()}")
    print(f"compared: `agelens run --preset demo` with every stage cached vs a flow of "
          f"{results['ephemeral']['tasks']} trivial cached tasks, both as fresh processes, run alternately "
          f"{repeats} times after one warm-up each")
    for mode, r in results.items():
        ratio = statistics.median(r["ours"]) / statistics.median(r["baseline"])
        print(f"{mode:>9}: agelens {spread(r['ours'], ' s')}; trivial {spread(r['baseline'], ' s')}; ratio of medians "
              f"{ratio:.2f} (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")
    status = [s for r in results.values() for s in r["status"]]
    print(f"   status: `agelens status --preset demo` {spread(status, ' s')} (target <= 2 s: "
          f"{'met' if statistics.median(status) <= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
