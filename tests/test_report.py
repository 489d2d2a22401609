"""User strings (file names, labels) are text wherever they are rendered."""

import numpy as np
from PIL import Image

from flows.age_pipeline import age_pipeline
from flows.settings import RunSettings
from tasks.reporting.markdown import escape, table

HOSTILE = "<img src=x onerror=alert(2)>|x"


def test_markdown_escapes_html_tables_math_and_code():
    text = escape("a|b <b>c</b> `d` $e$ [f](g) *h* _i_ \\")
    assert "<" not in text and ">" not in text and "|" not in text.replace("\\|", "")
    assert "\\`d\\`" in text and "\\$e\\$" in text and "\\[f\\]\\(g\\)" in text and "\\*h\\*" in text
    row = table([{"class": HOSTILE, "n": 1}])
    assert row.splitlines()[2] == "| &lt;img src=x onerror=alert\\(2\\)&gt;\\|x | 1 |"


def test_hostile_labels_and_file_names_pass_through_every_stage(prefect_backend, tmp_path):
    """Label folders and file names with `$`, `|`, `<`, `>` and backticks: no stage crashes (a
    matplotlib title would parse `$...$` as math) and the report renders them as text."""
    rng = np.random.default_rng(0)
    labels = [HOSTILE, "`tick`", "$x$ and $y$"]
    for k, label in enumerate(labels):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(60 + 70 * k, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"${i}$ |`{i}`<b>.png")
    result = age_pipeline(settings=RunSettings(
        data=str(tmp_path / "data"), out=str(tmp_path / "out"), backbone="convnext_narrow", weights="none",
        image_size=32, epochs=2, per_class=12, val_frac=0.34, explain_classes=labels, explain_images=1,
        feature_images=1, attention_images=2, faithfulness_steps=2, tsne_perplexity=5))
    assert set(s["state"] for s in result["stages"].values()) == {"Completed"}
    report = open(result["stages"]["report"]["outputs"]["report"]).read()
    assert "<img" not in report and "<b>" not in report
    assert "&lt;img src=x onerror=alert\\(2\\)&gt;\\|x" in report
    assert "\\$x\\$ and \\$y\\$" in report
