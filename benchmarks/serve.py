"""`jft serve` under concurrent clients, against transformers `generate` and llama-cpp-python's OpenAI server.

    python benchmarks/serve.py --out serve.md   # SmolLM2-135M, 4 LoRA adapters (2 cores: ~40 min cold, ~13 min reused)
    python benchmarks/serve.py --peers transformers           # without the llama.cpp side
    python benchmarks/serve.py --quick --peers transformers   # smoke run: a tiny random model, 2 adapters

One run, every side one after another (never two at once), each pinned to the same `--threads` cores:
  - transformers: the merged 1-adapter model (`jft export --format merged`), float32, greedy `generate`, one
    request at a time (torch.set_num_threads);
  - jft serve with 1 adapter, then with N distinct adapters (clients round-robin over their names): concurrency
    1, 4 and 16 (the server has as many decode slots as the largest), XLA on the pinned cores;
  - llama-cpp-python's server on the GGUF `jft export --format gguf --gguf-type f32` (and f16) writes from the same
    merged run (--n_threads = --threads; it decodes one request at a time: its lock serialises them).
The adapters are `jft train` runs of configs/sentiment.py (LoRA, different seeds) kept in --workdir, so a rerun
reuses them and their exports. In each cell every client sends `--rounds` completions back to back (streamed,
temperature 0, fixed max_tokens; a request may stop at EOS, so tokens are counted from the server's usage (jft)
or its chunks (llama.cpp: one per token)). Before any timed
cell every prompt is sent once (every prefill bucket compiled; jft's /health compile counts are checked to stay
put during the timed cells). Reported per cell: generated tokens/s (all completion tokens / wall time),
p50/p95 time to first token, p50/p95 time between streamed chunks, the server's peak RSS (VmHWM, loading
included) and its RSS after the cell (VmRSS: what serving holds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTIMENT = os.path.join(ROOT, "configs", "sentiment.py")
REVIEWS = os.path.join(ROOT, "data", "sentiment", "test.jsonl")
# A prompt that makes SmolLM2 write on (the sentiment template itself is answered in one word and EOS).
TEMPLATE = 'Here is a short movie review: "{text}"\nA longer version of this review:'
TARGETS = {"llama_cpp": 2.0, "transformers": 4.0, "adapters": 0.8, "rss": 1.1}


class BenchError(RuntimeError):
  """A side of the benchmark that could not run (the message names which and its log)."""


def _options(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="a tiny random model, 2 adapters, concurrency 1 and 2, 8 tokens")
  p.add_argument("--model", help="base: HF folder, .gguf or embedded name (default smollm2-135m; --quick: a tiny "
                 "random Llama built in --workdir)")
  p.add_argument("--workdir", help="adapters, exports and logs, reused by later runs (default runs/servebench; "
                 "--quick: a temporary folder)")
  p.add_argument("--peers", default="transformers,llama_cpp", help="comma-separated: transformers, llama_cpp")
  p.add_argument("--adapters", type=int, help="distinct adapters of the multi-adapter server (default 4; --quick 2)")
  p.add_argument("--train-steps", type=int, help="steps of each adapter's run (default 10; --quick 2)")
  p.add_argument("--concurrency", help="comma-separated client counts (default 1,4,16; --quick 1,2)")
  p.add_argument("--rounds", type=int, help="requests each client sends back to back (default 2)")
  p.add_argument("--sequential-requests", type=int, help="requests of the transformers side, one at a time "
                 "(default 8; --quick 2)")
  p.add_argument("--max-tokens", type=int, help="max_tokens of every request (default 64; --quick 8)")
  p.add_argument("--prompts", type=int, help="distinct prompts, the first test reviews (default 32; --quick 2)")
  p.add_argument("--max-len", type=int, help="context per request on every server (default 240: jft's cache is then "
                 "256 positions, 2 decode compiles; --quick 96)")
  p.add_argument("--gguf-types", default=None, help="GGUF tensor types for llama.cpp (default f32,f16; --quick f32)")
  p.add_argument("--threads", type=int, default=2, help="cores each side is pinned to (default 2)")
  p.add_argument("--out", help="also write the markdown report here")
  p.add_argument("--worker-transformers", help=argparse.SUPPRESS)  # internal: the transformers side's process
  args = p.parse_args(argv)
  q = args.quick
  defaults = dict(adapters=2 if q else 4, train_steps=2 if q else 10, concurrency="1,2" if q else "1,4,16",
                  rounds=2, sequential_requests=2 if q else 8, max_tokens=8 if q else 64, prompts=2 if q else 32,
                  max_len=96 if q else 240, gguf_types="f32" if q else "f32,f16")
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
  args.peers = [s for s in args.peers.split(",") if s]
  args.gguf_types = [s for s in args.gguf_types.split(",") if s]
  bad = [s for s in args.peers if s not in ("transformers", "llama_cpp")]
  if bad:
    p.error(f"--peers {bad[0]!r}: allowed: transformers, llama_cpp")
  bad = [t for t in args.gguf_types if t not in ("f32", "f16", "q8_0")]
  if bad:
    p.error(f"--gguf-types {bad[0]!r}: allowed: f32, f16, q8_0")
  counts = ("adapters", "rounds", "sequential_requests", "max_tokens", "prompts", "threads")
  if min(getattr(args, n) for n in counts) < 1 or min(args.concurrency) < 1:
    p.error(f"--{', --'.join(n.replace('_', '-') for n in counts)} and --concurrency must be >= 1")
  return args


# -- processes -------------------------------------------------------------------------------------

def _cores(threads: int) -> set:
  available = sorted(os.sched_getaffinity(0))
  return set(available[:threads])


def _pinned(threads: int):
  cores = _cores(threads)
  return lambda: os.sched_setaffinity(0, cores)


def _env(threads: int) -> dict:
  # XLA:CPU sizes its thread pool from the cores it may run on (the affinity set above); torch and OpenMP by these.
  return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def _run(cmd, log, threads, what):
  with open(log, "w") as f:
    code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(threads),
                          preexec_fn=_pinned(threads)).returncode
  if code != 0:
    raise BenchError(f"{what} failed (exit {code}); see {log}:\n{_tail(log)}")


def _tail(path, lines=15):
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def _jft(*args):
  return [sys.executable, "-m", "jft.cli", *args]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _rss_mib(pid: int, field: str = "VmHWM") -> float:
  """`field` of /proc/PID/status (VmHWM: peak RSS; VmRSS: now) of `pid` and its children, the largest, MiB."""
  import psutil

  best = 0
  for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
    try:
      with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
          if line.startswith(field + ":"):
            best = max(best, int(line.split()[1]))
    except OSError:
      pass
  return best / 1024


class Server:
  """A server process on a free port, its log in a file; stopped with SIGTERM (then killed after 60 s)."""

  def __init__(self, cmd, log, threads, ready_path, timeout=1800):
    self.port = _free_port()
    cmd = [c.replace("{port}", str(self.port)) for c in cmd]
    self.log = log
    self._file = open(log, "w")
    self.proc = subprocess.Popen(cmd, stdout=self._file, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(threads),
                                 preexec_fn=_pinned(threads))
    self.url = f"http://127.0.0.1:{self.port}"
    import httpx2 as httpx  # openai's HTTP client

    deadline = time.time() + timeout
    while True:
      if self.proc.poll() is not None:
        self.stop()
        raise BenchError(f"server exited with {self.proc.returncode} before answering; see {log}:\n{_tail(log)}")
      try:
        if httpx.get(self.url + ready_path, timeout=5).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if time.time() > deadline:
        self.stop()
        raise BenchError(f"server not ready after {timeout}s; see {log}")
      time.sleep(0.5)

  def get(self, path) -> dict:
    import httpx2 as httpx

    return httpx.get(self.url + path, timeout=30).json()

  def stop(self) -> float:
    """Stop the server; its peak RSS in MiB."""
    peak = _rss_mib(self.proc.pid) if self.proc.poll() is None else float("nan")
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._file.close()
    return peak


# -- preparation: model, adapters, exports ---------------------------------------------------------

def _tiny_model(folder: str) -> str:
  """A random 2-layer Llama with SmolLM2's tokenizer (as tests/conftest.py's `tiny_model`)."""
  if os.path.exists(os.path.join(folder, "config.json")):
    return folder
  import torch
  import transformers

  import jft

  tmp = folder + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=True)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
  jft.load_tokenizer("smollm2-135m").save_pretrained(tmp)
  os.replace(tmp, folder)
  return folder


def _train(model, folder, seed, steps, threads, logs):
  """A short LoRA run of the sentiment config (kept: a finished run folder has results.json)."""
  if os.path.exists(os.path.join(folder, "results.json")):
    return folder
  shutil.rmtree(folder, ignore_errors=True)  # a run killed midway: start it again
  name = os.path.basename(folder)
  print(f"serve bench: training adapter {name} ({steps} steps, seed {seed})", file=sys.stderr, flush=True)
  _run(_jft("train", "--config", f"{SENTIMENT}:method=lora,mode=local", f"--config.model.name={model}",
            f"--config.seed={seed}", f"--config.train.steps={steps}", f"--config.train.save_every={steps}",
            "--config.train.eval_every=0", "--config.data.eval_split=", "--config.data.test_split=",
            "--config.eval.zero_shot=false", "--workdir", folder),
       os.path.join(logs, f"train-{name}.log"), threads, f"jft train of adapter {name}")
  return folder


def _export(run, fmt, out, threads, logs, gguf_type=None):
  if os.path.isdir(out) and os.listdir(out):
    return out
  extra = ["--gguf-type", gguf_type] if gguf_type else []
  tag = os.path.basename(out)
  print(f"serve bench: jft export --format {fmt} {' '.join(extra)} -> {tag}", file=sys.stderr, flush=True)
  _run(_jft("export", "--workdir", run, "--format", fmt, *extra, "--out", out, "--overwrite"),
       os.path.join(logs, f"export-{tag}.log"), threads, f"jft export --format {fmt}")
  return out


def _prompts(n: int) -> list:
  with open(REVIEWS) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [TEMPLATE.format(text=r["text"]) for r in rows[:n]]


def _llama_cpp_folder() -> str:
  """The cached llama-cpp-python build with its server's packages (scripts/build_llama_cpp.py)."""
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  try:
    import build_llama_cpp
  finally:
    sys.path.pop(0)
  build_llama_cpp.load(server=True)
  return build_llama_cpp.folder()


# -- the load --------------------------------------------------------------------------------------

def _request(client, model, prompt, max_tokens, usage):
  kwargs = {"stream_options": {"include_usage": True}} if usage else {}
  start = time.perf_counter()
  stamps, counted = [], None
  for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         stream=True, **kwargs):
    now = time.perf_counter()
    if getattr(chunk, "usage", None) is not None:
      counted = chunk.usage.completion_tokens
    if chunk.choices and chunk.choices[0].text:
      stamps.append(now)
  end = time.perf_counter()
  tokens = counted if counted is not None else len(stamps)
  return {"start": start, "end": end, "tokens": tokens, "ttft": stamps[0] - start if stamps else end - start,
          "gaps": [b - a for a, b in zip(stamps, stamps[1:])]}


def _load(url, models, prompts, clients, total, max_tokens, usage):
  """`clients` threads sending `total` requests, each its share back to back; request j uses prompt j and model j
  (round-robin)."""
  import openai

  results, errors = [], []
  lock = threading.Lock()
  barrier = threading.Barrier(clients)

  def client_thread(c):
    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=1800)
    barrier.wait()
    for j in range(c, total, clients):
      try:
        r = _request(client, models[j % len(models)], prompts[j % len(prompts)], max_tokens, usage)
      except Exception as e:  # noqa: BLE001 - reported with the cell
        with lock:
          errors.append(f"{type(e).__name__}: {e}")
        continue
      with lock:
        results.append(r)

  threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise BenchError(f"{len(errors)} of {total} requests failed at {clients} clients: {errors[0]}")
  return results


def _pct(values, q):
  if not values:
    return float("nan")
  values = sorted(values)
  k = (len(values) - 1) * q
  lo, hi = int(k), min(int(k) + 1, len(values) - 1)
  return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _cell(side, adapters, clients, results, rss=None, **extra):
  wall = max(r["end"] for r in results) - min(r["start"] for r in results)
  tokens = sum(r["tokens"] for r in results)
  ttft = [r["ttft"] for r in results]
  gaps = [g for r in results for g in r["gaps"]]
  return {"side": side, "adapters": adapters, "clients": clients, "requests": len(results), "tokens": tokens,
          "wall_s": wall, "tok_s": tokens / wall, "ttft_p50": _pct(ttft, 0.5), "ttft_p95": _pct(ttft, 0.95),
          "tpot_p50": _pct(gaps, 0.5), "tpot_p95": _pct(gaps, 0.95), "rss_mib": rss, "load": os.getloadavg()[0],
          **extra}


def _serve_side(name, server, models, prompts, args, adapters, jft_side):
  """Warm up with every prompt, then the timed cells at each concurrency; fills in the server's peak RSS."""
  cells = []
  try:
    _load(server.url, models, prompts, max(args.concurrency), len(prompts), 2, jft_side)  # warm-up: every bucket
    for clients in args.concurrency:
      before = server.get("/health") if jft_side else None
      print(f"serve bench: {name}, {clients} clients", file=sys.stderr, flush=True)
      results = _load(server.url, models, prompts, clients, clients * args.rounds, args.max_tokens, jft_side)
      extra = {}
      if jft_side:
        after = server.get("/health")
        steps = after["decode_steps"] - before["decode_steps"]
        extra = {"compiles": after["compiles"] != before["compiles"], "steps": steps,
                 "rows_per_step": (after["tokens"] - before["tokens"]) / max(steps, 1)}
      extra["rss_now_mib"] = _rss_mib(server.proc.pid, "VmRSS")  # serving, after the cell (no loading peak)
      cells.append(_cell(name, adapters, clients, results, **extra))
  finally:
    rss = server.stop()
  for c in cells:
    c["rss_mib"] = rss
  return cells


def _transformers_worker(spec_path):
  """The transformers side, in its own process: greedy `generate` one request at a time, token times from a streamer."""
  import torch
  import transformers
  from transformers.generation.streamers import BaseStreamer

  with open(spec_path) as f:
    spec = json.load(f)
  torch.set_num_threads(spec["threads"])
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
  model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()

  class Clock(BaseStreamer):
    def __init__(self):
      self.stamps = []

    def put(self, value):  # first the prompt, then each new token
      self.stamps.append(time.perf_counter())

    def end(self):
      pass

  def one(prompt, max_tokens):
    ids = tokenizer(prompt, return_tensors="pt")
    clock = Clock()
    start = time.perf_counter()
    with torch.no_grad():
      out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, streamer=clock,
                           pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    end = time.perf_counter()
    stamps = clock.stamps[1:]
    return {"start": start, "end": end, "tokens": out.shape[1] - ids["input_ids"].shape[1],
            "ttft": stamps[0] - start if stamps else end - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:])]}

  prompts = spec["prompts"]
  for p in prompts[:2]:
    one(p, 2)  # warm-up
  results = [one(prompts[j % len(prompts)], spec["max_tokens"]) for j in range(spec["requests"])]
  with open(spec["out"], "w") as f:
    json.dump({"results": results, "rss_mib": _rss_mib(os.getpid()), "rss_now_mib": _rss_mib(os.getpid(), "VmRSS")}, f)


def _transformers_side(merged, prompts, args, logs):
  spec_path = os.path.join(logs, "transformers-spec.json")
  spec = {"model": merged, "prompts": prompts, "max_tokens": args.max_tokens, "requests": args.sequential_requests,
          "threads": args.threads, "out": os.path.join(logs, "transformers.json")}
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  print("serve bench: transformers generate, one request at a time", file=sys.stderr, flush=True)
  _run([sys.executable, os.path.abspath(__file__), "--worker-transformers", spec_path],
       os.path.join(logs, "transformers.log"), args.threads, "the transformers side")
  with open(spec["out"]) as f:
    data = json.load(f)
  return _cell("transformers generate", 1, 1, data["results"], data["rss_mib"], rss_now_mib=data["rss_now_mib"])


# -- the report ------------------------------------------------------------------------------------

def _ms(x):
  return "-" if x != x else f"{1000 * x:,.0f}"


def report(cells, args, model, started_load, notes) -> str:
  how = ["XLA by affinity"] + [{"transformers": "torch.set_num_threads", "llama_cpp": "llama.cpp --n_threads"}[p]
                               for p in args.peers]
  lines = [f"Model {model}; each client sends {args.rounds} requests back to back (transformers: "
           f"{args.sequential_requests} one at a time), prompts cycle over {args.prompts} reviews, max_tokens "
           f"{args.max_tokens}, temperature 0, streamed; each side pinned to {args.threads} cores "
           f"({', '.join(how)}); load average at start "
           f"{started_load:.1f}. Warm-up (every prompt once) excluded.", "",
           "| side | adapters | clients | requests | tokens | tokens/s | TTFT p50 / p95 (ms) "
           "| per-token p50 / p95 (ms) | RSS peak / serving (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for c in cells:
    lines.append(f"| {c['side']} | {c['adapters']} | {c['clients']} | {c['requests']} | {c['tokens']} | "
                 f"{c['tok_s']:.1f} | {_ms(c['ttft_p50'])} / {_ms(c['ttft_p95'])} | {_ms(c['tpot_p50'])} / "
                 f"{_ms(c['tpot_p95'])} | {c['rss_mib']:,.0f} / {c['rss_now_mib']:,.0f} |")
  top = max(args.concurrency)

  def find(side, clients=top, adapters=None):
    for c in cells:
      if c["side"] == side and c["clients"] == clients and (adapters is None or c["adapters"] == adapters):
        return c
    return None

  one, many = find("jft serve", adapters=1), find("jft serve", adapters=args.adapters)
  ratios = []
  if one:
    for c in cells:
      if c["side"].startswith("llama.cpp") and c["clients"] == top:
        ratios.append((f"jft 1 adapter / {c['side']}, {top} clients", one["tok_s"] / c["tok_s"],
                       ">=", TARGETS["llama_cpp"]))
    peer = find("transformers generate", clients=1)
    if peer:
      ratios.append((f"jft 1 adapter at {top} clients / sequential transformers", one["tok_s"] / peer["tok_s"], ">=",
                     TARGETS["transformers"]))
    if many and args.adapters > 1:
      ratios.append((f"jft {args.adapters} adapters / 1 adapter, {top} clients (tokens/s)",
                     many["tok_s"] / one["tok_s"], ">=", TARGETS["adapters"]))
      ratios.append((f"jft peak RSS (VmHWM, loading included), {args.adapters} adapters / 1 adapter",
                     many["rss_mib"] / one["rss_mib"], "<=", TARGETS["rss"]))
      ratios.append((f"jft RSS while serving ({top} clients), {args.adapters} adapters / 1 adapter",
                     many["rss_now_mib"] / one["rss_now_mib"], "<=", TARGETS["rss"]))
  if ratios:
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---:|---|"]
    for name, value, op, target in ratios:
      met = value >= target if op == ">=" else value <= target
      lines.append(f"| {name} | {value:.2f} | {op} {target:g} | {'yes' if met else 'no'} |")
  jft_cells = [c for c in cells if "steps" in c]
  if jft_cells:
    lines += ["", "jft decode steps per cell (wall time / steps includes the prefills that ran between them):", "",
              "| adapters | clients | decode steps | rows per step | ms per step | compiled during the cell |",
              "|---:|---:|---:|---:|---:|---|"]
    for c in jft_cells:
      lines.append(f"| {c['adapters']} | {c['clients']} | {c['steps']} | {c['rows_per_step']:.1f} | "
                   f"{_ms(c['wall_s'] / max(c['steps'], 1))} | {'yes' if c['compiles'] else 'no'} |")
  lines += ["", *notes]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  args = _options(argv)
  if args.worker_transformers:
    _transformers_worker(args.worker_transformers)
    return 0
  workdir = args.workdir or (tempfile.mkdtemp(prefix="jft-servebench-") if args.quick
                             else os.path.join(ROOT, "runs", "servebench"))
  try:
    return _bench(args, os.path.abspath(workdir))
  finally:
    if args.quick and not args.workdir:  # a smoke run's own temporary folder
      shutil.rmtree(workdir, ignore_errors=True)


def _bench(args, workdir) -> int:
  logs = os.path.join(workdir, "logs")
  os.makedirs(logs, exist_ok=True)
  started_load = os.getloadavg()[0]
  t0 = time.time()
  model = args.model or (_tiny_model(os.path.join(workdir, "tiny-model")) if args.quick else "smollm2-135m")
  llama_folder = _llama_cpp_folder() if "llama_cpp" in args.peers else None
  runs = [_train(model, os.path.join(workdir, "adapters", f"a{i}"), i, args.train_steps, args.threads, logs)
          for i in range(args.adapters)]
  names = [os.path.basename(r) for r in runs]
  prompts = _prompts(args.prompts)
  notes = []
  cells = []
  if "transformers" in args.peers:
    merged = _export(runs[0], "merged", os.path.join(workdir, "export", "merged"), args.threads, logs)
    cells.append(_transformers_side(merged, prompts, args, logs))
  slots = max(args.concurrency)
  for count in sorted({1, args.adapters}):
    extra = [a for r, n in zip(runs[1:count], names[1:count]) for a in ("--adapter", f"{n}={r}")]
    server = Server(_jft("serve", "--workdir", runs[0], *extra, "--port", "{port}", "--max-batch", str(slots),
                         "--max-len", str(args.max_len)), os.path.join(logs, f"jft-serve-{count}.log"),
                    args.threads, "/health")
    cells += _serve_side("jft serve", server, names[:count], prompts, args, count, True)
  for gguf_type in args.gguf_types if llama_folder else ():
    folder = _export(runs[0], "gguf", os.path.join(workdir, "export", f"gguf-{gguf_type}"), args.threads, logs,
                     gguf_type)
    boot = (f"import runpy, sys; sys.path.append({llama_folder!r}); "
            "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")
    server = Server([sys.executable, "-c", boot, "--model", os.path.join(folder, "model.gguf"), "--host", "127.0.0.1",
                     "--port", "{port}", "--n_ctx", str(args.max_len), "--n_threads", str(args.threads),
                     "--n_threads_batch", str(args.threads), "--interrupt_requests", "False", "--verbose", "False"],
                    os.path.join(logs, f"llama-cpp-{gguf_type}.log"), args.threads, "/v1/models")
    cells += _serve_side(f"llama.cpp server {gguf_type}", server, names[:1], prompts, args, 1, False)
  if llama_folder:
    notes.append("llama-cpp-python's server runs one request at a time (an asyncio lock around its one Llama "
                 "context; `--interrupt_requests False` so a waiting request does not cut the running stream): at "
                 "N clients the others queue, which their time to first token shows.")
  if any(c.get("compiles") for c in cells):
    notes.append("WARNING: jft compiled during a timed cell (see its server log).")
  kept = f" Logs: {logs}." if args.workdir or not args.quick else ""
  notes.append(f"Wall time of the whole benchmark {time.time() - t0:.0f} s; load average at the end "
               f"{os.getloadavg()[0]:.1f} (the machine's other work shares the cores).{kept}")
  text = report(cells, args, model if not args.quick else "a tiny random Llama (--quick)", started_load, notes)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
      json.dump(cells, f, indent=1)
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except BenchError as e:
    print(f"serve bench: error: {e}", file=sys.stderr)
    sys.exit(1)
