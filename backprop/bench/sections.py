"""A benchmark run made of sections, each written out the moment it ends.

:class:`SectionWriter` runs named sections one after another. A section is a function returning a
JSON-ready dict; it raises :class:`SkipSection` with the reason when it cannot run here (no GPU, no
CUDA-graph capture, ...). Whatever happens, as soon as the section ends its own files are written,
``OUT/<stem>.json`` and ``OUT/<stem>.md`` (each with the machine, the command and the date), and the
run's summary ``OUT/<summary>.json`` / ``.md`` is rewritten with every section so far. A section that
raises records its error and traceback, and the next one runs: a failure, or the run being killed by a
time limit, loses nothing already measured.

What a section may return (every key optional), rendered in its Markdown:

* ``description``: what is timed, and how;
* ``tables``: ``[{"title": ..., "header": [...], "rows": [[...], ...]}]`` (cells are strings);
* ``targets``: ``[{"what": ..., "target": ..., "measured": float | None, "met": bool | None}]``;
* ``notes``: further lines;
* anything else (raw timings, settings) goes to the JSON only.

JSON layout (``schema: backprop-bench-section/1``): ``command``, ``machine``, ``section`` (``name``,
``title``, ``status``: ``ok`` / ``skipped`` / ``error``, ``reason`` or ``error`` and ``traceback``,
``started``, ``duration_s``, ``load_average`` and ``cpu_pressure`` at its start and end, and the keys
above). Times are seconds unless a key says otherwise.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .machine import cpu_pressure, load_average
from .report import _table, machine_lines, write_json

__all__ = ["SECTION_SCHEMA", "SUMMARY_SCHEMA", "SectionWriter", "SkipSection", "section_markdown"]

SECTION_SCHEMA = "backprop-bench-section/1"
SUMMARY_SCHEMA = "backprop-bench-sections/1"


class SkipSection(Exception):
    """Raised by a section that cannot run here; its message is the reason, recorded as such."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _target_line(t: dict[str, Any]) -> str:
    measured = t.get("measured")
    value = "not measured" if measured is None else f"measured {measured:.3g}"
    met = t.get("met")
    verdict = "" if met is None else ("; **met**" if met else "; **not met**")
    return f"- target: {t['what']}: {t['target']}; {value}{verdict}"


def section_markdown(section: dict[str, Any], level: int = 2) -> list[str]:
    """The Markdown of one section (heading at ``level``)."""
    h = "#" * level
    lines = [f"{h} {section['title']}", ""]
    status = section["status"]
    if status == "skipped":
        lines += [f"Skipped: {section.get('reason')}", ""]
    elif status == "error":
        lines += [f"**Failed**: {section.get('error')}", ""]
        if section.get("traceback"):
            lines += ["<details><summary>traceback</summary>", "", "```", section["traceback"].rstrip(), "```", "",
                      "</details>", ""]
    if section.get("description"):
        lines += [section["description"], ""]
    for table in section.get("tables", []):
        if table.get("title"):
            lines += [f"{table['title']}:", ""]
        lines += _table(table["header"], table["rows"], markdown=True)
        lines.append("")
    if section.get("targets"):
        lines += [_target_line(t) for t in section["targets"]] + [""]
    if section.get("notes"):
        lines += [f"- {n}" for n in section["notes"]] + [""]
    la = section.get("load_average", {})
    lines += [f"_{status}, {section.get('duration_s', 0.0):.1f} s, started {section.get('started')}; "
              f"load average (1, 5, 15 min) at start {la.get('start')}, at end {la.get('end')}_", ""]
    return lines


class SectionWriter:
    """Runs sections and writes each one's JSON and Markdown as soon as it ends (see the module doc).

    ``out``: the output folder (made if missing); ``title``: the heading of the summary; ``command``: the
    command line, as run; ``machine``: :func:`~backprop.bench.machine.machine_info`; ``summary``: the stem
    of the summary files; ``preamble``: lines under the summary's heading; ``deadline``: a
    ``time.perf_counter()`` value after which no further section starts (each is recorded as skipped).
    """

    def __init__(self, out: str | Path, *, title: str, command: str, machine: dict[str, Any],
                 summary: str = "summary", preamble: list[str] | None = None, deadline: float | None = None) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.command = command
        self.machine = machine
        self.summary = summary
        self.preamble = list(preamble or [])
        self.deadline = deadline
        self.sections: list[dict[str, Any]] = []
        self.written: list[Path] = []

    @property
    def failed(self) -> list[str]:
        return [s["name"] for s in self.sections if s["status"] == "error"]

    def run(self, name: str, title: str, fn: Callable[[], dict[str, Any]], *, stem: str | None = None,
            echo: Callable[[str], None] | None = print) -> dict[str, Any]:
        """Run ``fn`` as the section ``name``; write its files and the summary; return the section."""
        section: dict[str, Any] = {"name": name, "title": title, "stem": stem or name, "started": _now()}
        load0, psi0 = load_average(), cpu_pressure()
        t0 = time.perf_counter()
        if echo:
            echo(f"== {name}: running ({title})")
        if self.deadline is not None and t0 > self.deadline:
            section.update(status="skipped", reason="the run's time limit (--time-limit) was reached before it")
        else:
            try:
                body = fn() or {}
                section.update(status="ok", **body)
            except SkipSection as exc:
                section.update(status="skipped", reason=str(exc))
            except Exception as exc:  # noqa: BLE001 - one section failing must not lose the others
                section.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        section["duration_s"] = time.perf_counter() - t0
        section["load_average"] = {"start": load0, "end": load_average()}
        section["cpu_pressure"] = {"start": psi0, "end": cpu_pressure()}
        self.sections.append(section)
        self.write(section)
        if echo:
            echo("\n".join(section_markdown(section, level=3)))
        return section

    # ---------------------------------------------------------------- files
    def _header(self, title: str, load: dict[str, Any], pressure: dict[str, Any]) -> list[str]:
        m = self.machine
        return [f"# {title}", "",
                f"{_now()} · backprop {m.get('backprop')}" + (f" ({m['git_commit']})" if m.get("git_commit") else ""),
                "", *machine_lines(m, load, pressure), f"- command: `{self.command}`", ""]

    def write(self, section: dict[str, Any]) -> None:
        """Write ``section``'s own files, then the summary of every section so far."""
        stem = section["stem"]
        doc = {"schema": SECTION_SCHEMA, "command": self.command, "written": _now(), "machine": self.machine,
               "section": section}
        json_path, md_path = self.out / f"{stem}.json", self.out / f"{stem}.md"
        write_json(json_path, doc)
        md = self._header(section["title"], section["load_average"], section["cpu_pressure"])
        md += section_markdown(section, level=2)
        md_path.write_text("\n".join(md))
        self.written += [json_path, md_path]
        self.write_summary()

    def write_summary(self) -> None:
        doc = {"schema": SUMMARY_SCHEMA, "command": self.command, "written": _now(), "machine": self.machine,
               "sections": self.sections}
        write_json(self.out / f"{self.summary}.json", doc)
        rows, previous = [], None
        for s in self.sections:
            heads = "; ".join(
                f"{t['what']}: {'-' if t.get('measured') is None else format(t['measured'], '.3g')} "
                f"(target {t['target']}{'' if t.get('met') is None else ', met' if t['met'] else ', NOT met'})"
                for t in s.get("targets", []))
            why = s.get("reason") or s.get("error") or ""
            shown = heads or ("(as above)" if why and why == previous else why)
            previous = why
            rows.append([s["name"], s["status"], shown, f"{s.get('duration_s', 0.0):.1f} s",
                         f"[{s['stem']}.md]({s['stem']}.md)"])
        first, last = self.sections[0], self.sections[-1]
        load = {"start": first["load_average"]["start"], "end": last["load_average"]["end"]}
        pressure = {"start": first["cpu_pressure"]["start"], "end": last["cpu_pressure"]["end"]}
        md = self._header(self.title, load, pressure) + self.preamble + ([""] if self.preamble else [])
        md += _table(["section", "status", "targets (or why not run)", "time", "file"], rows, markdown=True) + [""]
        for s in self.sections:
            md += section_markdown(s, level=2)
        (self.out / f"{self.summary}.md").write_text("\n".join(md))
