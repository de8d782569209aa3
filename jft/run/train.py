"""`train(config, workdir)`: one flat fine-tuning run, top to bottom.

Sections: run folder -> model, method, quantization -> data -> state (eval_shape ->
shardings -> jitted init) -> resume -> zero-shot evaluation -> loop (step, log,
evaluate, checkpoint, stop on signal or non-finite loss) -> test evaluation ->
summary. The step itself lives in `jft.run.step`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np

from jft import data, objectives, peft, run
from jft.models import sharding
from jft.config import schema
from jft.core import errors, files, progress, rules
from jft.core.lock import workdir_lock
from jft.models.pretrained import model_config
from jft.run import checkpoint, memory, plot, state
from jft.run.assemble import check_teacher, load_teacher
from jft.config.schema import _close
from jft.core.errors import JftError
from jft.run.step import make_train_step


class TrainingError(errors.RunFailure, RuntimeError):
  """Training failed while it ran (a diverged loss, a full disk): exit 1."""


class TrainingRefused(JftError, ValueError):
  """A run refused before any work (a folder that holds another run, a resume with another config): exit 2."""


def examples_for(config, tokenizer, split: str, limit):
  """The examples of one split, as the config's objective reads them."""
  return objectives.from_config(config).examples(config.data, tokenizer, split, limit)


def evaluate_split(config, model, params, tokenizer, examples, mesh=None, reference=None) -> dict:
  """The objective's evaluation of `examples` (`model` as the method configured it)."""
  forward = objectives.Forward(model, model, params, reference)
  return objectives.from_config(config).evaluate(config, forward, tokenizer, examples, mesh=mesh)


class _Log:
  """metrics.jsonl + TensorBoard, one call per event; process 0 only (the others log nothing).

  On resume, records after the restored step are dropped first, so steps
  redone after an interruption appear once (and so is a line cut short by a
  crash or a full disk). A failed write stops the run with the file named.
  """

  def __init__(self, workdir: str, resumed_step: int | None = None, enabled: bool = True, echo=print):
    self.enabled = enabled
    if not enabled:
      return
    path = self.path = os.path.join(workdir, "metrics.jsonl")
    if resumed_step is not None and os.path.isfile(path):
      with open(path, "rb") as f:
        lines = [(raw, files.parse_record(raw)) for raw in f if raw.strip()]
      damaged = [raw for raw, record in lines if record is None]
      if damaged[:-1] or (damaged and damaged[-1].endswith(b"\n")):  # more than a last line cut short
        aside = os.path.join(workdir, "corrupt", "metrics.jsonl.damaged")
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        with open(aside, "ab") as f:
          f.writelines(raw if raw.endswith(b"\n") else raw + b"\n" for raw in damaged)
        echo(f"warning: {path}: {len(damaged)} damaged line(s) set aside in {aside}")
      with files.write_file(path, "wb") as f:
        f.writelines(raw for raw, record in lines if record is not None and record["step"] <= resumed_step)
    self.file = open(path, "a")
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:  # TensorBoard is optional; metrics.jsonl always exists
      self.tb = None

  def __call__(self, step: int, kind: str, metrics: dict):
    if not self.enabled:
      return
    record = {"step": step, "kind": kind, "time": time.time(), **metrics}
    try:
      self.file.write(json.dumps(record) + "\n")
      self.file.flush()
    except OSError as e:
      raise TrainingError(f"writing {self.path} failed at step {step} ({e.strerror or e}); stopped. The "
                          "checkpoints saved before are intact: free the space and continue with --resume") from e
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(f"{kind}/{k}", v, step)

  def close(self):
    if not self.enabled:
      return
    self.file.close()
    if self.tb is not None:
      self.tb.close()


# Fields that say where arrays live, not what is computed: a run may resume on another mesh.
LAYOUT_FIELDS = ("mesh", "axis_rules", "sharding_overrides")


def _same_run(saved: dict, current: dict) -> bool:
  norm = lambda d: json.loads(json.dumps({**d, "train": {k: v for k, v in d.get("train", {}).items()
                                                           if k not in LAYOUT_FIELDS}}))
  return norm(saved) == norm(current)


def train(config, workdir: str, resume: bool = False, echo=print, dry_run: bool = False, on_eval=None) -> dict:
  """Fine-tune as `config` says; every process of a multi-process run calls this.

  `dry_run` builds and places the state, compiles the step and writes
  `shardings.json` (with the compiled step's memory analysis), then stops;
  into a folder that holds a run it writes only under `WORKDIR/dry-run/`.
  `on_eval(step, metrics)` is called after every periodic evaluation; when it
  returns True the run stops there, checkpointed, marked `pruned` (a sweep's
  pruner uses this). Process 0 holds `WORKDIR/.lock` throughout (`jft.core.lock`):
  a second run on the same folder fails at once instead of writing it too.
  """
  if dry_run and os.path.isfile(os.path.join(workdir, "config.json")):  # never rewrite a run's own files
    workdir = os.path.join(workdir, "dry-run")
    if sharding.is_primary():
      echo(f"dry run: {os.path.dirname(workdir)} holds a run; writing under {workdir}")
  with workdir_lock(workdir, enabled=sharding.is_primary()):
    return {**_train(config, workdir, resume, echo, dry_run, on_eval), "workdir": workdir}


def _train(config, workdir, resume, echo, dry_run, on_eval) -> dict:
  t_start = time.time()
  phases = _Phases()
  c = config
  primary = sharding.is_primary()
  if not primary:
    echo = lambda *a, **k: None

  # ---- Run folder ------------------------------------------------------------
  os.makedirs(workdir, exist_ok=True)
  has_checkpoints = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
      n.isdigit() for n in os.listdir(os.path.join(workdir, "checkpoints")))
  if has_checkpoints and not resume and not dry_run:
    raise TrainingRefused(f"{workdir} already holds checkpoints: pass --resume to continue it, "
                        "or choose a new --workdir")
  if resume and os.path.isfile(os.path.join(workdir, "config.json")):
    if not _same_run(run.read_config(workdir).to_dict(), c.to_dict()):
      raise TrainingRefused(f"{workdir}: --resume with a config that differs from the run's config.json "
                          f"(only train.{', train.'.join(LAYOUT_FIELDS)} may change)")
  if primary:
    run.write_json(os.path.join(workdir, "config.json"), c.to_dict())
    run.write_json(os.path.join(workdir, "versions.json"), run.versions())

  # ---- Model, method, quantization -------------------------------------------
  schema.validate_against_model(c, model_config(c.model.name))  # from config.json: no weights read yet
  check_teacher(c)  # a distillation's teacher: it exists and shares the tokenizer (metadata only)
  identity = run.base_identity(c.model.name)
  run.check_base(workdir, identity)
  if primary:
    run.write_json(os.path.join(workdir, "base.json"), identity)
  mesh = sharding.make_mesh(c.train.mesh.to_dict())
  echo(f"backend {jax.default_backend()}: {jax.device_count()} device(s) "
       f"({', '.join(sorted({d.device_kind for d in jax.devices()}))})")
  sharding.check_batch(mesh, c.train.batch_size)
  model, base, method, tokenizer = run.build_model(c, mesh)
  teacher = load_teacher(c, model, mesh)  # (model, params) or None; frozen, outside the state
  echo(f"model {c.model.name}, method {method.name}" + (f" on a {c.quant.format} base" if c.quant.format else "")
       + f"; mesh {dict(mesh.shape)} over {jax.process_count()} process(es)")

  # ---- Objective and data ----------------------------------------------------
  d = c.data
  objective = objectives.from_config(c)
  if d.pack and not objective.packable:
    raise TrainingRefused(f"data.pack=True: objective {objective.name} keeps its rows apart (pairs, groups); "
                        "set --config.data.pack=false")
  train_examples = examples_for(c, tokenizer, d.train_split, d.max_train_examples or None)
  eval_examples = examples_for(c, tokenizer, d.eval_split, d.max_eval_examples or None) if d.eval_split else []
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  if objective.online and jax.process_count() > 1:
    raise TrainingRefused(f"objective {objective.name} samples on one process; multi-process runs are not "
                        "supported for online objectives yet")
  train_rows = objective.rows(train_examples, tokenizer, d)
  data.check_token_ids(train_rows, model.config.vocab_size, f"{d.path} ({d.train_split} split)")
  batches = data.Batches(train_rows, objective.rows_per_batch(c.train.batch_size),
                         d.max_length, seed=c.seed, pack=d.pack, bucket=d.bucket, pad_id=pad_id,
                         shard=sharding.process_rows(mesh, c.train.batch_size), collate=objective.collate,
                         length=objective.row_length)

  # ---- State: eval_shape -> shardings -> jitted init (jft.run.state) ---------------
  st = run.build_state(c, method, base, mesh)
  objectives.check_base_view(method, rules.flatten(base), rules.flatten(st.trainable), objective)
  del base
  trainable, frozen, opt_state = st.trainable, st.frozen, st.opt_state
  counts = peft.count(method, peft.combine(trainable, frozen))
  echo(str(counts))
  step_fn = make_train_step(model, method, st.tx, skip_nonfinite=c.train.nan_policy == "skip",
                            shardings=st.step_shardings(), objective=objective, teacher=teacher)
  rng = jax.random.PRNGKey(c.seed + 1)
  eval_model = method.configure(model)
  layout_path = os.path.join(workdir, "shardings.json")
  if dry_run:
    step_bytes = memory.compiled_step_memory(step_fn, st, c.train.batch_size, d.max_length)
    if primary:
      sharding.write_layout(layout_path, {"params": peft.combine(trainable, frozen), "opt_state": opt_state},
                            mesh, {"compiled_step_memory": step_bytes})
    echo(f"dry run: wrote {layout_path}; compiled step per device: "
         + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in step_bytes.items()))
    return {"counts": counts, "compiled_step_memory": step_bytes, "mesh": dict(mesh.shape)}
  if primary:
    sharding.write_layout(layout_path, {"params": peft.combine(trainable, frozen), "opt_state": opt_state}, mesh)

  def run_params(trainable_):
    return method.materialize(peft.combine(trainable_, frozen))

  reference = objectives.base_view(method, frozen) if objective.uses_reference else None

  def evaluate_on(params, examples, phase="evaluation"):
    with phases(phase):
      return evaluate_split(c, eval_model, params, tokenizer, examples, mesh=mesh, reference=reference)

  # ---- Resume ----------------------------------------------------------------
  mngr = checkpoint.manager(workdir, c.train.keep, writer=primary, report=echo)
  best_mngr = run.best_manager(workdir, writer=primary, report=echo, latest=mngr)
  for folder in (mngr, best_mngr):
    for leftover in folder.remove_leftovers():
      echo(f"removed {leftover} in {folder.directory}: a save interrupted by an earlier process")
  start, best = 0, None
  if resume:
    restored = None
    try:
      restored = mngr.restore(checkpoint.abstract({"trainable": trainable, "opt_state": opt_state}),
                              upgrade=method.upgrade_path, report=echo, seal=True)
    except errors.CorruptCheckpointError:  # every step is broken: keep them aside, start again
      moved = [mngr.set_aside(s, why) for s, why in mngr.broken_after(-1)]
      echo(f"--resume: no intact checkpoint in {mngr.directory} (moved to {', '.join(moved)})")
    if restored is None:
      echo(f"--resume: no checkpoint to continue from in {workdir}; starting from step 0")
    else:
      start, saved, meta = restored
      for broken, why in mngr.broken_after(start):  # out of the way of the steps about to be redone
        echo(f"checkpoint step {broken} is {why}: moved to {mngr.set_aside(broken, why)}")
      trainable, opt_state = saved["trainable"], saved["opt_state"]
      batches.restore(meta["data"])
      best = meta.get("best")
      echo(f"resumed from step {start}")
  log = _Log(workdir, resumed_step=start if resume else None, enabled=primary, echo=echo)

  def save(step: int, position=None):
    with phases("checkpoints"):
      mngr.save(step, {"trainable": trainable, "opt_state": opt_state},
                {"data": position or batches.state(), "best": best, "step": step})

  # ---- Zero-shot evaluation --------------------------------------------------
  results = {"counts": {"trainable": counts.trainable, "total": counts.total, "percent": counts.percent},
             "data": {"splits": {d.train_split: data.split_record(d, d.train_split, len(train_examples)),
                                 **({d.eval_split: data.split_record(d, d.eval_split, len(eval_examples))}
                                    if d.eval_split else {})}}}
  zero_split = {"eval": d.eval_split, "test": d.test_split}[c.eval.zero_shot_split]
  if start == 0 and c.eval.zero_shot and zero_split:
    limit = d.max_eval_examples if c.eval.zero_shot_split == "eval" else d.max_test_examples
    zero = evaluate_on(run_params(trainable), examples_for(c, tokenizer, zero_split, limit or None), "zero-shot")
    if unknown := _unknown_metric(c, zero):
      raise TrainingError(f"{unknown}; nothing was trained")
    results["zero_shot"] = {"split": zero_split, **zero}
    log(0, "zero_shot", {"split": zero_split, **zero})
    echo("zero-shot " + _fmt(zero))

  samples_path = os.path.join(workdir, "samples.json")
  if start == 0 and eval_examples:
    with phases("samples"):
      before = objective.samples(c, objectives.Forward(eval_model, eval_model, run_params(trainable), reference),
                                 tokenizer, eval_examples)
    if before and primary:
      run.write_json(samples_path, {"before": before})

  # ---- Loop ------------------------------------------------------------------
  stop = {"signal": None, "pruned": False}

  def on_signal(signum, _frame):
    stop["signal"] = signum

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  bar = progress.TrainingBar(c.train.steps, start, enabled=primary)
  last_saved, t_last, tokens_since, steps_since = start, time.time(), 0, 0
  step = start
  try:
    for step in range(start, c.train.steps):
      t_step = time.time()
      position = batches.state()
      host, rollout = next(batches), {}
      if objective.online:
        policy = objectives.Forward(eval_model, eval_model, run_params(trainable))
        try:
          host, rollout = objective.rollout(host, policy, tokenizer, seed=c.seed * 1_000_003 + step,
                                            where=f"step {step + 1}")
        except JftError as e:
          save(step, position)
          raise TrainingError(f"{e}; nothing lost: checkpoint saved at step {step} in {workdir} (fix the cause "
                              "and continue with --resume)") from e
      batch = sharding.global_batch(mesh, host, c.train.batch_size)
      trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch,
                                              np.asarray(jax.random.fold_in(rng, step)))
      metrics = jax.device_get(metrics)  # one host transfer per step (the loss is checked every step)
      phases.add("training steps", time.time() - t_step)
      loss = float(metrics["loss"])
      tokens_since += int(metrics["tokens"])
      steps_since += 1
      if not math.isfinite(loss) and c.train.nan_policy == "stop":
        raise TrainingError(f"non-finite loss ({loss}) at step {step + 1}; stopped. The last good checkpoint is "
                            f"step {last_saved} in {workdir} (resume with --resume after fixing the cause)")
      done = step + 1
      if done % c.train.log_every == 0 or done == c.train.steps:
        dt = time.time() - t_last  # training steps only: evaluations and checkpoints are not counted
        rate = tokens_since / max(dt, 1e-9)
        record = {"loss": loss, "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": rate,
                  "step_seconds": dt / steps_since, "skipped": int(metrics.get("skipped", 0)),
                  **{k: float(v) for k, v in metrics.items() if k not in ("loss", "grad_norm", "tokens", "skipped")},
                  **rollout}
        log(done, "train", record)
        bar.update(done, loss, rate)
        t_last, tokens_since, steps_since = time.time(), 0, 0
      t_other = time.time()
      if eval_examples and c.train.eval_every and done % c.train.eval_every == 0 and done < c.train.steps:
        ev = evaluate_on(run_params(trainable), eval_examples)
        log(done, "eval", ev)
        bar.write(f"step {done}: eval " + _fmt(ev))
        if unknown := _unknown_metric(c, ev):
          save(done)
          raise TrainingError(f"{unknown}; nothing lost: checkpoint saved at step {done} in "
                              f"{workdir} (fix eval.metric and continue with --resume)")
        best = _track_best(c, best, done, ev, best_mngr, trainable)
        if on_eval is not None and on_eval(done, ev):
          stop.update(signal="pruned", pruned=True)
      stopping = _any_process(stop["signal"] is not None)
      if (done % c.train.save_every == 0 and done < c.train.steps) or stopping:
        save(done)
        last_saved = done
      t_last += time.time() - t_other
      if stopping:
        stop["signal"] = stop["signal"] or "from another process"
        bar.write(f"pruned after step {done} (its evaluation fell behind); checkpoint saved" if stop["pruned"] else
                  f"stopped by signal {stop['signal']} after step {done}; checkpoint saved, resume with --resume")
        break
  finally:
    bar.close()
    for s, h in previous.items():
      signal.signal(s, h)

  interrupted = stop["signal"] is not None
  if not interrupted:
    if eval_examples:
      ev = evaluate_on(run_params(trainable), eval_examples)
      log(c.train.steps, "eval", ev)
      if unknown := _unknown_metric(c, ev):  # the run is complete: said, not raised
        echo(f"warning: {unknown}; no best checkpoint was tracked")
      best = _track_best(c, best, c.train.steps, ev, best_mngr, trainable)
      results["validation"] = ev
      echo("validation " + _fmt(ev))
    if mngr.latest_step() != c.train.steps:
      save(c.train.steps)
    with phases("samples"):
      after = objective.samples(c, objectives.Forward(eval_model, eval_model, run_params(trainable), reference),
                                tokenizer, eval_examples) if eval_examples else []
    if after and primary:
      saved = files.read_json(samples_path, "run's samples") if os.path.isfile(samples_path) else {}
      run.write_json(samples_path, {**saved, "after": after})

  # ---- Test evaluation (the best checkpoint) ---------------------------------
  if not interrupted and d.test_split:
    test_examples = examples_for(c, tokenizer, d.test_split, d.max_test_examples or None)
    params = run_params(trainable)
    if best is not None and best["step"] != c.train.steps:
      _, saved, _ = best_mngr.restore({"trainable": checkpoint.abstract(trainable)}, upgrade=method.upgrade_path)
      params = run_params(saved["trainable"])
    results["data"]["splits"][d.test_split] = data.split_record(d, d.test_split, len(test_examples))
    results["test"] = evaluate_on(params, test_examples, "test")
    log(c.train.steps, "test", results["test"])
    echo("test " + _fmt(results["test"]))
  results.update(steps=step + 1 if interrupted else c.train.steps, interrupted=interrupted, pruned=stop["pruned"],
                 best=best, seconds=time.time() - t_start, peak_rss_mib=_peak_rss_mib(),
                 phases=phases.summary(time.time() - t_start))
  log.close()
  if primary:
    run.write_json(os.path.join(workdir, "results.json"), results)
    plot.plot_run(workdir)
    _write_summary(workdir, c, method, results)
  return results


class _Phases:
  """Seconds spent per phase of a run (training steps, evaluation, checkpoints...), for summary.md."""

  def __init__(self):
    self.seconds = {}

  def add(self, name: str, seconds: float):
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds

  @contextlib.contextmanager
  def __call__(self, name: str):
    t = time.time()
    try:
      yield
    finally:
      self.add(name, time.time() - t)

  def summary(self, total: float) -> dict:
    """Every phase, plus `setup and other` (loading, placing, what no phase covers) so that they add up to `total`."""
    return {"setup and other": max(total - sum(self.seconds.values()), 0.0), **self.seconds}


def _peak_rss_mib() -> float:
  """This process's peak resident memory (a sweep runs each point in its own process)."""
  import resource
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _any_process(flag: bool) -> bool:
  """True if any process has `flag` (a signal reaches one process; all must stop and save together)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _unknown_metric(c, ev: dict) -> str | None:
  """Why eval.metric cannot pick the best checkpoint (it is not among the evaluation's metrics), or None.

  Which metrics an evaluation reports depends on the objective and its settings
  (a judge, exact match...), so the first evaluation checks it; a typo would
  otherwise never track a best checkpoint, silently."""
  if c.eval.metric in ev:
    return None
  return (f"eval.metric={c.eval.metric!r} is not a metric the {c.objective.name} evaluation reports"
          f"{_close(c.eval.metric, ev)}; it reports {', '.join(sorted(ev))}")


def _track_best(c, best, step, ev, mngr, trainable):
  metric = c.eval.metric
  if metric not in ev:
    return best
  better = best is None or (ev[metric] > best["value"] if metric != "loss" else ev[metric] < best["value"])
  if better:
    best = {"step": step, "metric": metric, "value": ev[metric]}
    if step in mngr.steps():  # redone after a resume from an older step
      problem = mngr.problem(step)  # hashes the step's files: once
      if problem is None:
        mngr.seal(step)  # a best step finalized just before a kill has no checksums yet
        return best  # the same params (resumes are exact), kept as saved
      mngr.set_aside(step, problem)
    mngr.save(step, {"trainable": trainable}, best)
  return best


def _fmt(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _samples_section(path: str) -> list[str]:
  """Held-out prompts with the reference and the model's output before and after training."""
  if not os.path.isfile(path):
    return []
  saved = files.read_json(path, "run's samples")
  before, after = saved.get("before", []), saved.get("after", [])
  lines = ["", "## Held-out samples, before and after training"]
  quote = lambda text: "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())
  for i in range(max(len(before), len(after))):
    ex = (after or before)[i]
    prompt = ex["prompt"] if len(ex["prompt"]) <= 400 else "..." + ex["prompt"][-400:]
    lines += ["", f"### {i + 1}", "", "```text", prompt.strip(), "```"]
    if ex.get("reference"):
      reference = ex["reference"] if len(ex["reference"]) <= 600 else ex["reference"][:600] + " ..."
      lines += ["", "reference:", "", quote(reference)]
    for label, rows in (("before training", before), ("after training", after)):
      if i < len(rows):
        lines += ["", f"{label}:", "", quote(rows[i]["generated"])]
  return lines


def _write_summary(workdir: str, c, method, results: dict):
  lines = [f"# Run {os.path.basename(os.path.abspath(workdir))}", "",
           f"- model: `{c.model.name}` ({c.model.dtype}), method: `{method.name}` "
           f"{json.dumps(c.method.hparams.to_dict())}" + (f", base quantized to {c.quant.format}" if c.quant.format else ""),
           f"- trainable: {results['counts']['trainable']:,} of {results['counts']['total']:,} "
           f"({results['counts']['percent']:.4f}%)",
           f"- steps: {results['steps']} x batch {c.train.batch_size}, {results['seconds']:.0f} s"
           + (" (interrupted)" if results["interrupted"] else "")]
  if splits := results.get("data", {}).get("splits"):
    lines.append("- data: " + ", ".join(f"{name} {r['rows']} rows from {os.path.basename(r['source'])}"
                                        + (" (held out)" if r["holdout"] else "") for name, r in splits.items()))
  if results.get("phases"):
    lines.append("- time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results["phases"].items()))
  for key in ("zero_shot", "validation", "test"):
    if key in results:
      lines.append(f"- {key.replace('_', '-')}: " + _fmt(results[key]))
  if results.get("best"):
    b = results["best"]
    lines.append(f"- best {b['metric']}: {b['value']:.4f} at step {b['step']}")
  if os.path.isfile(os.path.join(workdir, "curves.png")):
    lines += ["", "![loss and evaluation curves](curves.png)"]
  lines += _samples_section(os.path.join(workdir, "samples.json"))
  with files.write_file(os.path.join(workdir, "summary.md")) as f:
    f.write("\n".join(lines) + "\n")
