"""`jft serve`: the batching engine against `jft generate`, and the HTTP API through OpenAI's own client.

One module-scoped engine serves the tiny byte-level base, two LoRA runs trained here (`configs/tiny.py`,
two steps each) and an IA3 and a DoRA adapter made by hand, over one uvicorn server in a thread: greedy
output must equal `generate`'s token for token, alone and in a batch mixing every adapter; once a prompt
bucket and a cache length have been compiled, no request compiles anything. Errors are checked status
by status, raw. The SIGTERM test starts `jft serve` as a process of its own (slow).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

import jft
from jft import cli, peft
from jft.core import rules
from jft.models import generate as gen
from jft.serve import app, engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
FAST = ["--config.data.eval_split=", "--config.data.test_split=", "--config.eval.zero_shot=false",
        "--config.data.max_train_examples=8", "--config.train.steps=2"]
# name -> (tiny config argument, overrides): the adapters differ from the base and from each other. The two
# LoRA runs differ by their seed alone, so the second reuses the first's compiled step. (IA3 and DoRA
# adapters are made by hand below: restoring is the same for every method, and a third run costs 6 s.)
RUNS = {"alpha": ("method=lora", ["--config.seed=1", "--config.optim.lr=0.3"]),
        "beta": ("method=lora", ["--config.seed=2", "--config.optim.lr=0.3"])}
KEY = "sk-test-key"
# The tests' prompts all fall in one prefill bucket (17..32 tokens): one compile of it serves them all.
PROMPT = "A fine film"  # 30 tokens through the chat template
HELLO = "Hello there, how are you?"  # 25 tokens as a plain completion
NEW = 12


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(application, port):
  server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started and time.time() < deadline:
    time.sleep(0.02)
  assert server.started
  return server, thread


@pytest.fixture(scope="module")
def runs(byte_model, tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_runs")
  out = {}
  for name, (arg, extra) in RUNS.items():
    folder = str(root / name)
    assert cli.main(["train", "--config", f"{TINY}:{arg}", f"--config.model.name={byte_model}", *FAST, *extra,
                     "--workdir", folder]) == 0
    out[name] = folder
  return out


def _by_hand(name, method, base, seed):
  """An adapter as if trained: `method`'s init with LoRA's B, DoRA's magnitudes and IA3's scales moved off it."""
  flat = rules.flatten(method.init(jax.random.PRNGKey(seed), base))
  rng = np.random.RandomState(seed)
  for path, value in list(flat.items()):
    if path.endswith("/lora/b"):
      flat[path] = jnp.asarray(rng.normal(0, 0.5, value.shape), jnp.float32)
    elif path.endswith(("/lora/magnitude", "/ia3/input", "/ia3/output")):
      flat[path] = value * jnp.asarray(rng.uniform(0.5, 1.5, value.shape), jnp.float32)
  leaves = {p: v for p, v in flat.items() if method.own(p) is not None}
  return engine.Adapter(name, method, leaves), rules.unflatten(flat)


class Served:
  def __init__(self, eng, port, references):
    self.engine, self.port, self.references = eng, port, references
    self.url = f"http://127.0.0.1:{port}"

  def client(self, key=KEY):
    return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

  def post(self, path, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(self.url + path, headers={**headers, **kwargs.pop("headers", {})}, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def served(runs, byte_model):
  model, base, tokenizer, base_name, adapters = engine.restore_adapters(runs["alpha"], None, [("beta", runs["beta"])])
  # IA3 on its default targets (k, v, down); DoRA on q and o, which no LoRA run targets.
  ia3, ia3_params = _by_hand("gamma", peft.build("ia3"), base, 1)
  dora, dora_params = _by_hand("delta", peft.build("dora", rank=2, alpha=4.0, targets=("q_proj", "o_proj")), base, 2)
  eng = engine.Engine(model, base, tokenizer, [*adapters, ia3, dora], base_name=base_name, max_batch=4,
                      max_queue=8).start(warmup=False)
  # What `jft generate` runs for each served name: the run's method configured over its restored params
  # (`jft.run.restore_params`: the base with the method's leaves), the base alone, IA3 and DoRA configured.
  references = {a.name: (a.method.configure(model), rules.unflatten({**rules.flatten(base), **a.leaves}))
                for a in adapters}
  references[base_name] = jft.load_pretrained(byte_model)
  references["gamma"] = (ia3.method.configure(model), ia3_params)
  references["delta"] = (dora.method.configure(model), dora_params)
  server, thread = _start(app.create_app(eng, KEY), _free_port())
  yield Served(eng, server.config.port, references)
  server.should_exit = True
  thread.join(30)
  assert eng.stop(30)


def _generate(served, name, ids, sampling=gen.Sampling(NEW), seed=0):
  """`jft generate`'s tokens for one prompt (`generate_text` decodes these)."""
  model, params = served.references[name]
  tokenizer = served.engine.tokenizer
  return gen.generate(model, params, [ids], sampling, stop_tokens=gen.stop_token_ids(model, tokenizer),
                      pad_id=tokenizer.pad_token_id, seed=seed)[0]


def _chat_ids(served, text=PROMPT):
  return gen.encode_prompts(served.engine.tokenizer, [text], chat=True)[0]


def test_greedy_output_equals_generate_alone_and_in_a_batch_mixing_every_adapter(served, runs, capsys):
  eng = served.engine
  ids = _chat_ids(served)
  short = _chat_ids(served, "Hi")
  want = {name: _generate(served, name, ids) for name in eng.names}
  want_short = {name: _generate(served, name, short) for name in eng.names}  # the same bucket: no new compile
  base = eng.names[0]
  assert eng.names == [base, "alpha", "beta", "gamma", "delta"]
  assert all(want[n] != want[base] for n in eng.names[1:]), "an adapter that decodes as the base proves nothing"
  for name in eng.names:  # alone
    assert eng.generate(ids, name, NEW, temperature=0.0).tokens == want[name], name
  # Ten requests on four slots: every adapter at once, the short ones (5 tokens) leaving early and the
  # waiting ones joining the running batch.
  jobs = [eng.submit(engine.Request(p, name, NEW if p is ids else 5)) for name in eng.names for p in (ids, short)]
  for job in jobs:
    tokens = job.result(60).tokens
    reference = want[job.model] if job.prompt is ids else want_short[job.model][:5]
    assert tokens == reference, (job.model, job.prompt is ids)
  assert eng.stats["peak_active"] == 4
  # Over HTTP, concurrently: the chat endpoint's text is `jft generate --workdir RUN`'s.
  texts = {}

  def ask(name):
    r = served.client().chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=NEW, temperature=0)
    texts[name] = r.choices[0].message.content

  threads = [threading.Thread(target=ask, args=(n,)) for n in eng.names]
  [t.start() for t in threads]
  [t.join(60) for t in threads]
  for name in eng.names:
    assert texts[name] == eng.tokenizer.decode(want[name], skip_special_tokens=True), name
  capsys.readouterr()
  assert cli.main(["generate", "--workdir", runs["alpha"], "--prompt", PROMPT, "--max-new-tokens", str(NEW)]) == 0
  assert capsys.readouterr().out.strip() == texts["alpha"].strip()


def test_a_seeded_sampled_request_draws_what_generate_draws(served):
  ids = _chat_ids(served)
  want = _generate(served, "beta", ids, gen.Sampling(NEW, temperature=0.9, top_p=0.8), seed=7)
  got = served.engine.generate(ids, "beta", NEW, temperature=0.9, top_p=0.8, seed=7)
  assert got.tokens == want
  client = served.client()
  again = [client.completions.create(model="beta", prompt=ids, max_tokens=NEW, temperature=0.9, top_p=0.8,
                                     seed=7).choices[0].text for _ in range(2)]
  assert again[0] == again[1] == served.engine.tokenizer.decode(want, skip_special_tokens=True)


def test_completions_chat_and_streaming_through_the_openai_client(served):
  client, eng = served.client(), served.engine
  assert [m.id for m in client.models.list()] == eng.names
  r = client.completions.create(model="gamma", prompt=HELLO, max_tokens=6, temperature=0)
  n = len(eng.tokenizer(HELLO)["input_ids"])
  assert r.object == "text_completion" and r.model == "gamma" and r.choices[0].finish_reason in ("stop", "length")
  assert r.usage.prompt_tokens == n and r.usage.total_tokens == n + r.usage.completion_tokens
  assert r.usage.completion_tokens == 6 or r.choices[0].finish_reason == "stop"
  # Streamed chunks add up to the same text, and end with a finish reason (and usage when asked).
  chunks = list(client.completions.create(model="gamma", prompt=HELLO, max_tokens=6, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
  assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
  chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": [
      {"type": "text", "text": PROMPT}]}], max_tokens=NEW, temperature=0)
  assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
  assert chat.usage.prompt_tokens == len(_chat_ids(served))
  stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=NEW, temperature=0, stream=True)
  pieces = [c.choices[0].delta.content or "" for c in stream]
  assert "".join(pieces) == chat.choices[0].message.content
  # A stop string ends the text before it, and is never streamed.
  text = chat.choices[0].message.content
  stop = text[4:6]
  cut = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=NEW, temperature=0, stop=[stop])
  assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
  streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
      model="alpha", messages=[{"role": "user", "content": PROMPT}], max_tokens=NEW, temperature=0, stop=stop,
      stream=True))
  assert streamed == text[:text.find(stop)]
  several = client.completions.create(model=eng.names[0], prompt=[HELLO, HELLO + "?"], max_tokens=3,
                                     temperature=0)
  assert [c.index for c in several.choices] == [0, 1]


def test_each_error_is_openai_json_with_its_status_and_the_server_lives_on(served):
  def error(r, status):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body

  ok = {"model": "alpha", "prompt": HELLO, "max_tokens": 2}
  assert "not valid JSON" in error(served.post("/v1/completions", content=b"{model: 1",
                                               headers={"content-type": "application/json"}), 400)["message"]
  assert error(served.post("/v1/chat/completions", json={"model": "alpha"}), 400)["param"] == "messages"
  assert error(served.post("/v1/completions", json={**ok, "top_p": 0}), 400)["param"] == "top_p"
  assert error(served.post("/v1/completions", json={**ok, "max_tokens": 0}), 400)["param"] == "max_tokens"
  assert error(served.post("/v1/completions", json={**ok, "temperature": "hot"}), 400)["code"] == "invalid_type"
  assert error(served.post("/v1/completions", json={**ok, "n": 2}), 400)["code"] == "unsupported_parameter"
  long = error(served.post("/v1/completions", json={**ok, "prompt": "x" * 250, "max_tokens": 20}), 400)
  assert "250 tokens" in long["message"] and "20" in long["message"] and "256 tokens" in long["message"]
  assert long["code"] == "context_length_exceeded"
  assert error(served.post("/v1/completions", json={**ok, "model": "nope"}), 404)["code"] == "model_not_found"
  assert error(served.post("/v1/completions", json=ok, key=None), 401)["code"] == "invalid_api_key"
  assert error(served.post("/v1/completions", json=ok, key="sk-wrong"), 401)["code"] == "invalid_api_key"
  assert error(served.post("/v1/completions", content=b" " * (2 << 20),
                           headers={"content-type": "application/json"}), 413)["code"] == "request_too_large"
  with pytest.raises(openai.NotFoundError, match="does not exist; served"):
    served.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
  with pytest.raises(openai.AuthenticationError):
    served.client("sk-wrong").models.list()
  assert httpx.get(served.url + "/health").json()["status"] == "ok"  # no key needed
  assert served.post("/v1/completions", json=ok).json()["usage"]["completion_tokens"] >= 1


def test_a_full_queue_answers_429_and_a_stopping_engine_503(served, byte_model):
  """Over an engine whose thread never started: submitted requests stay put, so the queue fills for sure."""
  model, params = jft.load_pretrained(byte_model)
  idle = engine.Engine(model, params, served.engine.tokenizer, max_batch=1, max_queue=1, base_name="b")
  for _ in range(2):
    idle.submit(engine.Request([5, 6], "b", 2))
  port = _free_port()
  server, thread = _start(app.create_app(idle), port)
  try:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
    assert "max-queue 1" in r.json()["error"]["message"]
    idle.stop(0)
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"], r.text
  finally:
    server.should_exit = True
    thread.join(30)


def test_no_request_compiles_after_warm_up(served):
  eng, client = served.engine, served.client()
  ids = _chat_ids(served)
  eng.generate(ids, "alpha", 2)  # this prompt's bucket has been seen
  before = (dict(eng.traces["decode"]), dict(eng.traces["prefill"]))
  assert all(n == 1 for kind in before for n in kind.values()), before
  for name in eng.names:
    eng.generate(ids, name, 3, temperature=0.7, top_p=0.5, seed=11)
  client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                                 temperature=1.3, stop=["zz"])
  list(client.chat.completions.create(model="delta", messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                                      stream=True))
  assert (dict(eng.traces["decode"]), dict(eng.traces["prefill"])) == before


def test_a_cancelled_or_disconnected_request_frees_its_slot(served, monkeypatch):
  eng = served.engine
  ids = _chat_ids(served)
  # A listener that fails cancels its own request only.
  job = eng.submit(engine.Request(ids, "beta", 200, on_text=lambda piece: 1 / 0))
  assert job.result(30).finish_reason == "cancelled" and len(job.result().tokens) < 200
  assert eng.generate(ids, "beta", 3).finish_reason in ("stop", "length")
  # A client that goes away mid-stream: its request is cancelled long before its 200 tokens (each step is
  # slowed to 10 ms here, so the stream would take seconds).
  text = eng._text
  monkeypatch.setattr(eng, "_text", lambda tokens: (time.sleep(0.01), text(tokens))[1])
  def cancelled_once_more(before):
    deadline = time.time() + 10
    while eng.stats["cancelled"] == before and time.time() < deadline:
      time.sleep(0.05)
    assert eng.stats["cancelled"] == before + 1 and eng.stats["active"] == 0

  before = eng.stats["cancelled"]
  with httpx.stream("POST", served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": "beta", "prompt": ids, "max_tokens": 200, "stream": True}, timeout=30) as r:
    next(r.iter_lines())
  cancelled_once_more(before)
  # Without streaming: the handler hears the connection close while it waits.
  before = eng.stats["cancelled"]
  body = json.dumps({"model": "beta", "prompt": ids, "max_tokens": 200}).encode()
  with socket.create_connection(("127.0.0.1", served.port)) as s:
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.time() + 10
    while eng.stats["active"] == 0 and time.time() < deadline:
      time.sleep(0.01)
  cancelled_once_more(before)


def test_serve_refuses_methods_that_cannot_share_a_batch_and_runs_over_another_base(runs, hf_models, tmp_path,
                                                                                     capsys):
  config = json.load(open(os.path.join(runs["alpha"], "config.json")))

  def fake(name, **changes):
    folder = tmp_path / name
    folder.mkdir()
    c = json.loads(json.dumps(config))
    for path, value in changes.items():
      section, field = path.split(".")
      c[section][field] = value
    (folder / "config.json").write_text(json.dumps(c))
    return str(folder)

  prefix = fake("prefix", **{"method.name": "prefix", "method.hparams": {}})
  other = fake("other", **{"model.name": hf_models("llama")[0]})
  capsys.readouterr()
  assert cli.main(["serve", "--workdir", runs["alpha"], "--adapter", f"p={prefix}"]) == 2
  assert "uses method 'prefix', which cannot share a batch; servable methods: lora, dora, ia3" in \
      capsys.readouterr().err
  assert cli.main(["serve", "--workdir", runs["alpha"], "--adapter", f"o={other}"]) == 2
  err = capsys.readouterr().err
  assert "fine-tuned" in err and "adapters must share one base" in err and err.count("\n") == 1
  assert cli.main(["serve", "--workdir", runs["alpha"], "--adapter", "nameless"]) == 2
  assert "expected NAME=RUN_FOLDER" in capsys.readouterr().err
  assert cli.main(["serve", "--workdir", runs["alpha"], "--adapter", f"alpha={runs['beta']}"]) == 2
  assert "given twice" in capsys.readouterr().err
  assert cli.main(["serve", "--workdir", runs["alpha"], "--max-batch", "0"]) == 2
  assert "--max-batch 0: must be >= 1" in capsys.readouterr().err
  with socket.socket() as taken:  # checked before the model loads
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    assert cli.main(["serve", "--workdir", runs["alpha"], "--port", str(taken.getsockname()[1])]) == 2
  assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


@pytest.mark.slow  # a `jft serve` process of its own: loading and compiling again, about 15 s
def test_sigterm_finishes_the_request_in_flight_and_exits_0(runs):
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-m", "jft.cli", "serve", "--workdir", runs["alpha"], "--port", str(port),
                           "--max-batch", "64"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 120
    while time.time() < deadline:
      try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
          break
      except httpx.TransportError:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    lines = []
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
        "model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200, "temperature": 0,
        "stream": True}) as r:
      for line in r.iter_lines():
        if not lines:
          proc.send_signal(signal.SIGTERM)
        lines.append(line)
    assert proc.wait(60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
  events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
  assert events[-1] == "[DONE]"
  assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
  log = proc.stdout.read()
  # 64 slots make each step slow enough that the stream is still open when uvicorn starts shutting down.
  assert "Shutting down" in log and "Waiting for connections to close" in log and "Finished server process" in log
