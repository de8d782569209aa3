"""Hyperparameter sweeps: the search space lives in the config file, every point is a run folder.

A config file may define `sweep(arg)` beside `get_config(arg)` (the file is the
whole record of the study). It returns a `Space` (or a list of them: a union,
for spaces that differ per method) over config fields, written as dotted paths,
and over the file's own arguments, written `arg:NAME`:

    from jft.studies.space import Space, grid, loguniform

    def sweep(arg=None):
      return [Space({"arg:method": grid("lora", "dora"), "method.hparams.rank": grid(4, 8),
                     "optim.lr": loguniform(1e-4, 3e-3)}, trials=8),
              Space({"arg:method": grid("ia3"), "optim.lr": grid(1e-3, 5e-3)})]

`grid` values are crossed (grid search), `choice`/`uniform`/`loguniform`/
`integer` are sampled (random search, Optuna); with `--search grid` a
`choice` is enumerated like a grid and a continuous distribution is an error.

    DIR/sweep.json                the command that made the sweep (rerunning it resumes)
    DIR/points/NNN-<name>/        an ordinary run folder per point, plus
      point.json                  its values, status (pending/running/done/failed/pruned), attempts, error
    DIR/optuna.db                 Optuna's study (--search optuna)
    DIR/results.{csv,md}, *.png   the table and plots (`jft.studies.report`)

Each point runs in its own process (`python -m jft.studies.sweep POINT_DIR`), so
`--parallel` is a pool of processes and `--point K` lets a SLURM array or a
Kubernetes indexed job run one point per task with the same command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Sequence

import numpy as np

from jft import config as cfg
from jft.core import files, lock
from jft.run.train import train
from jft.studies import report
from jft.studies.space import (Dim, Space, SweepError, check_space, choice, grid, integer,  # noqa: F401
                               loguniform, plan, probes, uniform)

ARG = "arg:"  # prefix of a key that sets the config file's argument, not a field
# The sweep folder's files (`sweep.json`, `points/NNN-name/point.json`) are read by `jft.studies.report`.
SWEEP_FILE, POINT_FILE, SWEEP_FIELDS, POINT_FIELDS = (report.SWEEP_FILE, report.POINT_FILE, report.SWEEP_FIELDS,
                                                      report.POINT_FIELDS)
read_point, load_points = report.read_point, report.load_points
MAX_FAILURES = 2  # a failed point is retried once, then recorded with its error


def load_space(spec: str) -> list[Space]:
  """The `sweep(arg)` of a `FILE.py[:arg]` config spec, as a list of spaces."""
  spaces = cfg.call(spec, "sweep")
  spaces = [spaces] if isinstance(spaces, Space) else list(spaces or ())
  check_space(spaces, f"{spec.partition(':')[0]}: sweep()")
  return spaces


def override_text(value) -> str:
  """A swept value as the command-line text `--config.FIELD=` parses back to it."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value
  return repr(value)


def point_config(spec: str, overrides: Sequence[tuple[str, str]], values: dict):
  """The resolved config of one point: file + argument (with the swept `arg:` keys) + overrides + values.

  Every mistake (an unknown field, a value of the wrong type) is a ConfigError naming it.
  """
  path, _, arg = spec.partition(":")
  args = dict(item.split("=", 1) for item in arg.split(",") if "=" in item)
  args.update({k[len(ARG):]: override_text(v) for k, v in values.items() if k.startswith(ARG)})
  fields = [(k, override_text(v)) for k, v in values.items() if not k.startswith(ARG)]
  swept = {k for k, _ in fields}
  clash = [k for k, _ in overrides if k in swept]
  if clash:
    raise SweepError(f"--config.{clash[0]} is also swept; remove the override or the dimension")
  spec = path + (":" + ",".join(f"{k}={v}" for k, v in args.items()) if args else "")
  try:
    return cfg.build(spec, list(overrides) + fields)
  except cfg.ConfigError as e:
    raise SweepError(f"sweep point {_short(values)}: {e}") from None


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.3g}"
  if isinstance(value, (tuple, list)):
    return "+".join(map(str, value))
  return str(value)


def _short(values: dict) -> str:
  return ",".join(f"{re.split(r'[.:]', k)[-1]}={_fmt(v)}" for k, v in values.items())


def point_name(index: int, values: dict) -> str:
  """`NNN-<short name>`: the index keeps folders in order, the name says what the point is."""
  slug = re.sub(r"[^A-Za-z0-9._=,+-]", "_", _short(values))[:80]
  return f"{index:03d}-{slug}"


def write_point(folder: str, record: dict):
  files.write_json(os.path.join(folder, POINT_FILE), record)


# ----------------------------------------------------------------------------
# One point, in its own process
# ----------------------------------------------------------------------------

TAKEN = 4  # run_point's exit code when another process (a second sweep on the folder) runs the point


def run_point(folder: str) -> int:
  """Train (or resume) the point in `folder`; record done / pruned / failed in its point.json.

  Of two sweeps started on one folder only one runs a point (its `train` holds the point's lock); the
  other leaves the point's record alone and exits `TAKEN`.
  """
  if holder := lock.owner(folder):
    print(f"{folder} is being run by process {holder['pid']} on {holder['host']}; left to it", file=sys.stderr)
    return TAKEN
  return _run_point(folder)


def running_elsewhere(record: dict) -> bool:
  """Whether a point recorded as running is run by a live process on this host (another sweep's worker)."""
  return (record.get("status") == "running" and record.get("host") == os.uname().nodename
          and isinstance(record.get("pid"), int) and record["pid"] != os.getpid() and lock.pid_running(record["pid"]))


def _run_point(folder: str) -> int:

  record = read_point(folder)
  record.update(status="running", attempts=record.get("attempts", 0) + 1, pid=os.getpid(),
                host=os.uname().nodename, started=time.time())
  write_point(folder, record)
  on_eval = _optuna_reporter(record) if record.get("optuna") else None
  t0 = time.time()
  try:
    config = point_config(record["config"], [tuple(o) for o in record["overrides"]], record["values"])
    results = train(config, folder, resume=True, on_eval=on_eval)
  except lock.WorkdirLockedError as e:  # another sweep's worker took the point at the same moment: its record
    print(f"{e}; left to that process", file=sys.stderr)
    return TAKEN
  except Exception as e:  # one failed point never stops the sweep: its error is recorded
    record.update(status="failed", failures=record.get("failures", 0) + 1,
                  error=f"{type(e).__name__}: {e}".splitlines()[0][:500], seconds=time.time() - t0)
    traceback.print_exc()
    write_point(folder, record)
    return 1
  status = "pruned" if results.get("pruned") else "interrupted" if results.get("interrupted") else "done"
  record.update(status=status, error=None, seconds=record.get("seconds", 0.0) + time.time() - t0)
  write_point(folder, record)
  return 0 if status != "interrupted" else 3


def _optuna_reporter(record: dict):
  """on_eval for train: report the metric to the point's trial; True = the pruner says stop."""
  import optuna

  info = record["optuna"]
  study = optuna.load_study(study_name=info["study"], storage=info["storage"])
  trial = optuna.trial.Trial(study, info["trial_id"])
  metric = info["metric"]

  def on_eval(step, metrics):
    if metric not in metrics:
      return False
    trial.report(float(metrics[metric]), step)
    return trial.should_prune()

  return on_eval


# ----------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Sweep:
  """A sweep as the command line gives it; `run` makes and runs its points."""
  spec: str
  overrides: list
  workdir: str
  search: str = "grid"
  trials: int = 0
  parallel: int = 1
  seed: int = 0
  echo: Any = print
  spaces: Any = None  # default: the config file's sweep(arg); a script may pass its own

  def __post_init__(self):
    files.check_output(self.workdir, overwrite=True, flag="--workdir")  # a rerun resumes; never a run's folder
    self.overrides = [tuple(o) for o in self.overrides]
    if self.spaces is None:
      self.spaces = load_space(self.spec)
    else:
      self.spaces = [self.spaces] if isinstance(self.spaces, Space) else list(self.spaces)
      check_space(self.spaces, "sweep space")
    if self.parallel < 1:
      raise SweepError(f"--parallel {self.parallel}: expected >= 1")
    base = cfg.build(self.spec, self.overrides)  # errors in the file or the overrides surface first
    self.metric = base.eval.metric
    self.direction = "minimize" if self.metric == "loss" else "maximize"
    if self.search == "optuna":
      self.trials = self.trials or sum(s.trials for s in self.spaces)
      if self.trials < 1:
        raise SweepError("--search optuna: how many trials? pass --trials N (or set Space(..., trials=N))")
      self.points = None
    else:
      self.points = plan(self.spaces, self.search, self.trials, self.seed)
    for values in self.points if self.search == "grid" else probes(self.spaces, self.seed):
      point_config(self.spec, self.overrides, values)  # every point (or every listed value) resolves first

  @property
  def size(self) -> int:
    return self.trials if self.points is None else len(self.points)

  def record(self) -> dict:
    return {"config": self.spec, "overrides": [list(o) for o in self.overrides], "search": self.search,
            "trials": self.trials, "seed": self.seed, "metric": self.metric, "direction": self.direction,
            "keys": sorted({k for s in self.spaces for k in s.dims}),
            "log_keys": sorted({k for s in self.spaces for k, d in s.dims.items() if d.log}),
            "points": self.points}

  def _claim_folder(self):
    """Write sweep.json, or check that the one there describes this sweep (a rerun resumes it)."""
    path = os.path.join(self.workdir, SWEEP_FILE)
    mine = json.loads(json.dumps(self.record(), default=str))
    if os.path.isfile(path):
      theirs = files.read_json(path, "sweep record")
      if theirs != mine:
        diff = sorted(k for k in mine if theirs.get(k) != mine[k])
        raise SweepError(f"{self.workdir} holds another sweep (its {', '.join(diff)} differ); "
                         "rerun the same command to resume it, or choose a new --workdir")
      return
    files.write_json(path, mine)  # array tasks may start together: each writes its own temporary, same content

  def _folder(self, index: int) -> str | None:
    """The existing folder of point `index`, if any."""
    root = os.path.join(self.workdir, "points")
    prefix = f"{index:03d}-"
    found = [n for n in os.listdir(root)] if os.path.isdir(root) else []
    found = [n for n in found if n.startswith(prefix)]
    return os.path.join(root, found[0]) if found else None

  def _prepare(self, index: int) -> str:
    """The folder of point `index`, created with its point.json (and Optuna trial) if new."""
    folder = self._folder(index)
    if folder is not None:
      return folder
    if self.points is None:
      self._ask(index)
      return self._folder(index)
    return self._new_point(index, self.points[index])

  def _new_point(self, index: int, values: dict, **extra) -> str:
    folder = os.path.join(self.workdir, "points", point_name(index, values))
    write_point(folder, {"index": index, "name": os.path.basename(folder), "values": values, "status": "pending",
                         "attempts": 0, "failures": 0, "config": self.spec,
                         "overrides": [list(o) for o in self.overrides], **extra})
    return folder

  # -- Optuna --------------------------------------------------------------

  def _study(self):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per point is ours to print

    storage = f"sqlite:///{os.path.abspath(os.path.join(self.workdir, 'optuna.db'))}"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, self.trials // 4)))
    study = optuna.create_study(study_name="jft", storage=storage, load_if_exists=True, direction=self.direction,
                                pruner=pruner)
    # A fresh sampler per call (each worker process, each machine): seeded by the trials so far, so
    # reproducible, and never drawing the same "random" startup point twice.
    study.sampler = optuna.samplers.TPESampler(seed=self.seed + len(study.trials))
    return study, storage

  def _ask(self, index: int):
    """Ask Optuna for trials (the sampler chooses their values) until point `index` has its folder.

    Under a file lock, so workers of one sweep on several machines number their trials in turn.
    """
    with _locked(os.path.join(self.workdir, ".optuna.lock")):
      study, storage = self._study()
      while self._folder(index) is None:
        trial = study.ask()
        if self._folder(trial.number) is not None:
          raise SweepError(f"{self.workdir}/optuna.db has trials the points/ folder does not; "
                           "the study and the folder are out of step (restore both, or start a new --workdir)")
        s = self.spaces[trial.suggest_categorical("space", list(range(len(self.spaces))))] \
            if len(self.spaces) > 1 else self.spaces[0]
        values = {k: d.suggest(trial, k) for k, d in s.dims.items()}
        self._new_point(trial.number, values, optuna={
            "study": "jft", "storage": storage, "trial_id": trial._trial_id,  # for optuna.trial.Trial(study, id)
            "number": trial.number, "metric": self.metric})

  def _tell(self, folder: str):
    """Give Optuna the point's outcome (its best validation metric, or pruned / failed)."""
    record = read_point(folder)
    if not record.get("optuna") or record["status"] not in ("done", "pruned", "failed"):
      return
    import optuna
    study, _ = self._study()
    number = record["optuna"]["number"]
    if study.trials[number].state != optuna.trial.TrialState.RUNNING:
      return
    value = report.point_row(folder, record, self.metric).get(f"best_{self.metric}")
    if record["status"] == "done" and value is not None:
      study.tell(number, float(value))
    else:
      study.tell(number, state=optuna_state(record["status"]))

  # -- running -------------------------------------------------------------

  def todo(self, index: int) -> bool:
    """Whether point `index` still needs a run (not done, pruned, or failed twice)."""
    folder = self._folder(index)
    record = read_point(folder) if folder else None
    if record is None:
      return True
    if record["status"] in ("done", "pruned") or running_elsewhere(record):
      return False
    return not (record["status"] == "failed" and record.get("failures", 0) >= MAX_FAILURES)

  def run(self, only: int | None = None) -> list[dict]:
    """Run every point still to do (or only point `only`), `parallel` at a time; then write the report."""
    if only is not None and not 0 <= only < self.size:
      raise SweepError(f"--point {only}: this sweep has points 0 .. {self.size - 1}")
    self._claim_folder()
    indices = [only] if only is not None else list(range(self.size))
    skipped = [i for i in indices if not self.todo(i)]
    elsewhere = [i for i in skipped if running_elsewhere(read_point(self._folder(i)))]
    if elsewhere:
      self.echo(f"{len(elsewhere)} point(s) running in another process (a second sweep on this folder), left to "
                "it: " + ", ".join(map(str, elsewhere)))
    if finished := [i for i in skipped if i not in elsewhere]:
      self.echo(f"{len(finished)} point(s) already finished: " + ", ".join(map(str, finished)))
    queue = [i for i in indices if i not in skipped]
    running: dict[int, tuple[subprocess.Popen, str]] = {}
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda n, _: stop.update(signal=n)) for s in (signal.SIGTERM, signal.SIGINT)}
    log_dir = os.path.join(self.workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    try:
      while (queue or running) and stop["signal"] is None:
        while queue and len(running) < self.parallel:
          index = queue.pop(0)
          folder = self._prepare(index)
          self.echo(f"point {index}/{self.size - 1} {os.path.basename(folder)}: starting")
          log = open(os.path.join(log_dir, os.path.basename(folder) + ".log"), "a")
          proc = subprocess.Popen([sys.executable, "-m", "jft.studies.sweep", folder], stdout=log, stderr=subprocess.STDOUT)
          log.close()
          running[index] = (proc, folder)
        time.sleep(0.2)
        for index, (proc, folder) in list(running.items()):
          if proc.poll() is None:
            continue
          del running[index]
          record = read_point(folder)
          if proc.returncode == TAKEN:
            self.echo(f"point {index}: running in another process (a second sweep on this folder), left to it")
            continue
          if record["status"] == "running":  # the process died without a word (killed, out of memory)
            record.update(status="failed", failures=record.get("failures", 0) + 1,
                          error=f"worker exited with code {proc.returncode}")
            write_point(folder, record)
          if record["status"] == "failed" and record["failures"] < MAX_FAILURES:
            self.echo(f"point {index}: failed ({record['error']}); retrying once")
            queue.insert(0, index)
            continue
          self._tell(folder)
          self.echo(f"point {index}: {record['status']}" + (f" ({record['error']})" if record.get("error") else ""))
    finally:
      for proc, _ in running.values():  # interrupted: the workers checkpoint and stop; a rerun resumes them
        proc.send_signal(signal.SIGTERM)
      for proc, _ in running.values():
        proc.wait()
      for s, h in previous.items():
        signal.signal(s, h)
    rows = report.sweep_report(self.workdir)
    if stop["signal"] is not None:
      self.echo(f"sweep stopped by signal {stop['signal']}; rerun the same command to resume it")
    return rows


def optuna_state(status: str):
  import optuna
  return {"pruned": optuna.trial.TrialState.PRUNED, "failed": optuna.trial.TrialState.FAIL}[status]


@contextlib.contextmanager
def _locked(path: str):
  """An exclusive file lock (workers of one Optuna sweep on several machines share its folder)."""
  import fcntl

  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


if __name__ == "__main__":
  sys.exit(run_point(sys.argv[1]))
