"""A run's curves (`curves.png`) from what it logged (`metrics.jsonl`, `results.json`).

`jft.studies.report` draws the same records across the points of a sweep.
"""

from __future__ import annotations

import os

from jft.core import files


def read_metrics(workdir: str) -> list[dict]:
  return files.read_records(os.path.join(workdir, "metrics.jsonl"))  # a damaged line is left out, named


def read_results(workdir: str) -> dict:
  path = os.path.join(workdir, "results.json")
  return files.read_json(path, "run's results") if os.path.isfile(path) else {}


def plot_run(workdir: str) -> str | None:
  """`curves.png` of a run: training (and validation) loss, and each other evaluation metric, by step; the
  zero-shot measurement is its own point, labelled with the split it was measured on."""
  records = read_metrics(workdir)
  train = [r for r in records if r["kind"] == "train"]
  if not train:
    return None
  evals = [r for r in records if r["kind"] == "eval"]
  zero = [r for r in records if r["kind"] == "zero_shot"][-1:]  # measured on its own split: not a curve point
  others = [k for k in ("accuracy", "exact_match") if any(k in r for r in evals + zero)]
  plt = files.pyplot()
  fig, axes = plt.subplots(1, 1 + len(others), figsize=(4.5 * (1 + len(others)), 3.4), squeeze=False)
  for ax, name in zip(axes[0], ["loss"] + others):
    if name == "loss":
      ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    points = [(r["step"], r[name]) for r in evals if name in r]
    if points:
      ax.plot(*zip(*points), "o-", label="validation")
    for r in zero:
      if name in r:
        ax.plot([r["step"]], [r[name]], "s", color="grey", label=f"zero-shot ({r.get('split', 'before training')})")
    ax.set(xlabel="step", ylabel=name, title=name)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, "curves.png")
  files.save_figure(fig, path)
  plt.close(fig)
  return path
