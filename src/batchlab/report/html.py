"""A small builder for self-contained HTML reports: one file, no external assets.

Every batchlab report (sweep, plan, ...) is a `HtmlPage`: a title, then blocks added in
order. Figures are embedded as base64 PNG, so the file can be mailed or attached to an
issue and still show everything.

    page = HtmlPage("batchlab plan: mnist1d-cnn", subtitle="CPU, 2 cores")
    page.cards([Card("batch size", "256", "fastest"), Card("lr", "0.02", "sqrt rule")])
    page.section("Throughput", note="Measured on one GPU.")       # h2 (+ a muted line)
    page.subsection("Forward + backward")                            # h3
    page.figure(fig, caption="Examples per second vs batch size")   # a matplotlib Figure
    page.figures([(fig_a, "left"), (fig_b, "right")])                # side by side
    page.table(["B", "s/step"], [[64, "0.012"], [128, "0.020"]], caption="Measured")
    page.warnings(["BatchNorm with per-device batch < 8"])
    page.reproduce("batchlab plan mnist1d-cnn --out report/")
    page.write("report/report.html")

All text is HTML-escaped; `page.html(raw)` is the one way to add unescaped markup.
Reporting never measures anything: build pages from result objects.
"""

from __future__ import annotations

import base64
import datetime
import html as _html
import importlib.metadata
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CSS = """
:root { --fg:#1d2430; --muted:#5b6576; --line:#e2e6ee; --bg:#f6f7fb; --card:#fff;
  --accent:#2f6fde; --warn-bg:#fff7e6; --warn-line:#f0b43c; --code-bg:#0f1724; --code-fg:#e6edf7; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1180px; margin:0 auto; padding:28px 28px 60px; }
header h1 { margin:0 0 4px; font-size:26px; letter-spacing:-0.01em; }
header .subtitle { color:var(--muted); margin:0 0 22px; }
h2 { font-size:19px; margin:34px 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:15px; margin:22px 0 8px; }
p.note { color:var(--muted); margin:6px 0 12px; }
.cards { display:grid; grid-template-columns:repeat(auto-fill, minmax(200px, 1fr)); gap:12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.05em; }
.card .value { font-size:24px; font-weight:600; margin:2px 0; font-variant-numeric:tabular-nums; }
.card .detail { color:var(--muted); font-size:13px; }
.card.accent { border-top:3px solid var(--accent); }
figure { margin:0; background:var(--card); border:1px solid var(--line); border-radius:10px; padding:10px; }
figure img { width:100%; height:auto; display:block; }
figcaption { color:var(--muted); font-size:13px; padding:6px 4px 0; }
.grid, figure { margin-bottom:14px; }
.grid figure { margin-bottom:0; }
.grid { display:grid; grid-template-columns:repeat(auto-fit, minmax(460px, 1fr)); gap:14px; }
.table-wrap { overflow-x:auto; background:var(--card); border:1px solid var(--line); border-radius:10px; }
table { border-collapse:collapse; width:100%; font-size:14px; font-variant-numeric:tabular-nums; }
th, td { padding:7px 12px; text-align:right; border-bottom:1px solid var(--line); white-space:nowrap; }
th:first-child, td:first-child { text-align:left; }
th { background:#fafbfd; font-weight:600; color:var(--muted); font-size:13px; }
tr:last-child td { border-bottom:none; }
tr.highlight td { background:#eef4ff; }
.table-caption { color:var(--muted); font-size:13px; margin:6px 2px 16px; }
.warnings { background:var(--warn-bg); border:1px solid var(--warn-line); border-radius:10px;
  padding:10px 16px 10px 34px; margin:0; }
.warnings li { margin:4px 0; }
.ok { color:#1a7f37; }
pre.cmd { background:var(--code-bg); color:var(--code-fg); border-radius:10px; padding:14px 16px;
  white-space:pre-wrap; overflow-wrap:anywhere; font:13px/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
footer { color:var(--muted); font-size:12px; margin-top:40px; }
"""


@dataclass(frozen=True)
class Card:
    """A summary card: a small label, a big value, an optional line of detail."""

    label: str
    value: str
    detail: str = ""
    accent: bool = False


def figure_png(fig: Any, *, dpi: int = 110) -> bytes:
    """A matplotlib Figure as PNG bytes. A pyplot-managed figure is closed afterwards."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    if getattr(fig.canvas, "manager", None) is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return buffer.getvalue()


def _img_tag(image: Any, alt: str) -> str:
    png = image if isinstance(image, bytes) else figure_png(image)
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_html.escape(alt)}" src="data:image/png;base64,{data}">'


def esc(value: Any) -> str:
    return _html.escape("" if value is None else str(value))


class HtmlPage:
    """An HTML report, built block by block. Methods return `self`, so calls can chain."""

    def __init__(self, title: str, *, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self._blocks: list[str] = []

    def section(self, heading: str, note: str = "") -> HtmlPage:
        """A heading, with an optional muted paragraph under it."""
        self._blocks.append(f"<h2>{esc(heading)}</h2>")
        if note:
            self.paragraph(note)
        return self

    def subsection(self, heading: str) -> HtmlPage:
        """A smaller heading inside a section."""
        self._blocks.append(f"<h3>{esc(heading)}</h3>")
        return self

    def paragraph(self, text: str) -> HtmlPage:
        self._blocks.append(f'<p class="note">{esc(text)}</p>')
        return self

    def cards(self, cards: Iterable[Card]) -> HtmlPage:
        items = []
        for c in cards:
            cls = "card accent" if c.accent else "card"
            detail = f'<div class="detail">{esc(c.detail)}</div>' if c.detail else ""
            items.append(
                f'<div class="{cls}"><div class="label">{esc(c.label)}</div>'
                f'<div class="value">{esc(c.value)}</div>{detail}</div>'
            )
        self._blocks.append(f'<div class="cards">{"".join(items)}</div>')
        return self

    def figure(self, image: Any, caption: str = "") -> HtmlPage:
        """One figure across the page: a matplotlib Figure or PNG bytes."""
        self._blocks.append(self._figure_html(image, caption))
        return self

    def figures(self, items: Sequence[tuple[Any, str]]) -> HtmlPage:
        """Figures in a responsive grid (two per row on a laptop screen)."""
        inner = "".join(self._figure_html(image, caption) for image, caption in items)
        self._blocks.append(f'<div class="grid">{inner}</div>')
        return self

    @staticmethod
    def _figure_html(image: Any, caption: str) -> str:
        cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
        return f"<figure>{_img_tag(image, caption)}{cap}</figure>"

    def table(
        self,
        headers: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        caption: str = "",
        highlight: Iterable[int] = (),
    ) -> HtmlPage:
        """A table; cells are escaped text. `highlight` lists row indices to tint."""
        marked = set(highlight)
        head = "".join(f"<th>{esc(h)}</th>" for h in headers)
        body = []
        for i, row in enumerate(rows):
            cls = ' class="highlight"' if i in marked else ""
            body.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        cap = f'<div class="table-caption">{esc(caption)}</div>' if caption else ""
        self._blocks.append(
            f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>{cap}"
        )
        return self

    def warnings(self, items: Sequence[str], *, none_text: str = "No warnings.") -> HtmlPage:
        """A highlighted list of warnings (or one line saying there are none)."""
        if not items:
            self._blocks.append(f'<p class="note ok">{esc(none_text)}</p>')
            return self
        lis = "".join(f"<li>{esc(w)}</li>" for w in items)
        self._blocks.append(f'<ul class="warnings">{lis}</ul>')
        return self

    def reproduce(self, command: str | Sequence[str]) -> HtmlPage:
        """The exact command(s) that rebuild what the page shows."""
        text = command if isinstance(command, str) else "\n".join(command)
        self._blocks.append(f'<pre class="cmd">{esc(text)}</pre>')
        return self

    def html(self, raw: str) -> HtmlPage:
        """Unescaped markup, for the rare block the builder does not cover."""
        self._blocks.append(raw)
        return self

    def render(self) -> str:
        __version__ = importlib.metadata.version("batchlab")
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        sub = f'<p class="subtitle">{esc(self.subtitle)}</p>' if self.subtitle else ""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body><main>"
            f"<header><h1>{esc(self.title)}</h1>{sub}</header>"
            + "\n".join(self._blocks)
            + f"<footer>Made by batchlab {esc(__version__)} on {stamp}.</footer>"
            "</main></body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path
