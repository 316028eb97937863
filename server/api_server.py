"""FastAPI front end: translates HTTP to engine requests and engine outputs back to OpenAI's shapes.

It owns no model logic. The engine loads in a background thread (GET /health is 503 until then);
every request ends in exactly one of completed, aborted (client gone: the engine frees its KV within
a step) or failed (an OpenAI-shaped error, never a bare 500 for bad input).
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.llm_engine import Engine, EngineConfig, QueueFull
from engine.sampling import SamplingParams
from engine.sequence import Request as EngineRequest
from engine.sequence import StepOutput

from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("rattn.server")


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = None
    api_key: str | None = None

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

    def load(self):
        try:
            self.engine = Engine(self.cfg.engine, observer=self.metrics)
        except Exception as e:  # reported by /health and every route
            log.exception("model load failed")
            self.load_error = f"{type(e).__name__}: {e}"

    def require_engine(self) -> Engine:
        if self.engine is None:
            msg = f"model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, msg, "service_unavailable")
        return self.engine


# ---------------------------------------------------------------------------------------------- bridge
class Generation:
    """Submits one engine request per choice and hands their outputs to the event loop, in order."""

    def __init__(self, state: State, prompts: list[list[int]], sampling: SamplingParams, attention, n: int):
        self.state, self.engine = state, state.require_engine()
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
        self.ids: list[str] = []
        self.t0 = time.perf_counter()
        self.last: dict[int, float] = {}
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        base = uuid.uuid4().hex[:12]
        try:
            for i, (p, j) in enumerate((p, j) for p in prompts for j in range(n)):
                # choice j of a seeded request gets seed + j: n samples, each reproducible
                sp = sampling if sampling.seed is None or j == 0 else replace(sampling, seed=sampling.seed + j)
                req = EngineRequest(p, sp, attention, f"{base}-{i}")
                self.engine.submit(req, lambda o, i=i: self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, o)))
                self.ids.append(req.request_id)
        except QueueFull as e:
            self.abort()
            raise APIError(429, str(e), "rate_limit_exceeded") from None
        except ValueError as e:
            self.abort()
            raise APIError(400, str(e), param="messages") from None
        self.pending = len(self.ids)

    def abort(self):
        for rid in self.ids:
            self.engine.abort(rid)

    async def outputs(self, request: Request | None = None):
        """Yield (choice index, StepOutput) until every choice has finished; abort if the client leaves."""
        m = self.state.metrics
        try:
            while self.pending:
                try:
                    i, out = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        self.abort()
                    continue
                now = time.perf_counter()
                if out.token is not None:
                    self.completion_tokens += 1
                    m.generation_tokens.inc()
                    if i in self.last:
                        m.itl.observe(now - self.last[i])
                    else:
                        m.ttft.observe(now - self.t0)
                    self.last[i] = now
                if out.finish_reason is not None:
                    self.pending -= 1
                    m.success.labels(finished_reason=out.finish_reason).inc()
                    m.e2e.observe(now - self.t0)
                    if out.finish_reason == "error":
                        raise APIError(500, f"generation failed: {out.error}", "server_error")
                yield i, out
        finally:
            if self.pending:  # the consumer left (client gone): the engine drops these within a step
                self.abort()
                m.success.labels(finished_reason="abort").inc(self.pending)
                self.pending = 0


# ---------------------------------------------------------------------------------------------- helpers
async def _parse(request: Request, model):
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ())) or None
        raise APIError(400, f"{param}: {err.get('msg')}" if param else err.get("msg", "invalid request"),
                       param=param) from None


def _sampling(req, max_tokens: int, logprobs: int | None, engine: Engine) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=max(req.top_k or 0, 0), seed=req.seed, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, stop=req.stop or [], logprobs=logprobs,
            ignore_eos=req.ignore_eos)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _attention(req, engine: Engine):
    if req.attention is None:
        return None
    try:
        return engine.config.attention.override(**req.attention.model_dump())
    except ValueError as e:
        raise APIError(400, str(e), param="attention") from None


def _max_tokens(requested: int | None, prompt_len: int, engine: Engine) -> int:
    if requested is not None:
        return requested
    left = engine.max_model_len - prompt_len
    if left < 1:
        raise APIError(400, f"this model's maximum context length is {engine.max_model_len} tokens; the prompt "
                            f"has {prompt_len} tokens, leaving no room to generate", param="messages")
    return left


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(engine: Engine, token: int) -> str:
    return engine.tokenizer.decode([token])


def _chat_logprobs(engine: Engine, out: StepOutput) -> dict:
    def entry(t, lp):
        s = _token_text(engine, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    e = entry(out.sample.token, out.sample.logprob)
    e["top_logprobs"] = [entry(t, lp) for t, lp in (out.sample.top or [])]
    return e


# ---------------------------------------------------------------------------------------------- app
def create_app(cfg: ServerConfig, load_in_background: bool = True) -> FastAPI:
    state = State(cfg)
    app = FastAPI(title="rattn", version="0.1.0",
                  description="OpenAI-compatible server for long-context LLMs with RetrievalAttention")
    app.state.rattn = state

    @app.on_event("startup")
    async def _startup():
        if load_in_background:
            threading.Thread(target=state.load, name="rattn-load", daemon=True).start()
        else:
            state.load()

    @app.on_event("shutdown")
    async def _shutdown():
        if state.engine is not None:
            state.engine.shutdown()

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e.errors()[0].get("msg"))).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
                return JSONResponse(APIError(401, "invalid or missing API key", "authentication_error",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    def check_model(name: str):
        if name != cfg.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{cfg.model_name}'",
                           "not_found_error", param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "error" if state.load_error else "loading", "error": state.load_error},
                                status_code=503)
        return {"status": "ok"}

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

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        check_model(req.model)
        engine = state.require_engine()
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        ids = engine.encode_chat(msgs)
        mt = _max_tokens(req.max_completion_tokens or req.max_tokens, len(ids), engine)
        lp = (req.top_logprobs or 0) if req.logprobs else None
        gen = Generation(state, [ids], _sampling(req, mt, lp, engine), _attention(req, engine), req.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": cfg.model_name}
        if req.stream:
            return EventSourceResponse(_stream_chat(gen, head, req, engine, len(ids)), ping=15)
        texts, reasons = [""] * req.n, [None] * req.n
        lps: list[list] = [[] for _ in range(req.n)]
        async for i, out in gen.outputs(request):
            texts[i] += out.text
            if out.token is not None and lp is not None:
                lps[i].append(_chat_logprobs(engine, out))
            reasons[i] = out.finish_reason or reasons[i]
        if any(r == "abort" for r in reasons):
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": {"content": lps[i]} if lp is not None else None, "finish_reason": reasons[i]}
                   for i in range(req.n)]
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": _usage(len(ids), gen.completion_tokens)}

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
                    yield chunk([{"index": i, "delta": {"content": out.text},
                                  "logprobs": {"content": [_chat_logprobs(engine, out)]} if lp else None,
                                  "finish_reason": None}])
                if out.finish_reason is not None:
                    yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}])

        return _sse(events(), gen, chunk, prompt_len if include_usage else None)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        check_model(req.model)
        engine = state.require_engine()
        prompts = [p if isinstance(p, list) else engine.encode(p) for p in req.prompts()]
        longest = max(len(p) for p in prompts)
        mt = _max_tokens(req.max_tokens if req.max_tokens is not None else 16, longest, engine)
        gen = Generation(state, prompts, _sampling(req, mt, req.logprobs, engine), _attention(req, engine), req.n)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name}
        total = len(prompts) * req.n
        if req.stream:
            return EventSourceResponse(_stream_completion(gen, head, req, engine), ping=15)
        texts, reasons = [""] * total, [None] * total
        lps = [_empty_completion_logprobs() for _ in range(total)]
        async for i, out in gen.outputs(request):
            if out.token is not None and req.logprobs is not None:
                _add_completion_logprob(lps[i], engine, out, len(texts[i]))
            texts[i] += out.text
            reasons[i] = out.finish_reason or reasons[i]
        if any(r == "abort" for r in reasons):
            return Response(status_code=499)
        choices = [{"index": i, "text": texts[i], "logprobs": lps[i] if req.logprobs is not None else None,
                    "finish_reason": reasons[i]} for i in range(total)]
        return {**head, "choices": choices, "usage": _usage(gen.prompt_tokens, gen.completion_tokens)}

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
            yield chunk([], _usage(usage_prompt_tokens, gen.completion_tokens))
        yield {"data": "[DONE]"}
    except APIError as e:
        yield {"data": json.dumps(e.body())}


def _empty_completion_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _add_completion_logprob(lp: dict, engine: Engine, out: StepOutput, offset: int):
    lp["tokens"].append(_token_text(engine, out.sample.token))
    lp["token_logprobs"].append(out.sample.logprob)
    lp["top_logprobs"].append({_token_text(engine, t): v for t, v in (out.sample.top or [])})
    lp["text_offset"].append(offset)
