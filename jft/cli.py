"""The `jft` command line. Each subcommand is a thin shell over library calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _config(args):
  from jft import config as cfg

  return cfg.build(args.config, cfg.parse_overrides(args.overrides))


def _join(args):
  """Join a multi-process run (explicit flags, or the scheduler's environment with --distributed)."""
  if args.coordinator or args.distributed:
    from jft import sharding
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)


def _train(args) -> int:
  from jft import sharding
  from jft.train import train

  config = _config(args)  # every config error surfaces here, before any compute
  _join(args)
  results = train(config, args.workdir, resume=args.resume, dry_run=args.dry_run)
  if not sharding.is_primary():
    return 0
  print(f"run folder: {os.path.abspath(args.workdir)}")
  if args.dry_run:
    return 0
  zero = results.get("zero_shot", {})
  if "accuracy" in zero:
    print(f"zero-shot accuracy before training ({zero['split']} split): {zero['accuracy']:.4f}")
  if "test" in results:
    print("after training, test split: " + ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()))
  return 0


def _eval(args) -> int:
  from jft import run
  from jft.train import evaluate_split, examples_for

  config, model, method, params, tokenizer = run.restore_params(args.workdir, args.checkpoint)
  split = args.split or config.data.test_split
  examples = examples_for(config, tokenizer, split, args.limit or None)
  metrics = evaluate_split(config, model, params, tokenizer, examples)
  print(json.dumps({"split": split, "examples": len(examples), **metrics}, indent=2))
  return 0


def _export(args) -> int:
  import shutil

  from jft import quant, rules, run
  from jft.models.pretrained import save_pretrained
  from jft.peft import peft_format

  if args.format == "adapters":
    print("jft export: --format adapters is deprecated; use --format trainable", file=sys.stderr)
    args.format = "trainable"
  out = _export_target(args)
  config, model, method, params, tokenizer = run.restore_params(args.workdir, args.checkpoint)
  tmp = f"{out}.tmp-{os.getpid()}"  # written whole, then renamed into place: never half an export
  shutil.rmtree(tmp, ignore_errors=True)
  if args.format == "peft":
    peft_format.export_peft(method, params, model.config, tmp, base_model=config.model.name)
  elif args.format == "merged":
    merged, _ = method.merge(params)
    dense = {p: (quant.dequantize(v) if quant.is_quantized(v) else v) for p, v in rules.flatten(merged).items()}
    save_pretrained(model, rules.unflatten(dense), tmp, tokenizer=tokenizer)
  else:  # trainable: jft's own format, the trainable leaves as safetensors + the method's hyperparameters
    from safetensors.numpy import save_file
    import numpy as np
    from jft import peft
    trainable, _ = peft.split(method, params)
    os.makedirs(tmp, exist_ok=True)
    save_file({p: np.asarray(v) for p, v in rules.flatten(trainable).items()},
              os.path.join(tmp, "trainable.safetensors"))
    run.write_json(os.path.join(tmp, "method.json"), method.hparams())
  if os.path.exists(out):
    shutil.rmtree(out)
  os.replace(tmp, out)
  print(f"exported {args.format} to {out}")
  return 0


def _export_target(args) -> str:
  """The export folder, refused when it is the run, holds the run or its base, or is not empty."""
  import json as _json

  from jft import run

  out = os.path.realpath(args.out)
  protected = [os.path.realpath(args.workdir)]
  base_json = os.path.join(args.workdir, "base.json")
  if os.path.isfile(base_json):
    with open(base_json) as f:
      protected.append(os.path.realpath(_json.load(f)["path"]))
  for path in protected:
    if out == path or path.startswith(out + os.sep):  # replacing `out` would delete it
      raise run.RunError(f"--out {args.out}: refusing to write over or into {path} (the run or its base model)")
  if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not args.overwrite):
    raise run.RunError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it")
  return out


def _generate(args) -> int:
  import jax.numpy as jnp

  from jft.models import load_pretrained, load_tokenizer

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
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
    params, _ = quant.quantize(params, ((r"layers/.*/kernel", args.quantize),), blocksize=args.blocksize)
  tokenizer = load_tokenizer(args.model)
  return _decode(args, model, params, tokenizer, t0)


def _decode(args, model, params, tokenizer, t0) -> int:
  from jft.models.generate import Sampling, generate_text

  print(f"loaded in {time.time() - t0:.1f}s; generating ...", file=sys.stderr, flush=True)
  sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  t0 = time.time()
  texts = generate_text(model, params, tokenizer, args.prompt, sampling, chat=not args.no_chat,
                        seed=args.seed)
  for prompt, text in zip(args.prompt, texts):
    if len(args.prompt) > 1:
      print(f"### {prompt}")
    print(text)
  print(f"generated in {time.time() - t0:.1f}s (including compilation)", file=sys.stderr)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jft", description="Performance-efficient fine-tuning in JAX.")
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
  g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
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
  t.set_defaults(run=_train, accepts_overrides=True)

  e = sub.add_parser("eval", help="evaluate a run on a split")
  e.add_argument("--workdir", required=True)
  e.add_argument("--split", help="default: the config's test split")
  e.add_argument("--limit", type=int, default=0, help="first N examples only")
  e.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  e.set_defaults(run=_eval)

  x = sub.add_parser("export", help="export a run's adapter (peft format), merged model or trainable leaves")
  x.add_argument("--workdir", required=True)
  x.add_argument("--format", choices=("peft", "merged", "trainable", "adapters"), required=True,
                 help="peft: a peft adapter folder; merged: a transformers checkpoint with the method folded in; "
                      "trainable: jft's own (trainable leaves + method.json); adapters: deprecated name of trainable")
  x.add_argument("--out", required=True, help="a new or empty folder (written whole, then renamed into place)")
  x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  x.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  x.set_defaults(run=_export)
  return parser


def main(argv=None) -> int:
  from jft.errors import JftError

  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  if rest and not getattr(args, "accepts_overrides", False):
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  args.overrides = rest
  try:
    return args.run(args)
  except JftError as e:  # bad input: one clear line, no traceback
    print(f"jft {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
