"""`/dashboard`: the account's images, batches and webhooks in a browser, signed in with an API key.

The key is exchanged once (a form POST) for a session: a random id in an HttpOnly, SameSite=Strict cookie
(Secure when the service is reached over https), kept in Redis for `DARKROOM_DASHBOARD_SESSION_TTL`. Only
a hash of the id is stored, and the key itself nowhere: it is never in a URL, a page or a cookie.

Every state-changing request carries the session's CSRF token (`X-CSRF-Token`, which htmx sends from the
page's `hx-headers`, or a `csrf_token` form field) besides the SameSite cookie; the sign-in form has its
own token, double-submitted in a cookie, so no other site can sign a browser into its account.

What the dashboard does, it does through the API's own route functions (upload, thumbnails as output
variants, batches made, filled and sealed, archives, endpoints added and deleted, test events, retries),
whose JSON bodies the pages' forms send as they are: the session's account is counted against the rate
limit as an API request, after which `require_account` answers with it.

Pages are Jinja2 templates; htmx, its SSE extension and our `dashboard.js` are served from
`server/static/` under a strict Content-Security-Policy (no inline script or style). One SSE stream per
page sends the page's table (images, batches or deliveries) again whenever it changes: it waits for the
account's change notifications (server/changes.py) and reads Redis only when one is heard, a burst of
them read once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import jinja2
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from jobs.records import Account
from jobs.settings import Settings
from jobs.store import Store
from server import batches, deliveries, endpoints, images
from server.auth import why_key_refused
from server.changes import ChangeFeed
from server.docs import IMMUTABLE_ASSET_HEADERS
from server.failed_authentications import FailedAuthentications, client_address
from server.images import batches_of
from server.problems import Problem
from server.query import QueryModel, query_of, takes_query
from server.ratelimit import count_request
from server.variants import VariantQuery
from webhooks.changes import ChangeKind
from webhooks.endpoints import EVENT_TYPES
from webhooks.messages import MessageFilter

_HERE = Path(__file__).resolve().parent
_STATIC_DIR = _HERE / "static"
_STATIC_FILES = frozenset(path.name for path in _STATIC_DIR.iterdir() if not path.name.endswith(".LICENSE"))
# Changes whenever one of the files does: what a browser cached under an older one is never used.
ASSET_VERSION = hashlib.sha256(
    b"".join((_STATIC_DIR / name).read_bytes() for name in sorted(_STATIC_FILES))
).hexdigest()[:12]
ASSET_PATH = f"/dashboard/assets/{ASSET_VERSION}"

SESSION_COOKIE = "dr_session"
SIGN_IN_COOKIE = "dr_sign_in"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
_COOKIE_PATH = "/dashboard"
_SIGN_IN_TOKEN_SECONDS = 3600
# Rows each table shows: the newest.
TABLE_ROWS = 50
# The SSE stream reads its table again at most this often, however many changes it hears meanwhile.
RENDER_EVERY_SECONDS = 0.25
# It checks that the session still stands this often (and when it hears of a change), sends a comment
# after this long without a word so that proxies keep an idle stream open, ends after STREAM_SECONDS and
# the browser reconnects at once (`retry:`): a web process shutting down waits for no stream longer.
SESSION_CHECK_SECONDS = 5.0
KEEP_ALIVE_SECONDS = 15.0
STREAM_SECONDS = 30.0
RECONNECT_MS = 500

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _to_the_minute(moment: str) -> str:
    """`2026-12-06T20:57:51.730Z` as `2026-12-06 20:57 UTC`: the resources' times, for people."""
    return f"{moment[:10]} {moment[11:16]} UTC"


_templates.filters["minute"] = _to_the_minute
_templates.globals["event_types"] = EVENT_TYPES


def _session_key(session_id: str) -> str:
    # A hash: whoever reads Redis learns no session id a browser could present.
    return f"dr:dashboard:session:{hashlib.sha256(session_id.encode()).hexdigest()}"


@dataclass(frozen=True)
class Session:
    id: str
    account: Account
    csrf_token: str


async def _session(request: Request) -> Session | None:
    """The signed-in session the request's cookie names, its account counted as an API request."""
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        return None
    redis: Redis = request.app.state.redis
    raw = await redis.get(_session_key(session_id))
    if raw is None:
        return None
    saved = json.loads(raw)
    store: Store = request.app.state.store
    account = await store.get_account(saved["account_id"])
    if account is None:
        return None
    await count_request(request, account)
    return Session(session_id, account, saved["csrf_token"])


async def _require_session(request: Request) -> Session:
    session = await _session(request)
    if session is None:
        raise Problem(401, "not_signed_in", "sign in to the dashboard first (/dashboard/sign-in)")
    return session


async def _require_changing_session(request: Request) -> Session:
    """A signed-in session, for a request that changes something: its CSRF token must come with it."""
    session = await _require_session(request)
    presented = request.headers.get(CSRF_HEADER)
    if presented is None and _is_form(request):
        presented = str((await request.form()).get(CSRF_FIELD, ""))
    _check_csrf(presented, session.csrf_token)
    return session


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")


def _check_csrf(presented: str | None, expected: str) -> None:
    if not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise Problem(403, "csrf_failed", "the request did not carry this session's CSRF token")


def _secure(request: Request) -> bool:
    settings: Settings = request.app.state.settings
    return request.url.scheme == "https" or urlsplit(settings.public_url).scheme == "https"


def _set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=_COOKIE_PATH,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )


def _page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = _templates.get_template(template).render(asset_path=ASSET_PATH, request=request, **context)
    return HTMLResponse(html, status_code=status_code, headers=_PAGE_HEADERS)


def _fragment(template: str, **context: Any) -> str:
    return _templates.get_template(template).render(**context)


# Sign-in and sign-out.


def _in_words(seconds: int) -> str:
    """`seconds` of a wait, for people: `45 seconds`, `1 minute`, `4 minutes` (rounded up)."""
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


async def sign_in_page(request: Request) -> Response:
    if await _session(request) is not None:
        return RedirectResponse("/dashboard", status_code=303)
    return _sign_in_form(request)


def _sign_in_form(
    request: Request, error: str | None = None, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    token = secrets.token_urlsafe(32)
    response = _page(request, "sign_in.html", status_code, csrf_token=token, error=error)
    response.headers.update(headers or {})
    _set_cookie(response, request, SIGN_IN_COOKIE, token, _SIGN_IN_TOKEN_SECONDS)
    return response


async def sign_in(request: Request) -> Response:
    form = await request.form()
    try:
        _check_csrf(str(form.get(CSRF_FIELD, "")), request.cookies.get(SIGN_IN_COOKIE, ""))
    except Problem:
        # A form left open past its token's hour, or posted from another site: a fresh form, no session.
        return _sign_in_form(request, "This sign-in form has expired; please sign in again.", 403)
    failures: FailedAuthentications = request.app.state.failed_authentications
    address = client_address(request)
    # While the address is limited, its key is not even looked up.
    refused = await failures.refusal(address)
    account = None
    api_key = str(form.get("api_key", "")).strip()
    if refused is None:
        store: Store = request.app.state.store
        account = await store.authenticate(api_key) if api_key else None
        if account is None:
            refused = await failures.count_failure(address)
    if refused is not None:
        wait = _in_words(refused.retry_after)
        message = f"Too many sign-ins from your network failed. Please try again in {wait}."
        return _sign_in_form(request, message, 429, refused.headers)
    if account is None:
        why = why_key_refused(api_key)  # what to do about it, as the API tells a partner
        return _sign_in_form(request, f"{why[0].upper()}{why[1:]}.", 401)
    settings: Settings = request.app.state.settings
    session_id = secrets.token_urlsafe(32)
    saved = {"account_id": account.id, "csrf_token": secrets.token_urlsafe(32)}
    redis: Redis = request.app.state.redis
    await redis.set(_session_key(session_id), json.dumps(saved), ex=settings.dashboard_session_ttl)
    response = RedirectResponse("/dashboard", status_code=303)
    _set_cookie(response, request, SESSION_COOKIE, session_id, settings.dashboard_session_ttl)
    response.delete_cookie(SIGN_IN_COOKIE, path=_COOKIE_PATH)
    return response


async def sign_out(request: Request) -> Response:
    session = await _require_changing_session(request)
    redis: Redis = request.app.state.redis
    await redis.delete(_session_key(session.id))
    response = RedirectResponse("/dashboard/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=_COOKIE_PATH, secure=_secure(request), httponly=True)
    return response


# Pages.

Page = Callable[[Request, Session], Awaitable[Response]]


def _signed_in_page(page: Page) -> Callable[[Request], Awaitable[Response]]:
    """A page for a signed-in session; without one, the sign-in form."""

    async def route(request: Request) -> Response:
        session = await _session(request)
        if session is None:
            return RedirectResponse("/dashboard/sign-in", status_code=303)
        return await page(request, session)

    return route


Rows = list[dict[str, Any]]


async def _images(request: Request, account: Account) -> Rows:
    store: Store = request.app.state.store
    public_url = request.app.state.settings.public_url
    return [image.resource(public_url) for image in await store.list_images(account.id, limit=TABLE_ROWS)]


async def _batches(request: Request, account: Account) -> Rows:
    public_url = request.app.state.settings.public_url
    found = await batches_of(request).list_for_account(account.id, limit=TABLE_ROWS)
    return [batch.resource(public_url) for batch in found]


async def _deliveries(request: Request, account: Account) -> Rows:
    store: Store = request.app.state.store
    found = await store.messages.list_for_account(
        account.id, limit=TABLE_ROWS, before=None, where=MessageFilter()
    )
    return [logged.resource() for logged in found]


@dataclass(frozen=True)
class _Table:
    """One of the account's tables: how its rows (the API's resources) are read, their template, and the
    kind of change notification (webhooks/changes.py) that may change them."""

    read: Callable[[Request, Account], Awaitable[Rows]]
    template: str
    kind: ChangeKind

    def render(self, rows: Rows) -> str:
        return _fragment(self.template, rows=rows)

    async def html(self, request: Request, account: Account) -> str:
        return self.render(await self.read(request, account))


_TABLES = {
    "images": _Table(_images, "image_rows.html", "image"),
    "batches": _Table(_batches, "batch_rows.html", "batch"),
    "deliveries": _Table(_deliveries, "delivery_rows.html", "delivery"),
}


def _table_page(name: str) -> Page:
    """The page `{name}.html` around the account's table `name` (kept live by its event stream)."""

    async def page(request: Request, session: Session) -> Response:
        rows = await _TABLES[name].html(request, session.account)
        return _page(request, f"{name}.html", session=session, rows=rows, current=name, table=name)

    return page


async def _webhooks_page(request: Request, session: Session) -> Response:
    rows = await _TABLES["deliveries"].html(request, session.account)
    return _page(
        request,
        "webhooks.html",
        session=session,
        endpoints_section=await _endpoints_section(request, session.account),
        rows=rows,
        current="webhooks",
        table="deliveries",
    )


async def _endpoints_section(
    request: Request, account: Account, created: dict[str, Any] | None = None
) -> str:
    """The webhooks page's endpoints, with the one just `created` and its secret (shown only then)."""
    store: Store = request.app.state.store
    found = await store.endpoints.list_for_account(account.id)
    return _fragment("endpoints.html", endpoints=[endpoint.resource() for endpoint in found], created=created)


class EventsQuery(QueryModel):
    table: Literal["images", "batches", "deliveries"]


@takes_query(EventsQuery)
async def events(request: Request) -> Response:
    """Server-sent events: the page's table of the account (`images`, `batches` or `deliveries`) as HTML,
    sent when the stream starts and whenever it changes, until the session ends."""
    session = await _require_session(request)
    table = query_of(request, EventsQuery).table
    shown = _TABLES[table]
    redis: Redis = request.app.state.redis
    feed: ChangeFeed = request.app.state.changes

    async def stream() -> AsyncIterator[str]:
        yield f"retry: {RECONNECT_MS}\n\n"
        loop = asyncio.get_running_loop()
        ends = loop.time() + STREAM_SECONDS
        sent: Rows | None = None
        said_at = session_checked_at = loop.time()
        read_at = said_at - RENDER_EVERY_SECONDS
        # Watching before the first read: a change committed after it is heard.
        async with feed.watching(session.account.id, lambda kind, _id: kind == shown.kind) as watch:
            heard = True  # the first read
            while True:
                if heard:
                    # Whatever else changes meanwhile is read with it.
                    await asyncio.sleep(read_at + RENDER_EVERY_SECONDS - loop.time())
                    await watch.changed(0)
                    read_at = loop.time()
                    rows = await shown.read(request, session.account)
                    # Rendered only when the rows changed: comparing them costs a small part of rendering.
                    if rows != sent:
                        sent = rows
                        lines = shown.render(rows).splitlines() or [""]
                        yield f"event: {table}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"
                        said_at = loop.time()
                if loop.time() - said_at >= KEEP_ALIVE_SECONDS:
                    yield ": keep-alive\n\n"
                    said_at = loop.time()
                now = loop.time()
                if now >= ends:
                    return
                wake_at = min(ends, session_checked_at + SESSION_CHECK_SECONDS, said_at + KEEP_ALIVE_SECONDS)
                heard = await watch.changed(wake_at - now)
                if feed.stopping.is_set():  # the browser reconnects at once, to another web process
                    return
                now = loop.time()
                if heard or now - session_checked_at >= SESSION_CHECK_SECONDS:
                    if not await redis.exists(_session_key(session.id)):
                        return
                    session_checked_at = now

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


# What the API does, for the session's account.


async def upload_image(request: Request) -> Response:
    """`POST /v1/images`'s multipart form, from the drop zone."""
    await _require_changing_session(request)
    return await images.create_image(request)


@takes_query(VariantQuery)
async def output(request: Request) -> Response:
    """`GET /v1/images/{id}/output`, variants included (the images table's thumbnails)."""
    await _require_session(request)
    return await images.get_output(request)


async def archive(request: Request) -> Response:
    await _require_session(request)
    return await batches.get_archive(request)


def _answered(response: Response) -> Any:
    """What an API route answered the page, for its template."""
    return json.loads(bytes(response.body))


async def retry_delivery(request: Request) -> Response:
    await _require_changing_session(request)
    retried = await deliveries.retry_delivery(request)
    return HTMLResponse(_fragment("delivery_rows.html", rows=[_answered(retried)]))


async def send_test_event(request: Request) -> Response:
    await _require_changing_session(request)
    sent = await endpoints.send_test_event(request)
    return HTMLResponse(_fragment("test_sent.html", delivery=_answered(sent)))


async def add_endpoint(request: Request) -> Response:
    """`POST /v1/webhook-endpoints`'s JSON body, from the webhooks page: the endpoints again, the new
    one's signing secret shown this once."""
    session = await _require_changing_session(request)
    created = await endpoints.create_endpoint(request)
    section = await _endpoints_section(request, session.account, _answered(created))
    return HTMLResponse(section, status_code=201, headers={"Cache-Control": "no-store"})


async def delete_endpoint(request: Request) -> Response:
    session = await _require_changing_session(request)
    await endpoints.delete_endpoint(request)
    return HTMLResponse(await _endpoints_section(request, session.account))


def _new_batch_section(
    session: Session, batch: dict[str, Any] | None = None, notice: str | None = None
) -> str:
    return _fragment("new_batch.html", batch=batch, notice=notice, csrf_token=session.csrf_token)


async def create_batch(request: Request) -> Response:
    """`POST /v1/batches`'s JSON body, from the batches page: a drop zone for the new batch."""
    session = await _require_changing_session(request)
    created = await batches.create_batch(request)
    return HTMLResponse(_new_batch_section(session, _answered(created)), status_code=201)


async def add_batch_images(request: Request) -> Response:
    """`POST /v1/batches/{id}/images`'s multipart form, from the batch's drop zone."""
    await _require_changing_session(request)
    return await batches.add_images(request)


async def seal_batch(request: Request) -> Response:
    session = await _require_changing_session(request)
    sealed = _answered(await batches.seal_batch(request))
    notice = (
        f"Batch {sealed['id']} is sealed with {sealed['counts']['total']} images: "
        "the table below follows it until it completes."
    )
    return HTMLResponse(_new_batch_section(session, notice=notice))


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if request.path_params["version"] != ASSET_VERSION or name not in _STATIC_FILES:
        raise Problem(404, "not_found", "no such dashboard asset (the pages name the current ones)")
    return FileResponse(_STATIC_DIR / name, headers=IMMUTABLE_ASSET_HEADERS)


# Pages for a browser signed in by cookie, not the API: left out of /openapi.json.
routes = [
    Route("/dashboard", _signed_in_page(_table_page("images")), methods=["GET"], include_in_schema=False),
    Route(
        "/dashboard/batches",
        _signed_in_page(_table_page("batches")),
        methods=["GET"],
        include_in_schema=False,
    ),
    Route("/dashboard/webhooks", _signed_in_page(_webhooks_page), methods=["GET"], include_in_schema=False),
    Route("/dashboard/sign-in", sign_in_page, methods=["GET"], include_in_schema=False),
    Route("/dashboard/sign-in", sign_in, methods=["POST"], include_in_schema=False),
    Route("/dashboard/sign-out", sign_out, methods=["POST"], include_in_schema=False),
    Route("/dashboard/events", events, methods=["GET"], include_in_schema=False),
    Route("/dashboard/images", upload_image, methods=["POST"], include_in_schema=False),
    Route("/dashboard/images/{image_id}/output", output, methods=["GET"], include_in_schema=False),
    Route("/dashboard/batches/{batch_id}/archive", archive, methods=["GET"], include_in_schema=False),
    Route("/dashboard/deliveries/{msg_id}/retry", retry_delivery, methods=["POST"], include_in_schema=False),
    Route(
        "/dashboard/webhook-endpoints/{endpoint_id}/test",
        send_test_event,
        methods=["POST"],
        include_in_schema=False,
    ),
    Route("/dashboard/webhook-endpoints", add_endpoint, methods=["POST"], include_in_schema=False),
    Route(
        "/dashboard/webhook-endpoints/{endpoint_id}",
        delete_endpoint,
        methods=["DELETE"],
        include_in_schema=False,
    ),
    Route("/dashboard/batches", create_batch, methods=["POST"], include_in_schema=False),
    Route(
        "/dashboard/batches/{batch_id}/images", add_batch_images, methods=["POST"], include_in_schema=False
    ),
    Route("/dashboard/batches/{batch_id}/seal", seal_batch, methods=["POST"], include_in_schema=False),
    Route("/dashboard/assets/{version}/{name}", asset, methods=["GET"], include_in_schema=False),
]
