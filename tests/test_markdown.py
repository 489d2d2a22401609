"""User strings (file names, labels, messages) are text wherever they are rendered: escaped once,
for a CommonMark renderer such as the UI's."""

from markdown_it import MarkdownIt

from agelens.tasks.reporting.markdown import escape, table

HOSTILE = "<img src=x onerror=alert(2)>|x"
RENDER = MarkdownIt("commonmark").enable("table").render


def test_markdown_escapes_html_tables_math_and_code():
    text = escape("a|b <b>c</b> `d` $e$ [f](g) *h* _i_ \\")
    assert "\\<b\\>" in text and "|" not in text.replace("\\|", "")
    assert "\\`d\\`" in text and "\\$e\\$" in text and "\\[f\\]\\(g\\)" in text and "\\*h\\*" in text
    row = table([{"class": HOSTILE, "n": 1}])
    assert row.splitlines()[2] == "| \\<img src=x onerror=alert\\(2\\)\\>\\|x | 1 |"


def test_a_renderer_shows_the_text_as_it_was_once():
    """What a CommonMark renderer shows of an escaped string is the string: no entity such as
    `&#x27;` left over from a second escape, no live element, no link."""
    for text in ("the champion's {'10s': 218}", "<img src=x onerror=alert(1)>", "[l](javascript:alert(1))",
                 "a & b &amp; &#x27; # heading", "*bold* _it_ `code` $x$ ~s~ | pipe", "new\nline.jpg"):
        html = RENDER(escape(text))
        assert html.startswith("<p>") and html.count("<p>") == 1, html
        assert "<img" not in html and "<a " not in html and "<em>" not in html and "<code>" not in html, html
        shown = html[3:-5].replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
        assert shown == text.replace("\n", " "), (text, html)
    cell = RENDER(table([{"file": "a|b's <i>.jpg", "n": 1}]))
    assert "<td>a|b's &lt;i&gt;.jpg</td>" in cell
