"""Tables as Markdown, for the run's report artifact and the console."""

from __future__ import annotations

from typing import Dict, Iterable


def markdown_table(rows: Iterable[Dict]) -> str:
    rows = list(rows)
    if not rows:
        return ""
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row[h]) for h in headers) + " |")
    return "\n".join(lines) + "\n"


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
