"""What the client raises: `DarkroomError` at the root, one class per kind of answer under `APIError`."""

from __future__ import annotations

from typing import Any


class DarkroomError(Exception):
    """Anything the client raises on purpose."""


class TransportError(DarkroomError):
    """No answer: the connection failed, broke or timed out, after the retries."""


class WaitTimeout(DarkroomError):
    """`wait` gave up before the image or batch finished."""


class APIError(DarkroomError):
    """The service answered with an RFC 9457 problem."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        request_id: str | None = None,
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        # A 422's detail says "see errors": the message carries them, so a traceback or the CLI's line
        # names the field to fix rather than pointing at a list nobody printed.
        listed = _listed_errors((problem or {}).get("errors"))
        super().__init__(
            f"{status} {code}: {detail}"
            + (f" ({listed})" if listed else "")
            + (f" (request {request_id})" if request_id else "")
        )
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.problem = problem or {}
        # Seconds the service asked to wait (its Retry-After), on 429, 503 and some 409s.
        self.retry_after = retry_after


def _listed_errors(errors: object) -> str:
    """`field: message; …` of a problem's `errors` (whatever else the list holds is left out)."""
    if not isinstance(errors, list):
        return ""
    return "; ".join(
        f"{error.get('field')}: {error.get('message')}" for error in errors if isinstance(error, dict)
    )


class BadRequest(APIError):
    """400: the request is malformed (bad JSON, multipart, Idempotency-Key, …)."""


class AuthenticationError(APIError):
    """401: no API key, or not a valid one."""


class PermissionDenied(APIError):
    """403: a direct upload URL that is altered or expired."""


class NotFound(APIError):
    """404: no such resource in this account."""


class Conflict(APIError):
    """409: the resource is not in a state that allows it (not ready, sealed, failed, …)."""


class Gone(APIError):
    """410: expired or deleted for good (an archive past its 7 days, a missing output)."""


class PayloadTooLarge(APIError):
    """413: the file or a field is over the service's limit."""


class UnsupportedMedia(APIError):
    """415: the bytes are not an image format the service reads."""


class ValidationFailed(APIError):
    """422: the request names bad fields; `errors` lists `{"field", "message"}`."""

    @property
    def errors(self) -> list[dict[str, str]]:
        found: list[dict[str, str]] = self.problem.get("errors") or []
        return found


class RateLimited(APIError):
    """429: the plan's allowance is used up, after the retries; `retry_after` says for how long."""


class ServerError(APIError):
    """5xx: a fault or outage on the service's side (503s are retried before this is raised)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    415: UnsupportedMedia,
    416: BadRequest,
    422: ValidationFailed,
    429: RateLimited,
}


def error_for(
    status: int, problem: dict[str, Any], request_id: str | None, retry_after: float | None
) -> APIError:
    """The exception for a problem answer, its class chosen by status."""
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    code = str(problem.get("code") or "http_error")
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    return kind(status, code, detail, problem.get("request_id") or request_id, problem, retry_after)
