"""Rendering the report: one list of blocks (headings, text, tables, rows of figures) written
as markdown (``report.md``, figures as PNG) and as interactive HTML (``report.html``)."""

import html
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from mechicl.experiments.outputs import markdown_table

__all__ = ["Document"]


class Document:
    """The report's content, in order; rendered by :meth:`markdown` and :meth:`html`."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []
        self.figures: dict[str, go.Figure] = {}
        self.tables: dict[str, pd.DataFrame] = {}

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def table(self, name: str, table: pd.DataFrame, caption: str = "") -> None:
        self.tables[name] = table
        self.blocks.append(("table", (name, caption)))

    def figures_row(self, items: Sequence[tuple[str, go.Figure]], caption: str = "") -> None:
        for name, fig in items:
            if name in self.figures:
                raise ValueError(f"two figures named {name!r}")
            self.figures[name] = fig
        self.blocks.append(("figures", ([n for n, _ in items], caption)))

    def markdown(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "heading":
                out.append("#" * value[0] + " " + value[1] + "\n")
            elif kind == "text":
                out.append(value + "\n")
            elif kind == "table":
                name, caption = value
                out.append((f"*{caption}* (`tables/{name}.csv`)\n\n" if caption else "")
                           + markdown_table(self.tables[name]))
            else:
                names, caption = value
                imgs = " ".join(f'<img src="img/{n}.png" width="{_md_width(self.figures[n])}" '
                                f'alt="{n}">' for n in names)
                out.append(imgs + ("\n\n*" + caption + "*" if caption else "") + "\n")
        return "\n".join(out)

    def html(self, title: str) -> str:
        body = []
        toc = []
        for i, (kind, value) in enumerate(self.blocks):
            if kind == "heading":
                level, text = value
                anchor = f"s{i}"
                if level == 2:
                    toc.append(f'<li><a href="#{anchor}">{html.escape(text)}</a></li>')
                body.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')
            elif kind == "text":
                body.append(_paragraphs(value))
            elif kind == "table":
                name, caption = value
                cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
                table = self.tables[name].to_html(index=False, float_format=lambda v: f"{v:.3f}",
                                                  na_rep="", border=0)
                body.append(table.replace("<table", "<table class=\"data\"", 1)
                            .replace("<thead>", cap + "<thead>", 1))
            else:
                names, caption = value
                divs = "".join(
                    '<div class="fig">' + self.figures[n].to_html(
                        full_html=False, include_plotlyjs=False, div_id=f"fig-{n}",
                        config={"displaylogo": False}) + "</div>" for n in names)
                cap = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""
                body.append(f'<div class="row">{divs}</div>{cap}')
        return _HTML.format(title=html.escape(title), toc="".join(toc), body="\n".join(body))


def _md_width(fig: go.Figure) -> int:
    return int(min(fig.layout.width or 640, 640) * 0.75)


def _paragraphs(text: str) -> str:
    """Plain text with ``code`` and blank-line paragraphs as HTML (everything else escaped)."""
    out = []
    for para in text.strip().split("\n\n"):
        escaped = html.escape(para)
        parts = escaped.split("`")
        for i in range(1, len(parts), 2):
            parts[i] = f"<code>{parts[i]}</code>"
        lines = "`".join(parts) if len(parts) % 2 == 0 else "".join(parts)
        if lines.lstrip().startswith("- "):
            items = [li.strip()[2:] for li in lines.split("\n") if li.strip()]
            out.append("<ul>" + "".join(f"<li>{li}</li>" for li in items) + "</ul>")
        else:
            out.append(f"<p>{lines}</p>")
    return "\n".join(out)


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<script src="plotly.min.js"></script>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }}
.row {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.fig {{ flex: 0 0 auto; }}
.caption {{ color: #555; font-style: italic; }}
table.data {{ border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }}
table.data th, table.data td {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
table.data caption {{ caption-side: top; text-align: left; font-style: italic; color: #555; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
nav ul {{ columns: 2; }}
</style></head>
<body>
<h1>{title}</h1>
<nav><ul>{toc}</ul></nav>
{body}
</body></html>
"""
