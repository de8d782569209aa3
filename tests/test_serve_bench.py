"""`benchmarks/serve.py --quick` runs end to end: two adapters trained, the merged export, the transformers side and
`jft serve` with 1 and 2 adapters at 1 and 2 clients, a table and the ratios. Slow (about 2 minutes of processes:
two `jft train` runs, an export, three servers' compiles); the llama.cpp side is left out with `--peers
transformers` (tests/test_llama_cpp.py checks llama.cpp on jft's GGUF)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_the_serve_benchmark_runs_end_to_end_in_quick_mode(tmp_path):
  out = tmp_path / "serve.md"
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serve.py"), "--quick", "--peers",
                         "transformers", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  cells = json.loads((tmp_path / "serve.json").read_text())
  got = {(c["side"], c["adapters"], c["clients"]) for c in cells}
  assert got == {("transformers generate", 1, 1), *(("jft serve", a, c) for a in (1, 2) for c in (1, 2))}
  for c in cells:
    assert c["requests"] == 2 * c["clients"] and 0 < c["tokens"] <= 8 * c["requests"], c  # 2 rounds, <= 8 tokens
    assert c["tok_s"] > 0 and c["ttft_p50"] > 0 and c["rss_mib"] >= c["rss_now_mib"] > 0, c
    if c["side"] == "jft serve":
      assert not c["compiles"], c  # warm-up compiled every bucket: nothing compiles in a timed cell
      assert c["steps"] > 0
  # The two adapters decode in one batch: at 2 clients the steps carry ~2 rows each.
  two = next(c for c in cells if c["side"] == "jft serve" and c["adapters"] == 2 and c["clients"] == 2)
  assert two["rows_per_step"] > 1.2, two
  text = out.read_text()
  assert done.stdout == text + "\n"  # the report on stdout (progress goes to stderr), the same in --out
  for line in ("| transformers generate | 1 | 1 | 2 |", "jft 1 adapter at 2 clients / sequential transformers",
               "jft 2 adapters / 1 adapter, 2 clients (tokens/s)",
               "jft peak RSS (VmHWM, loading included), 2 adapters / 1 adapter",
               "jft RSS while serving (2 clients), 2 adapters / 1 adapter"):
    assert line in text, text
  assert "| llama.cpp" not in text and "llama.cpp --n_threads" not in text  # --peers transformers: no llama.cpp
  # The adapters and exports stay in --workdir, finished (a rerun reuses what has results.json or files).
  assert all((tmp_path / "work" / "adapters" / a / "results.json").exists() for a in ("a0", "a1"))
  assert os.listdir(tmp_path / "work" / "export" / "merged")
