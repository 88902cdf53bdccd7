"""``molting report DIR``: one self-contained HTML page about a run, to look at rather than read.

The page holds, for each step of the run (one for a single run, each
``N-NAME`` folder of a pipeline): what ran on what (model, data, status,
headline figures), the reward-hacking watch's alarms in a banner, the
training curves and the held-out evaluation curves (PNG images embedded as
data URIs, the alarms marked), the before/after table of the demo task,
the best model kept, the held-out answers before and after side by side
with their scores (a filter box narrows them), and the settings. Nothing is
loaded from elsewhere: the file can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Mapping

from molting.errors import DataError

REPORT_FILE = "report.html"

_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; } header p { margin: 4px 0 0; color: #c9cfdb; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 32px 48px; }
section.step { background: #fff; border-radius: 10px; box-shadow: 0 1px 3px #0002; margin: 24px 0; padding: 8px 24px 20px; }
h2 { font-size: 19px; margin: 16px 0 8px; } h3 { font-size: 16px; margin: 20px 0 8px; color: #3a4356; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border-bottom: 1px solid #e3e6ec; padding: 5px 12px 5px 0; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.facts td:first-child { color: #5b6478; padding-right: 24px; }
.alarm { background: #fff1f0; border-left: 4px solid #d93025; padding: 10px 14px; margin: 12px 0; border-radius: 4px; }
.quiet { background: #eef8f0; border-left: 4px solid #1e8e3e; padding: 10px 14px; margin: 12px 0; border-radius: 4px; }
img { max-width: 100%; border: 1px solid #e3e6ec; border-radius: 6px; }
.samples td { width: 45%; white-space: pre-wrap; } .samples td.prompt { width: 10%; color: #5b6478; }
.score { color: #5b6478; font-size: 12px; } .better { background: #eef8f0; } .worse { background: #fff1f0; }
input[type=search] { padding: 6px 10px; width: 320px; border: 1px solid #c9cfdb; border-radius: 6px; }
details summary { cursor: pointer; color: #3a4356; margin: 12px 0; }
code { background: #f0f2f5; padding: 1px 4px; border-radius: 3px; }
"""

_SCRIPT = """
document.querySelectorAll("input[data-filter]").forEach(function (box) {
  box.addEventListener("input", function () {
    var table = document.getElementById(box.dataset.filter), needle = box.value.toLowerCase();
    table.querySelectorAll("tbody tr").forEach(function (row) {
      row.hidden = needle !== "" && row.textContent.toLowerCase().indexOf(needle) < 0;
    });
  });
});
"""


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's step folders: the directory itself for a single run, each ``N-NAME`` of a pipeline, in order."""
    if (run_dir / "molting_run.json").exists():
        return [run_dir]
    steps = sorted((d for d in run_dir.iterdir() if d.is_dir() and (d / "molting_run.json").exists()),
                   key=lambda d: (int(d.name.split("-", 1)[0]) if d.name.split("-", 1)[0].isdigit() else 0, d.name))
    if not steps:
        raise DataError(f"{run_dir} holds no molting_run.json, nor pipeline steps with one: not a molting run directory")
    return steps


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of ``run_dir`` (default: ``RUN_DIR/report.html``), atomically; returns its path."""
    from molting.files import write_text_atomic

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / REPORT_FILE
    write_text_atomic(out, render(run_dir))
    return out


def render(run_dir: Path) -> str:
    steps = step_dirs(run_dir)
    records = [json.loads((step / "molting_run.json").read_text()) for step in steps]
    sections = "\n".join(_step_section(step, record, index) for index, (step, record) in enumerate(zip(steps, records)))
    subtitle = " → ".join(r["plugin"] for r in records) + f" · molting {records[-1].get('molting_version', '')}"
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>molting report: {_e(run_dir.name)}</title><style>{_STYLE}</style></head>\n<body>"
            f"<header><h1>{_e(run_dir.name)}</h1><p>{_e(subtitle)}</p></header>\n<main>{sections}</main>"
            f"<script>{_SCRIPT}</script></body></html>\n")


def _step_section(step: Path, record: Mapping[str, Any], index: int) -> str:
    from molting.plots import read_metrics, run_figures

    logged = read_metrics(step) if (step / "metrics.jsonl").exists() else []
    figures = run_figures(step, logged, record) if (step / "metrics.jsonl").exists() else {}
    parts = [f"<h2>{_e(step.name)}: {_e(record['plugin'])}</h2>", _facts(record), _watch(record)]
    if "watch" in figures:
        parts.append(_image(figures["watch"], "training reward against the held-out judges"))
    if "training" in figures:
        parts.append(f"<h3>Training</h3>{_image(figures['training'], 'training curves')}")
    if "eval_curves" in figures:
        parts.append(f"<h3>Held-out evaluation during training</h3>{_held_out(record)}"
                     f"{_image(figures['eval_curves'], 'held-out evaluation curves')}")
    if "env" in figures:
        parts.append(f"<h3>Episodes</h3>{_image(figures['env'], 'episode curves')}")
    if record.get("eval"):
        chart = _image(figures["eval"], "before and after") if "eval" in figures else ""
        parts.append(f"<h3>Before and after (the demo task's held-out split)</h3>{_before_after(record['eval'])}{chart}")
    episodes = record.get("eval_episodes")
    if episodes:
        chart = _image(figures["eval_episodes"], "held-out episodes") if "eval_episodes" in figures else ""
        parts.append(f"<h3>Before and after: {episodes['rows']} held-out episodes of {_e(episodes['environment'])} "
                     f"({_e(episodes['source'])}, greedy)</h3>{_before_after(episodes)}{chart}")
    parts.append(_samples(step, index))
    parts.append(_settings(record))
    if not logged:
        parts.append("<p>No metrics were logged.</p>")
    return f"<section class=\"step\">{''.join(parts)}</section>"


def _facts(record: Mapping[str, Any]) -> str:
    from molting.card import HEADLINE_METRICS

    metrics = record.get("metrics") or {}
    rows = [("stage", record["stage"] + (f", loss {record['loss']}" if record.get("loss") else "")),
            ("model", record["model"]), ("data", record["data"]), ("status", record["status"]),
            ("started", record.get("started", "")), *((k, _number(metrics[k])) for k in HEADLINE_METRICS if k in metrics)]
    if record.get("error"):
        rows.append(("error", record["error"]))
    return "<table class=\"facts\">" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _watch(record: Mapping[str, Any]) -> str:
    watch = record.get("watch")
    if not watch:
        return ""
    if not watch["fired"]:
        return (f"<div class=\"quiet\">Reward-hacking watch: silent over {len(watch['evaluations'])} held-out "
                "evaluations.</div>")
    first = {}
    for alarm in watch["alarms"]:
        first.setdefault(alarm["kind"], alarm)
    items = "".join(f"<li>step {a['step']}: {_e(a['message'])}</li>" for a in first.values())
    stopped = f"<p>The run stopped at step {watch['stopped_at']} (--stop-on-hacking).</p>" \
        if watch.get("stopped_at") is not None else ""
    return (f"<div class=\"alarm\"><strong>Possible reward hacking</strong> ({len(watch['alarms'])} alarms over "
            f"{len(watch['evaluations'])} evaluations)<ul>{items}</ul>{stopped}</div>")


def _held_out(record: Mapping[str, Any]) -> str:
    held, best = record.get("eval_data"), record.get("best")
    text = f"<p>On {_e(held['source'])} ({held['rows']} rows).</p>" if held else ""
    if best:
        text += (f"<p>Best {_e(best['metric'])}: {_number(best['value'])} at step {best['step']}, kept in "
                 f"<code>{_e(best['path'])}</code>.</p>")
    return text


def _before_after(evaluation: Mapping[str, Mapping[str, float]]) -> str:
    before, after = evaluation["before"], evaluation["after"]
    rows = "".join(f"<tr><td>{_e(name)}</td><td class=\"num\">{_number(before.get(name))}</td>"
                   f"<td class=\"num\">{_number(after[name])}</td></tr>" for name in after)
    return f"<table><thead><tr><th>metric</th><th>before</th><th>after</th></tr></thead><tbody>{rows}</tbody></table>"


def _samples(step: Path, index: int) -> str:
    from molting.evaluation import SAMPLES_FILE

    path = step / SAMPLES_FILE
    if not path.exists():
        return ""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    body = "".join(_sample_row(row) for row in rows)
    table = f"samples-{index}"
    return (f"<h3>Held-out answers, before and after ({len(rows)})</h3>"
            f"<p><input type=\"search\" placeholder=\"filter the answers\" data-filter=\"{table}\"></p>"
            f"<table class=\"samples\" id=\"{table}\"><thead><tr><th>prompt</th><th>before</th><th>after</th></tr>"
            f"</thead><tbody>{body}</tbody></table>")


def _sample_row(row: Mapping[str, Any]) -> str:
    before, after = row.get("before_score"), row.get("after_score")
    shade = "" if before is None or after is None or before == after else " better" if after > before else " worse"
    return (f"<tr><td class=\"prompt\">{_e(_text(row['prompt']))}</td><td>{_e(row['before'])}{_score(before)}</td>"
            f"<td class=\"{shade.strip()}\">{_e(row['after'])}{_score(after)}</td></tr>")


def _settings(record: Mapping[str, Any]) -> str:
    config = {**{k: v for k, v in record["config"].items() if k != "loss_params" and v not in (None, {}, [])},
              **record.get("loss_params", {}), **record.get("stage_params", {})}
    rows = "".join(f"<tr><td>{_e(k)}</td><td><code>{_e(v)}</code></td></tr>" for k, v in config.items())
    return f"<details><summary>Settings ({len(config)})</summary><table class=\"facts\">{rows}</table></details>"


def _image(figure: Any, alt: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<p><img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{data}\"></p>"


def _score(value: Any) -> str:
    return "" if value is None else f"<div class=\"score\">score {_number(value)}</div>"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value or "-")


def _text(value: Any) -> str:
    from molting.judging import text_of

    return text_of(value)


def _e(value: Any) -> str:
    return html.escape(str(value))
