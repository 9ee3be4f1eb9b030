"""The report document: Markdown and HTML written side by side (:class:`_Doc`)."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------ document blocks


def _fmt(v: float, digits: int = 2) -> str:
    if v is None or not math.isfinite(v):
        return "inf" if v == math.inf else "-"
    return f"{v:.{digits}f}"


def _delta(v: float) -> str:
    """A signed difference with two decimals (``+0.12``, ``-0.34``; ``0.00``, never ``-0.00``)."""
    return "0.00" if abs(v) < 0.005 else f"{v:+.2f}"


def _group_slug(dataset: str, scale: int) -> str:
    """File-name prefix of a group: the dataset kind and the last part of its path, and scale."""
    kind, _, rest = dataset.partition(":")
    tail = Path(rest.split(":")[0]).name if rest else ""
    extra = rest.split(":")[1] if rest.count(":") == 1 else ""  # e.g. a DIV2K index range
    return _slug("_".join(p for p in (kind, tail, extra) if p) + f"_x{scale}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "x"


class _Doc:
    """A tiny document model rendered to both Markdown and (self-contained) HTML."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(
        self,
        header: Sequence[str],
        rows: Sequence[Sequence[str]],
        align: Sequence[str] | None = None,
    ) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows], align)))

    def img(self, path: Path, alt: str, caption: str = "") -> None:
        self.blocks.append(("img", (path, alt, caption)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, val in self.blocks:
            if kind == "h":
                out.append("#" * val[0] + " " + val[1])
            elif kind == "p":
                out.append(val)
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in val))
            elif kind == "table":
                header, rows, align = val
                align = align or ["l"] * len(header)
                esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
                out.append(
                    "\n".join(
                        [
                            "| " + " | ".join(esc[0]) + " |",
                            "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|",
                        ]
                        + ["| " + " | ".join(r) + " |" for r in esc[1:]]
                    )
                )
            elif kind == "img":
                path, alt, caption = val
                rel = path.relative_to(self.out).as_posix()
                out.append(f"![{alt}]({rel})" + (f"\n\n*{caption}*" if caption else ""))
        return "\n\n".join(out) + "\n"

    @staticmethod
    def _inline(text: str) -> str:
        t = html.escape(text, quote=False)
        t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
        t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
        return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<i>\1</i>", t)

    def html(self, title: str) -> str:
        body: list[str] = []
        for kind, val in self.blocks:
            if kind == "h":
                body.append(f"<h{val[0]}>{self._inline(val[1])}</h{val[0]}>")
            elif kind == "p":
                body.append(f"<p>{self._inline(val)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{self._inline(i)}</li>" for i in val) + "</ul>")
            elif kind == "table":
                header, rows, align = val
                align = align or ["l"] * len(header)
                cls = ["" if a == "l" else ' class="num"' for a in align]
                head = "".join(
                    f"<th{c}>{self._inline(h)}</th>" for h, c in zip(header, cls, strict=True)
                )
                trs = "".join(
                    "<tr>"
                    + "".join(f"<td{c}>{self._inline(v)}</td>" for v, c in zip(r, cls, strict=True))
                    + "</tr>"
                    for r in rows
                )
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                path, alt, caption = val
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                cap = f"<figcaption>{self._inline(caption)}</figcaption>" if caption else ""
                body.append(
                    f'<figure><img alt="{html.escape(alt)}" '
                    f'src="data:image/png;base64,{data}">{cap}</figure>'
                )
        css = (
            "body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;"
            "padding:0 1em;color:#222;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0;font-size:0.92em}"
            "th,td{border:1px solid #ccc;padding:3px 9px}th{background:#f3f3f3}"
            "td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}"
            "figure{margin:1.2em 0}img{max-width:100%;height:auto;border:1px solid #eee}"
            "figcaption{font-size:0.9em;color:#555}code{background:#f5f5f5;padding:0 3px}"
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{css}</style></head><body>\n"
            + "\n".join(body)
            + "\n</body></html>\n"
        )
