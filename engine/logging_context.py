"""The id of the request a log line belongs to, for every log line of that request.

The server sets it per HTTP request (its X-Request-Id); the engine thread sets it while it runs a
request. `RequestIdFilter` puts it on each record as `request_id` ("-" outside any request)."""
from __future__ import annotations

import logging
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("request_id", default="-")

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure(level: int = logging.INFO):
    """Root logging with the request id on every line (uvicorn's loggers propagate to it)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
