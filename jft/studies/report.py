"""Tables and plots from run folders: a run's curves, a sweep's results table and its figures.

Everything here reads only what runs wrote (`metrics.jsonl`, `results.json`,
`point.json`), so `jft report DIR` rebuilds the same files at any time, also
while a sweep is still running.
"""

from __future__ import annotations

import csv
import os
import re

from jft.core import files
from jft.run.plot import plot_run, read_metrics, read_results
from jft.core.errors import JftError

# A sweep folder (written by `jft.studies.sweep`): sweep.json, and points/NNN-name/point.json beside each point's run.
SWEEP_FILE, POINT_FILE = "sweep.json", "point.json"
# What jft reads back from them (`files.read_json` names the file and a missing or mistyped field).
SWEEP_FIELDS = {"config": str, "overrides": list, "search": str, "metric": str, "direction": str, "keys": list,
                "log_keys": list}
POINT_FIELDS = {"index": int, "name": str, "values": dict, "status": str, "config": str, "overrides": list}


def read_point(folder: str) -> dict | None:
  path = os.path.join(folder, POINT_FILE)
  return files.read_json(path, "sweep point", POINT_FIELDS) if os.path.isfile(path) else None


def load_points(sweep_dir: str) -> list[tuple[str, dict]]:
  """[(folder, point record)] of a sweep, by index."""
  root = os.path.join(sweep_dir, "points")
  if not os.path.isdir(root):
    return []
  out = []
  for name in sorted(os.listdir(root)):
    record = read_point(os.path.join(root, name))
    if record is not None:
      out.append((os.path.join(root, name), record))
  return sorted(out, key=lambda p: p[1]["index"])


class ReportError(JftError, ValueError):
  pass


# ----------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------

def point_row(folder: str, record: dict, metric: str) -> dict:
  """One results row: status, swept values, best/final validation and test metric, cost."""
  records = read_metrics(folder)
  results = read_results(folder)
  evals = [r for r in records if r["kind"] == "eval" and metric in r]
  best = None
  if evals:
    pick = min if metric == "loss" else max
    best = pick(r[metric] for r in evals)
  rates = [r["tokens_per_s"] for r in records if r["kind"] == "train" and "tokens_per_s" in r]
  rates = sorted(rates[1:] or rates)  # the first record includes compiling the step
  test = results.get("test", {})
  counts = results.get("counts", {})
  row = {"point": record["index"], "status": record["status"]}
  row.update({k: _cell(v) for k, v in record["values"].items()})
  row.update({f"best_{metric}": best, f"final_{metric}": evals[-1][metric] if evals else None,
              f"test_{metric}": test.get(metric), "trainable": counts.get("trainable"),
              "trainable_pct": counts.get("percent"), "seconds": record.get("seconds"),
              "tokens_per_s": rates[len(rates) // 2] if rates else None,
              "peak_rss_mib": results.get("peak_rss_mib"), "name": record["name"], "error": record.get("error")})
  return row


def _cell(value):
  return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _text(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def sweep_report(sweep_dir: str) -> list[dict]:
  """Write `results.csv`, `results.md` and the plots of a sweep; -> the rows."""
  path = os.path.join(sweep_dir, SWEEP_FILE)
  if not os.path.isfile(path):
    raise ReportError(f"{sweep_dir}: not a sweep folder (no {SWEEP_FILE})")
  info = files.read_json(path, "sweep record", SWEEP_FIELDS)
  metric = info["metric"]
  points = load_points(sweep_dir)
  rows = [point_row(folder, record, metric) for folder, record in points]
  columns = ["point", "status"] + [k for k in info["keys"] if any(k in r for r in rows)]
  for row in rows:
    columns += [k for k in row if k not in columns]
  with files.write_file(os.path.join(sweep_dir, "results.csv"), newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns or ["point"])
    writer.writeheader()
    writer.writerows(rows)
  figures = _sweep_plots(sweep_dir, info, rows, [folder for folder, _ in points])
  shown = [c for c in columns if c not in ("name", "error")] + (["error"] if any(r.get("error") for r in rows) else [])
  lines = [f"# Sweep {os.path.basename(os.path.abspath(sweep_dir))}", "",
           f"`{info['config']}` " + " ".join(f"--config.{k}={v}" for k, v in info["overrides"])
           + f", {info['search']} search, {len(rows)} point(s); metric: validation {metric} ({info['direction']})",
           ""]
  done = [r for r in rows if r.get(f"best_{metric}") is not None]
  if done:
    pick = min if info["direction"] == "minimize" else max
    top = pick(done, key=lambda r: r[f"best_{metric}"])
    lines += [f"Best: point {top['point']} (`points/{top['name']}`), validation {metric} "
              f"{top[f'best_{metric}']:.4f}", ""]
  lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
  lines += ["| " + " | ".join(_text(r.get(c)).replace("|", "/") for c in shown) + " |" for r in rows]
  lines += [""] + [f"![{os.path.splitext(name)[0]}]({name})" for name in figures]
  with files.write_file(os.path.join(sweep_dir, "results.md")) as f:
    f.write("\n".join(lines) + "\n")
  return rows


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _sweep_plots(sweep_dir: str, info: dict, rows: list[dict], folders: list[str]) -> list[str]:
  """metric-vs-<field>.png per swept field, loss-curves.png for all points; -> file names."""
  metric = info["metric"]
  plt = files.pyplot()
  names = []
  scored = [r for r in rows if r.get(f"best_{metric}") is not None]
  for key in info["keys"]:
    short = re.split(r"[.:]", key)[-1]
    pts = [(r[key], r[f"best_{metric}"]) for r in scored if key in r]
    if not pts:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = [x for x, _ in pts]
    if _numeric(xs):
      ax.plot(xs, [y for _, y in pts], "o", alpha=0.8)
      if key in info.get("log_keys", ()) and min(xs) > 0:
        ax.set_xscale("log")
    else:
      cats = sorted({str(x) for x in xs})
      ax.plot([cats.index(str(x)) for x in xs], [y for _, y in pts], "o", alpha=0.8)
      ax.set_xticks(range(len(cats)), cats, rotation=30 if max(map(len, cats)) > 6 else 0)
    ax.set(xlabel=key, ylabel=f"best validation {metric}", title=f"{metric} against {short}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    name = f"metric-vs-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
    files.save_figure(fig, os.path.join(sweep_dir, name))
    plt.close(fig)
    names.append(name)
  curves = [(os.path.basename(f), [r for r in read_metrics(f) if r["kind"] == "train"]) for f in folders]
  curves = [(n, c) for n, c in curves if c]
  if curves:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, c in curves:
      ax.plot([r["step"] for r in c], [r["loss"] for r in c], label=name[:40], lw=1.2)
    ax.set(xlabel="step", ylabel="training loss", title="training loss, every point")
    if len(curves) <= 12:
      ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.save_figure(fig, os.path.join(sweep_dir, "loss-curves.png"))
    plt.close(fig)
    names.append("loss-curves.png")
  return names


def report(path: str) -> str:
  """Rebuild the report of a sweep folder or a run folder; -> what was written."""
  if os.path.isfile(os.path.join(path, SWEEP_FILE)):
    rows = sweep_report(path)
    return f"{os.path.join(path, 'results.md')} ({len(rows)} point(s))"
  if os.path.isfile(os.path.join(path, "config.json")):
    png = plot_run(path)
    if png is None:
      raise ReportError(f"{path}: the run has logged no training steps yet")
    return png
  raise ReportError(f"{path}: neither a sweep folder (sweep.json) nor a run folder (config.json)")

