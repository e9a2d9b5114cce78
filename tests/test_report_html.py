"""The generic HTML page builder: self-contained, escaped, every block type."""

import base64
import re

from batchlab.report.html import Card, HtmlPage, figure_png
from batchlab.report.sweep_plots import new_axes


def test_a_page_is_self_contained_and_escapes_text(tmp_path):
    ax = new_axes()
    ax.plot([1, 2, 3], [3, 1, 2])
    page = HtmlPage("a <b> title", subtitle="x & y")
    page.cards([Card("batch", "256", "fastest", accent=True), Card("lr", "0.02")])
    page.section("Plots", note="<script>alert(1)</script>")
    page.subsection("one")
    page.figures([(ax.figure, "a figure"), (figure_png(new_axes().figure), "bytes")])
    page.table(["B", "s"], [[64, "0.1"], [128, "<0.2>"]], caption="t", highlight=[1])
    page.warnings([])
    page.warnings(["careful & slow"])
    page.reproduce(["batchlab sweep dots --out 'a b'", "batchlab report a"])
    path = page.write(tmp_path / "r" / "report.html")
    html = path.read_text()

    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "a &lt;b&gt; title" in html and "x &amp; y" in html and "&lt;0.2&gt;" in html
    assert 'class="card accent"' in html and "<h3>one</h3>" in html
    assert '<tr class="highlight"><td>128</td>' in html
    assert "No warnings." in html and "<li>careful &amp; slow</li>" in html
    assert "batchlab sweep dots --out &#x27;a b&#x27;\nbatchlab report a" in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 2
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)
    assert "http://" not in html and "https://" not in html  # nothing to fetch
