"""dare.leaderboard: collecting eval_results.jsonl, the Markdown/CSV/HTML outputs, and the page in a real browser."""
import csv
import io
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from dare import leaderboard as lb
from dare.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
SAMPLER = {"sampler": "low_confidence", "sampler_args": {"steps": 64, "gen_length": 128}}


def record(run, step, benchmark, score, n, created="2025-01-01T00:00:00Z", **extra):
    return {"run": run, "model": f"runs/{run}/checkpoints/step-{step}" if step is not None else "hf/base-model",
            "checkpoint": None if step is None else f"step-{step}", "step": step, "recipe": "recipes/x.yaml",
            "benchmark": benchmark, "score": score, "n": n, "few_shot": None, "time_s": 12.5,
            "dare_version": "0.1.0", "created": created, **SAMPLER, **extra}


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def runs(tmp_path):
    """Three runs, two benchmarks: two training runs (several steps) and a standalone `dare eval --output`."""
    write_jsonl(tmp_path / "runs" / "sft-a" / "eval_results.jsonl", [
        record("sft-a", 100, "gsm8k", 0.40, 200), record("sft-a", 100, "math", 0.20, 100),
        record("sft-a", 200, "gsm8k", 0.30, 200),  # re-evaluated below: the later record wins
        record("sft-a", 200, "math", 0.25, 100),
        record("sft-a", 200, "gsm8k", 0.46, 200, created="2025-01-02T00:00:00Z")])
    write_jsonl(tmp_path / "runs" / "grpo-b" / "eval_results.jsonl", [
        record("grpo-b", s, "gsm8k", g, 200) for s, g in ((50, 0.5), (100, 0.6), (150, 0.62))] + [
        record("grpo-b", s, "math", m, 100) for s, m in ((50, 0.3), (100, 0.33))])  # math not at step 150
    write_jsonl(tmp_path / "evals" / "base" / "eval_results.jsonl", [
        record("base", None, "gsm8k", 0.35, 200), record("base", None, "math", 0.15, 100)])
    return tmp_path


EXPECTED_MD = """\
| run | sampler | step | gsm8k | math | mean |
|---|---|---:|---:|---:|---:|
| grpo-b | low_confidence(gen_length=128, steps=64) | 150 | 62.0 (n=200) | 33.0 (n=100, step 100) | 47.5 |
| sft-a | low_confidence(gen_length=128, steps=64) | 200 | 46.0 (n=200) | 25.0 (n=100) | 35.5 |
| base | low_confidence(gen_length=128, steps=64) | - | 35.0 (n=200) | 15.0 (n=100) | 25.0 |
"""


def test_collect_reads_every_file_under_each_path(runs):
    records = lb.collect([runs / "runs", runs / "evals" / "base" / "eval_results.jsonl"])
    assert len(records) == 12
    assert {r["run"] for r in records} == {"sft-a", "grpo-b", "base"}
    assert {Path(r["_source"]).parent.name for r in records} == {"sft-a", "grpo-b", "base"}
    assert len(lb.collect([runs, runs / "runs"])) == 12  # overlapping paths: each file read once
    with pytest.raises(FileNotFoundError, match="nope"):
        lb.collect([runs / "nope"])


def test_markdown_table(runs):
    assert lb.to_markdown(*lb.leaderboard(lb.collect([runs]))) == EXPECTED_MD


def test_csv_round_trip(runs):
    columns, rows = lb.leaderboard(lb.collect([runs]))
    parsed = list(csv.DictReader(io.StringIO(lb.to_csv(columns, rows))))
    assert list(parsed[0]) == ["run", "sampler", "step", "gsm8k", "gsm8k n", "gsm8k step",
                               "math", "math n", "math step", "mean"]
    assert [p["run"] for p in parsed] == [r["run"] for r in rows]
    for p, row in zip(parsed, rows):
        assert p["sampler"] == row["sampler"] and p["step"] == ("" if row["step"] is None else str(row["step"]))
        assert float(p["mean"]) == pytest.approx(100 * row["mean"], abs=0.05)
        for bench, cell in row["scores"].items():
            assert float(p[bench]) == pytest.approx(100 * cell["score"], abs=0.05)
            assert int(p[f"{bench} n"]) == cell["n"]
            assert p[f"{bench} step"] == ("" if cell["step"] is None else str(cell["step"]))
    assert parsed[0]["math step"] == "100" and parsed[2]["step"] == ""


def test_malformed_line_names_file_and_line(tmp_path):
    bad = tmp_path / "r" / "eval_results.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps(record("a", 1, "gsm8k", 0.5, 10)) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=rf"{bad}:3: malformed JSON"):
        lb.collect([tmp_path])
    rec = record("a", 1, "gsm8k", 0.5, 10)
    del rec["score"], rec["benchmark"]
    write_jsonl(bad, [record("a", 1, "gsm8k", 0.5, 10), rec])
    with pytest.raises(ValueError, match=rf"{bad}:2: missing required key\(s\): benchmark, score"):
        lb.collect([bad])
    write_jsonl(bad, [record("a", 1, "gsm8k", 1.5, 10)])
    with pytest.raises(ValueError, match=rf"{bad}:1: 'score' must be a number in \[0, 1\]"):
        lb.collect([bad])


def test_sampler_settings_and_clashing_run_names_get_their_own_rows(tmp_path):
    greedy = {"sampler": "greedy", "sampler_args": {}}
    write_jsonl(tmp_path / "a" / "exp" / "eval_results.jsonl", [
        record("exp", 10, "gsm8k", 0.5, 10), record("exp", 10, "gsm8k", 0.7, 10, **greedy)])
    write_jsonl(tmp_path / "b" / "exp" / "eval_results.jsonl", [record("exp", 10, "gsm8k", 0.6, 10)])
    columns, rows = lb.leaderboard(lb.collect([tmp_path]))
    assert columns == ["run", "sampler", "step", "gsm8k", "mean"]
    assert [(r["run"], r["sampler"], r["mean"]) for r in rows] == [
        ("exp [a/exp]", "greedy", 0.7), ("exp [b/exp]", "low_confidence(gen_length=128, steps=64)", 0.6),
        ("exp [a/exp]", "low_confidence(gen_length=128, steps=64)", 0.5)]


def test_standalone_models_sharing_a_name_in_one_file_get_their_own_rows(tmp_path):
    # `dare opencompass --model runs/x/checkpoints/step-100` then `--model runs/y/...`: one file, run "step-100"
    write_jsonl(tmp_path / "oc" / "eval_results.jsonl", [
        record("step-100", None, "gsm8k", 0.4, 10, model="runs/x/checkpoints/step-100"),
        record("step-100", None, "gsm8k", 0.2, 10, model="runs/y/checkpoints/step-100")])
    _, rows = lb.leaderboard(lb.collect([tmp_path]))
    assert [(r["run"], r["mean"]) for r in rows] == [("step-100 [runs/x/checkpoints/step-100]", 0.4),
                                                     ("step-100 [runs/y/checkpoints/step-100]", 0.2)]


def test_html_has_a_chart_per_benchmark_and_escapes_names(runs):
    write_jsonl(runs / "runs" / "evil" / "eval_results.jsonl", [
        record("<script>", 10, "gsm8k", 0.1, 5), record("<script>", 20, "a&b<i>", 0.2, 5)])
    records = lb.collect([runs])
    columns, rows = lb.leaderboard(records)
    page = lb.to_html(records, columns, rows, "t <b>")
    assert page.count("<svg") == 3 == len(columns) - 4  # gsm8k, math, a&b<i>
    assert "<script" not in page and "&lt;script&gt;" in page and "a&amp;b&lt;i&gt;" in page
    assert "<title>t &lt;b&gt;</title>" in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count("<polyline points=") == 2 + 2  # sft-a and grpo-b on both; standalone/one-step: markers only


def test_write_and_command(runs, tmp_path, capsys):
    out = lb.write([runs], tmp_path / "out", title="T")
    assert {k: p.name for k, p in out.items()} == {"md": "leaderboard.md", "csv": "leaderboard.csv",
                                                   "html": "leaderboard.html"}
    assert out["md"].read_text() == EXPECTED_MD
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if "leaderboard" not in sub.choices:  # until dare/cli.py wires it in
        lb.add_command(sub)
    args = parser.parse_args(["leaderboard", str(runs / "runs"), str(runs / "evals"),
                              "--out", str(tmp_path / "o2"), "--format", "csv"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == EXPECTED_MD
    assert [p.name for p in (tmp_path / "o2").iterdir()] == ["leaderboard.csv"]
    with pytest.raises(ValueError, match="no evaluation results"):
        lb.write([tmp_path / "o2"], tmp_path / "o3")


# --- the page in a real headless browser --------------------------------------------------------------------

WIDTH, HEIGHT = 1280, 1000


def png_pixels(data: bytes):
    """Decode a plain 8-bit RGB/RGBA, non-interlaced PNG -> (width, height, rows of pixel bytes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        ihdr = struct.unpack(">IIBBBBB", chunk) if kind == b"IHDR" else ihdr
        idat += chunk if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = ihdr
    assert depth == 8 and colour in (2, 6) and interlace == 0, ihdr
    bpp, raw = (3 if colour == 2 else 4), zlib.decompress(idat)
    stride = width * bpp
    assert len(raw) == height * (stride + 1)
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind:
            for i in range(stride):
                a, b = line[i - bpp] if i >= bpp else 0, prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                if kind == 1:
                    pred = a
                elif kind == 3:
                    pred = (a + b) >> 1
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def test_page_renders_in_headless_chromium(runs, tmp_path):
    chromium = os.environ.get("DARE_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        pytest.skip("chromium not found (apt-get install -y chromium, or set DARE_CHROMIUM)")
    write_jsonl(runs / "runs" / "evil" / "eval_results.jsonl", [record("<script>", 10, "gsm8k", 0.1, 5)])
    artifacts = Path(os.environ.get("DARE_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    html = lb.write([runs], artifacts, title="dare leaderboard (test)")["html"]
    png = artifacts / "leaderboard.png"
    png.unlink(missing_ok=True)
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--window-size={WIDTH},{HEIGHT}"]

    def browse(*flags, profile):
        return subprocess.run(base + [f"--user-data-dir={tmp_path / profile}", *flags, html.resolve().as_uri()],
                              capture_output=True, text=True, timeout=180)

    dom = browse("--dump-dom", profile="dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<tr>") == 1 + 4 and dom.stdout.count("<svg") == 2  # header + 4 rows; 2 benchmarks
    assert "<td>&lt;script&gt;</td>" in dom.stdout and "<td>grpo-b</td>" in dom.stdout

    shot = browse(f"--screenshot={png}", profile="shot")
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    width, height, bpp, rows = png_pixels(png.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    pixels = {row[i:i + 3] for row in rows for i in range(0, len(row), bpp)}
    assert len(pixels) > 50, f"screenshot looks blank: {len(pixels)} colours"
    drawn = {bytes.fromhex(c[1:]) for c in lb.COLORS[:4]}  # the series colours of the 4 rows
    assert drawn <= pixels, "the chart lines/markers are not in the screenshot"
