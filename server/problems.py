"""RFC 9457 problem responses: every error a partner sees has the same shape."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from jobs.params import FieldError
from server.json_response import JSONResponse
from server.request_log import REQUEST_ID_HEADER, request_id_of

PROBLEM_BASE = "https://darkroom.dev/problems/"
_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    409: "Conflict",
    410: "Gone",
    413: "Payload too large",
    415: "Unsupported media type",
    416: "Range not satisfiable",
    422: "Unprocessable content",
    429: "Too many requests",
    431: "Request header fields too large",
    500: "Internal server error",
    503: "Service unavailable",
    507: "Insufficient storage",
}
# How long a client is told to wait before sending again into a full storage.
STORAGE_FULL_RETRY_AFTER_SECONDS = 60
STORAGE_UNAVAILABLE_RETRY_AFTER_SECONDS = 5


class Problem(Exception):
    """Raise from a route to answer with a problem document; `code` becomes the type's last segment."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        errors: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = list(errors)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.code,
            "title": _TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if self.errors:
            body["errors"] = [error.to_json() for error in self.errors]
        return body


class ProblemResponse(JSONResponse):
    media_type = "application/problem+json"

    def render(self, content: Any) -> bytes:
        # A detail or field may quote what the client sent: half a UTF-16 pair in it (a lone surrogate,
        # not encodable as UTF-8) becomes "?" rather than turning the problem into a 500.
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "replace")


def problem_response(request: Request, problem: Problem) -> Response:
    """`problem` as answered to `request`, naming its id (the header too: a fault of the outermost
    middlewares is answered from outside the one that sets it on every other response)."""
    body, headers = problem.body(), dict(problem.headers)
    request_id = request_id_of(request)
    if request_id is not None:
        body["request_id"] = request_id
        headers[REQUEST_ID_HEADER] = request_id
    return ProblemResponse(body, status_code=problem.status, headers=headers)


def storage_full_problem() -> Problem:
    """Our storage has no room: nothing was kept, and the same request will work once space is freed."""
    return Problem(
        507,
        "storage_full",
        "the service's storage is full, so nothing was stored; retry later",
        headers={"Retry-After": str(STORAGE_FULL_RETRY_AFTER_SECONDS)},
    )


def validation_problem(errors: Sequence[FieldError]) -> Problem:
    return Problem(422, "validation_failed", "The request has invalid fields; see errors.", errors=errors)


async def handle_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(request, exc)


async def handle_store_unavailable(request: Request, exc: Exception) -> Response:
    """Redis unreachable: nothing was accepted, and trying again shortly is the right move."""
    return problem_response(
        request,
        Problem(
            503,
            "store_unavailable",
            "the service cannot reach its store; retry shortly",
            headers={"Retry-After": "5"},
        ),
    )


async def handle_storage_unavailable(request: Request, exc: Exception) -> Response:
    """The blob storage (S3) failed or cannot be reached: nothing was accepted; trying again shortly works."""
    return problem_response(
        request,
        Problem(
            503,
            "storage_unavailable",
            "the service cannot reach its file storage; retry shortly",
            headers={"Retry-After": str(STORAGE_UNAVAILABLE_RETRY_AFTER_SECONDS)},
        ),
    )


async def handle_client_gone(request: Request, exc: Exception) -> Response:
    """The client closed its connection before its body ended (a phone losing its network mid-`PUT`):
    nobody reads this answer, but the request's log line and metrics then count it as the client's doing,
    as a cut-off multipart upload is, not as a fault of ours with a traceback."""
    return problem_response(
        request, Problem(400, "client_disconnected", "the connection closed before the request body ended")
    )


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """A bug of ours still answers in the problem shape (the traceback goes to the server log)."""
    return problem_response(
        request, Problem(500, "internal_error", "an unexpected error occurred; it has been logged")
    )


async def handle_http_status(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 answers, in the same problem shape."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or _TITLES.get(status, "Error")
    headers = getattr(exc, "headers", None)
    if status == 405:
        allowed = _allowed_methods(request)
        detail = f"{request.method} is not allowed here; this route takes {allowed}"
        headers = {**(headers or {}), "Allow": allowed}
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    return problem_response(request, Problem(status, code, str(detail), headers=headers))


def _allowed_methods(request: Request) -> str:
    """Every method the request's path takes: Starlette's 405 names only the first route matching it,
    and one path may be served by several (an image's GET and DELETE)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))
