"""The `jft` command line. Each subcommand is a thin shell over library calls."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args) -> int:
  import jax.numpy as jnp

  from jft.models import load_pretrained, load_tokenizer
  from jft.models.generate import Sampling, generate_text

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  t0 = time.time()
  print(f"loading {args.model} ...", file=sys.stderr, flush=True)
  model, params = load_pretrained(args.model, dtype=dtype)
  if args.quantize:
    from jft import quant
    params, _ = quant.quantize(params, ((r"layers/.*/kernel", args.quantize),), blocksize=args.blocksize)
  tokenizer = load_tokenizer(args.model)
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
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
