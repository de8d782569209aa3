"""Checkpoint integrity under faults: damaged items, SIGKILL during a save, a save that fails, kill/resume.

Every case ends with the newest *intact* step restored (the damaged one named),
nothing older deleted, and a run that `--resume` continues.
"""

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.run import checkpoint
from jft.core import errors
from jft import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _state(step: int, size: int = 1000):
  return {"trainable": {"a": jnp.arange(size, dtype=jnp.float32) + step, "b": jnp.full((7, 3), step, jnp.float32)},
          "opt_state": {"mu": jnp.full((5,), step, jnp.float32)}}


def _saved(folder, steps=(1, 2, 3), keep=None):
  mngr = checkpoint.manager(folder, keep)
  for s in steps:
    mngr.save(s, _state(s), {"data": {"pos": s}, "best": None, "step": s})
  return mngr


def _restore(folder, lines):
  return checkpoint.manager(folder, None).restore(checkpoint.abstract(_state(0)), report=lines.append)


# Every kind of file of a step folder (the data files' names are content hashes: matched by pattern).
ITEMS = ["_CHECKPOINT_METADATA", "commit_success.txt", checkpoint.CHECKSUMS, "meta/metadata", "state/_METADATA",
         "state/manifest.ocdbt", "state/_sharding", "state/array_metadatas/*", "state/ocdbt.process_0/manifest.ocdbt",
         "state/ocdbt.process_0/d/*", "state/d/*"]


def _damage(path: str, how: str):
  if how == "deleted":
    os.remove(path)
  elif how == "truncated":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif how == "garbage":  # seeded, so a failure reproduces (orbax names its d/* files at random: no name seed)
    import random

    with open(path, "wb") as f:
      f.write(random.Random(0).randbytes(max(16, os.path.getsize(path))))
  else:  # 16 flipped bytes, spread over the file
    data = bytearray(open(path, "rb").read())
    for i in range(16):
      data[(i * 7919) % len(data)] ^= 0x5A
    with open(path, "wb") as f:
      f.write(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "deleted", "flipped", "garbage"])
@pytest.mark.parametrize("item", ITEMS)
def test_damaged_item_of_the_newest_step_falls_back_to_the_previous(tmp_path, item, how, caplog):
  _saved(str(tmp_path))
  targets = sorted(glob.glob(os.path.join(tmp_path, "checkpoints", "3", item)))
  assert targets, f"step folder has no {item}: {os.listdir(tmp_path / 'checkpoints' / '3')}"
  _damage(targets[0], how)
  lines = []
  step, state, meta = _restore(str(tmp_path), lines)
  if item == checkpoint.CHECKSUMS and how == "deleted":  # a finalized step, unsealed: reading it is the check
    assert step == 3 and lines == [f"checkpoint: step 3 had no {checkpoint.CHECKSUMS} (the save stopped after "
                                   "orbax finalized it, before its checksums were written); it restored cleanly"]
    return
  assert step == 2 and meta["data"] == {"pos": 2}
  np.testing.assert_array_equal(state["trainable"]["a"], _state(2)["trainable"]["a"])
  assert "checkpoints/3 is" in lines[0] and ("corrupt" in lines[0] or "incomplete" in lines[0]), lines
  assert lines[-1] == "checkpoint: using step 2 instead"
  # Our line says what is wrong; orbax's own ERROR about the same folder is not repeated.
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_no_intact_step_is_one_named_error(tmp_path):
  _saved(str(tmp_path), steps=(1,))
  _damage(glob.glob(os.path.join(tmp_path, "checkpoints", "1", "state", "d", "*"))[0], "flipped")
  with pytest.raises(errors.CorruptCheckpointError, match=r"no intact checkpoint \(step 1: corrupt"):
    _restore(str(tmp_path), [])


def test_a_step_written_before_checksums_existed_still_restores(tmp_path):
  _saved(str(tmp_path), steps=(1,))
  folder = os.path.join(tmp_path, "checkpoints", "1")
  os.remove(os.path.join(folder, checkpoint.CHECKSUMS))
  meta = json.load(open(os.path.join(folder, "meta", "metadata")))
  del meta["checksummed"]
  json.dump(meta, open(os.path.join(folder, "meta", "metadata"), "w"))
  lines = []
  assert _restore(str(tmp_path), lines)[0] == 1
  assert lines == [f"checkpoint: step 1 had no {checkpoint.CHECKSUMS} (saved by a jft that wrote no checksums); "
                   "it restored cleanly"]
  assert not os.path.isfile(os.path.join(folder, checkpoint.CHECKSUMS))  # a reader writes nothing


def test_a_finalized_step_without_checksums_is_restored_and_sealed_by_the_writer(tmp_path):
  """A kill between orbax's finalization and the checksums: the step is whole, so the writer uses it
  and seals it; a damaged one of the same kind is still refused by name."""
  _saved(str(tmp_path), steps=(1, 2))
  for step in (1, 2):
    os.remove(os.path.join(tmp_path, "checkpoints", str(step), checkpoint.CHECKSUMS))
  _damage(glob.glob(os.path.join(tmp_path, "checkpoints", "2", "state", "d", "*"))[0], "truncated")
  lines = []
  mngr = checkpoint.manager(str(tmp_path), None)
  step, state, _ = mngr.restore(checkpoint.abstract(_state(0)), report=lines.append, seal=True)
  assert step == 1 and lines[0].startswith("checkpoint: ") and "checkpoints/2 is unreadable" in lines[0], lines
  assert lines[1] == (f"checkpoint: step 1 had no {checkpoint.CHECKSUMS} (the save stopped after orbax finalized "
                      "it, before its checksums were written); it restored cleanly, checksums written now")
  np.testing.assert_array_equal(state["trainable"]["a"], _state(1)["trainable"]["a"])
  assert mngr.problem(1) is None and mngr.unsealed(1) is None  # sealed: later damage is caught by checksum
  _damage(glob.glob(os.path.join(tmp_path, "checkpoints", "1", "state", "d", "*"))[0], "flipped")
  assert mngr.problem(1).startswith("corrupt")


@pytest.mark.parametrize("where", ["orbax", "checksums"])
def test_a_save_that_fails_keeps_the_previous_step(tmp_path, monkeypatch, where):
  mngr = _saved(str(tmp_path), steps=(1,), keep=1)
  if where == "orbax":  # the disk fills while the items are written
    def full(*a, **k):
      raise OSError(28, "No space left on device")
    monkeypatch.setattr(mngr._mngr, "wait_until_finished", full)
  else:
    def full(folder):
      raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "write_checksums", full)
  with pytest.raises(checkpoint.CheckpointSaveError, match=r"saving step 2 .* failed \(No space left on device\); "
                     r"the last complete checkpoint, step 1, is intact"):
    mngr.save(2, _state(2), {"data": {}, "step": 2})
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]  # no leftover, nothing pruned
  assert _restore(str(tmp_path), [])[0] == 1
  mngr = checkpoint.manager(str(tmp_path), 1)
  mngr.save(2, _state(2), {"data": {}, "step": 2})  # the step can be saved again
  assert mngr.steps() == [2]


SAVER = textwrap.dedent("""
    import sys, time, jax.numpy as jnp
    from jft import checkpoint
    if sys.argv[2] == "before checksums":  # hold the process at the moment under test: step 3 finalized, unsealed
      write = checkpoint.write_checksums
      def stall(folder):
        if folder.endswith("/3"):
          print("stalled", flush=True)
          time.sleep(600)
        write(folder)
      checkpoint.write_checksums = stall
    mngr = checkpoint.manager(sys.argv[1], 2)
    for step in range(1, 1000):
      state = {"trainable": {"a": jnp.full((4_000_000,), step, jnp.float32)}, "opt_state": {}}
      mngr.save(step, state, {"data": {}, "step": step})
      print(step, flush=True)
""")


@pytest.mark.parametrize("moment", ["items being written", "before checksums"])
def test_sigkill_during_a_save_leaves_a_run_that_resumes(tmp_path, moment):
  """Kill a process that saves 16 MB steps back to back at a moment inside a save; reopen the folder."""
  folder = str(tmp_path)
  proc = subprocess.Popen([sys.executable, "-c", SAVER, folder, moment], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  ckpts = os.path.join(folder, "checkpoints")
  deadline = time.time() + 240
  try:
    while True:
      assert proc.poll() is None and time.time() < deadline, "saver ended before the moment was seen"
      if os.path.isdir(ckpts):
        names = os.listdir(ckpts)
        steps = [int(n) for n in names if n.isdigit()]
        if moment == "items being written":
          hit = len(steps) >= 2 and any(".orbax-checkpoint-tmp" in n for n in names)
        else:  # the saver says it stalls in step 3's checksums
          hit = proc.stdout.readline().strip() == "stalled"
        if hit:
          break
      time.sleep(0.001)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  lines = []
  mngr = checkpoint.manager(folder, 2)
  if moment == "before checksums":  # the moment was hit: step 3 finalized by orbax, no checksums
    assert mngr.steps() == [1, 2, 3] and mngr.unsealed(3) and mngr.unsealed(2) is None
  left = mngr.remove_leftovers()
  assert left or moment == "before checksums"
  assert not [n for n in os.listdir(ckpts) if "tmp" in n]  # leftovers of the interrupted save are gone
  step, state, _ = mngr.restore(checkpoint.abstract({"trainable": {"a": jnp.zeros((4_000_000,))}, "opt_state": {}}),
                                report=lines.append, seal=True)
  assert float(state["trainable"]["a"][0]) == step and step >= 1
  if moment == "before checksums":  # the finalized step is used, not thrown away
    assert step == 3 and "checksums written now" in lines[-1] and mngr.problem(3) is None
  for broken, why in mngr.broken_after(step):
    mngr.set_aside(broken, why)
  mngr.save(step + 1, {"trainable": {"a": jnp.full((4_000_000,), step + 1.0)}, "opt_state": {}}, {"data": {}})
  assert mngr.steps()[-1] == step + 1 and mngr.problem(step + 1) is None


def _jft(*args):
  return subprocess.Popen([sys.executable, "-m", "jft.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT)


@pytest.mark.slow  # two full `jft train` runs (60-100 s); the default suite keeps the SIGKILL-during-save cases
def test_kill_between_eval_and_save_with_intervals_that_do_not_divide(tiny_model, tmp_path):
  """save_every=3, eval_every=4: killed after step 5 (best/4 saved, latest step 3), resumed to the end.

  The resumed run redoes steps 4 and 5: it must neither trip over best/4 nor log a step twice.
  """
  workdir = str(tmp_path / "run")
  args = ["train", "--config", TINY, f"--config.model.name={tiny_model}", "--config.train.steps=8",
          "--config.train.save_every=3", "--config.train.eval_every=4", "--config.train.log_every=1",
          "--workdir", workdir]
  p = _jft(*args)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.isfile(metrics) and '"step": 5, "kind": "train"' in open(metrics).read()):
    assert p.poll() is None and time.time() < deadline, p.communicate()[1][-2000:]
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert os.listdir(os.path.join(workdir, "best")) == ["4"]
  p = _jft(*args, "--resume")
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  assert "resumed from step 3" in out + err
  records = [json.loads(line) for line in open(metrics)]
  train_steps = [r["step"] for r in records if r["kind"] == "train"]
  assert train_steps == list(range(1, 9))  # each step once
  assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
  best = json.load(open(os.path.join(workdir, "results.json")))["best"]["step"]
  assert best in (4, 8)

  # eval/export read the best step; a damaged one is named and the newest intact step is used.
  _damage(glob.glob(os.path.join(workdir, "best", str(best), "state", "ocdbt.process_0", "d", "*"))[0], "flipped")
  lines = []
  restored = run.restore(workdir, "best", report=lines.append)
  assert restored.source == "latest" and restored.step == 8
  assert any(f"best/{best} is corrupt" in line for line in lines), lines


def test_a_disk_that_fills_while_metrics_are_written_stops_the_run_and_resume_continues(tiny_model, tmp_path,
                                                                                          monkeypatch, capsys):
  """The metrics write hits ENOSPC after half a line: one error naming metrics.jsonl (exit 1), the saved
  checkpoints intact; `--resume` drops the cut line and logs each step once."""
  import errno

  from jft import cli
  from jft.run import train

  class FillsUp:
    def __init__(self, file, after):
      self.file, self.left = file, after

    def write(self, text):
      self.left -= 1
      if self.left < 0:
        self.file.write(text[:len(text) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return self.file.write(text)

    def __getattr__(self, name):
      return getattr(self.file, name)

  init = train._Log.__init__

  def full_after_five(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if self.enabled:
      self.file = FillsUp(self.file, after=5)

  workdir = str(tmp_path / "run")
  args = ["train", "--config", TINY, f"--config.model.name={tiny_model}", "--config.train.steps=5",
          "--config.train.save_every=2", "--config.train.eval_every=0", "--config.train.log_every=1",
          "--workdir", workdir]
  monkeypatch.setattr(train._Log, "__init__", full_after_five)
  assert cli.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f"jft train: error: writing {workdir}/metrics.jsonl failed at step 5 (No space left on "
                        "device); stopped."), err
  assert checkpoint.manager(workdir, None).steps() == [2, 4]
  assert not open(os.path.join(workdir, "metrics.jsonl")).read().endswith("\n")  # the cut line is there
  monkeypatch.setattr(train._Log, "__init__", init)
  assert cli.main(args + ["--resume"]) == 0
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]


BEST_SAVER = textwrap.dedent("""
    import resource, signal, sys, jax, jax.numpy as jnp
    from jft import checkpoint, run
    workdir = sys.argv[1]
    checkpoint.manager(workdir, None).save(2, {"trainable": {"a": jnp.zeros((10,))}}, {"data": {}})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # no file may grow past 100 kB: the disk is full
    try:
      run.best_manager(workdir).save(4, {"trainable": {"a": jax.random.normal(jax.random.PRNGKey(0), (200_000,))}}, {})
    except checkpoint.CheckpointSaveError as e:
      print(e)
""")


def test_a_full_disk_while_the_best_step_is_saved_names_the_runs_intact_step(tmp_path):
  """Tensorstore's write fails in orbax's background threads: one line naming the run's intact step
  (not "no earlier checkpoint"), none of orbax's tracebacks, nothing left in best/."""
  out = subprocess.run([sys.executable, "-c", BEST_SAVER, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
  assert out.stdout.strip() == (f"saving step 4 to {tmp_path}/best failed (File too large); the run's last complete "
                                f"checkpoint, step 2 in {tmp_path}/checkpoints, is intact"), out.stdout + out.stderr
  assert "Traceback" not in out.stderr and "ERROR" not in out.stderr, out.stderr
  assert os.listdir(tmp_path / "best") == [] and checkpoint.manager(str(tmp_path), None).steps() == [2]


@pytest.mark.parametrize("junk", [b"[]", b'"x"', b"7"])
def test_orbax_metadata_that_orbax_cannot_open_is_named_and_the_writer_moves_it_aside(tmp_path, junk):
  """A step's _CHECKPOINT_METADATA that is JSON but not an object stops orbax's CheckpointManager from
  opening the folder at all: a reader gets one named error, the writer (`--resume`) moves the step to
  corrupt/ and restores the one before."""
  _saved(str(tmp_path), steps=(1, 2))
  with open(os.path.join(tmp_path, "checkpoints", "2", "_CHECKPOINT_METADATA"), "wb") as f:
    f.write(junk)
  with pytest.raises(errors.CorruptCheckpointError, match=r"checkpoints/2: _CHECKPOINT_METADATA is damaged \("):
    checkpoint.manager(str(tmp_path), None)
  lines = []
  mngr = checkpoint.manager(str(tmp_path), None, writer=True, report=lines.append)
  assert lines[0].startswith("checkpoint step 2 is corrupt (_CHECKPOINT_METADATA is damaged") and "corrupt/" in lines[0]
  assert mngr.steps() == [1] and _restore(str(tmp_path), [])[0] == 1
