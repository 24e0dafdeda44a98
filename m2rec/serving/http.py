"""HTTP pieces of the service: refused requests as JSON responses, a request body size limit, /readyz details and
the token check of /reload and /items."""

from __future__ import annotations

import hmac
from typing import Any, Awaitable, Callable, Mapping

from starlette.responses import JSONResponse

from m2rec.serving.schemas import Failure

MAX_BODY_BYTES = 64 * 1024  # a 2,000-item history of 20-character ids is about 50 KB

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def failure_response(failure: Failure) -> JSONResponse:
    return JSONResponse(failure.body(), status_code=failure.status)


class BodySizeLimit:
    """ASGI middleware: answer 413 to request bodies over `max_bytes`, by Content-Length, or for chunked uploads
    by reading at most that much before the application sees the body."""

    def __init__(self, app: Callable, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await failure_response(Failure(status=413, field="body", message=(
            f"request body is over {self.max_bytes} bytes. Fix: send a shorter history (the model uses only the "
            "most recent items)")))(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        body, message = b"", {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class ReadinessDetails:
    """ASGI middleware: once the service has a status (`status()` is not None), GET /readyz answers it as JSON:
    200 with the version serving and the follower's last error, if any (a failed reload leaves the old version
    serving, which is ready)."""

    def __init__(self, app: Callable, status: Callable[[], dict | None]):
        self.app, self.status = app, status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/readyz" and scope["method"] == "GET":
            status = self.status()
            if status is not None:
                await JSONResponse(status, status_code=200 if status["ready"] else 503)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def token_failure(headers: Mapping[str, str], expected: str | None, variable: str = "M2REC_RELOAD_TOKEN",
                  action: str = "reloading") -> Failure | None:
    """Why a request may not do `action` (None: it may): it needs `Authorization: Bearer <$variable>`."""
    if not expected:
        return Failure(status=403, field="authorization", message=(
            f"{action} is disabled. Fix: set {variable} in the service's environment (a secret)"))
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        return Failure(status=401, field="authorization", message=(
            f"missing or wrong token. Fix: send the header `Authorization: Bearer <{variable}>`"))
    return None
