"""OpenAI protocol models (requests validated here, at the edge) and our `attention` extension."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class APIError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


INT64 = 2**63 - 1
MAX_STOP_CHARS = 1024  # each stop string: longer ones are never a real stop and cost a hold-back per token


class _Lenient(BaseModel):
    # unknown fields are ignored, as OpenAI-compatible servers do; NaN and infinities are not numbers here
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class AttentionOverride(_Lenient):
    """rattn extension: attention settings for one request. Token counts (top_k, sink, window,
    query_stride) are also bounded by the model's context, in the route that knows it."""

    mode: Literal["full", "streaming", "flat", "hnsw", "retrieval"] | None = None
    top_k: int | None = Field(None, ge=1, le=2**20)
    sink: int | None = Field(None, ge=0, le=2**24)
    window: int | None = Field(None, ge=1, le=2**24)
    ef: int | None = Field(None, ge=1, le=4096)  # index search list size
    # graph index build (the request's own index is built after its prefill). The bounds keep one request's
    # graph memory and build work within a few times the defaults'.
    degree: int | None = Field(None, ge=3, le=64)
    knn: int | None = Field(None, ge=2, le=256)
    max_queries: int | None = Field(None, ge=1, le=8192)
    query_stride: int | None = Field(None, ge=1, le=2**24)
    copy_threshold: float | None = Field(None, ge=0, le=1e6)  # retrieval: copying heads at or above it scan exactly


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT64)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT64)  # also at most the vocabulary (checked in the route)
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    attention: AttentionOverride | None = None
    ignore_eos: bool = False          # vLLM's extension: generate max_tokens whatever the model says
    # known fields we cannot honour: accepted only at their neutral value
    logit_bias: dict | None = None
    best_of: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in v):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in v):
            raise ValueError(f"each stop sequence must be at most {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat(self):
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than text is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Annotated[int, Field(ge=0, le=INT64)]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class TokenizeRequest(_Lenient):
    """vLLM's /tokenize: a `prompt` string or chat `messages` (with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None      # default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT64)]]
