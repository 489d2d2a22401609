"""Show that a person sees the results in Prefect's UI: start a server on a non-default port,
run the demo pipeline against it, and screenshot the run report artifact, the flow run (its
graph marks each stage's artifacts) and the artifacts list in headless Chromium (Debian's `chromium`; `apt-get install chromium`).

    .venv/bin/python scripts/ui_screenshot.py   # writes docs/ui-run-report.png, ui-run-graph.png, ui-artifacts.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.harness import REPO, PrefectServer  # noqa: E402


def screenshot(url: str, target: Path, height: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        sys.exit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size=1400,{height}",
                        "--virtual-time-budget=20000", f"--screenshot={target}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"{target}  <-  {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    args.docs.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, PrefectServer(Path(tmp)) as server:
        print(f"server {server.url} (PREFECT_UI_API_URL set to it)")
        # A fresh output folder, so that every stage runs and publishes its artifacts.
        server.run(str(Path(sys.executable).with_name("agelens")), "run", "--preset", "demo", "--out", str(Path(tmp) / "out"),
                   timeout=1800)
        run = server.api("POST", "/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1})[0]
        report = server.api("POST", "/artifacts/filter",
                            json={"artifacts": {"key": {"any_": ["agelens-run-report"]}}, "limit": 1})[0]
        ui = server.url.removesuffix("/api")
        screenshot(f"{ui}/artifacts/artifact/{report['id']}", args.docs / "ui-run-report.png", 2600)
        screenshot(f"{ui}/runs/flow-run/{run['id']}", args.docs / "ui-run-graph.png", 1000)
        screenshot(f"{ui}/artifacts", args.docs / "ui-artifacts.png", 1000)


if __name__ == "__main__":
    main()
