"""benchmarks/device.sh: `--dry-run` parses, builds (lowers) every cell's step on this CPU and stops; the table
and the goals' verdicts read the rows the cells return."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _device():
  spec = importlib.util.spec_from_file_location("device_bench", os.path.join(ROOT, "benchmarks", "device.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_dry_run_builds_every_cell_and_stops():
  out = subprocess.run(["bash", "benchmarks/device.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHON": sys.executable})
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"shape"')]
  assert {(r["shape"], r["method"]) for r in rows} == {(s, m) for s in ("smollm2-135m", "llama-3.2-1b")
                                                        for m in ("lora", "qlora", "full")}
  by = {(r["shape"], r["method"]): r for r in rows}
  for shape in ("smollm2-135m", "llama-3.2-1b"):  # full fine-tuning also computes the weight gradients
    assert by[shape, "full"]["flops_per_step"] > by[shape, "lora"]["flops_per_step"] > 0
    assert by[shape, "lora"]["h100_batch"] >= 1 and by[shape, "lora"]["lowered_chars"] > 0
  assert by["llama-3.2-1b", "lora"]["flops_per_step"] > 5 * by["smollm2-135m", "lora"]["flops_per_step"]
  assert "dry run: every cell's step built" in out.stdout


def test_an_unknown_argument_is_refused():
  out = subprocess.run(["bash", "benchmarks/device.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2 and "unknown argument --fast (expected --dry-run, --no-torch)" in out.stderr


def test_the_table_and_the_goals():
  device = _device()
  row = lambda method, step_s, mfu, shape="llama-3.2-1b", batch=8: dict(
      side="jft", shape=shape, method=method, batch=batch, length=1024, steps=10, compile_s=30.0, step_s=step_s,
      tokens_per_s=batch * 1024 / step_s, flops_per_step=1e15, mfu=mfu, hardware="h100-80g", peak_memory_gib=40.0)
  rows = [row("lora", 1.0, 0.55), row("qlora", 1.3, 0.42),
          dict(side="jft", shape="llama-3.2-1b", method="full", error="RESOURCE_EXHAUSTED: out of memory")]
  text = device.table(rows)
  assert "| jft | llama-3.2-1b | lora | 8 x 1024 | 1.000 | 8,192 | 55.0% | 40.0 | 30.0 |" in text
  assert "RESOURCE_EXHAUSTED" in text.splitlines()[-1]
  assert device.verdicts(rows) == ["LoRA 1B MFU 55.0% (goal >= 50%): met",
                                   "llama-3.2-1b: QLoRA/LoRA step time per row 1.30x (goal <= 1.2x): missed"]
