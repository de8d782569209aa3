"""`benchmarks/race.py --workload demo|sft|dpo --quick`: each workload race runs end to end on a tiny model.

The numbers of a --quick race mean nothing; what is checked is that both sides ran the same job: the
same tokens, the same first-step loss (the same weights, adapter init and first batch), agreeing accuracy.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _race(workload: str) -> str:
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "race.py"), "--workload", workload,
                         "--quick"], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _table(stdout: str, header: str) -> list[list[str]]:
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip().strip("|").split("|")])
  return rows


@pytest.mark.slow  # three jft runs and a Trainer run of a tiny model (1.5-4.5 minutes on 2 shared cores)
def test_demo_race_quick():
  out = _race("demo")
  assert "tokens equal: yes" in out, out
  rows = {r[0]: r for r in _table(out, "| side | wall s")}
  assert set(rows) == {"jft cold", "jft warm", "peer"}, rows
  losses = [float(rows[side][10]) for side in rows]
  assert max(losses) - min(losses) < 1e-3, rows  # same weights, adapter init, first batch and label-word loss
  for side in rows:
    assert float(rows[side][1]) > 0 and 0 <= float(rows[side][12]) <= 1, rows[side]
  assert "peer / jft cold wall clock" in out and "peer / jft warm wall clock" in out


@pytest.mark.slow
def test_sft_race_quick():
  out = _race("sft")
  rows = {r[0]: r for r in _table(out, "| side | response tok/s")}
  assert set(rows) == {"jft", "TRL"}, rows
  assert all(float(r[1]) > 0 for r in rows.values()), rows
  jft_loss, trl_loss = float(rows["jft"][4]), float(rows["TRL"][4])
  assert abs(jft_loss / trl_loss - 1) < 0.05, rows  # 4 steps from the same init: the losses barely move
  assert "jft / TRL response tokens/s" in out


@pytest.mark.slow
def test_dpo_race_quick():
  out = _race("dpo")
  rows = {r[0]: r for r in _table(out, "| side | pairs/s")}
  assert set(rows) == {"jft", "TRL"}, rows
  for r in rows.values():
    assert float(r[1]) > 0 and 0 <= float(r[4]) <= 1 and float(r[5]) > 0, r
  assert "jft / TRL pairs/s" in out
