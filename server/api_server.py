"""FastAPI front end: translates HTTP to engine requests and engine outputs back to OpenAI's shapes.

It owns no model logic. The engine loads in a background thread (GET /health is 503 until then);
every request ends in exactly one of completed, aborted (client gone: the engine frees its KV within
a step) or failed (an OpenAI-shaped error, never a bare 500 for bad input). On SIGTERM/SIGINT the
server drains: new requests get 503, running ones may finish within the shutdown timeout, the rest
are aborted with a final chunk, then the process exits 0 (`serve`).
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.attention import AttentionConfig
from engine.llm_engine import Engine, EngineConfig, EngineUnavailable, QueueFull
from engine.sampling import SamplingParams
from engine.sequence import Request as EngineRequest
from engine.sequence import StepOutput

from .metrics import Metrics
from .middleware import ApiKey, BodyLimit, RequestId
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger("rattn.server")

try:
    VERSION = importlib.metadata.version("rattn")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    VERSION = "0.0.0+source"

ERROR_TYPES = {503: "service_unavailable"}


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = None
    api_key: str | None = None
    max_request_mb: float = 8.0         # request body limit (413 above it): a 1M-token prompt is ~4 MB of text
    sse_keepalive: float = 15.0         # seconds between `: keep-alive` comments on a quiet stream
    shutdown_timeout: float = 30.0      # on SIGTERM: how long running requests may still run
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: no CORS headers
    # a chat request without max_tokens: at most this many (0: what the context and the host budget hold).
    # Admission reserves a request's largest size, so uncapped ones would each take a long context's room.
    default_max_tokens: int = 4096

    def __post_init__(self):
        if self.max_request_mb <= 0 or self.sse_keepalive <= 0 or self.shutdown_timeout < 0:
            raise ValueError("max_request_mb and sse_keepalive must be > 0, shutdown_timeout >= 0")
        if self.default_max_tokens < 0:
            raise ValueError("default_max_tokens must be >= 0")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model


class State:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.started = int(time.time())
        self.metrics = Metrics(lambda: self.engine)
        self.draining = False   # SIGTERM seen: no new work
        self.active = 0         # generations whose HTTP response has not ended

    def load(self):
        try:
            self.engine = Engine(self.cfg.engine, observer=self.metrics)
        except Exception as e:  # reported by /health and every route
            log.exception("model load failed")
            self.load_error = f"{type(e).__name__}: {e}"

    def require_engine(self) -> Engine:
        if self.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable")
        if self.engine is None:
            msg = f"model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, msg, "service_unavailable")
        return self.engine


# ---------------------------------------------------------------------------------------------- bridge
class Generation:
    """Submits one engine request per choice and hands their outputs to the event loop, in order."""

    def __init__(self, state: State, prompts: list[list[int]], sampling: SamplingParams, attention, n: int,
                 request_id: str, param: str):
        self.state, self.engine = state, state.require_engine()
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
        self.ids: list[str] = []
        self.t0 = time.perf_counter()
        self.last: dict[int, float] = {}
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.n = n
        self.cached: dict[int, int] = {}  # per prompt: its tokens reused from the document cache (any choice's)
        try:
            for i, (p, j) in enumerate((p, j) for p in prompts for j in range(n)):
                # choice j of a seeded request gets seed + j: n samples, each reproducible
                sp = sampling if sampling.seed is None or j == 0 else replace(sampling, seed=sampling.seed + j)
                req = EngineRequest(p, sp, attention, f"{request_id}-{uuid.uuid4().hex[:8]}-{i}")
                self.engine.submit(req, lambda o, i=i: self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, o)))
                self.ids.append(req.request_id)
        except QueueFull as e:
            self.abort()
            raise APIError(429, str(e), "rate_limit_exceeded") from None
        except EngineUnavailable as e:
            self.abort()
            raise APIError(503, str(e), "service_unavailable") from None
        except ValueError as e:
            self.abort()
            raise APIError(400, str(e), param=param) from None
        self.pending = len(self.ids)
        self.closed = False
        self.watchers: list[asyncio.Task] = []
        state.active += 1

    def usage(self, prompt_tokens: int) -> dict:
        """OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens the document cache held."""
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())}}

    def abort(self):
        for rid in self.ids:
            self.engine.abort(rid)

    async def outputs(self, request: Request | None = None):
        """Yield (choice index, StepOutput) until every choice has finished. With `request` (a plain,
        non-streaming response) a watcher aborts the generation as soon as the client disconnects."""
        m = self.state.metrics
        self.watchers.append(asyncio.create_task(self._fail_if_engine_stops()))
        if request is not None:
            self.watchers.append(asyncio.create_task(self._abort_on_disconnect(request)))
        try:
            while self.pending:
                i, out = await self.queue.get()
                if out is None:  # from _fail_if_engine_stops
                    raise APIError(503, f"the engine stopped serving: {self.engine.health()}", "service_unavailable")
                now = time.perf_counter()
                if out.token is not None:
                    self.completion_tokens += 1
                    m.generation_tokens.inc()
                    if i in self.last:
                        m.itl.observe(now - self.last[i])
                    else:
                        m.ttft.observe(now - self.t0)
                    self.last[i] = now
                if out.num_cached_tokens:
                    self.cached[i // self.n] = max(self.cached.get(i // self.n, 0), out.num_cached_tokens)
                if out.finish_reason is not None:
                    self.pending -= 1
                    m.success.labels(finished_reason=out.finish_reason).inc()
                    m.e2e.observe(now - self.t0)
                    if out.finish_reason == "error":
                        s = out.error_status
                        raise APIError(s, f"generation failed: {out.error}", ERROR_TYPES.get(s, "server_error"))
                yield i, out
        finally:
            self.close()

    def close(self):
        """End of the HTTP side (idempotent): what has not finished is aborted; the engine drops it within a step."""
        if self.closed:
            return
        self.closed = True
        for w in self.watchers:
            w.cancel()
        if self.pending:
            self.abort()
            self.state.metrics.success.labels(finished_reason="abort").inc(self.pending)
            self.pending = 0
        self.state.active -= 1

    async def _abort_on_disconnect(self, request: Request):
        # the body has been read: the next ASGI message is the disconnect, whenever it comes
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.abort()

    async def _fail_if_engine_stops(self):
        # an engine thread that ended or stalls never sends the final outputs: fail instead of hanging
        while not self.engine.health():
            await asyncio.sleep(1.0)
        self.queue.put_nowait((-1, None))

    def aborted_response(self) -> Response:
        """A plain response whose generation was aborted: by the server's shutdown (503), else the client
        is gone and nobody reads it (499, nginx's 'client closed request')."""
        if self.state.draining:
            e = APIError(503, "the server shut down before this request finished", "service_unavailable")
            return JSONResponse(e.body(), status_code=503)
        return Response(status_code=499)


# ---------------------------------------------------------------------------------------------- helpers
def _sampling(req, max_tokens: int, logprobs: int | None, engine: Engine) -> SamplingParams:
    vocab = engine.shape.vocab_size
    if req.top_k is not None and req.top_k > vocab:
        raise APIError(400, f"top_k: must be at most the vocabulary size {vocab} (or -1/0 for off)", param="top_k")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=max(req.top_k or 0, 0), seed=None if req.seed is None else req.seed % 2**63,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, stop=req.stop or [],
            logprobs=logprobs, ignore_eos=req.ignore_eos)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _attention(req, engine: Engine):
    if req.attention is None:
        return None
    over = req.attention.model_dump()
    limit = engine.max_model_len
    for name in ("top_k", "sink", "window", "query_stride"):
        if over[name] is not None and over[name] > limit:
            raise APIError(400, f"attention.{name}: must be at most {limit} (this model's context)",
                           param=f"attention.{name}")
    try:
        return engine.config.attention.override(**over)
    except ValueError as e:
        raise APIError(400, str(e), param="attention") from None


def _max_tokens(requested: int | None, name: str, prompt_len: int, engine: Engine,
                attention: AttentionConfig | None, default: int = 0) -> int:
    limit = engine.max_model_len
    if requested is not None:
        if requested > limit:
            raise APIError(400, f"{name}: must be at most {limit} (this model's maximum context length); got "
                                f"{requested}", param=name)
        return requested
    left = limit - prompt_len
    if left < 1:
        raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt "
                            f"has {prompt_len} tokens, leaving no room to generate", param="messages")
    # unasked: up to `default`, and no more than the host memory budget holds (the engine refuses the prompt
    # if it holds none)
    return max(1, min(left, default or left, engine.tokens_that_fit(prompt_len, attention)))


async def _tokenize(fn, *args, param: str):
    """Tokenisation and chat templating off the event loop; a model without a tokenizer, or a template
    that rejects the conversation (jinja's TemplateError), is the client's 400."""
    try:
        return await run_in_threadpool(fn, *args)
    except (ValueError, TypeError, TemplateError) as e:
        raise APIError(400, f"{param}: {e}", param=param) from None


def _messages(req) -> list[dict]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


def _token_text(engine: Engine, token: int) -> str:
    # without a tokenizer, vLLM's spelling of a bare token id
    return engine.tokenizer.decode([token]) if engine.tokenizer is not None else f"token_id:{token}"


def _chat_logprobs(engine: Engine, out: StepOutput) -> dict:
    def entry(t, lp):
        s = _token_text(engine, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    e = entry(out.sample.token, out.sample.logprob)
    e["top_logprobs"] = [entry(t, lp) for t, lp in (out.sample.top or [])]
    return e


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid request"))
    return (f"{param}: {msg}" if param else msg), param


# ---------------------------------------------------------------------------------------------- app
def create_app(cfg: ServerConfig, load_in_background: bool = True) -> FastAPI:
    state = State(cfg)

    @asynccontextmanager
    async def lifespan(_app):
        if load_in_background:
            threading.Thread(target=state.load, name="rattn-load", daemon=True).start()
        else:
            state.load()
        yield
        if state.engine is not None:
            await run_in_threadpool(state.engine.shutdown)

    app = FastAPI(title="rattn", version=VERSION, lifespan=lifespan,
                  description="OpenAI-compatible server for long-context LLMs with RetrievalAttention")
    app.state.rattn = state
    generated_openapi = app.openapi

    def openapi() -> dict:
        """The schema names the one model served, so that clients and fuzzers see which `model` is valid."""
        schema = generated_openapi()
        for props in (c.get("properties", {}) for c in schema["components"]["schemas"].values()):
            if "model" in props:
                enum = {"type": "string", "enum": [cfg.model_name]}
                props["model"] = enum if "type" in props["model"] else {"anyOf": [enum, {"type": "null"}]}
        return schema

    app.openapi = openapi

    # outermost last: the request id covers everything; CORS answers preflights before the key check
    if cfg.api_key:
        app.add_middleware(ApiKey, key=cfg.api_key)
    app.add_middleware(BodyLimit, limit=int(cfg.max_request_mb * 2**20))
    if cfg.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(RequestId)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        msg, param = _validation_message(e)
        return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind, code=getattr(e, "code", None)).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    def check_model(name: str | None):
        if name is not None and name != cfg.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{cfg.model_name}'",
                           "not_found_error", param="model", code="model_not_found")

    def keepalive_stream(events) -> EventSourceResponse:
        # a `: keep-alive` comment whenever the stream is quiet (queued, prefilling), for idle-timeout proxies
        return EventSourceResponse(events, ping=cfg.sse_keepalive,
                                   ping_message_factory=lambda: ServerSentEvent(comment="keep-alive"))

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "error" if state.load_error else "loading", "error": state.load_error},
                                status_code=503)
        problem = state.engine.health()
        if problem:
            return JSONResponse({"status": "error", "error": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": state.started, "owned_by": "rattn",
                "max_model_len": state.engine.max_model_len if state.engine else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        engine = state.require_engine()
        if req.messages is not None:
            ids = await _tokenize(engine.encode_chat, _messages(req), req.add_generation_prompt,
                                  bool(req.add_special_tokens), param="messages")
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await _tokenize(engine.encode, req.prompt, add, param="prompt")
        strs = await _tokenize(engine.token_strs, ids, param="tokens") if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        engine = state.require_engine()
        if any(t >= engine.shape.vocab_size for t in req.tokens):
            raise APIError(400, f"tokens: ids must be below the vocabulary size {engine.shape.vocab_size}",
                           param="tokens")
        return {"prompt": await _tokenize(engine.decode, req.tokens, param="tokens")}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        engine = state.require_engine()
        ids = await _tokenize(engine.encode_chat, _messages(req), param="messages")
        name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        att = _attention(req, engine)
        mt = _max_tokens(req.max_completion_tokens or req.max_tokens, name, len(ids), engine, att,
                         cfg.default_max_tokens)
        lp = (req.top_logprobs or 0) if req.logprobs else None
        gen = Generation(state, [ids], _sampling(req, mt, lp, engine), att, req.n,
                         request.state.request_id, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": cfg.model_name}
        if req.stream:
            return keepalive_stream(_stream_chat(gen, head, req, engine, len(ids)))
        texts, reasons = [""] * req.n, [None] * req.n
        lps: list[list] = [[] for _ in range(req.n)]
        async for i, out in gen.outputs(request):
            texts[i] += out.text
            if out.token is not None and lp is not None:
                lps[i].append(_chat_logprobs(engine, out))
            reasons[i] = out.finish_reason or reasons[i]
        if any(r == "abort" for r in reasons):
            return gen.aborted_response()
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": {"content": lps[i]} if lp is not None else None, "finish_reason": reasons[i]}
                   for i in range(req.n)]
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": gen.usage(len(ids))}

    def _stream_chat(gen: Generation, head: dict, req, engine: Engine, prompt_len: int):
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        lp = req.logprobs

        def chunk(choices, usage=None):
            c = {**head, "object": "chat.completion.chunk", "choices": choices}
            if include_usage:
                c["usage"] = usage
            return {"data": json.dumps(c)}

        async def events():
            for i in range(req.n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for i, out in gen.outputs():
                if out.text or (lp and out.token is not None):
                    has_lp = lp and out.token is not None  # text released at an abort carries no new token
                    yield chunk([{"index": i, "delta": {"content": out.text},
                                  "logprobs": {"content": [_chat_logprobs(engine, out)]} if has_lp else None,
                                  "finish_reason": None}])
                if out.finish_reason is not None:
                    yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}])

        return _sse(events(), gen, chunk, prompt_len if include_usage else None)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        engine = state.require_engine()
        prompts = [p if isinstance(p, list) else await _tokenize(engine.encode, p, param="prompt")
                   for p in req.prompts()]
        if len(prompts) * req.n > engine.config.max_queue:
            raise APIError(400, f"prompt: {len(prompts)} prompts x n={req.n} is more than the {engine.config.max_queue}"
                                f" requests this server queues (--max-queue)", param="prompt")
        longest = max(len(p) for p in prompts)
        att = _attention(req, engine)
        mt = _max_tokens(req.max_tokens if req.max_tokens is not None else 16, "max_tokens", longest, engine, att)
        gen = Generation(state, prompts, _sampling(req, mt, req.logprobs, engine), att, req.n,
                         request.state.request_id, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name}
        total = len(prompts) * req.n
        if req.stream:
            return keepalive_stream(_stream_completion(gen, head, req, engine))
        texts, reasons = [""] * total, [None] * total
        lps = [_empty_completion_logprobs() for _ in range(total)]
        async for i, out in gen.outputs(request):
            if out.token is not None and req.logprobs is not None:
                _add_completion_logprob(lps[i], engine, out, len(texts[i]))
            texts[i] += out.text
            reasons[i] = out.finish_reason or reasons[i]
        if any(r == "abort" for r in reasons):
            return gen.aborted_response()
        choices = [{"index": i, "text": texts[i], "logprobs": lps[i] if req.logprobs is not None else None,
                    "finish_reason": reasons[i]} for i in range(total)]
        return {**head, "choices": choices, "usage": gen.usage(gen.prompt_tokens)}

    def _stream_completion(gen: Generation, head: dict, req, engine: Engine):
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        offsets: dict[int, int] = {}

        def chunk(choices, usage=None):
            c = {**head, "choices": choices}
            if include_usage:
                c["usage"] = usage
            return {"data": json.dumps(c)}

        async def events():
            async for i, out in gen.outputs():
                lp = None
                if out.token is not None and req.logprobs is not None:
                    lp = _empty_completion_logprobs()
                    _add_completion_logprob(lp, engine, out, offsets.get(i, 0))
                offsets[i] = offsets.get(i, 0) + len(out.text)
                if out.text or lp or out.finish_reason:
                    yield chunk([{"index": i, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}])

        return _sse(events(), gen, chunk, gen.prompt_tokens if include_usage else None)

    return app


async def _sse(events, gen: Generation, chunk, usage_prompt_tokens: int | None):
    """The tail every stream shares: the usage chunk (with include_usage), `[DONE]`, and a failure as an
    OpenAI-shaped error event. A client that leaves stops this generator; Generation aborts the rest."""
    try:
        async for c in events:
            yield c
        if usage_prompt_tokens is not None:
            yield chunk([], gen.usage(usage_prompt_tokens))
        yield {"data": "[DONE]"}
    except APIError as e:
        yield {"data": json.dumps(e.body())}
    except Exception as e:  # a bug of ours must still end the stream in OpenAI's shape, not cut it
        log.exception("stream failed")
        yield {"data": json.dumps(APIError(500, f"internal error: {type(e).__name__}", "server_error").body())}
    finally:
        gen.close()


def _empty_completion_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _add_completion_logprob(lp: dict, engine: Engine, out: StepOutput, offset: int):
    lp["tokens"].append(_token_text(engine, out.sample.token))
    lp["token_logprobs"].append(out.sample.logprob)
    lp["top_logprobs"].append({_token_text(engine, t): v for t, v in (out.sample.top or [])})
    lp["text_offset"].append(offset)


# ---------------------------------------------------------------------------------------------- serving
class DrainingServer(uvicorn.Server):
    """uvicorn, with a graceful drain on the first SIGTERM/SIGINT: /health and new requests get 503,
    running requests may finish within `shutdown_timeout`, the rest are aborted (each stream still gets
    its final chunk and [DONE]), then uvicorn exits. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: State):
        super().__init__(config)
        self.state = state
        self.drain_task: asyncio.Task | None = None

    def handle_exit(self, sig, frame):
        if self.state.draining:  # second signal
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True
        loop = asyncio.get_event_loop()  # a signal handler: start the drain from the loop itself
        loop.call_soon_threadsafe(lambda: setattr(self, "drain_task", loop.create_task(self._drain())))

    async def _drain(self):
        st, timeout = self.state, self.state.cfg.shutdown_timeout
        eng = st.engine
        log.info("shutting down: %d requests running or queued; waiting up to %g s", st.active, timeout)
        deadline = time.monotonic() + timeout
        while st.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if st.active and eng is not None:
            log.info("shutdown timeout: aborting %d requests", st.active)
            eng.abort_all()
            end = time.monotonic() + 1.5  # their final chunks go out within a decode step
            while st.active and time.monotonic() < end:
                await asyncio.sleep(0.02)
        self.should_exit = True


def serve(cfg: ServerConfig, host: str, port: int):
    app = create_app(cfg)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=2)
    server = DrainingServer(config, app.state.rattn)
    server.run()
    if server.state.draining:
        # Drained and shut down: every request has ended and the engine has freed its state. The interpreter's
        # own teardown (torch's and numba's thread pools, module finalisers) would add ~1.5 s to the exit.
        logging.shutdown()
        os._exit(0)
