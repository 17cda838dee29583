"""Views out: rich tables on a terminal, Markdown, CSV and JSON for machines, and the report folder."""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from harness.core.errors import ConfigError
from harness.report.views import SPREAD, View

FORMATS = ("table", "md", "csv", "json")
REPORT_FILES = ("report.md", "runs.csv")


def cell(value: Any) -> str:
    """Four significant digits; a missing value is an em dash, never 0 or nan."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:,.0f}" if 1e4 <= abs(value) < 1e15 else f"{value:.4g}"  # 14,650 tokens/s, not 1.465e+04
    return str(value)


def spread_text(value: float) -> str:
    """A spread to two significant digits, never in exponent form (1,200 not 1.2e+03)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2g}"


def displayed(table: pd.DataFrame) -> tuple[pd.DataFrame, set[str]]:
    """The table as printed: each `X ±` column folded into X as `median ± spread` (two significant digits for
    the spread); also the names of the columns that hold numbers, to right-align them."""
    numeric = {str(c) for c in table.columns if pd.api.types.is_numeric_dtype(table[c])}
    out = table.map(cell)
    for name in [c for c in table.columns if str(c).endswith(SPREAD) and str(c)[:-len(SPREAD)] in table.columns]:
        base = str(name)[:-len(SPREAD)]
        out[base] = [v if s is None or pd.isna(s) or v == "—" else f"{v} ± {spread_text(s)}"
                     for v, s in zip(out[base], table[name])]
        out = out.drop(columns=[name])
    return out, numeric


def _notes(view: View) -> list[str]:
    return [f"({i}) {note}" for i, note in enumerate(view.notes, 1)]


def markdown(view: View) -> str:
    table = displayed(view.table)[0] if not view.table.empty else None
    body = table.to_markdown(index=False) if table is not None else "_no rows_"
    notes = "\n".join(f"{n}  " for n in _notes(view))
    return f"## {view.title}\n\n{body}\n\n{notes}\n".rstrip() + "\n"


def rich_table(view: View) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=view.title, title_justify="left", show_lines=False)
    shown, numeric = displayed(view.table)
    for name in shown.columns:
        table.add_column(str(name), justify="right" if str(name) in numeric else "left", overflow="fold")
    for row in shown.itertuples(index=False):
        table.add_row(*row)
    buffer = io.StringIO()
    width = shutil.get_terminal_size((200, 40)).columns if sys.stdout.isatty() else 200
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    console.print(table)
    for note in _notes(view):
        console.print(note, highlight=False, markup=False)
    return buffer.getvalue()


def render(views: list[View], fmt: str, header: list[str]) -> str:
    if fmt == "json":
        tables = {v.name: json.loads(v.table.to_json(orient="records", double_precision=15)) for v in views}
        return json.dumps(tables, indent=1)
    if fmt == "csv":
        parts = [(f"# {v.name}\n" if len(views) > 1 else "") + v.table.to_csv(index=False) for v in views]
        return "\n".join(parts)
    heading = "\n".join(header) + "\n\n" if header else ""
    if fmt == "md":
        return heading + "\n".join(markdown(v) for v in views)
    return heading + "\n".join(rich_table(v) for v in views)


def check_out_dir(out: Path) -> None:
    """A report folder is new, empty, or an earlier report (whose files are replaced); nothing else is touched."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"report: --out={out} is a file; give a directory for report.md, runs.csv and the plots")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.md").exists():
        raise ConfigError(f"report: --out={out} holds other files; give a new or empty directory")


def write_report(out: Path, frame: pd.DataFrame, views: list[View], header: list[str],
                 plots: dict[str, Optional[Path]]) -> Path:
    """report.md (tables with the plots embedded), runs.csv (every run, every flattened field)."""
    out.mkdir(parents=True, exist_ok=True)
    frame.drop(columns=[c for c in ("breakdown.ranks",) if c in frame.columns]).to_csv(out / "runs.csv", index=False)
    sections = []
    for view in views:
        image = plots.get(view.name)
        sections.append(markdown(view) + (f"\n![{view.title}]({image.name})\n" if image else ""))
    title = ["# harness report", "", *header, "", f"{len(frame)} run(s); every field of every run: "
             "[runs.csv](runs.csv)", ""]
    (out / "report.md").write_text("\n".join(title) + "\n" + "\n".join(sections))
    return out / "report.md"
