"""The `jft` command line. Each subcommand is a thin shell over library calls.

Layer 8, the top: it may import anything, and it is the only place for
function-local imports (a subcommand loads JAX only when it runs, so
`jft --help` answers at once). `host_memory.py` re-executes the command under
the allocator setting training wants, before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from jft.core.errors import JftError, RunFailure


def _config(args):
  from jft import config as cfg

  return cfg.build(args.config, cfg.parse_overrides(args.overrides))


def _check_join(args):
  """The multi-process flags, checked before the config (and its model) is read."""
  from jft.models import sharding
  sharding.check_distributed_flags(args.coordinator, args.num_processes, args.process_id, args.distributed,
                                   args.distributed_timeout)


def _join(args):
  """Join a multi-process run (explicit flags, or the scheduler's environment with --distributed)."""
  if args.coordinator is not None or args.distributed:
    from jft.models import sharding
    timeout = args.distributed_timeout
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                    timeout=sharding.DEFAULT_DISTRIBUTED_TIMEOUT if timeout is None else timeout)


def _train(args) -> int:
  from jft.models import sharding
  from jft.run.train import train

  _check_join(args)
  config = _config(args)  # every config error surfaces here, before any compute
  if args.init_from:
    from jft import config as cfg
    cfg.override(config, "train.init_from", args.init_from)
  _join(args)
  results = train(config, args.workdir, resume=args.resume, dry_run=args.dry_run)
  if not sharding.is_primary():
    return 0
  print(f"run folder: {os.path.abspath(results['workdir'])}")
  if args.dry_run:
    return 0
  zero = results.get("zero_shot", {})
  if "accuracy" in zero:
    print(f"zero-shot accuracy before training ({zero['split']} split): {zero['accuracy']:.4f}")
  if "test" in results:
    print("after training, test split: " + ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()))
  return 0


def _sweep(args) -> int:
  from jft import config as cfg
  from jft.studies.sweep import Sweep

  sweep = Sweep(args.config, cfg.parse_overrides(args.overrides), args.workdir, search=args.search,
                trials=args.trials, parallel=args.parallel, seed=args.seed)
  rows = sweep.run(only=args.point)
  counts = {}
  for row in rows:
    counts[row["status"]] = counts.get(row["status"], 0) + 1
  print(f"sweep folder: {os.path.abspath(args.workdir)} ({', '.join(f'{n} {s}' for s, n in counts.items())}); "
        f"table: {os.path.join(args.workdir, 'results.md')}")
  return 0


def _pairs(args) -> int:
  from jft.studies.pairs import preference_pairs

  counts = preference_pairs(args.policy, args.reward, args.out, prompts=args.prompts, samples=args.samples,
                            max_new_tokens=args.max_new_tokens, split=args.split, seed=args.seed,
                            overwrite=args.overwrite)
  print(f"wrote {counts['pairs']} pairs from {counts['prompts']} prompts ({counts['ties']} groups skipped: fewer "
        f"than two different non-empty completions) to {args.out}")
  return 0


# `jft data` flags -> the commands they belong to (each is None unless given, so the library's defaults hold)
_DATA_FLAGS = {"model": ("stats", "select"), "words": ("stats",), "bins": ("stats",), "near": ("dedup",),
               "shingle": ("dedup",), "seed": ("dedup",), "min_words": ("filter",), "max_words": ("filter",),
               "max_dup_lines": ("filter",), "max_top_ngram": ("filter",), "max_dup_ngram": ("filter",),
               "max_non_text": ("filter",), "against": ("decontaminate",), "against_field": ("decontaminate",),
               "ngram": ("decontaminate",), "workdir": ("select",), "checkpoint": ("select",), "score": ("select",),
               "fraction": ("select",), "batch_size": ("select",), "max_length": ("select",)}


def _data(args) -> int:
  """`jft data CMD IN... --out OUT`: curate data files (jft.data.curate; select: jft.studies.select)."""
  from jft.data import curate

  cmd = curate.command(args.data_command)
  for name, commands in _DATA_FLAGS.items():
    if getattr(args, name) not in (None, False) and cmd not in commands:
      raise curate.CurationError(f"--{name.replace('_', '-')} applies to jft data {' and '.join(commands)}, "
                                 f"not {cmd}")
  given = lambda *names: {n: getattr(args, n) for n in names if getattr(args, n) is not None}
  common = dict(fields=args.field, overwrite=args.overwrite)
  if cmd == "stats":
    lengths, unit = None, "words"
    if not args.words:
      from jft.models import load_tokenizer

      model = args.model or "smollm2-135m"
      tokenizer = load_tokenizer(model)
      lengths = lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
      unit = f"tokens of {model}"
    result = curate.stats(args.inputs, args.out, lengths=lengths, unit=unit, **given("bins"), **common)
    length = result["length"]
    print(f"{result['rows']} rows, fields {', '.join(result['fields'])}; length ({unit}) median {length['median']}, "
          f"max {length['max']}; {result['exact_duplicates']} exact duplicates")
    print(f"wrote {args.out} and {args.out}.png")
    return 0
  if cmd == "dedup":
    report = curate.dedup(args.inputs, args.out, **given("near", "shingle", "seed"), **common)
  elif cmd == "filter":
    report = curate.filter_rows(args.inputs, args.out, **given("min_words", "max_words", "max_dup_lines",
                                                               "max_top_ngram", "max_dup_ngram", "max_non_text"),
                                **common)
  elif cmd == "decontaminate":
    report = curate.decontaminate(args.inputs, args.out, against=args.against, against_fields=args.against_field,
                                  **given("ngram"), **common)
  else:
    from jft.studies.select import select

    if args.fraction is None:
      raise curate.CurationError("select needs --fraction F, the fraction of rows kept, in (0, 1]")
    report = select(args.inputs, args.out, fraction=args.fraction, model=args.model, workdir=args.workdir,
                    **given("score", "checkpoint", "batch_size", "max_length"), **common)
  detail = report.get("counts") or {k: v["removed"] for k, v in report.get("rules", {}).items()}
  print(f"{cmd}: kept {report['rows_out']} of {report['rows_in']} rows ({len(report['removed'])} removed: "
        f"{', '.join(f'{k} {v}' for k, v in detail.items() if not isinstance(v, dict))})")
  print(f"wrote {args.out} and {args.out}.report.json")
  return 0


def _report(args) -> int:
  from jft.studies.report import report

  print(f"wrote {report(args.dir)}")
  return 0


def _eval(args) -> int:
  if args.harness is not None:
    return _eval_harness(args)
  from jft import run
  from jft.run.train import evaluate_split, examples_for

  r = run.restore(args.workdir, args.checkpoint)
  split = args.split or r.config.data.test_split or r.config.data.eval_split
  examples = examples_for(r.config, r.tokenizer, split, args.limit or None)
  metrics = evaluate_split(r.config, r.model, r.params(), r.tokenizer, examples, reference=r.reference())
  print(json.dumps({"split": split, "examples": len(examples), **metrics}, indent=2))
  return 0


def _eval_harness(args) -> int:
  from jft.studies import harness

  if args.split:
    raise harness.HarnessError("--split does not apply to --harness: each harness task names its own documents")
  results, path = harness.evaluate_run(args.workdir, args.harness, include_path=args.include_path,
                                       limit=args.limit or None, checkpoint=args.checkpoint)
  print(harness.lm_utils.make_table(results))
  print(f"harness results: {path}")
  return 0


def _export(args) -> int:
  from jft.studies import export

  if args.format == "adapters":
    print("jft export: --format adapters is deprecated; use --format trainable", file=sys.stderr)
    args.format = "trainable"
  export.export(args.workdir, args.out, args.format, args.checkpoint, args.overwrite, gguf_type=args.gguf_type)
  print(f"exported {args.format} to {args.out}")
  return 0


def _merge(args) -> int:
  from jft.studies import merge

  from jft import config as cfg

  weights = merge.parse_weights(args.weights)
  record = merge.merge(args.inputs, args.method, weights, args.out, density=args.density, svd_rank=args.svd_rank,
                       seed=args.seed, overwrite=args.overwrite, base=args.base,
                       overrides=cfg.parse_overrides(args.overrides))
  print(f"merged {len(record['inputs'])} adapter(s) by {record['applied']} (rank {record['rank']}) into the run "
        f"folder {args.out} (peft format: {os.path.join(args.out, merge.PEFT_FOLDER)})")
  return 0


def _generate(args) -> int:
  import jax.numpy as jnp

  from jft.models import load_pretrained, load_tokenizer
  from jft.models.generate import GenerationError, Sampling

  # Checked before anything loads.
  args.sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  if args.quantize and args.blocksize < 1:
    raise GenerationError(f"--blocksize {args.blocksize}: must be >= 1")
  empty = [i for i, p in enumerate(args.prompt) if not p.strip()]
  if empty:
    raise GenerationError(f"prompt {empty[0]} is empty")
  dtype = jnp.dtype(args.dtype)
  t0 = time.time()
  if args.workdir:
    from jft import run
    print(f"restoring {args.workdir} ...", file=sys.stderr, flush=True)
    _, model, _, params, tokenizer = run.restore_params(args.workdir, args.checkpoint)
    return _decode(args, model, params, tokenizer, t0)
  print(f"loading {args.model} ...", file=sys.stderr, flush=True)
  model, params = load_pretrained(args.model, dtype=dtype)
  if args.quantize:
    from jft import quant
    params, _ = quant.quantize(params, quant.rules_for(args.quantize), blocksize=args.blocksize)
  tokenizer = load_tokenizer(args.model)
  return _decode(args, model, params, tokenizer, t0)


def _decode(args, model, params, tokenizer, t0) -> int:
  from jft.models.generate import generate_text

  print(f"loaded in {time.time() - t0:.1f}s; generating ...", file=sys.stderr, flush=True)
  t0 = time.time()
  texts = generate_text(model, params, tokenizer, args.prompt, args.sampling, chat=not args.no_chat,
                        seed=args.seed, progress_desc="generating (tokens)")
  for prompt, text in zip(args.prompt, texts):
    if len(args.prompt) > 1:
      print(f"### {prompt}")
    print(text)
  print(f"generated in {time.time() - t0:.1f}s (including compilation)", file=sys.stderr)
  return 0


def _serve(args) -> int:
  from jft.serve import app, engine

  adapters = []
  for spec in args.adapter:  # checked before anything loads
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
      raise engine.EngineError(f"--adapter {spec!r}: expected NAME=RUN_FOLDER")
    adapters.append((name, folder))
  if args.model is None and args.workdir is None:
    raise engine.EngineError("give --model NAME_OR_FOLDER (the base alone) or --workdir RUN (a run's adapter)")
  for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                              ("--max-len", args.max_len, 2), ("--shutdown-timeout", args.shutdown_timeout, 0)):
    if value is not None and value < least:
      raise engine.EngineError(f"{flag} {value}: must be >= {least}")
  app.check_address(args.host, args.port)
  key = args.api_key or os.environ.get("JFT_API_KEY") or None
  if not key and args.host not in ("127.0.0.1", "localhost", "::1"):
    print(f"jft serve: warning: listening on {args.host} without an API key (--api-key or JFT_API_KEY)",
          file=sys.stderr)
  served = engine.load(args.workdir, args.model, adapters, max_batch=args.max_batch, max_queue=args.max_queue,
                       max_len=args.max_len)
  served.start()
  print(f"jft serve: {', '.join(served.names)} on http://{args.host}:{args.port}/v1 ({args.max_batch} slots, "
        f"context {served.context})", file=sys.stderr, flush=True)
  return app.run(served, args.host, args.port, key, shutdown_timeout=args.shutdown_timeout)


def _ablate(args) -> int:
  from jft.studies.ablate import run_ablations

  run_ablations(args.workdir, [args.kind], split=args.split, limit=args.limit, out=args.out,
                checkpoint=args.checkpoint, overwrite=args.overwrite)
  return 0


def _prune(args) -> int:
  from jft.studies.prune import prune

  record = prune(args.out, model=args.model, workdir=args.workdir, data_path=args.data, method=args.method,
                 sparsity_spec=args.sparsity, calibration=args.calibration, max_length=args.max_length,
                 targets=args.targets, drop_layers=args.drop_layers, overwrite=args.overwrite)
  what = [f"{record['method']} {record['pattern']} on {len(record['modules'])} linear layers "
          f"({100 * record['sparsity']:.1f}% of their weights zero)"] if record["pattern"] else []
  if record["dropped_layers"]:
    what.append(f"layers {record['dropped_layers']} dropped ({record['num_hidden_layers']} left)")
  print(f"wrote {args.out}: {'; '.join(what)}; {record['calibration']['rows']} calibration rows, "
        f"{record['seconds']:.1f} s")
  return 0


def _estimate(args) -> int:
  from jft.studies import estimate

  kw = dict(hardware_name=args.hardware, utilization=args.utilization, price_per_hour=args.price_per_hour)
  estimate.hardware(args.hardware)  # a wrong name or setting fails before any config is read
  estimate.check_settings(args.utilization, args.price_per_hour)
  if args.all_methods:
    from jft import config as cfg
    configs = estimate.method_configs(args.config, cfg.parse_overrides(args.overrides))
    results = {name: estimate.analytic(c, name=name, **kw) for name, c in configs.items()}
  else:
    config = _config(args)
    results = {config.method.name: estimate.analytic(config, **kw)}
  if args.json:
    dicts = {name: e.to_dict() for name, e in results.items()}
    print(json.dumps({"methods": dicts} if args.all_methods else next(iter(dicts.values())), indent=2))
  elif args.all_methods:
    e = next(iter(results.values()))
    print(f"{e.model}: batch {e.batch} x {e.length}, {e.dtype}, remat {e.remat}, {e.steps} steps on {e.hardware} at "
          f"{e.utilization:.0%} of {e.peak_flops / 1e12:g} TFLOP/s, ${e.price_per_hour:.2f}/h (typical on-demand "
          "price, edit with --price-per-hour)\n")
    print(estimate.table(results))
  else:
    print(estimate.report(next(iter(results.values()))))
  for e in results.values():
    warning = estimate.memory_warning(e)
    if warning:
      print(warning, file=sys.stderr)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jft", description="Performance-efficient fine-tuning in JAX.")
  parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (or JFT_DEBUG=1)")
  sub = parser.add_subparsers(dest="command", required=True)

  g = sub.add_parser("generate", help="generate text from a pretrained model",
                     description="Generate text with KV-cache decoding (chat template applied if any).")
  g.add_argument("--model", default="smollm2-135m",
                 help="HF folder, .gguf file or embedded model name (default: smollm2-135m)")
  g.add_argument("--workdir", help="generate with a trained run instead of --model")
  g.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  g.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
  g.add_argument("--max-new-tokens", type=int, default=64)
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  g.add_argument("--top-k", type=int, default=0)
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")  # jft.models.COMPUTE_DTYPES
  g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
  g.add_argument("--quantize", choices=("nf4", "fp4", "int4", "int8"),
                 help="quantize the transformer blocks' linear weights (double quantization on)")
  g.add_argument("--blocksize", type=int, default=64, help="quantization block size (default 64)")
  g.set_defaults(run=_generate)

  t = sub.add_parser("train", help="fine-tune from a config file",
                     description="Fine-tune. Override any config field with --config.FIELD=VALUE.",
                     epilog="example: jft train --config configs/sentiment.py:method=lora "
                            "--config.optim.lr=3e-4 --workdir runs/x")
  t.add_argument("--config", required=True, help="configs/FILE.py[:name=value,...]")
  t.add_argument("--workdir", required=True, help="run folder (config, metrics, checkpoints)")
  t.add_argument("--resume", action="store_true", help="continue the run in --workdir from its last checkpoint")
  t.add_argument("--init-from", metavar="RUN", default="",
                 help="start from an earlier run: its adapter (best checkpoint) merged into the base, which is "
                      "then the frozen base and the reference model (= --config.train.init_from=RUN)")
  t.add_argument("--dry-run", action="store_true",
                 help="build and place the state, compile the step, write shardings.json (with the compiled "
                      "step's memory per device), and stop")
  m = t.add_argument_group("multi-process runs (jax.distributed; every process runs the same command)")
  m.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
  m.add_argument("--num-processes", type=int, help="number of processes in the run")
  m.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
  m.add_argument("--distributed", action="store_true",
                 help="join a multi-process run described by the scheduler's environment "
                      "(SLURM, Cloud TPU, Kubernetes indexed jobs, Open MPI)")
  m.add_argument("--distributed-timeout", type=float, metavar="SECONDS",
                 help="give up (exit 2) when not every process has joined after SECONDS (default 300)")
  t.set_defaults(run=_train, accepts_overrides=True)

  s = sub.add_parser("sweep", help="run a hyperparameter sweep defined by a config file's sweep(arg)",
                     description="Run every point of the config file's sweep(arg) as a run folder under "
                                 "WORKDIR/points/. Rerunning the same command resumes. Overrides "
                                 "(--config.FIELD=VALUE) apply to every point.",
                     epilog="example: jft sweep --config configs/sentiment.py:mode=local --workdir runs/sweep "
                            "--parallel 2; on a cluster: one task per point with --point $SLURM_ARRAY_TASK_ID")
  s.add_argument("--config", required=True, help="configs/FILE.py[:name=value,...] (defines sweep(arg))")
  s.add_argument("--workdir", required=True, help="sweep folder (points/, results.csv/md, plots)")
  s.add_argument("--search", choices=("grid", "random", "optuna"), default="grid")
  s.add_argument("--trials", type=int, default=0, help="points of a random/optuna search (default: the space's)")
  s.add_argument("--parallel", type=int, default=1, help="points run at once, each in its own process")
  s.add_argument("--point", type=int, help="run only point K (a scheduler's array index)")
  s.add_argument("--seed", type=int, default=0, help="seed of the random/optuna search itself")
  s.set_defaults(run=_sweep, accepts_overrides=True)

  p = sub.add_parser("pairs", help="sample preference pairs from a run's policy, ranked by a reward (for DPO)")
  p.add_argument("policy", metavar="RUN", help="the policy's run folder (its best checkpoint)")
  p.add_argument("--reward", required=True, help="jft.objectives.reward_functions spec: run:DIR, module:function, file.py:function")
  p.add_argument("--out", required=True, help="JSONL file (prompt/chosen/rejected)")
  p.add_argument("--prompts", type=int, default=400)
  p.add_argument("--samples", type=int, default=4, help="completions per prompt; best = chosen, worst = rejected")
  p.add_argument("--max-new-tokens", type=int, default=24)
  p.add_argument("--split", default="train")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  p.set_defaults(run=_pairs)

  d = sub.add_parser("data", help="curate data files: stats, dedup, filter, decontaminate, select",
                     description="jft data CMD IN... --out OUT: CMD is stats, dedup, filter, decontaminate or select. "
                                 "Each reads JSON (a list of rows) or JSONL files and writes a new file OUT (the rows "
                                 "kept, in input order) and OUT.report.json (every removed row: its 0-based row, the "
                                 "reason, the row kept in its place); inputs are never modified. A flag marked "
                                 "(CMD) belongs to that command only.",
                     epilog="example: jft data dedup data/sentiment/train.jsonl --near 0.8 --out train_dedup.jsonl")
  d.add_argument("data_command", metavar="CMD", help="stats, dedup, filter, decontaminate or select")
  d.add_argument("inputs", nargs="+", metavar="IN", help="JSONL or JSON (list of rows) files")
  d.add_argument("--out", required=True, help="the new file (.jsonl or .json; stats: its JSON, and OUT.png)")
  d.add_argument("--field", default="text", help="the text field, or several joined by newlines "
                 "(instruction,input,output; select: the last is the response); default text")
  d.add_argument("--overwrite", action="store_true", help="replace an existing OUT (never an input)")
  d.add_argument("--model", help="(stats) count tokens of this model's tokenizer (default smollm2-135m); "
                 "(select) score with this model: HF folder, .gguf file or embedded model name")
  d.add_argument("--words", action="store_true", help="(stats) count whitespace words instead of tokens")
  d.add_argument("--bins", type=int, help="(stats) histogram bins (default 40)")
  d.add_argument("--near", type=float, metavar="J", help="(dedup) also near duplicates at Jaccard >= J in (0, 1] of "
                 "word shingles (MinHash LSH, confirmed exactly)")
  d.add_argument("--shingle", type=int, help="(dedup) words per shingle (default 5)")
  d.add_argument("--seed", type=int, help="(dedup) MinHash seed (default 1)")
  d.add_argument("--min-words", type=int, help="(filter) drop rows with fewer words (default 1)")
  d.add_argument("--max-words", type=int, help="(filter) drop rows with more words (default 100000)")
  d.add_argument("--max-dup-lines", type=float, help="(filter) fraction of repeated lines (default 0.30)")
  d.add_argument("--max-top-ngram", type=float, help="(filter) characters in the most frequent 2-gram; 3-, 4-grams "
                 "0.02, 0.04 lower (default 0.20)")
  d.add_argument("--max-dup-ngram", type=float, help="(filter) characters in repeated 5-grams; each n up to 10 0.01 "
                 "lower (default 0.15)")
  d.add_argument("--max-non-text", type=float, help="(filter) fraction of non-space characters that are not letters "
                 "or digits (default 0.30)")
  d.add_argument("--against", nargs="+", metavar="EVAL", help="(decontaminate) evaluation files")
  d.add_argument("--against-field", help="(decontaminate) their text field(s) (default: --field)")
  d.add_argument("--ngram", type=int, help="(decontaminate) words per n-gram (default 13)")
  d.add_argument("--workdir", help="(select) score with a trained run instead of --model")
  d.add_argument("--checkpoint", choices=("best", "latest"), help="(select) the run's checkpoint (default best)")
  d.add_argument("--score", help="(select) loss (mean response loss, default) or ifd (loss given the instruction / "
                 "loss alone); highest kept")
  d.add_argument("--fraction", type=float, help="(select) fraction of rows kept, in (0, 1]")
  d.add_argument("--batch-size", type=int, help="(select) rows per forward pass (default 16)")
  d.add_argument("--max-length", type=int, help="(select) tokens per row (default 512)")
  d.set_defaults(run=_data)

  r = sub.add_parser("report", help="rebuild the table and plots of a sweep folder, or a run's curves")
  r.add_argument("dir", help="a sweep folder (sweep.json) or a run folder (config.json)")
  r.set_defaults(run=_report)

  e = sub.add_parser("eval", help="evaluate a run on a split")
  e.add_argument("--workdir", required=True)
  e.add_argument("--split", help="default: the config's test split")
  e.add_argument("--limit", type=int, default=0, help="first N examples only")
  e.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  e.add_argument("--harness", metavar="TASKS", help="run lm-evaluation-harness tasks instead (comma-separated: "
                 "jft_sentiment, jft_alpaca_heldout, jft_chat or any lm_eval task); writes RUN/harness/results.json")
  e.add_argument("--include-path", metavar="DIR", help="with --harness: a folder of more task YAML files")
  e.set_defaults(run=_eval)

  x = sub.add_parser("export", help="export a run's adapter (peft format), merged model or trainable leaves")
  x.add_argument("--workdir", required=True)
  x.add_argument("--format", choices=("peft", "merged", "trainable", "gguf", "gguf-lora", "adapters"), required=True,
                 help="peft: a peft adapter folder; merged: a transformers checkpoint with the method folded in; "
                      "trainable: jft's own (trainable leaves + method.json); gguf: the merged model as a llama.cpp "
                      "GGUF + Ollama Modelfile; gguf-lora: a LoRA run's adapter as a llama.cpp LoRA GGUF + Modelfile; "
                      "adapters: deprecated name of trainable")
  x.add_argument("--gguf-type", choices=("f32", "f16", "q8_0"), default="f16",
                 help="tensor type of the gguf formats (vectors stay f32; default: f16)")
  x.add_argument("--out", required=True, help="a new or empty folder (written whole, then renamed into place)")
  x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  x.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  x.set_defaults(run=_export)
  mg = sub.add_parser("merge", help="combine LoRA adapters (runs or peft folders) over one base into a new run",
                      description="Combine LoRA adapters as peft's add_weighted_adapter does; the result is a run "
                                  "folder (eval, export, serve, generate take it) with the adapter also in peft's "
                                  "format at OUT/peft/.",
                      epilog="example: jft merge runs/a runs/b --method ties --weights 0.5,0.5 --density 0.5 "
                             "--out runs/ab; --config.FIELD=VALUE edits the merged run's config (e.g. data.path "
                             "when every input is a peft folder)")
  mg.add_argument("inputs", nargs="+", metavar="RUN_OR_PEFT", help="run folders or peft adapter folders")
  mg.add_argument("--method", required=True,
                  help="linear, cat, svd, ties, dare_linear, dare_ties or magnitude_prune (peft's combination_type)")
  mg.add_argument("--weights", required=True, help="one weight per adapter, comma-separated (e.g. 0.5,0.5)")
  mg.add_argument("--density", type=float, help="fraction of entries kept, in (0, 1] (ties, dare_*, magnitude_prune)")
  mg.add_argument("--svd-rank", type=int, help="rank of the svd merge (default: the largest input rank)")
  mg.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops (default 0)")
  mg.add_argument("--base", help="base model of peft folders whose adapter_config.json names none (or another path)")
  mg.add_argument("--out", required=True, help="the new run folder (written whole, then renamed into place)")
  mg.add_argument("--overwrite", action="store_true", help="replace an existing --out (an earlier merge's folder)")
  mg.set_defaults(run=_merge, accepts_overrides=True)
  a = sub.add_parser("ablate", help="evaluate a run with its method removed from layers/modules, truncated in rank "
                                     "or with fewer virtual tokens",
                     description="Restore a run's checkpoint once and evaluate ablations of it on one split; "
                                 "writes ablations.csv, ablations.md and plots to --out.")
  a.add_argument("--workdir", required=True)
  a.add_argument("--kind", choices=("layers", "modules", "rank", "tokens", "all"), default="all",
                 help="all (default): every kind that applies to the run's method")
  a.add_argument("--split", help="default: the config's eval split")
  a.add_argument("--limit", type=int, default=None,
                 help="first N examples only (default: the config's limit for the split; 0 = all)")
  a.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  a.add_argument("--out", help="output folder (default: WORKDIR/ablations), written whole")
  a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  a.set_defaults(run=_ablate)
  n = sub.add_parser("prune", help="prune a model or a run's model (magnitude, Wanda, SparseGPT; N:M; layer dropping)",
                     description="Prune the linear layers of the transformer blocks per output row, block by block "
                                 "on calibration rows, and/or drop the blocks that change the hidden states least; "
                                 "writes a transformers folder with jft_sparsity.json (the pattern and every pruned "
                                 "module's sparsity).",
                     epilog="example: jft prune --model smollm2-135m --data rows.jsonl --method wanda --sparsity 2:4 "
                            "--out pruned/")
  n.add_argument("--model", help="HF folder, .gguf file or embedded model name")
  n.add_argument("--workdir", help="a run: its model (adapter merged) pruned on its training rows")
  n.add_argument("--data", help="with --model: JSONL calibration rows (a 'text' field, or 'prompt' and 'response')")
  n.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="wanda")
  n.add_argument("--sparsity", help="a fraction of zeros per row (0.5) or N:M, N kept of every M inputs (2:4, 4:8)")
  n.add_argument("--calibration", type=int, default=128, help="calibration rows (default 128)")
  n.add_argument("--max-length", type=int, default=256, help="tokens kept of each calibration row (default 256)")
  n.add_argument("--targets", help="regex searched in layers/<i>/<module> (default: every linear layer of the blocks)")
  n.add_argument("--drop-layers", type=float, default=0.0, metavar="FRACTION",
                 help="remove round(FRACTION * layers) contiguous blocks, those closest in angular distance")
  n.add_argument("--out", required=True, help="a new or empty folder (written whole, then renamed into place)")
  n.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  n.set_defaults(run=_prune)
  s = sub.add_parser("estimate", help="estimate a run's memory, FLOPs, time and cost from shapes alone",
                     description="Estimate parameters, step memory, FLOPs, step time and the run's cost without "
                                 "loading weights or running anything. Override any config field with "
                                 "--config.FIELD=VALUE.",
                     epilog="example: jft estimate --config configs/sentiment.py:method=qlora --hardware a100-80g "
                            "--all-methods")
  s.add_argument("--config", required=True, help="configs/FILE.py[:name=value,...]")
  s.add_argument("--hardware", default="cpu", help="cpu (nominal), a100-80g, h100-80g, h200 or tpu-v5e (default cpu)")
  s.add_argument("--price-per-hour", type=float, help="USD per chip-hour (default: a typical on-demand price)")
  s.add_argument("--utilization", type=float, default=0.4, help="fraction of peak FLOP/s reached (default 0.4)")
  s.add_argument("--all-methods", action="store_true", help="every method of the config's methods() table, side by side")
  s.add_argument("--json", action="store_true", help="print one JSON object")
  s.set_defaults(run=_estimate, accepts_overrides=True)
  v = sub.add_parser("serve", help="an OpenAI-compatible server: a base and its adapters, continuously batched",
                     description="Serve /v1/completions and /v1/chat/completions (OpenAI's API) for a base model and "
                                 "adapters trained over it (LoRA, DoRA, IA3), decoding requests for different "
                                 "adapters in one batch. SIGTERM finishes the requests in flight, then exits 0.",
                     epilog="example: jft serve --workdir runs/sft --adapter dpo=runs/dpo --port 8000")
  v.add_argument("--model", help="serve this base alone (HF folder, .gguf file or embedded model name)")
  v.add_argument("--workdir", help="serve this run's adapter (named after the folder) over its base")
  v.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN",
                 help="another run's adapter over the same base; repeat for more")
  v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
  v.add_argument("--port", type=int, default=8000)
  v.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set JFT_API_KEY)")
  v.add_argument("--max-batch", type=int, default=16, help="decode slots: requests decoded together (default 16)")
  v.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
  v.add_argument("--max-len", type=int, help="context per request, prompt + completion (default: the model's, "
                                              "at most 2048); sets the KV cache size")
  v.add_argument("--shutdown-timeout", type=float, default=30.0,
                 help="seconds to let requests in flight finish on SIGTERM (default 30)")
  v.set_defaults(run=_serve)
  for command in sub.choices.values():  # `jft --debug CMD` and `jft CMD ... --debug` alike
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error (or JFT_DEBUG=1)")
  return parser


def _compilation_cache():
  """Keep compiled XLA programs between commands (JAX's persistent cache in `files.cache_dir("xla")`): a
  second `jft train` or `jft eval` of the same shapes loads its steps instead of compiling them again.
  Only before JAX is imported (a command run in-process by a test keeps that process's setting), and
  never over a `JAX_COMPILATION_CACHE_DIR` already set."""
  from jft.core import files

  folder = files.cache_dir("xla")
  if folder and "jax" not in sys.modules and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder


def main(argv=None) -> int:
  """Run one subcommand. Bad input and the environment's failures (a missing or unreadable file, a full
  disk, a corrupt run file) end as one line `jft COMMAND: error: ...`, exit 2 (1: training failed);
  the traceback only with --debug or JFT_DEBUG=1. Anything else is a bug and keeps its traceback."""
  from jft.cli import host_memory  # here, not at the top: `python -m jft.cli.host_memory` imports this package first

  if argv is None and set(sys.argv[1:2]) & host_memory.COMMANDS:  # the `jft` command, before JAX starts
    host_memory.reexec(["-m", "jft.cli", *sys.argv[1:]])
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  if rest and not getattr(args, "accepts_overrides", False):
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  args.overrides = rest
  _compilation_cache()
  debug = getattr(args, "debug", False) or os.environ.get("JFT_DEBUG", "0") not in ("", "0")
  try:
    return args.run(args)
  except KeyboardInterrupt:
    if debug:
      traceback.print_exc()
    print(f"jft {args.command}: interrupted", file=sys.stderr)
    return 130
  except (JftError, OSError, json.JSONDecodeError) as e:
    if debug:
      traceback.print_exc()
    print(f"jft {args.command}: error: {_describe(e)}", file=sys.stderr)
    return 1 if isinstance(e, RunFailure) else 2


def _describe(e: BaseException) -> str:
  """One line saying what failed and where: the file, or else the jft code that was running."""
  if isinstance(e, JftError):
    return str(e)
  if isinstance(e, json.JSONDecodeError):
    return f"{_open_file(e) or 'a JSON file'}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})"
  what = e.strerror or str(e) or type(e).__name__
  where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or _open_file(e)
  return f"{where}: {what}" if where else f"{what} (in {_jft_frame(e)})"


def _open_file(e: BaseException) -> str | None:
  """The file the failing code had open (json.load's `fp`, a `with open(...) as f`): the innermost
  frame's local file object. Python's errors from reads and writes of open files carry no name."""
  import io

  for frame, _ in reversed(list(traceback.walk_tb(e.__traceback__))):
    for value in frame.f_locals.values():
      if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
        return value.name
  return None


def _jft_frame(e: BaseException) -> str:
  """`function, jft/file.py:line` of the innermost jft frame of the traceback."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the jft package
  inner = [(f.f_code, line) for f, line in traceback.walk_tb(e.__traceback__) if f.f_code.co_filename.startswith(here)]
  if not inner:
    return "jft"
  code, line = inner[-1]
  return f"{code.co_name}, {os.path.relpath(code.co_filename, os.path.dirname(here))}:{line}"

