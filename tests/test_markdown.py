"""User strings (file names, labels) are text wherever they are rendered."""

from agelens.tasks.reporting.markdown import escape, table

HOSTILE = "<img src=x onerror=alert(2)>|x"


def test_markdown_escapes_html_tables_math_and_code():
    text = escape("a|b <b>c</b> `d` $e$ [f](g) *h* _i_ \\")
    assert "<" not in text and ">" not in text and "|" not in text.replace("\\|", "")
    assert "\\`d\\`" in text and "\\$e\\$" in text and "\\[f\\]\\(g\\)" in text and "\\*h\\*" in text
    row = table([{"class": HOSTILE, "n": 1}])
    assert row.splitlines()[2] == "| &lt;img src=x onerror=alert\\(2\\)&gt;\\|x | 1 |"
