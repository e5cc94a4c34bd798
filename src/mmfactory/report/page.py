"""Build the report's HTML (see :mod:`mmfactory.report`)."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from mmfactory.atomic import write_atomic
from mmfactory.config import ConfigError
from mmfactory.examples import read_examples
from mmfactory.report.figures import curves_png, read_metrics_log, stage_curves
from mmfactory.reproduce.claims import MARKS

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222;
  padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2rem; margin-top: 2.5rem; }
h3 { margin-bottom: .4rem; } nav a { margin-right: .8rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; vertical-align: top; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict-yes { background: #d8f5d0; } .verdict-no, .verdict-failed { background: #fbd5d5; }
.verdict-partly { background: #fff1c2; }
.verdict-not-built, .verdict-not-run, .verdict-not-judged { background: #e8e8e8; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5rem .8rem; }
.cards { display: flex; flex-wrap: wrap; gap: .6rem; }
.card { border: 2px solid #ccc; border-radius: 6px; padding: .4rem; width: 260px; font-size: 12px; }
.card.right { border-color: #3a9a3a; } .card.wrong { border-color: #c83232; }
.card img, img.thumb { width: 72px; height: 72px; image-rendering: pixelated; margin-right: 3px; }
.card .title { font-weight: 600; color: #555; } .card dt { font-weight: 600; } .card dd { margin: 0 0 .3rem; }
mark { background: #ffb3b3; } img.figure { max-width: 100%; image-rendering: pixelated; }
"""


def _e(text) -> str:
    return html.escape(str(text))


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _marked(text: str, marks: list[str]) -> str:
    """``text`` escaped, each occurrence of a string in ``marks`` wrapped in ``<mark>``."""
    marks = [m for m in marks if m]
    if not marks:
        return _e(text)
    pattern = re.compile("|".join(re.escape(m) for m in sorted(marks, key=len, reverse=True)))
    out, last = [], 0
    for match in pattern.finditer(text):
        out += [_e(text[last : match.start()]), f"<mark>{_e(match.group())}</mark>"]
        last = match.end()
    return "".join(out) + _e(text[last:])


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return _e(value)


def _claims_section(folder: Path) -> str:
    path = folder / "claims.json"
    if not path.is_file():
        return (
            '<section id="claims"><h2>Claims</h2><p>This folder is a single recipe run; '
            "<code>mmfactory reproduce</code> writes the claims table of every method.</p></section>"
        )
    rows = json.loads(path.read_text(encoding="utf-8"))
    summary_path = folder / "reproduce.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    parts = ['<section id="claims"><h2>Claims</h2>']
    if summary.get("profile") == "quick":
        parts.append(f'<p class="note">{_e(summary["note"])}.</p>')
    seeds = summary.get("seeds", [])
    spread = f"mean ± sd over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else ""
    parts.append(
        f"<table><tr><th>method</th><th>paper's claim</th><th>measured ({_e(spread)})</th>"
        "<th>reproduced?</th></tr>"
    )
    for r in rows:
        checks = "".join(
            f"<li>{MARKS[c['state']]} {_e(c['label'])}: {_e(c['detail'])}</li>" for c in r["checks"]
        )
        measured = f"<ul>{checks}</ul>" if checks else _e(r["reason"])
        verdict = r["verdict"].replace(" ", "-")
        parts.append(
            f"<tr><td><b>{_e(r['method'])}</b><br><small>{_e(r['recipe'] or '')}</small></td>"
            f"<td>{_e(r['paper'])}</td><td>{measured}</td>"
            f'<td class="verdict-{verdict}"><b>{_e(r["verdict"])}</b></td></tr>'
        )
    parts.append("</table>")
    if summary.get("runs"):
        parts.append(
            "<table><tr><th>run</th><th>state</th><th>training time</th><th>wall time, last call</th></tr>"
        )
        for name, run in summary["runs"].items():
            parts.append(
                f"<tr><td>{_e(name)}</td><td>{_e(run['state'])}</td>"
                f"<td class='num'>{run['stage_seconds']:.0f} s</td>"
                f"<td class='num'>{run['seconds']:.0f} s</td></tr>"
            )
        total = summary.get("total_seconds", 0) / 60
        parts.append(f"</table><p>The last <code>mmfactory reproduce</code> call took {total:.1f} min.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table of already-escaped cells; numeric-looking cells align right."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='num'>{c}</td>" if re.fullmatch(r"-?[\d.e+-]+( s)?", c) else f"<td>{c}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _comparison(results: dict) -> str:
    """The recipe's ``compare`` metrics per stage, then every stage's steps, time and evaluation metrics
    (folded, one table per stage)."""
    stages, parts = results["stages"], []
    compare = results.get("compare") or []
    if compare:
        rows = [
            [_e(s), *(_number(v["metrics"].get(k, "-")) for k in compare)]
            for s, v in stages.items()
            if any(m in v["metrics"] for m in compare)
        ]
        parts.append(_table(["stage", *map(_e, compare)], rows))
    for stage, summary in stages.items():
        shown = {k: v for k, v in summary["metrics"].items() if not k.startswith("train_")}
        steps, time_s = summary.get("steps", 0), summary.get("time_s", 0)
        table = _table(["metric", "value"], [[_e(k), _number(v)] for k, v in shown.items()])
        parts.append(
            f"<details><summary>{_e(stage)}: {steps} steps, {time_s:.0f} s, {len(shown)} metrics</summary>"
            f"{table}</details>"
        )
    return "\n".join(parts)


def _markdown_tables(run_dir: Path) -> str:
    """The Markdown tables a run wrote at its top (e.g. SAG's ``notebench.md``) as HTML tables."""
    parts = []
    for path in sorted(run_dir.glob("*.md")):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
        if len(lines) < 2:
            continue
        cells = [[_e(c.strip()) for c in line.strip("|").split("|")] for line in lines]
        parts.append(f"<h4>{_e(path.name)}</h4>" + _table(cells[0], cells[2:]))
    return "\n".join(parts)


def _card(record: dict) -> str:
    state = {True: " right", False: " wrong", None: ""}[record.get("correct")]
    images = "".join(
        f'<img src="{_png_uri(Path(p).read_bytes())}" alt="{_e(record["title"])}">' for p in record["images"]
    )
    marks = record.get("marks", {})
    fields = "".join(
        f"<dt>{_e(k)}</dt><dd>{_marked(str(v), marks.get(k, []))}</dd>" for k, v in record["fields"].items()
    )
    title = f'<div class="title">{_e(record["title"])}</div>'
    return f'<div class="card{state}">{title}{images}<dl>{fields}</dl></div>'


def _run_section(run_dir: Path, anchor: str, heading: str) -> str:
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    parts = [f'<section class="run" id="{anchor}"><h2>{_e(heading)}</h2>']
    curves = {}
    for stage in results["stages"]:
        log = run_dir / stage / "metrics.jsonl"
        if log.is_file():
            curves[stage] = stage_curves(read_metrics_log(log))
    png = curves_png(curves)
    parts.append(f'<h3 id="{anchor}-curves">Curves</h3>')
    parts.append(
        f'<img class="figure" alt="loss curves of {_e(heading)}" src="{_png_uri(png)}">'
        if png
        else "<p>No stage logged a training loss.</p>"
    )
    parts.append(
        f'<h3 id="{anchor}-comparison">Comparison</h3>{_comparison(results)}{_markdown_tables(run_dir)}'
    )
    parts.append(f'<h3 id="{anchor}-examples">Examples</h3>')
    shown = 0
    for stage in results["stages"]:
        stage_dir = run_dir / stage
        for group, records in read_examples(stage_dir).items():
            parts.append(f"<h4>{_e(stage)}: {_e(group)}</h4><div class='cards'>")
            parts += [_card(r) for r in records]
            parts.append("</div>")
            shown += 1
        for figure in sorted(stage_dir.glob("*.png")):
            parts.append(
                f"<h4>{_e(stage)}: {_e(figure.stem)}</h4>"
                f'<img class="figure" alt="{_e(figure.stem)}" src="{_png_uri(figure.read_bytes())}">'
            )
            shown += 1
    if not shown:
        parts.append("<p>The stages of this run wrote no examples.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _environment_section(environments: dict[str, dict]) -> str:
    parts = ['<section id="environment"><h2>Environment</h2>']
    if not environments:
        parts.append("<p>The runs recorded no environment (written by an older mmfactory).</p>")
    for name, env in environments.items():
        rows = {k: v for k, v in env.items() if k != "packages"}
        rows.update({f"package {k}": v for k, v in env.get("packages", {}).items()})
        cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows.items())
        parts.append(f"<h3>{_e(name)}</h3><table>{cells}</table>")
    parts.append("</section>")
    return "\n".join(parts)


def _runs(folder: Path) -> list[tuple[Path, str]]:
    """(run folder, heading): the folder itself, or the first seed of each recipe of a reproduce folder."""
    if (folder / "results.json").is_file():
        return [(folder, json.loads((folder / "results.json").read_text())["recipe"])]
    runs = []
    for recipe_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        seeds = sorted(recipe_dir.glob("seed-*/results.json"), key=lambda p: int(p.parent.name.split("-")[1]))
        if seeds:
            name = json.loads(seeds[0].read_text())["recipe"]
            runs.append((seeds[0].parent, f"{name} ({seeds[0].parent.name})"))
    return runs


def build_report(folder: Path) -> str:
    """The report of ``folder`` (a run folder with ``results.json`` or a ``reproduce`` folder) as HTML."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such run folder")
    runs = _runs(folder)
    if not runs and not (folder / "claims.json").is_file():
        raise ConfigError(
            f"{folder}: neither a run folder (results.json) nor a reproduce folder (claims.json)"
        )
    anchors = [f"run-{i}" for i in range(len(runs))]
    nav = "".join(f'<a href="#{a}">{_e(h)}</a>' for a, (_, h) in zip(anchors, runs, strict=True))
    environments = {}
    summary = folder / "reproduce.json"
    if summary.is_file():
        environments["reproduce"] = json.loads(summary.read_text()).get("environment", {})
    sections = [_claims_section(folder)]
    for anchor, (run_dir, heading) in zip(anchors, runs, strict=True):
        sections.append(_run_section(run_dir, anchor, heading))
        env = json.loads((run_dir / "results.json").read_text()).get("environment")
        if env:
            environments[heading] = env
    sections.append(_environment_section(environments))
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>mmfactory report: {_e(folder.name)}</title><style>{STYLE}</style></head><body>"
        f"<h1>mmfactory report: {_e(folder.name)}</h1>"
        f'<nav><a href="#claims">claims</a>{nav}<a href="#environment">environment</a></nav>'
        + "\n".join(sections)
        + "</body></html>\n"
    )


def write_report(folder: Path, out: Path | None = None) -> Path:
    """Write :func:`build_report` to ``out`` (default ``folder/report.html``) atomically; returns the path."""
    out = Path(out) if out is not None else Path(folder) / "report.html"
    write_atomic(out, build_report(folder))
    return out
