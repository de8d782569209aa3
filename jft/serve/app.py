"""The OpenAI-compatible HTTP face of an `Engine` (FastAPI, served by uvicorn).

    GET  /health                 ok, with the engine's load (no key needed)
    GET  /v1/models              the base (by its model name) and every adapter (by its name)
    POST /v1/completions         prompt: a string, a list of strings or token ids
    POST /v1/chat/completions    messages through the tokenizer's chat template

`stream: true` answers with server-sent events in OpenAI's chunk format, ending `data: [DONE]`.
Errors are OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed
body, a missing field, a value out of range or a prompt past the context; 401 without the key when
one is set; 404 for an unknown model; 413 for a body over 1 MiB; 429 when the queue is full; 503
while shutting down. The handlers only parse, tokenize and wait: the engine's thread owns the device,
and a request that fails is answered alone.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import socket
import threading
import time
import uuid
from typing import Any, Optional

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jft.core.errors import JftError
from jft.serve.engine import Engine, EngineError, EngineStopped, QueueFull, Request as Job

MAX_BODY = 1 << 20  # bytes of a request body
MAX_STOP = 4  # stop strings per request, as OpenAI allows
# Fields OpenAI defines that this server does not implement: refused unless they hold their no-op value.
UNSUPPORTED = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
               "suffix": (None, ""), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}),
               "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"})}


class ApiError(JftError):
  """One request refused: its HTTP status and OpenAI's error fields."""

  def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

  def response(self) -> JSONResponse:
    return _error(self.status, self.message, self.type, self.param, self.code)


def _error(status, message, type_="invalid_request_error", param=None, code=None) -> JSONResponse:
  headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
  return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                      headers=headers)


def create_app(engine: Engine, api_key: Optional[str] = None, max_body: int = MAX_BODY) -> FastAPI:
  """The ASGI app over a started engine; `api_key` (when set) guards every /v1 route."""
  app = FastAPI(title="jft serve", docs_url=None, redoc_url=None, openapi_url=None)
  created = int(time.time())

  @app.exception_handler(ApiError)
  async def _api_error(request, e: ApiError):
    return e.response()

  @app.exception_handler(HTTPException)
  async def _http_error(request, e: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    message = f"{request.method} {request.url.path}: {e.detail}" + (
        "; routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions"
        if e.status_code in (404, 405) else "")
    return _error(e.status_code, message, code=code)

  @app.exception_handler(Exception)
  async def _bug(request, e: Exception):
    return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

  async def key(request: Request):
    """The key (when set) on every /v1 route, compared in constant time."""
    if api_key:
      scheme, _, given = request.headers.get("authorization", "").partition(" ")
      if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key")

  v1 = APIRouter(prefix="/v1", dependencies=[Depends(key)])

  @app.get("/health")
  async def health():
    failed = engine.error is not None
    compiles = {kind: dict(sorted(engine.traces[kind].items())) for kind in ("decode", "prefill")}
    return JSONResponse({"status": "error" if failed else "ok", "models": engine.names, **engine.stats,
                         "compiles": compiles}, 503 if failed else 200)

  def card(name: str) -> dict:
    base = engine.names[0]
    return {"id": name, "object": "model", "created": created, "owned_by": "jft", "root": base,
            "parent": None if name == base else base}

  @v1.get("/models")
  async def models():
    return {"object": "list", "data": [card(n) for n in engine.names]}

  @v1.get("/models/{name:path}")
  async def model(name: str):
    if name not in engine.index:
      raise _unknown_model(engine, name)
    return card(name)

  @v1.post("/completions")
  async def completions(request: Request):
    body = await _read_json(request, max_body)
    options = _options(engine, body, chat=False)
    prompts = _prompts(engine, body)
    return await _answer(engine, request, options, prompts, chat=False)

  @v1.post("/chat/completions")
  async def chat(request: Request):
    body = await _read_json(request, max_body)
    options = _options(engine, body, chat=True)
    return await _answer(engine, request, options, [_chat_prompt(engine, body)], chat=True)

  app.include_router(v1)
  return app


# -- parsing ---------------------------------------------------------------------------------------

async def _read_json(request: Request, limit: int) -> dict:
  length = request.headers.get("content-length", "")
  if length.isdigit() and int(length) > limit:
    raise ApiError(413, f"the request body has {int(length)} bytes; the limit is {limit} bytes",
                   code="request_too_large")
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > limit:
      raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
  try:
    data = json.loads(bytes(body))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ApiError(400, f"the body is not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ApiError(400, f"the body must be a JSON object, not {type(data).__name__}")
  return data


def _get(body: dict, name: str, kinds, default: Any = None, required: bool = False):
  """`body[name]` when of one of `kinds` (bool is never a number); else a 400 naming the field."""
  if name not in body or body[name] is None:
    if required:
      raise ApiError(400, f"missing required field {name!r}", param=name, code="missing_field")
    return default
  value = body[name]
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
    names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
                         dict: "an object"}[k] for k in kinds if k is not int or float not in kinds)
    raise ApiError(400, f"{name} must be {names}, got {json.dumps(value)[:60]}", param=name, code="invalid_type")
  return value


def _options(engine: Engine, body: dict, chat: bool) -> dict:
  name = _get(body, "model", str, required=True)
  if name not in engine.index:
    raise _unknown_model(engine, name)
  for field, neutral in UNSUPPORTED.items():
    if field in body and body[field] not in neutral:
      raise ApiError(400, f"{field}={json.dumps(body[field])[:60]} is not supported by this server (allowed: "
                     f"{', '.join(json.dumps(v) for v in neutral)})", param=field, code="unsupported_parameter")
  limit = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = _get(body, limit, int)
  if max_tokens is not None and max_tokens < 1:
    raise ApiError(400, f"{limit}={max_tokens}: must be >= 1", param=limit, code="invalid_value")
  temperature = float(_get(body, "temperature", (int, float), 1.0))
  if not 0 <= temperature <= 2:
    raise ApiError(400, f"temperature={temperature}: must be in [0, 2] (0 = greedy)", param="temperature",
                   code="invalid_value")
  top_p = float(_get(body, "top_p", (int, float), 1.0))
  if not 0 < top_p <= 1:
    raise ApiError(400, f"top_p={top_p}: must be in (0, 1]", param="top_p", code="invalid_value")
  stop = _get(body, "stop", (str, list), [])
  stop = [stop] if isinstance(stop, str) else stop
  if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
    raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them",
                   param="stop", code="invalid_value")
  seed = _get(body, "seed", int)
  if seed is not None and not -(1 << 63) <= seed < (1 << 63):
    raise ApiError(400, f"seed={seed}: must fit in 64 bits", param="seed", code="invalid_value")
  stream = _get(body, "stream", bool, False)
  usage = _get(_get(body, "stream_options", dict, {}), "include_usage", bool, False)
  return {"model": name, "max_tokens": max_tokens, "temperature": temperature,
          "top_p": top_p, "stop": stop, "seed": seed, "stream": stream, "stream_usage": usage}


def _unknown_model(engine: Engine, name: str) -> ApiError:
  return ApiError(404, f"model {name!r} does not exist; served: {', '.join(engine.names)}", param="model",
                  code="model_not_found")


def _prompts(engine: Engine, body: dict) -> list[list[int]]:
  """A completion's prompt: a string, a list of strings, a list of token ids or a list of such lists."""
  prompt = _get(body, "prompt", (str, list), required=True)
  if isinstance(prompt, str) or prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
    prompt = [prompt]
  if not prompt:
    raise ApiError(400, "prompt is an empty list", param="prompt", code="invalid_value")
  out = []
  for p in prompt:
    if isinstance(p, str):
      out.append(engine.tokenizer(p)["input_ids"])  # as `jft generate --no-chat` encodes it
    elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
      out.append(list(p))
    else:
      raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                     param="prompt", code="invalid_type")
  vocab = engine.model.config.vocab_size
  for ids in out:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
      raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt",
                     code="invalid_value")
  return out


ROLES = ("system", "developer", "user", "assistant", "tool")


def _chat_prompt(engine: Engine, body: dict) -> list[int]:
  messages = _get(body, "messages", list, required=True)
  if not messages:
    raise ApiError(400, "messages is an empty list; send at least one message", param="messages",
                   code="invalid_value")
  plain = []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict):
      raise ApiError(400, f"{where} must be an object with 'role' and 'content'", param=where, code="invalid_type")
    role = m.get("role")
    if role not in ROLES:
      raise ApiError(400, f"{where}.role={json.dumps(role)}: must be one of {', '.join(ROLES)}", param=where,
                     code="invalid_value")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise ApiError(400, f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                       param=where, code="invalid_value")
      content = "".join(p["text"] for p in content)
    if content is None and role == "assistant":
      content = ""
    if not isinstance(content, str):
      raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=where,
                     code="invalid_type")
    plain.append({"role": role, "content": content})
  tokenizer = engine.tokenizer
  if not getattr(tokenizer, "chat_template", None):
    raise ApiError(400, f"{engine.names[0]}'s tokenizer has no chat template; use /v1/completions",
                   param="messages", code="no_chat_template")
  try:
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
  except Exception as e:  # noqa: BLE001 - a template's own refusal (roles out of order...)
    raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
  return tokenizer(text, add_special_tokens=False)["input_ids"]  # as `jft generate` encodes a chat prompt


# -- answering -------------------------------------------------------------------------------------

async def _answer(engine: Engine, request: Request, options: dict, prompts: list[list[int]], chat: bool):
  loop = asyncio.get_running_loop()
  events: asyncio.Queue = asyncio.Queue()

  def post(item):  # from the engine's thread; if this loop has closed, the engine cancels the job
    loop.call_soon_threadsafe(events.put_nowait, item)

  jobs = []
  for i, ids in enumerate(prompts):
    max_tokens = options["max_tokens"]
    if max_tokens is None:  # OpenAI's defaults: 16 for a completion, the rest of the context for a chat
      max_tokens = min(16, max(engine.context - len(ids), 1)) if not chat else max(engine.context - len(ids), 1)
    if not ids:
      raise ApiError(400, "the prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty",
                     param="messages" if chat else "prompt", code="invalid_value")
    try:
      engine.check(len(ids), max_tokens)
    except EngineError as e:
      raise ApiError(400, str(e) if len(prompts) == 1 else f"prompt {i}: {e}",
                     param="messages" if chat else "prompt", code="context_length_exceeded") from None
    jobs.append(Job(ids, options["model"], max_tokens, options["temperature"], options["top_p"], options["stop"],
                    _nth_seed(options["seed"], i),
                    on_text=lambda piece, i=i: post(("text", i, piece))))
  submitted = []
  try:
    for i, job in enumerate(jobs):
      submitted.append(engine.submit(job))
      # Called with the result, or with the engine's failure: no handler waits on a stopped engine.
      job.future.add_done_callback(lambda f, i=i: post(("done", i, f)))
  except QueueFull as e:
    _cancel(submitted)
    raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from None
  except EngineStopped as e:
    _cancel(submitted)
    raise ApiError(503, str(e), "server_error", code="unavailable") from None
  except EngineError as e:
    _cancel(submitted)
    raise ApiError(400, str(e)) from None
  ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
  head = {"id": ident, "created": int(time.time()), "model": options["model"]}
  if options["stream"]:
    return StreamingResponse(_stream(events, submitted, head, options, chat), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
  results = {}
  gone = asyncio.ensure_future(_disconnected(request))
  try:
    while len(results) < len(submitted):
      event = asyncio.ensure_future(events.get())
      await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
      if not event.done():  # the client went away: nobody reads the answer, the jobs are cancelled below
        event.cancel()
        return JSONResponse({}, 499)
      kind, i, value = event.result()
      if kind == "done":
        results[i] = _result(value)
  finally:
    gone.cancel()
    _cancel(submitted)
  choices = []
  for i in range(len(submitted)):
    r = results[i]
    reason = "length" if r.finish_reason == "cancelled" else r.finish_reason
    if chat:
      choices.append({"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                      "finish_reason": reason})
    else:
      choices.append({"index": i, "text": r.text, "logprobs": None, "finish_reason": reason})
  return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
          "usage": _usage(results.values()), "system_fingerprint": None}


async def _disconnected(request: Request):
  """Returns when the client closes its connection (the body has been read: the next message says so)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass


def _result(future):
  """A finished job's Result; the engine's failure as a 500 (503 when it was shutting down)."""
  error = future.exception()
  if error is not None:
    raise ApiError(503 if isinstance(error, EngineStopped) else 500, f"the engine failed: {error}", "server_error")
  return future.result()


def _nth_seed(seed: Optional[int], i: int) -> Optional[int]:
  """Prompt i of a list samples with seed + i (wrapped into 64 bits): its own draws, reproducible."""
  return None if seed is None else (seed + i + (1 << 63)) % (1 << 64) - (1 << 63)


def _cancel(jobs):
  for job in jobs:
    if not job.future.done():
      job.cancel()


def _usage(results) -> dict:
  prompt = sum(r.prompt_tokens for r in results)
  completion = sum(len(r.tokens) for r in results)
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(events: asyncio.Queue, jobs, head: dict, options: dict, chat: bool):
  """Server-sent events: OpenAI's chunks, then `data: [DONE]`. A client that goes away cancels its jobs."""
  kind_name = "chat.completion.chunk" if chat else "text_completion"

  def chunk(i, piece=None, reason=None, first=False):
    if chat:
      delta = {"role": "assistant", "content": ""} if first else ({} if piece is None else {"content": piece})
      choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
      choice = {"index": i, "text": piece or "", "logprobs": None, "finish_reason": reason}
    out = {**head, "object": kind_name, "choices": [choice], "system_fingerprint": None}
    if options["stream_usage"]:
      out["usage"] = None
    return f"data: {json.dumps(out)}\n\n"

  results = {}
  try:
    if chat:
      yield chunk(0, first=True)
    while len(results) < len(jobs):
      kind, i, value = await events.get()
      if kind == "text":
        yield chunk(i, value)
      else:
        try:
          results[i] = _result(value)
        except ApiError as e:  # the engine failed: the stream ends with OpenAI's error object
          error = {"message": e.message, "type": e.type, "param": None, "code": None}
          yield f"data: {json.dumps({'error': error})}\n\n"
          return
        reason = results[i].finish_reason
        yield chunk(i, reason="length" if reason == "cancelled" else reason)
    if options["stream_usage"]:
      yield f"data: {json.dumps({**head, 'object': kind_name, 'choices': [], 'usage': _usage(results.values())})}\n\n"
    yield "data: [DONE]\n\n"
  finally:
    _cancel(jobs)


# -- running ---------------------------------------------------------------------------------------

def check_address(host: str, port: int):
  """Refuse an address this process cannot listen on, before the model loads."""
  if not 0 <= port <= 65535:
    raise EngineError(f"--port {port}: must be in 0..65535")
  try:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
      s.bind((host, port))
  except OSError as e:
    raise EngineError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
        shutdown_timeout: float = 30.0, log_level: str = "info") -> int:
  """Serve until SIGTERM or SIGINT: stop accepting, let the requests in flight finish (at most
  `shutdown_timeout` seconds), drain the engine, return 0 (SIGINT raises KeyboardInterrupt after)."""
  config = uvicorn.Config(create_app(engine, api_key), host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=shutdown_timeout)
  server = uvicorn.Server(config)
  # uvicorn re-raises the signal that stopped it, with the handler found before it ran: for SIGTERM
  # that handler is this no-op, so a graceful shutdown ends the process with 0.
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    server.run()
  finally:
    engine.stop(shutdown_timeout)
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return 0 if server.started else 1
