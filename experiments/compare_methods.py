"""The method comparison, measured: one task, one budget, one model, every method.

    python experiments/compare_methods.py --mode local --out runs/compare
    python experiments/compare_methods.py --config configs/tiny.py --mode "" --methods lora,ia3 \
        --set model.name=/path/to/tiny --out /tmp/compare

A `jft sweep` over the config's `method` argument (every point an ordinary run
folder under OUT/points/, rerunning resumes), then, for each finished run and
in this one process: the bytes of its exported adapter (the whole model for
full fine-tuning), the compiled train step's memory (XLA's analysis, as
`jft train --dry-run`), and greedy decoding latency with the adapter unmerged,
merged, and the base alone. Writes OUT/compare.csv, OUT/compare.md and
OUT/accuracy-vs-params.png (accuracy against trainable parameters, point
size = training memory).
"""

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

METHODS = "full,lora,qlora,dora,bottleneck,prefix,prompt,ptuning,bitfit,ia3"


def human(n: int) -> str:
  for unit in ("B", "KiB", "MiB"):
    if n < 1024:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.2f} GiB"


def folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def export_bytes(point: str, method) -> tuple[str, int]:
  """(format, bytes) of what a task needs stored beside the shared base."""
  from jft import cli

  fmt = "merged" if method.name == "full" else "peft" if method.peft_type else "trainable"
  with tempfile.TemporaryDirectory(prefix="jft-compare-export-") as scratch:  # never inside the run folder
    out = os.path.join(scratch, "export")
    if cli.main(["export", "--workdir", point, "--format", fmt, "--out", out]) != 0:
      raise RuntimeError(f"export of {point} failed")
    return fmt, folder_bytes(out)


def compiled_step_mib(point: str) -> float:
  """The compiled train step's bytes (arguments + outputs + temporaries - donated), as --dry-run reports."""
  from jft import run
  from jft.run.train import train

  folder = os.path.join(point, "compare-dry-run")
  shutil.rmtree(folder, ignore_errors=True)
  result = train(run.read_config(point), folder, dry_run=True, echo=lambda *_: None)
  shutil.rmtree(folder)
  return result["compiled_step_memory"]["total"] / 2**20


def decode_ms_per_token(model, params, prompt_ids, new_tokens: int) -> float:
  """Greedy decoding of `new_tokens` (batch 1) after a warm-up call: milliseconds per new token."""
  from jft.models.generate import Sampling, generate

  sampling = Sampling(max_new_tokens=new_tokens)
  generate(model, params, [prompt_ids], sampling)  # compile
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    generate(model, params, [prompt_ids], sampling)
    times.append(time.perf_counter() - t0)
  return 1000 * min(times) / new_tokens


def measure(point: str, new_tokens: int, base_cache: dict) -> dict:
  """Storage, compiled memory and decoding latency of one finished run (cached in measurements.json)."""
  path = os.path.join(point, "measurements.json")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  from jft import run
  from jft.peft.api import MethodError

  r = run.restore(point)
  config, model, method, params, tokenizer = r.config, r.model, r.method, r.params(), r.tokenizer
  fmt, size = export_bytes(point, method)
  prompt = tokenizer(config.data.template.format(text="A warm, funny and moving film."))["input_ids"]
  out = {"export_format": fmt, "export_bytes": size, "compiled_step_mib": compiled_step_mib(point),
         "decode_unmerged_ms": decode_ms_per_token(model, params, prompt, new_tokens)}
  try:
    merged, _ = method.merge(r.tree())  # the method's own tree (VeRA's shared pair), not the model's view
    out["decode_merged_ms"] = decode_ms_per_token(model, merged, prompt, new_tokens)
  except MethodError:  # prefix / prompt tuning: virtual tokens cannot be folded into weights
    out["decode_merged_ms"] = None
  key = (config.model.name, config.model.dtype)
  if key not in base_cache:
    from jft.models import load_pretrained
    import jax.numpy as jnp
    base_model, base = load_pretrained(config.model.name, dtype=getattr(jnp, config.model.dtype))
    base_cache[key] = decode_ms_per_token(base_model, base, prompt, new_tokens)
  out["decode_base_ms"] = base_cache[key]
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  return out


def step_seconds(point: str) -> float | None:
  """Median seconds per training step, from the log records (the first, which compiles, left out)."""
  from jft.studies.report import read_metrics

  times = [r["step_seconds"] for r in read_metrics(point) if r["kind"] == "train" and "step_seconds" in r]
  return statistics.median(times[1:] or times) if times else None


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def plot(rows: list, out: str):
  from jft.core import files

  plt = files.pyplot()
  pts = [r for r in rows if r["test_accuracy"] is not None]
  if not pts:
    return
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  peak = max(r["compiled_step_mib"] for r in pts)
  for r in pts:
    ax.scatter(r["trainable"], r["test_accuracy"], s=40 + 600 * r["compiled_step_mib"] / peak, alpha=0.6)
    ax.annotate(r["method"], (r["trainable"], r["test_accuracy"]), fontsize=8, xytext=(4, 4),
                textcoords="offset points")
  ax.set_xscale("log")
  ax.set(xlabel="trainable parameters", ylabel="test accuracy",
         title="accuracy against trainable parameters (size: compiled step memory)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "accuracy-vs-params.png"), dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "sentiment.py"),
                      help="a config file whose get_config takes a `method` argument")
  parser.add_argument("--methods", default=METHODS)
  parser.add_argument("--mode", default="local", help="passed as mode=... to the config ('' for none)")
  parser.add_argument("--set", action="append", default=[], help="FIELD=VALUE override, repeatable")
  parser.add_argument("--parallel", type=int, default=1)
  parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per latency measurement")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  from jft.studies import report
  from jft import run
  from jft.studies.sweep import Space, Sweep, grid

  methods = [m for m in args.methods.split(",") if m]
  spec = args.config + (f":mode={args.mode}" if args.mode else "")
  study = Sweep(spec, [tuple(s.split("=", 1)) for s in args.set], args.out, search="grid", parallel=args.parallel,
                spaces=Space({"arg:method": grid(*methods)}))
  study.run()

  rows, base_cache = [], {}
  from jft.studies import sweep
  for point, record in sweep.load_points(args.out):
    if record["status"] != "done":
      print(f"{record['name']}: {record['status']} {record.get('error') or ''}", file=sys.stderr)
      continue
    results = report.read_results(point)
    config = run.read_config(point)
    m = measure(point, args.new_tokens, base_cache)
    rate = report.point_row(point, record, "accuracy")["tokens_per_s"]
    rows.append({"method": record["values"]["arg:method"], "trainable": results["counts"]["trainable"],
                 "trainable_pct": results["counts"]["percent"], "export": m["export_format"],
                 "storage_bytes": m["export_bytes"], "compiled_step_mib": m["compiled_step_mib"],
                 "peak_rss_mib": results.get("peak_rss_mib"), "step_s": step_seconds(point),
                 "tokens_per_s": rate, "decode_unmerged_ms": m["decode_unmerged_ms"],
                 "decode_merged_ms": m["decode_merged_ms"], "decode_base_ms": m["decode_base_ms"],
                 "zero_shot_accuracy": results.get("zero_shot", {}).get("accuracy"),
                 "test_accuracy": results.get("test", {}).get("accuracy"),
                 "steps": config.train.steps, "batch": config.train.batch_size})
  if not rows:
    sys.exit("no finished runs to compare")
  with open(os.path.join(args.out, "compare.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  fmt = lambda v, p=3: "n/a" if v is None else f"{v:,.{p}f}" if isinstance(v, float) else f"{v:,}"
  lines = ["| method | trainable | % of base | extra storage per task | compiled step | peak RSS | step | tokens/s "
           "| decode unmerged / merged / base (ms/token) | zero-shot acc | test acc |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.3f} | {human(r['storage_bytes'])} "
                 f"({r['export']}) | {r['compiled_step_mib']:.0f} MiB | {fmt(r['peak_rss_mib'], 0)} MiB "
                 f"| {fmt(r['step_s'], 2)} s | {fmt(r['tokens_per_s'], 0)} | {fmt(r['decode_unmerged_ms'], 1)} / "
                 f"{fmt(r['decode_merged_ms'], 1)} / {fmt(r['decode_base_ms'], 1)} "
                 f"| {fmt(r['zero_shot_accuracy'])} | {fmt(r['test_accuracy'])} |")
  header = [f"`python experiments/compare_methods.py {' '.join(sys.argv[1:])}`", "",
            f"Machine: {cpu_model()}, {os.cpu_count()} CPU(s), Python "
            f"{platform.python_version()}; {rows[0]['steps']} steps x batch {rows[0]['batch']} per method.", ""]
  with open(os.path.join(args.out, "compare.md"), "w") as f:
    f.write("\n".join(header + lines) + "\n\n![accuracy against trainable parameters](accuracy-vs-params.png)\n")
  plot(rows, args.out)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
