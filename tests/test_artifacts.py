"""What Prefect's UI shows of a run's artifacts, in a real browser: class names that are HTML or
markdown links arrive as text, never as elements or clickable links."""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from markdown_it import MarkdownIt
from PIL import Image

from agelens.tasks.reporting.artifacts import artifact_key, cell_text, safe_rows

REPO = Path(__file__).resolve().parents[1]
HOSTILE = ["<img src=x onerror=alert(1)>", "[l](javascript:alert(1))", "$x$ and `y` |z"]


def test_cells_and_column_names_are_escaped_but_numbers_kept():
    rows = safe_rows([{"class": HOSTILE[0], f"predicted {HOSTILE[1]}": 0.5, "train_loss": 1, "ok": True}])
    assert rows == [{"class": "&lt;img src=x onerror=alert\\(1\\)&gt;", "predicted \\[l\\]\\(javascript:alert\\(1\\)\\)": 0.5,
                     "train_loss": 1, "ok": True}]
    assert cell_text("a\\b") == "a\\\\b"
    assert artifact_key("run-report") == "agelens-run-report"
    assert artifact_key("run-report", "My Deployment_1") == "agelens-my-deployment-1-run-report"


def browser_dom(url: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make test installs it where apt-get can)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_hostile_class_names_and_file_names_are_text_everywhere(server, tmp_path):
    """Label folders and file names with HTML, links, `$`, `|` and backticks, through every stage:
    no stage crashes (a matplotlib title would parse `$...$` as math), and the report, the run
    report and the UI's artifact pages show them as text."""
    rng = np.random.default_rng(0)
    for k, label in enumerate(HOSTILE):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(rng.normal(60 + 70 * k, 30, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"${i}$ |`{i}`<b>.png")
    proc = subprocess.run([sys.executable, "-m", "agelens", "run", "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "out"), "--backbone", "convnext_narrow", "--weights", "none",
                           "--image-size", "32", "--epochs", "1", "--val-frac", "0.5", "--explain-classes",
                           ",".join(HOSTILE[:2]), "--explain-images", "1", "--feature-images", "1",
                           "--attention-images", "2", "--faithfulness-steps", "2", "--tsne-perplexity", "5", "--json"],
                          cwd=REPO, env=server.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {s["state"] for s in result["stages"].values()} == {"Completed"}
    study = Path(result["stages"]["report"]["outputs"]["report"]).read_text()
    found = server.api("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [result["run"]["run_id"]]}}})
    reports = [study, Path(result["run"]["report"]).read_text()]
    for report in reports:  # as markdown source: every character with a meaning escaped
        assert "\\<img src=x onerror=alert\\(1\\)\\>" in report and "\\$x\\$ and \\`y\\` \\|z" in report
    # A CommonMark renderer shows every markdown artifact's text as text, escaped once.
    for markdown in [*reports, *(a["data"] for a in found if a["type"] == "markdown")]:
        html = MarkdownIt("commonmark").enable("table").render(markdown)
        assert "<img src=x" not in html and "<b>" not in html and 'href="javascript:' not in html
        assert "&amp;#" not in html and "&amp;lt;" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in MarkdownIt("commonmark").enable("table").render(study)
    by_key = {a["key"]: a for a in found}
    ui = server.url.removesuffix("/api")
    for key in ("agelens-confusion-matrix-val", "agelens-classification-report-val", "agelens-split-counts",
                "agelens-run-report"):
        for _ in range(3):  # on a loaded machine the page may not have fetched the artifact within the budget
            dom = browser_dom(f"{ui}/artifacts/artifact/{by_key[key]['id']}")
            if "onerror=alert(1)" in dom.replace("\\", ""):
                break
        assert "onerror=alert(1)" in dom.replace("\\", ""), key  # the name is shown, as text
        assert '<img src="x"' not in dom and "<img src=x" not in dom, key
        assert 'href="javascript:' not in dom, key
