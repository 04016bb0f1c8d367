"""Leaderboards from evaluation records (``eval_results.jsonl``, see docs/leaderboard.md): Markdown, CSV and a
static HTML page. A row is one run with one sampler setting; a cell, a benchmark's score at its latest step."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections import Counter
from html import escape
from pathlib import Path

FILENAME = "eval_results.jsonl"
REQUIRED = ("run", "model", "checkpoint", "step", "recipe", "benchmark", "score", "n", "sampler",
            "sampler_args", "few_shot", "time_s", "dare_version", "created")
FORMATS = {"md": "leaderboard.md", "csv": "leaderboard.csv", "html": "leaderboard.html"}
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22")


def _check(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing required key(s): {', '.join(missing)}")
    score, step = rec["score"], rec["step"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not -1e-9 <= score <= 1 + 1e-9:
        raise ValueError(f"{where}: 'score' must be a number in [0, 1], got {score!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise ValueError(f"{where}: 'step' must be an integer or null, got {step!r}")
    if not isinstance(rec["sampler_args"], dict):
        raise ValueError(f"{where}: 'sampler_args' must be an object, got {rec['sampler_args']!r}")


def collect(paths: list[Path]) -> list[dict]:
    """Records of every eval_results.jsonl under each path (or the file itself), each with ``_source`` (its file).
    A malformed line or an invalid record raises ValueError naming the file and line."""
    records, seen = [], set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        for file in [path] if path.is_file() else sorted(path.rglob(FILENAME)):
            if file.resolve() in seen:  # overlapping arguments (runs/ and runs/x) read a file once
                continue
            seen.add(file.resolve())
            with open(file, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{file}:{lineno}: malformed JSON line ({exc.msg})") from None
                    _check(rec, f"{file}:{lineno}")
                    records.append({**rec, "_source": str(file)})
    return records


def _when(rec) -> tuple:  # order of evaluation: standalone (step null) first, then by step, then by time
    return (rec["step"] is not None, rec["step"] or 0, str(rec["created"]))


def _sampler_text(rec) -> str:
    args = rec["sampler_args"]
    fmt = lambda v: v if isinstance(v, str) else json.dumps(v, sort_keys=True)  # noqa: E731
    return rec["sampler"] + (f"({', '.join(f'{k}={fmt(args[k])}' for k in sorted(args))})" if args else "")


def _group(records) -> tuple[dict, dict]:
    """Records by row key -> records, and row key -> (run label, sampler text). The key: the run (its name, the
    directory of its file, and for a standalone evaluation the model path), the sampler and its arguments."""
    groups: dict[tuple, list] = {}
    for rec in records:
        folder = os.path.dirname(os.path.abspath(rec.get("_source", FILENAME)))
        key = (rec["run"], folder, rec["model"] if rec["step"] is None else None, rec["sampler"],
               json.dumps(rec["sampler_args"], sort_keys=True, default=str))
        groups.setdefault(key, []).append(rec)
    runs: dict[str, set] = {}
    for run, folder, model, *_ in groups:
        runs.setdefault(run, set()).add((folder, model))
    labels = {}
    for key, recs in groups.items():
        run, folder, model = key[:3]
        if len(runs[run]) > 1:  # different runs with one name: tell them apart by directory, then model
            folders = sorted({f for f, _ in runs[run]})
            common = os.path.commonpath(folders)
            rel = os.path.relpath(folder, common) if folder != common else os.path.basename(folder)
            tags = [rel] if len(folders) > 1 else []
            tags += [model or "checkpoints"] if sum(f == folder for f, _ in runs[run]) > 1 else []
            run = f"{run} [{', '.join(tags)}]"
        labels[key] = (run, _sampler_text(recs[0]))
    return groups, labels


def leaderboard(records) -> tuple[list[str], list[dict]]:
    """Columns ``run, sampler, step, <benchmark>..., mean``; rows ``{"run", "sampler", "step", "scores": {benchmark:
    {"score", "n", "step"} | None}, "mean"}``, one per (run, sampler settings), sorted by mean, best first."""
    benches = sorted({r["benchmark"] for r in records})
    groups, labels = _group(records)
    rows = []
    for key, recs in groups.items():
        run, sampler = labels[key]
        scores = {}
        for bench in benches:
            mine = [r for r in recs if r["benchmark"] == bench]
            last = max(mine, key=_when) if mine else None
            scores[bench] = {"score": last["score"], "n": last["n"], "step": last["step"]} if last else None
        have = [c["score"] for c in scores.values() if c]
        rows.append({"run": run, "sampler": sampler, "step": max(recs, key=_when)["step"], "scores": scores,
                     "mean": sum(have) / len(have)})
    rows.sort(key=lambda r: (-r["mean"], r["run"], r["sampler"]))
    return ["run", "sampler", "step", *benches, "mean"], rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _text(row: dict, col: int, columns: list[str]) -> str:
    """Display text of a row's cell in column number ``col``."""
    if col < 2:
        return row[columns[col]]
    if col == 2:
        return "-" if row["step"] is None else str(row["step"])
    if col == len(columns) - 1:
        have = sum(c is not None for c in row["scores"].values())
        return _pct(row["mean"]) + ("" if have == len(row["scores"]) else f" ({have}/{len(row['scores'])})")
    if (cell := row["scores"][columns[col]]) is None:
        return "-"
    step = "" if cell["step"] == row["step"] else \
        f", {'standalone' if cell['step'] is None else 'step ' + str(cell['step'])}"
    return f"{_pct(cell['score'])} (n={cell['n']}{step})"


def to_markdown(columns: list[str], rows: list[dict]) -> str:
    md = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(md, columns)) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(md(_text(row, i, columns)) for i in range(len(columns))) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict]) -> str:
    """CSV: run, sampler, step, then per benchmark its score (%), n and step, then mean (%)."""
    benches = columns[3:-1]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns[:3] + [f"{b}{s}" for b in benches for s in ("", " n", " step")] + ["mean"])
    blank = lambda v: "" if v is None else v  # noqa: E731
    for row in rows:
        line = [row["run"], row["sampler"], blank(row["step"])]
        for bench in benches:
            cell = row["scores"][bench]
            line += [_pct(cell["score"]), cell["n"], blank(cell["step"])] if cell else ["", "", ""]
        writer.writerow(line + [_pct(row["mean"])])
    return out.getvalue()


def _ticks(lo: float, hi: float, whole: bool = False) -> list[float]:
    raw = (hi - lo) / 5 or 1
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    step = max(1, round(step)) if whole else step
    start, k = math.floor(lo / step + 1e-9), 0
    while (start + k) * step < hi - 1e-9:
        k += 1
    return [round((start + i) * step, 9) for i in range(k + 1)]


def _chart(bench: str, series: list) -> str:
    """Inline SVG: score (%) against training step; series = [(label, colour, dash, [(x, y, tip, hollow)])]."""
    W, H, L, T = 440, 250, 56, 14  # plot part; left and top margins
    pw, ph = W - L - 18, H - T - 46
    pts = [p for *_, ps in series for p in ps]
    xt = _ticks(0, max(1, max(p[0] for p in pts)), whole=True)
    lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
    lo, hi = (lo - 1, hi + 1) if hi - lo < 2 else (lo, hi)
    yt = _ticks(max(0.0, lo - (hi - lo) * 0.1), min(100.0, hi + (hi - lo) * 0.1))
    X = lambda x: L + pw * (x - xt[0]) / (xt[-1] - xt[0])  # noqa: E731
    Y = lambda y: T + ph * (yt[-1] - y) / (yt[-1] - yt[0])  # noqa: E731
    height = H + 20 * len(series) - 4
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" '
           f'role="img" aria-label="{escape(bench)}: score against training step">']
    for t in yt:
        out.append(f'<line class="grid" x1="{L}" x2="{L + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}"/>'
                   f'<text x="{L - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in xt:
        out.append(f'<line class="axis" x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{T + ph}" y2="{T + ph + 5}"/>'
                   f'<text x="{X(t):.1f}" y="{T + ph + 18}" text-anchor="middle">{int(t)}</text>')
    out.append(f'<polyline class="axis" points="{L},{T} {L},{T + ph} {L + pw},{T + ph}"/>'
               f'<text x="{L + pw / 2}" y="{T + ph + 36}" text-anchor="middle">training step</text>'
               f'<text transform="translate(14 {T + ph / 2}) rotate(-90)" text-anchor="middle">score (%)</text>')
    for i, (label, color, dash, points) in enumerate(series):
        style = f' stroke-dasharray="{dash}"' if dash else ""
        if len(points) > 1:
            xy = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y, *_ in points)
            out.append(f'<polyline points="{xy}" fill="none" stroke="{color}" stroke-width="2"{style}/>')
        for x, y, tip, hollow in points:
            out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="4" fill="{"#fff" if hollow else color}" '
                       f'stroke="{color}" stroke-width="2"><title>{escape(tip)}</title></circle>')
        ly, short = H + 20 * i + 6, label if len(label) <= 52 else label[:51] + "\u2026"
        fill = "#fff" if all(p[3] for p in points) else color  # hollow: only standalone evaluations
        out.append(f'<g><title>{escape(label)}</title><line x1="{L}" x2="{L + 24}" y1="{ly}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="2"{style}/><circle cx="{L + 12}" cy="{ly}" r="4" fill="{fill}" '
                   f'stroke="{color}" stroke-width="2"/><text x="{L + 32}" y="{ly + 4}">{escape(short)}</text></g>')
    return "\n".join(out + ["</svg>"])


CSS = """body{font:14px/1.45 system-ui,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px 32px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 8px}.note{color:#666;margin:4px 0}
.scroll{overflow-x:auto}table{border-collapse:collapse}th,td{padding:5px 12px;text-align:right;white-space:nowrap}
th{border-bottom:2px solid #999;background:#f5f5f5}td{border-bottom:1px solid #e2e2e2}td.best{font-weight:700}
th:nth-child(-n+2),td:nth-child(-n+2){text-align:left}tbody tr:nth-child(even){background:#fafafa}
td:first-child{white-space:normal;min-width:10em;max-width:30em;overflow-wrap:anywhere}
.charts{display:flex;flex-wrap:wrap;gap:18px}figcaption{font-weight:600}svg text{font-size:12px;fill:#333}
figure{margin:0;border:1px solid #ddd;border-radius:4px;padding:8px 10px}
svg .grid{stroke:#e6e6e6}svg .axis{stroke:#555;fill:none}"""


def to_html(records, columns: list[str], rows: list[dict], title: str) -> str:
    """A self-contained page: the leaderboard table and one SVG chart of score against step per benchmark."""
    benches = columns[3:-1]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    best = {b: max((r["scores"][b]["score"] for r in rows if r["scores"][b]), default=None) for b in benches}

    def td(row: dict, i: int) -> str:
        cell = row["scores"].get(columns[i]) if 2 < i < len(columns) - 1 else None
        top = cell is not None and cell["score"] == best[columns[i]] and len(rows) > 1
        return f'<td{" class=best" if top else ""}>{escape(_text(row, i, columns))}</td>'
    body = ["<tr>" + "".join(td(row, i) for i in range(len(columns))) + "</tr>" for row in rows]
    groups, labels = _group(records)
    order = {(r["run"], r["sampler"]): i for i, r in enumerate(rows)}
    keys = sorted(groups, key=lambda k: order.get(labels[k], len(order)))
    per_run = Counter(labels[k][0] for k in keys)
    charts = []
    for bench in benches:
        series = []
        for i, key in enumerate(keys):
            latest = {r["step"]: r for r in sorted(groups[key], key=_when) if r["benchmark"] == bench}
            if not latest:
                continue
            run, sampler = labels[key]
            name = f"{run} \u00b7 {sampler}" if per_run[run] > 1 else run
            points = sorted(((s or 0, 100 * r["score"], f"{name}\n{'standalone model' if s is None else f'step {s}'}"
                              f": {_pct(r['score'])}% (n={r['n']})", s is None) for s, r in latest.items()),
                            key=lambda p: (p[0], not p[3]))
            series.append((name, COLORS[i % len(COLORS)], None if i < len(COLORS) else "6 3", points))
        charts.append(f"<figure><figcaption>{escape(bench)}</figcaption>{_chart(bench, series)}</figure>")
    files = len({r.get("_source") for r in records})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head><body>
<h1>{escape(title)}</h1>
<p class="note">{len(records)} evaluations from {files} file(s): {len(rows)} row(s), {len(benches)} benchmark(s).
Scores in %, at the latest step each benchmark was evaluated (n: number of examples); best in bold.
Mean over the row's benchmarks; \u201c(k/m)\u201d: only k of the m benchmarks were evaluated.</p>
<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table></div>
<h2>Score against training step</h2>
<p class="note">One chart per benchmark. Evaluations without a training step (standalone models) are drawn
as hollow markers at step 0. Hover a marker for its value.</p>
<div class="charts">
{chr(10).join(charts)}
</div></body></html>
"""


def _write(records, out_dir: Path, title: str, formats=tuple(FORMATS)) -> dict[str, Path]:
    columns, rows = leaderboard(records)
    render = {"md": lambda: to_markdown(columns, rows), "csv": lambda: to_csv(columns, rows),
              "html": lambda: to_html(records, columns, rows, title)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = {fmt: Path(out_dir) / FORMATS[fmt] for fmt in formats}
    for fmt, path in written.items():
        path.write_text(render[fmt](), encoding="utf-8")
    return written


def _collect_some(paths) -> list[dict]:
    if not (records := collect(paths)):
        raise ValueError(f"no evaluation results ({FILENAME}) under: {', '.join(map(str, paths))}")
    return records


def write(paths: list[Path], out_dir: Path, title: str = "dare leaderboard") -> dict[str, Path]:
    """Write leaderboard.md, leaderboard.csv and leaderboard.html to out_dir; returns {"md"|"csv"|"html": path}."""
    return _write(_collect_some(paths), out_dir, title)


def cmd_leaderboard(args) -> int:
    records = _collect_some(args.runs)
    print(to_markdown(*leaderboard(records)), end="")
    formats = tuple(FORMATS) if args.format == "all" else (args.format,)
    for path in _write(records, args.out, args.title, formats).values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


def add_command(subparsers):
    """Add ``dare leaderboard RUNS_DIR... [--out DIR] [--title T] [--format md|csv|html|all]``."""
    p = subparsers.add_parser("leaderboard", help="leaderboard of evaluation results (Markdown, CSV, HTML)",
                              description="Collect every eval_results.jsonl under the given run directories, "
                                          "print a Markdown leaderboard and write it as files.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUNS_DIR",
                   help="run directories (searched recursively) or eval_results.jsonl files")
    p.add_argument("--out", type=Path, default=Path("leaderboard"), help="output folder (default: ./leaderboard)")
    p.add_argument("--title", default="dare leaderboard", help="page title of the HTML file")
    p.add_argument("--format", choices=("md", "csv", "html", "all"), default="all",
                   help="which file(s) to write (default: all); the Markdown table is always printed")
    p.set_defaults(func=cmd_leaderboard)
    return p
