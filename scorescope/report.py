"""A study report written twice from one list of blocks: ``report.md`` and a self-contained ``report.html``.

A :class:`Report` is a title and a list of blocks (headings, paragraphs, bullet lists, tables, figures). The
Markdown links each figure by its path relative to the report's folder; the HTML embeds every figure as a base64
PNG, so the one file can be mailed or attached without the folder. Both are written atomically
(:func:`interp.io.atomic_write`). Inline markup in text is the Markdown subset ``**bold**`` and ```code```; the
HTML escapes everything else.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp.io import atomic_write

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")

_STYLE = """body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.45;color:#222}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.9em}th,td{border:1px solid #bbb;padding:0.2em 0.6em;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:0.9em;color:#444}code{background:#f3f3f3;padding:0 0.2em}"""


def _inline_html(text: str) -> str:
    """``text`` escaped for HTML, with ``**bold**`` and ```code``` turned into tags."""
    out = html.escape(text, quote=False)
    out = _CODE.sub(r"<code>\1</code>", out)
    return _BOLD.sub(r"<strong>\1</strong>", out)


def _cell(value: Any, floatfmt: str) -> str:
    if isinstance(value, float):
        return "–" if value != value else format(value, floatfmt)  # NaN: nothing measured
    return str(value)


@dataclass
class Report:
    """A report under construction; ``blocks`` are ``(kind, payload)`` pairs in order."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        """A section heading (``level`` 2 or 3; the title is level 1)."""
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        """A paragraph."""
        self.blocks.append(("text", text))

    def bullets(self, items: Sequence[str]) -> None:
        """A bullet list."""
        self.blocks.append(("bullets", list(items)))

    def table(self, frame: Any, *, floatfmt: str = ".2f") -> None:
        """A table from a ``pandas.DataFrame`` (columns as the header, index dropped; NaN shown as "–")."""
        header = [str(c) for c in frame.columns]
        rows = [[_cell(v, floatfmt) for v in rec] for rec in frame.itertuples(index=False)]
        self.blocks.append(("table", (header, rows)))

    def figure(self, path: str | Path, caption: str) -> None:
        """A PNG figure (``path`` absolute or relative to the report's folder) with its caption."""
        self.blocks.append(("figure", (Path(path), caption)))

    def figures(self) -> list[Path]:
        """Every figure the report names, in order."""
        return [p for kind, payload in self.blocks if kind == "figure" for p in [payload[0]]]

    # ------------------------------------------------------------------------------------------ rendering
    def markdown(self, folder: str | Path) -> str:
        """The report as Markdown; figures linked relative to ``folder`` (where ``report.md`` is written)."""
        folder = Path(folder)
        lines = [f"# {self.title}", ""]
        for kind, payload in self.blocks:
            if kind == "heading":
                level, text = payload
                lines += ["#" * level + " " + text, ""]
            elif kind == "text":
                lines += [payload, ""]
            elif kind == "bullets":
                lines += [f"- {item}" for item in payload] + [""]
            elif kind == "table":
                header, rows = payload
                lines.append("| " + " | ".join(header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(r) + " |" for r in rows]
                lines.append("")
            elif kind == "figure":
                path, caption = payload
                lines += [f"![{caption}]({_relative(path, folder)})", "", f"*{caption}*", ""]
        return "\n".join(lines)

    def html(self, folder: str | Path) -> str:
        """The report as one HTML page with every figure embedded (``data:image/png;base64``)."""
        folder = Path(folder)
        body = [f"<h1>{_inline_html(self.title)}</h1>"]
        for kind, payload in self.blocks:
            if kind == "heading":
                level, text = payload
                body.append(f"<h{level}>{_inline_html(text)}</h{level}>")
            elif kind == "text":
                body.append(f"<p>{_inline_html(payload)}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in payload) + "</ul>")
            elif kind == "table":
                header, rows = payload
                head = "".join(f"<th>{_inline_html(h)}</th>" for h in header)
                cells = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "figure":
                path, caption = payload
                full = path if path.is_absolute() else folder / path
                data = base64.b64encode(full.read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{_inline_html(caption)}</figcaption></figure>")
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")

    def write(self, folder: str | Path, stem: str = "report") -> tuple[Path, Path]:
        """Write ``<stem>.md`` and ``<stem>.html`` into ``folder`` (atomically); returns both paths.

        Raises ``FileNotFoundError`` naming a figure the report names but that is not on disk (before writing).
        """
        folder = Path(folder)
        missing = [p for p in self.figures() if not (p if p.is_absolute() else folder / p).is_file()]
        if missing:
            raise FileNotFoundError(f"the report names figures that do not exist: {', '.join(map(str, missing))}")
        md = atomic_write(folder / f"{stem}.md", self.markdown(folder))
        page = atomic_write(folder / f"{stem}.html", self.html(folder))
        return md, page


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix() if path.is_absolute() else path.as_posix()
    except ValueError:  # a figure outside the folder: link it absolutely
        return path.as_posix()


__all__ = ["Report"]
