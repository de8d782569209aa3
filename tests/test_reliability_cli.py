"""The CLI fails in one line (traceback on --debug), exports never overwrite by accident, one run per folder."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jft import cli
from jft.core import lock
from jft.run.checkpoint import CheckpointSaveError
from jft.core.errors import CheckpointNotFoundError
from jft.run import RunError
from jft.run.train import TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
ONE_STEP = ["--config.train.steps=1", "--config.data.max_train_examples=8", "--config.data.max_eval_examples=4",
            "--config.data.test_split=", "--config.eval.zero_shot=false"]


def _jft(*args, env=None, code=None):
  """Run `jft ARGS` in a fresh process (or `code` that calls cli.main) -> (returncode, stderr)."""
  argv = [sys.executable, "-c", code] if code else [sys.executable, "-m", "jft.cli", *args]
  p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300,
                     env={**os.environ, "JFT_DEBUG": "0", **(env or {})})
  return p.returncode, p.stderr


def _snapshot(folder) -> dict:
  """relative path -> bytes of every file under `folder` (None for a folder)."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(folder):
    for name in dirnames:
      out[os.path.relpath(os.path.join(dirpath, name), folder)] = None
    for name in filenames:
      with open(os.path.join(dirpath, name), "rb") as f:
        out[os.path.relpath(os.path.join(dirpath, name), folder)] = f.read()
  return out


def _dead_pid() -> int:
  p = subprocess.Popen(["true"])
  p.wait()  # reaped: the PID names no process (not even a zombie)
  return p.pid


# ---------------------------------------------------------------------------- one error path


def _raise(e):
  def command(args):
    raise e
  return command


def _json_error(tmp_path):
  path = tmp_path / "run.json"
  path.write_text('{"step": 3,')
  with open(path) as f:
    try:
      json.load(f)
    except json.JSONDecodeError as e:
      return e


@pytest.mark.parametrize("make_error, code, line", [
    (lambda _: RunError("runs/x: not a run folder (no config.json)"), 2, "runs/x: not a run folder"),
    (lambda _: CheckpointNotFoundError("runs/x/best: no checkpoint"), 2, "runs/x/best: no checkpoint"),
    (lambda _: TrainingError("non-finite loss (nan) at step 3"), 1, "non-finite loss (nan) at step 3"),
    (lambda _: CheckpointSaveError("saving step 4 failed (No space left on device)"), 1,  # failed while running
     "saving step 4 failed (No space left on device)"),
    (lambda _: FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "data/x.jsonl"), 2,
     "data/x.jsonl: No such file or directory"),
    (lambda _: PermissionError(errno.EACCES, os.strerror(errno.EACCES), "runs/x/config.json"), 2,
     "runs/x/config.json: Permission denied"),
    (lambda _: IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), "runs/x"), 2, "runs/x: Is a directory"),
    (lambda _: NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "a/b"), 2, "a/b: Not a directory"),
    (lambda _: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 2, "No space left on device (in main, jft/cli/__init__.py:"),
    (lambda tmp: _json_error(tmp), 2, "run.json: not valid JSON (Expecting "),
])
def test_expected_errors_end_in_one_line(make_error, code, line, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(cli, "_report", _raise(make_error(tmp_path)))
  assert cli.main(["report", str(tmp_path)]) == code
  err = capsys.readouterr().err
  assert err.startswith("jft report: error: ") and line in err and err.count("\n") == 1, err


def test_an_unreadable_run_file_is_named(tmp_path, capsys):
  (tmp_path / "config.json").write_text('{"model": ')
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err == (f"jft eval: error: {tmp_path / 'config.json'}: not valid JSON (Expecting value: line 1 column 11); "
                 "not a run config\n")


def test_interrupted_and_unexpected_errors(monkeypatch, capsys):
  monkeypatch.setattr(cli, "_report", _raise(KeyboardInterrupt()))
  assert cli.main(["report", "x"]) == 130
  assert capsys.readouterr().err == "jft report: interrupted\n"
  monkeypatch.setattr(cli, "_report", _raise(ZeroDivisionError("a bug")))
  with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
    cli.main(["report", "x"])


@pytest.mark.parametrize("args, env, traceback", [
    (["eval", "--workdir", "{bad}"], {}, False),
    (["eval", "--workdir", "{bad}", "--debug"], {}, True),
    (["--debug", "eval", "--workdir", "{bad}"], {}, True),
    (["eval", "--workdir", "{bad}"], {"JFT_DEBUG": "1"}, True),
])
def test_traceback_only_with_debug(args, env, traceback, tmp_path):
  (tmp_path / "config.json").write_text("{")
  code, err = _jft(*[a.format(bad=tmp_path) for a in args], env=env)
  assert code == 2
  assert ("Traceback (most recent call last)" in err) == traceback, err
  assert err.rstrip("\n").splitlines()[-1].startswith(f"jft eval: error: {tmp_path / 'config.json'}: not valid JSON")


def test_a_bug_still_shows_its_traceback():
  code, err = _jft(code="import sys; from jft import cli\n"
                        "def bug(args): return {}['missing']\n"
                        "cli._report = bug; sys.exit(cli.main(['report', 'x']))")
  assert code == 1 and "Traceback (most recent call last)" in err and "KeyError: 'missing'" in err


def test_every_subcommand_accepts_debug():
  parser = cli.build_parser()
  for name, command in parser._subparsers._group_actions[0].choices.items():
    assert "--debug" in command._option_string_actions, name


# ---------------------------------------------------------------------------- data errors (jft/data/__init__.py, not fixed here)


@pytest.mark.parametrize("text", ['{"text": "a", "label": "positive"}\n{"text": "b", "label": \n', ""])
def test_data_errors_name_the_file_and_line(text, tmp_path):
  from jft import data
  (tmp_path / "train.jsonl").write_text(text)
  with pytest.raises(data.DataError, match=r"train\.jsonl(:2: not valid JSON|: the file is empty)"):
    data.load_split(str(tmp_path), "train")


# ---------------------------------------------------------------------------- a tiny run (export and lock)


@pytest.fixture(scope="module")
def tiny_run(byte_model, tmp_path_factory):
  """(run folder, base model folder, stderr) of a one-step run started over a stale lock."""
  workdir = str(tmp_path_factory.mktemp("reliability") / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, lock.NAME), "w") as f:
    json.dump({"pid": _dead_pid(), "host": socket.gethostname()}, f)
  capture = subprocess.run(
      [sys.executable, "-m", "jft.cli", "train", "--config", TINY, f"--config.model.name={byte_model}", *ONE_STEP,
       "--workdir", workdir],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert capture.returncode == 0, capture.stderr
  return workdir, byte_model, capture.stderr


def test_a_stale_lock_is_taken_over_and_the_lock_goes_with_the_run(tiny_run):
  workdir, _, err = tiny_run
  assert "taking over the stale lock" in err and "no longer running" in err
  assert not os.path.exists(os.path.join(workdir, lock.NAME))


def test_a_second_run_on_a_folder_in_use_is_refused(tiny_run, capsys):
  workdir, base, _ = tiny_run
  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    with open(os.path.join(workdir, lock.NAME), "w") as f:
      json.dump({"pid": sleeper.pid, "host": socket.gethostname()}, f)
    before = _snapshot(workdir)
    code = cli.main(["train", "--config", TINY, f"--config.model.name={base}", *ONE_STEP, "--workdir", workdir,
                     "--resume"])  # the run's own config: only the lock stops it
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("jft train: error: ") and f"in use by process {sleeper.pid}" in err, err
    assert _snapshot(workdir) == before  # nothing written
  finally:
    sleeper.kill()
    sleeper.wait()
    os.remove(os.path.join(workdir, lock.NAME))


def _export(workdir, out, *extra, fmt="trainable"):
  return cli.main(["export", "--workdir", workdir, "--format", fmt, "--out", str(out), *extra])


@pytest.mark.parametrize("fmt", ["trainable", "peft"])
def test_export_refuses_a_non_empty_folder(fmt, tiny_run, tmp_path, capsys):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  before = _snapshot(out)
  assert _export(tiny_run[0], out, fmt=fmt) == 2
  assert "not empty; pass --overwrite" in capsys.readouterr().err
  assert _snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["mine"]


@pytest.mark.parametrize("target", ["run", "base", "run/checkpoints", "run/new", "base/new", "above run",
                                    "above base"])
def test_export_never_touches_the_run_or_its_base(target, tiny_run, capsys):
  workdir, base, _ = tiny_run
  names = {"run": workdir, "base": base, "above run": os.path.dirname(workdir), "above base": os.path.dirname(base)}
  out = names.get(target) or os.path.join(names[target.split("/")[0]], target.split("/")[1])
  before = {workdir: _snapshot(workdir), base: _snapshot(base)}
  assert _export(workdir, out, "--overwrite") == 2
  assert "refusing to write over or into" in capsys.readouterr().err
  assert {workdir: _snapshot(workdir), base: _snapshot(base)} == before


def test_export_refuses_a_file(tiny_run, tmp_path, capsys):
  (tmp_path / "f").write_text("x")
  assert _export(tiny_run[0], tmp_path / "f", "--overwrite") == 2
  assert "exists and is not a folder" in capsys.readouterr().err and (tmp_path / "f").read_text() == "x"


def test_export_into_new_empty_and_overwritten_folders(tiny_run, tmp_path):
  workdir = tiny_run[0]
  assert _export(workdir, tmp_path / "a" / "b") == 0  # parents made
  assert sorted(os.listdir(tmp_path / "a" / "b")) == ["method.json", "trainable.safetensors"]
  (tmp_path / "empty").mkdir()
  assert _export(workdir, tmp_path / "empty") == 0
  assert sorted(os.listdir(tmp_path / "empty")) == ["method.json", "trainable.safetensors"]
  (tmp_path / "empty" / "stray.txt").write_text("old")
  assert _export(workdir, tmp_path / "empty", "--overwrite", fmt="peft") == 0
  assert "stray.txt" not in os.listdir(tmp_path / "empty") and "adapter_config.json" in os.listdir(tmp_path / "empty")
  assert sorted(os.listdir(tmp_path)) == ["a", "empty"]  # no .tmp-/.old- folder left


def test_a_run_config_from_an_earlier_layout_is_upgraded_and_named(tiny_run, tmp_path):
  """A config.json written before `objective` existed (data.task), without a field added since and with one
  no longer read, is read in today's layout; each change is one line naming the file."""
  from jft import run

  saved = json.load(open(os.path.join(tiny_run[0], "config.json")))
  name = saved.pop("objective")["name"]
  saved["data"]["task"] = name
  del saved["train"]["keep"]
  saved["train"]["old_knob"] = 3
  (tmp_path / "config.json").write_text(json.dumps(saved))
  lines = []
  config = run.read_config(str(tmp_path), report=lines.append)
  assert config.objective.name == name and config.train.keep == 2 and "old_knob" not in config.train
  where = f"{tmp_path / 'config.json'}: "
  assert lines == [where + f"data.task={name!r} read as objective.name (the layout before objectives)",
                   where + "train.old_knob=3 ignored (not a field of this jft)",
                   where + "train.keep missing; using the default 2"]
  # Today's layout reads back unchanged and silently.
  again = run.read_config(tiny_run[0], report=lines.append)
  assert len(lines) == 3 and json.loads(json.dumps(again.to_dict())) == json.load(
      open(os.path.join(tiny_run[0], "config.json")))


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_run_config_with_a_bad_value_is_one_error_before_anything_loads(command, tiny_run, tmp_path, capsys):
  import shutil

  workdir = tmp_path / "run"
  shutil.copytree(tiny_run[0], workdir)
  saved = json.load(open(workdir / "config.json"))
  saved["train"]["nan_policy"] = "skpi"
  (workdir / "config.json").write_text(json.dumps(saved))
  before = _snapshot(tmp_path)
  argv = ["eval", "--workdir", str(workdir)] if command == "eval" else \
      ["export", "--workdir", str(workdir), "--format", "peft", "--out", str(tmp_path / "out")]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"jft {command}: error: {workdir / 'config.json'}: invalid run config: train.nan_policy") \
      and "did you mean skip" in err and err.count("\n") == 1, err
  assert _snapshot(tmp_path) == before


def test_a_killed_exports_leftovers_are_cleaned_up_on_the_next_export(tiny_run, tmp_path, capsys):
  """SIGKILL leaves `<out>.tmp-PID` (and maybe `<out>.old-PID`): the next export removes a dead process's
  temporary folder, never a live one's, and keeps a moved-aside previous export that has no other copy."""
  dead, live = _dead_pid(), os.getppid()
  for name in (f"out.tmp-{dead}", f"out.tmp-{live}", f"other.old-{dead}"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "half.safetensors").write_text("half")
  assert _export(tiny_run[0], tmp_path / "out") == 0
  err = capsys.readouterr().err
  assert f"removing {tmp_path / f'out.tmp-{dead}'}: left by an interrupted write" in err
  assert sorted(os.listdir(tmp_path)) == ["other.old-" + str(dead), "out", f"out.tmp-{live}"]
  assert _export(tiny_run[0], tmp_path / "other") == 0  # `other` missing: its old copy is the only one
  assert f"keeping {tmp_path / f'other.old-{dead}'}: the folder an interrupted write was replacing" in \
      capsys.readouterr().err
  assert (tmp_path / f"other.old-{dead}" / "half.safetensors").exists()


@pytest.mark.parametrize("failure, code", [(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 2),
                                           (KeyboardInterrupt(), 130)])
@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_export_leaves_nothing_half_written(failure, code, existing, tiny_run, tmp_path, monkeypatch,
                                                           capsys):
  from types import SimpleNamespace

  from jft import run
  from jft.peft import peft_format

  def half(method, params, config, folder, base_model):
    os.makedirs(folder)
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
      f.write(b"half")
      raise failure

  monkeypatch.setattr(peft_format, "export_peft", half)
  fake = SimpleNamespace(model=SimpleNamespace(name="base"), config=None)  # no restore: the writer fails anyway
  monkeypatch.setattr(run, "restore", lambda *_: SimpleNamespace(config=fake, model=fake, method=None,
                                                                 tree=lambda: None, tokenizer=None))
  out = tmp_path / "out"
  if existing:
    out.mkdir()
    (out / "old.txt").write_text("old")
  before = _snapshot(tmp_path)
  assert _export(tiny_run[0], out, "--overwrite", fmt="peft") == code
  assert _snapshot(tmp_path) == before
  if code == 2:
    assert "adapter_model.safetensors: No space left on device" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the lock itself


def _owner(kind: str) -> dict:
  host = socket.gethostname()
  return {"foreign host": {"pid": _dead_pid(), "host": host + "-elsewhere"},
          "dead": {"pid": _dead_pid(), "host": host},
          "own pid, not held": {"pid": os.getpid(), "host": host},  # a restart that got the same PID
          "reused pid": {"pid": os.getppid(), "host": host, "started": -1}}[kind]


@pytest.mark.parametrize("kind, taken", [("foreign host", False), ("dead", True), ("own pid, not held", True),
                                         ("reused pid", True)])
def test_lock_takes_over_only_stale_locks(kind, taken, tmp_path):
  owner = _owner(kind)
  (tmp_path / lock.NAME).write_text(json.dumps(owner))
  messages = []
  if not taken:
    with pytest.raises(lock.WorkdirLockedError, match=f"in use by process {owner['pid']} on {owner['host']}"):
      with lock.workdir_lock(str(tmp_path), warn=messages.append):
        pass
    assert json.loads((tmp_path / lock.NAME).read_text()) == owner
    return
  with lock.workdir_lock(str(tmp_path), warn=messages.append):
    assert json.loads((tmp_path / lock.NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(lock.WorkdirLockedError, match=f"in use by process {os.getpid()}"):  # not twice either
      with lock.workdir_lock(str(tmp_path)):
        pass
  assert messages and f"process {owner['pid']}" in messages[0]
  assert os.listdir(tmp_path) == []


def test_lock_unreadable_file_is_refused_and_other_processes_skip_it(tmp_path):
  (tmp_path / lock.NAME).write_text("")
  with pytest.raises(lock.WorkdirLockedError, match="unreadable lock file"):
    with lock.workdir_lock(str(tmp_path)):
      pass
  with lock.workdir_lock(str(tmp_path), enabled=False):  # a process other than 0
    pass
  assert (tmp_path / lock.NAME).read_text() == ""


def test_lock_held_by_another_process_until_it_ends(tmp_path):
  """A process holding the lock refuses this one; SIGTERM (before training's own handler) still releases it."""
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom jft import lock\n"
       "with lock.workdir_lock(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(60)\n", str(tmp_path)],
      stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(lock.WorkdirLockedError, match=f"in use by process {holder.pid} "):
      with lock.workdir_lock(str(tmp_path)):
        pass
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=30) == 128 + signal.SIGTERM
  finally:
    holder.kill()
    holder.wait()
  assert not (tmp_path / lock.NAME).exists()
  with lock.workdir_lock(str(tmp_path)):
    pass


def test_lock_is_released_on_error(tmp_path):
  with pytest.raises(ZeroDivisionError):
    with lock.workdir_lock(str(tmp_path)):
      time.sleep(0)
      1 / 0
  assert not (tmp_path / lock.NAME).exists()


# ---------------------------------------------------------------------------- a quiet, informative start


def test_a_normal_run_prints_no_library_noise_and_times_its_phases(tiny_run):
  workdir, _, err = tiny_run
  noise = [line for line in err.splitlines()
           if line.strip() and not line.startswith(("step ", "taking over the stale lock"))]
  assert not noise, noise  # no "PyTorch was not found", absl or deprecation lines
  summary = open(os.path.join(workdir, "summary.md")).read()
  timing = next(line for line in summary.splitlines() if line.startswith("- time: "))
  for phase in ("setup and other", "training steps", "evaluation", "checkpoints"):
    assert phase in timing, timing
  phases = json.load(open(os.path.join(workdir, "results.json")))["phases"]
  assert abs(sum(phases.values()) - json.load(open(os.path.join(workdir, "results.json")))["seconds"]) < 1.0


def test_long_passes_report_progress_without_a_terminal(monkeypatch, capsys):
  from jft.core import progress

  monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
  assert list(progress.track(range(3), 3, "evaluating (batches)")) == [0, 1, 2]
  lines = capsys.readouterr().err.splitlines()
  assert lines[0].startswith("evaluating (batches) 1/3") and lines[-1].startswith("evaluating (batches) 3/3")
  monkeypatch.setattr(progress, "PLAIN_EVERY_S", 60.0)
  list(progress.track(range(3), 3, "quick"))
  assert capsys.readouterr().err == ""  # short passes stay quiet


# ---------------------------------------------------------------------------- bad inputs and faults, one table

TRAIN = ["train", "--config", TINY, "--config.model.name={model}", "--workdir", "{tmp}/w", *ONE_STEP]
DPO = ["train", "--config", TINY + ":objective=dpo", "--config.model.name={model}", "--workdir", "{tmp}/w", *ONE_STEP]
INSTRUCT = ["train", "--config", TINY + ":objective=instruct", "--config.model.name={model}", "--workdir", "{tmp}/w",
            *ONE_STEP]
SFT = ["train", "--config", TINY + ":objective=sft", "--config.model.name={model}", "--workdir", "{tmp}/w", *ONE_STEP]
SWEEP_RECORD = {"config": TINY, "overrides": [], "search": "grid", "trials": 0, "seed": 0, "metric": "accuracy",
                "direction": "maximize", "keys": ["optim.lr"], "log_keys": [], "points": [{"optim.lr": 0.1}]}
GENERATE = ["generate", "--model", "{model}", "--no-chat"]


def _files(tmp, files: dict, model: str):
  """Write `files` under tmp; a text "@model/NAME" copies the test model's file NAME."""
  import shutil

  for name, text in files.items():
    os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
    if isinstance(text, bytes):
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(text)
      continue
    if text.startswith("@model/"):
      shutil.copy(os.path.join(model, text[len("@model/"):]), os.path.join(tmp, name))
      continue
    with open(os.path.join(tmp, name), "w") as f:
      f.write(text)


ROWS = '{"text": "good", "label": "positive"}\n{"text": "bad", "label": "negative"}\n'

# (case, argv, files written first, exit code, what the one error line says)
BAD_INPUTS = [
    ("dtype not offered", TRAIN + ["--config.model.dtype=float16"], {}, 2, r"model\.dtype='float16'"),
    ("enum typo", TRAIN + ["--config.eval.zero_shot_split=evl"], {}, 2, r"eval\.zero_shot_split.*did you mean"),
    ("save_every 0", TRAIN + ["--config.train.save_every=0"], {}, 2, r"train\.save_every=0"),
    ("batch 0", TRAIN + ["--config.train.batch_size=0"], {}, 2, r"train\.batch_size=0"),
    ("negative steps", TRAIN + ["--config.train.steps=-3"], {}, 2, r"train\.steps=-3"),
    ("nan_policy typo", TRAIN + ["--config.train.nan_policy=skp"], {}, 2, r"train\.nan_policy='skp'"),
    ("negative lr", TRAIN + ["--config.optim.lr=-0.001"], {}, 2, r"optim\.lr=-0\.001"),
    ("eval.metric typo, zero-shot", TRAIN + ["--config.eval.zero_shot=true", "--config.eval.metric=acurracy"], {}, 1,
     r"eval\.metric='acurracy' is not a metric the classification evaluation reports \(did you mean accuracy\?\)"
     r".*nothing was trained"),
    ("eval.metric typo, periodic", TRAIN + ["--config.train.steps=2", "--config.train.eval_every=1",
                                            "--config.eval.metric=los"], {}, 1,
     r"eval\.metric='los' is not a metric .*checkpoint saved at step 1"),
    ("unknown field", TRAIN + ["--config.train.stepz=3"], {}, 2, r"stepz.*did you mean.*steps"),
    ("unknown method", TRAIN + ["--config.method.name=lorra"], {}, 2, r"method\.name='lorra'.*did you mean"),
    ("rank 0", TRAIN + ["--config.method.hparams.rank=0"], {}, 2,
     r"invalid config: method\.hparams\.rank=0: expected an int >= 1$"),
    ("past the context", TRAIN + ["--config.data.max_length=4096"], {}, 2, r"exceeds the context of model"),
    ("config syntax error", ["train", "--config", "{tmp}/bad.py", "--workdir", "{tmp}/w"],
     {"bad.py": "def get_config(:\n"}, 2, r"bad\.py:1"),
    ("config raises", ["train", "--config", "{tmp}/raises.py", "--workdir", "{tmp}/w"],
     {"raises.py": "def get_config(arg=None):\n  return 1 / 0\n"}, 2, r"raises\.py:2: ZeroDivisionError"),
    ("config missing", ["train", "--config", "{tmp}/nope.py", "--workdir", "{tmp}/w"], {}, 2, r"nope\.py"),
    ("model missing", ["train", "--config", TINY, "--config.model.name={tmp}/no-model", "--workdir", "{tmp}/w"], {},
     2, r"no-model"),
    ("model without tokenizer", ["train", "--config", TINY, "--config.model.name={tmp}/m", "--workdir", "{tmp}/w"],
     {"m/config.json": "@model/config.json", "m/model.safetensors": "@model/model.safetensors"}, 2,
     r"m: no tokenizer files"),
    ("empty train file", TRAIN + ["--config.data.path={tmp}/d"], {"d/train.jsonl": "", "d/eval.jsonl": ROWS}, 2,
     r"train\.jsonl: the file is empty"),
    ("malformed JSONL line", TRAIN + ["--config.data.path={tmp}/d"],
     {"d/train.jsonl": ROWS + '{"text": "x", "label": \n', "d/eval.jsonl": ROWS}, 2,
     r"train\.jsonl:3: not valid JSON \(Expecting value at column 24\)"),
    ("data folder missing", TRAIN + ["--config.data.path={tmp}/nothing/"], {}, 2, r"nothing"),
    ("label field missing", TRAIN + ["--config.data.path={tmp}/d"],
     {"d/train.jsonl": '{"text": "x"}\n', "d/eval.jsonl": ROWS}, 2, r"no field 'label'"),
    ("workdir is a file", ["train", "--config", TINY, "--config.model.name={model}", *ONE_STEP,
                           "--workdir", "{tmp}/f"], {"f": "x"}, 2, r"error: /\S*/f: File exists$"),
    ("checkpoints, no --resume", ["train", "--config", TINY, "--config.model.name={model}", *ONE_STEP,
                                  "--workdir", "{run}"], {}, 2, r"already holds checkpoints"),
    ("resume, another config", ["train", "--config", TINY, "--config.model.name={model}", *ONE_STEP,
                                "--config.optim.lr=0.5", "--workdir", "{run}", "--resume"], {}, 2,
     r"differs from the run's config\.json"),
    ("eval, not a run", ["eval", "--workdir", "{tmp}"], {}, 2, r"config\.json"),
    ("eval, truncated config", ["eval", "--workdir", "{tmp}"], {"config.json": '{"model": {'}, 2,
     r"config\.json: not valid JSON"),
    ("export, non-empty out", ["export", "--workdir", "{run}", "--format", "trainable", "--out", "{tmp}/o"],
     {"o/keep.txt": "mine"}, 2, r"not empty; pass --overwrite"),
    ("export over the run", ["export", "--workdir", "{run}", "--format", "trainable", "--out", "{run}",
                             "--overwrite"], {}, 2, r"refusing to write over or into"),
    ("export over the base", ["export", "--workdir", "{run}", "--format", "merged", "--out", "{model}",
                              "--overwrite"], {}, 2, r"refusing to write over or into"),
    ("generate 0 tokens", GENERATE + ["--prompt", "hi", "--max-new-tokens", "0"], {}, 2, r"max_new_tokens=0"),
    ("generate top-p 0", GENERATE + ["--prompt", "hi", "--top-p", "0"], {}, 2, r"top_p=0\.0"),
    ("generate blocksize 0", GENERATE + ["--prompt", "hi", "--quantize", "nf4", "--blocksize", "0"], {}, 2,
     r"--blocksize 0"),
    ("generate empty prompt", GENERATE + ["--prompt", " "], {}, 2, r"prompt 0 is empty"),
    ("generate past the context", GENERATE + ["--prompt", "x" * 300, "--max-new-tokens", "4"], {}, 2,
     r"a prompt of 300 tokens leaves no room for new tokens in the model's context of 256 positions"),
    ("generate, model missing", ["generate", "--model", "{tmp}/no-model", "--prompt", "hi"], {}, 2, r"no-model"),
    # Data files that are not UTF-8: file, line and byte offset.
    ("non-UTF-8 sentiment JSONL", TRAIN + ["--config.data.path={tmp}/d"],
     {"d/train.jsonl": ROWS.encode() + b'{"text": "caf\xe9", "label": "positive"}\n', "d/eval.jsonl": ROWS}, 2,
     r"d/train\.jsonl:3: not UTF-8 text \(byte 0xe9 at offset 88, line 3\)"),
    ("non-UTF-8 CSV", TRAIN + ["--config.data.path={tmp}/d"],
     {"d/train.csv": b"text,label\ncaf\xe9,positive\n", "d/eval.jsonl": ROWS}, 2,
     r"d/train\.csv:2: not UTF-8 text \(byte 0xe9 at offset 14, line 2\)"),
    ("non-UTF-8 preference JSONL", DPO + ["--config.data.path={tmp}/p.jsonl"],
     {"p.jsonl": b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n'}, 2,
     r"p\.jsonl:2: not UTF-8 text \(byte 0xff at offset 60, line 2\)"),
    ("empty preference file", DPO + ["--config.data.path={tmp}/p.jsonl"], {"p.jsonl": "\n"}, 2,
     r"p\.jsonl: the file is empty \(no rows\)"),
    ("empty Alpaca JSON", INSTRUCT + ["--config.data.path={tmp}/a.json"], {"a.json": "[]"}, 2,
     r"a\.json: the file is empty \(no rows\)"),
    ("non-UTF-8 Alpaca JSON", INSTRUCT + ["--config.data.path={tmp}/a.json"],
     {"a.json": b'[{"instruction": "x",\n  "output": "\xc3("}]'}, 2, r"a\.json:2: not UTF-8 text"),
    # A field of the wrong type is named, never trained on as its Python repr.
    ("instruction output is an object", INSTRUCT + ["--config.data.path={tmp}/a.json"],
     {"a.json": json.dumps([{"instruction": f"say {i}", "output": {"text": "y"}} for i in range(8)])}, 2,
     r"a\.json.*row \d+: field 'output' is an object \(\{\"text\": \"y\"\}\), expected text"),
    ("SFT response is a list", SFT + ["--config.data.path={tmp}/d"],
     {"d/train.jsonl": '{"prompt": "a", "response": ["b"]}\n', "d/eval.jsonl": '{"prompt": "a", "response": "b"}\n'},
     2, r"SFT data: row 0: field 'response' is a list"),
    # One guard for every output path: never a run's own files, an existing output only with --overwrite.
    ("ablate into the run's checkpoints", ["ablate", "--workdir", "{run}", "--out", "{run}/checkpoints",
                                           "--overwrite"], {}, 2,
     r"--out .*/checkpoints: refusing to write over or into .*/checkpoints, a file of the run folder"),
    ("ablate over the run", ["ablate", "--workdir", "{run}", "--out", "{run}", "--overwrite"], {}, 2,
     r"refusing to write over the run folder"),
    ("pairs over the run's metrics", ["pairs", "{run}", "--reward", "jft.objectives.reward_functions:vader", "--out",
                                      "{run}/metrics.jsonl"], {}, 2,
     r"--out .*metrics\.jsonl: refusing to write over or into .* \(a run folder or its base model\)"),
    ("pairs over an existing file", ["pairs", "{run}", "--reward", "jft.objectives.reward_functions:vader", "--out", "{tmp}/p.jsonl"],
     {"p.jsonl": "mine\n"}, 2, r"--out .*p\.jsonl exists; pass --overwrite"),
    ("sweep into a run folder", ["sweep", "--config", TINY, "--config.model.name={model}", "--workdir", "{run}"], {},
     2, r"--workdir .*: refusing to write over the run folder"),
    # Run-folder files jft reads back: one loader per kind, naming the file and the field.
    ("report, empty sweep.json", ["report", "{tmp}/s"], {"s/sweep.json": "{}"}, 2,
     r"s/sweep\.json: not a sweep record \(no field 'config'\)"),
    ("report, empty point.json", ["report", "{tmp}/s"], {"s/sweep.json": json.dumps(SWEEP_RECORD),
                                                         "s/points/000-a/point.json": "{}"}, 2,
     r"000-a/point\.json: not a sweep point \(no field 'index'\)"),
    ("report, point.json not UTF-8", ["report", "{tmp}/s"], {"s/sweep.json": json.dumps(SWEEP_RECORD),
                                                             "s/points/000-a/point.json": b'{"index": "\xff"}'}, 2,
     r"000-a/point\.json: not a sweep point \(not UTF-8 text: byte 11\)"),
]


@pytest.mark.parametrize("case, argv, files, code, line", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_named_error_and_changes_nothing(case, argv, files, code, line, tiny_run, tmp_path,
                                                          capsys):
  import re

  run_dir, model, _ = tiny_run
  _files(str(tmp_path), files, model)
  watched = {"tmp": str(tmp_path), "run": run_dir, "model": model}
  before = {k: _snapshot(v) for k, v in watched.items()}
  args = [a.format(tmp=tmp_path, run=run_dir, model=model) for a in argv]
  assert cli.main(args) == code
  err = capsys.readouterr().err
  lines = err.splitlines()  # status lines ("loading ...") may come first; the error is the last and only one
  assert lines[-1].startswith(f"jft {args[0]}: error: ") and "Traceback" not in err, err
  assert sum(x.startswith("jft ") for x in lines) == 1 and re.search(line, lines[-1]), err
  for key, snapshot in before.items():  # what existed is untouched (a failed train may have added files)
    after = _snapshot(watched[key])
    assert {p: after.get(p) for p in snapshot} == snapshot, f"{case}: {key} changed"


# ---------------------------------------------------------------------------- run files jft wrote, damaged


def test_damaged_metrics_lines_are_set_aside_not_a_reason_to_stop(tiny_run, tmp_path, capsys):
  """A metrics.jsonl line that is not UTF-8, not JSON or has no `kind`: `jft report` leaves it out with a
  warning, and `--resume` sets it aside in corrupt/ (a last line cut short is dropped as before)."""
  import shutil

  run_dir, model, _ = tiny_run
  copy = str(tmp_path / "run")
  shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
  metrics = os.path.join(copy, "metrics.jsonl")
  good = open(metrics, "rb").read()
  damaged = [b'{"step": 1, "loss": 2.0}\n', b'{"step": 1, "kind": "train", "note": "\xff"}\n', b"\x00\x01garbage\n"]
  with open(metrics, "ab") as f:
    f.writelines(damaged)
  assert cli.main(["report", copy]) == 0
  err = capsys.readouterr().err
  assert f"warning: {metrics}: left out 3 damaged line(s) (line " in err, err
  assert cli.main(["train", "--config", TINY, f"--config.model.name={model}", *ONE_STEP, "--workdir", copy,
                   "--resume"]) == 0
  out = capsys.readouterr()
  assert f"warning: {metrics}: 3 damaged line(s) set aside in {copy}/corrupt/metrics.jsonl.damaged" in out.out
  assert open(os.path.join(copy, "corrupt", "metrics.jsonl.damaged"), "rb").read() == b"".join(damaged)
  assert open(metrics, "rb").read().startswith(good)  # the whole records are kept


def test_a_dry_run_into_a_run_folder_writes_only_under_dry_run(tiny_run, tmp_path, capsys):
  import shutil

  run_dir, model, _ = tiny_run
  copy = str(tmp_path / "run")
  shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
  before = _snapshot(copy)
  args = ["train", "--config", TINY, f"--config.model.name={model}", *ONE_STEP, "--workdir", copy]
  assert cli.main(args + ["--config.optim.lr=0.5", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert f"dry run: {copy} holds a run; writing under {copy}/dry-run" in out and f"run folder: {copy}/dry-run" in out
  after = _snapshot(copy)
  assert {p: v for p, v in after.items() if not p.startswith("dry-run")} == before  # the run is untouched
  assert "dry-run/shardings.json" in after
  assert cli.main(args + ["--resume"]) == 0  # and its own resume is still accepted


# ---------------------------------------------------------------------------- resume after a kill at a save


def _copy_run(tiny_run, tmp_path) -> str:
  import shutil

  copy = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], copy, ignore=shutil.ignore_patterns(".lock"))
  return copy


def test_resume_uses_a_step_killed_between_its_finalization_and_its_checksums(tiny_run, tmp_path, capsys):
  """The window of a run's first save: `checkpoints/1` finalized by orbax, `jft_checksums.json` not yet
  written. `--resume` uses the step (it restores cleanly) and seals it; it is never refused."""
  from jft.run import checkpoint

  copy = _copy_run(tiny_run, tmp_path)
  mngr = checkpoint.manager(copy, None)
  step = mngr.latest_step()
  os.remove(os.path.join(mngr.step_dir(step), checkpoint.CHECKSUMS))
  args = ["train", "--config", TINY, f"--config.model.name={tiny_run[1]}", *ONE_STEP, "--workdir", copy, "--resume"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert (f"checkpoint: step {step} had no {checkpoint.CHECKSUMS} (the save stopped after orbax finalized it, "
          "before its checksums were written); it restored cleanly, checksums written now") in out, out
  assert f"resumed from step {step}" in out and mngr.problem(step) is None and mngr.unsealed(step) is None


def test_resume_with_no_intact_step_starts_again_and_keeps_the_broken_ones(tiny_run, tmp_path, capsys):
  import glob

  copy = _copy_run(tiny_run, tmp_path)
  for data_file in glob.glob(os.path.join(copy, "checkpoints", "*", "state", "ocdbt.process_0", "d", "*")):
    with open(data_file, "r+b") as f:
      f.truncate(os.path.getsize(data_file) // 2)
  args = ["train", "--config", TINY, f"--config.model.name={tiny_run[1]}", *ONE_STEP, "--workdir", copy, "--resume"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert f"--resume: no intact checkpoint in {copy}/checkpoints (moved to {copy}/corrupt/checkpoints-1-" in out, out
  assert f"--resume: no checkpoint to continue from in {copy}; starting from step 0" in out
  assert os.listdir(os.path.join(copy, "checkpoints")) == ["1"]  # trained again
  assert [n.split("-")[1] for n in os.listdir(os.path.join(copy, "corrupt"))] == ["1"]


def test_a_run_folder_without_checkpoints_is_refused_with_exit_2(tiny_run, tmp_path, capsys):
  import shutil

  copy = _copy_run(tiny_run, tmp_path)
  for sub in ("checkpoints", "best"):
    shutil.rmtree(os.path.join(copy, sub), ignore_errors=True)
  assert cli.main(["eval", "--workdir", copy]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == f"jft eval: error: {copy}: no checkpoint to restore"
