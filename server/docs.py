"""`/docs`: Swagger UI on `/openapi.json`, served by Darkroom itself so that it works offline and under a
strict Content-Security-Policy.

The page loads nothing from elsewhere: Swagger UI's files come from the `swagger-ui-bundle-v2` package,
under a path naming their version and that of our `init.js`, so browsers may keep them for good; the
page itself is never cached, so an upgrade is seen at once. No script is inline (the CSP forbids it):
`init.js` starts Swagger UI on the spec URL the page names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route
from swagger_ui_bundle import swagger_ui_path

from jobs.settings import Settings
from server.problems import Problem

SPEC_PATH = "/openapi.json"

# Swagger UI's own validator badge would send the spec to a public service: off. "Try it out" sends the
# Authorize dialog's key as `Authorization: Bearer …`, as the spec's `bearer` scheme says.
INIT_JS = """\
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    validatorUrl: null,
    displayRequestDuration: true,
  });
});
"""
_INIT_JS_NAME = "init.js"
_VENDOR_FILES = (
    "swagger-ui.css",
    "swagger-ui.css.map",
    "swagger-ui-bundle.js",
    "swagger-ui-bundle.js.map",
    "favicon-16x16.png",
    "favicon-32x32.png",
)
_VENDOR_DIR = Path(str(swagger_ui_path))
# Changes whenever Swagger UI or init.js does: what a browser cached under an older one is never used.
ASSET_VERSION = f"{_VENDOR_DIR.name}-{hashlib.sha256(INIT_JS.encode()).hexdigest()[:12]}"
ASSET_PATH = f"/docs/assets/{ASSET_VERSION}"
IMMUTABLE_ASSET_HEADERS = {
    "Cache-Control": "public, max-age=31536000, immutable",
    "X-Content-Type-Options": "nosniff",
}

_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Darkroom API</title>
<link rel="stylesheet" href="{ASSET_PATH}/swagger-ui.css">
<link rel="icon" type="image/png" href="{ASSET_PATH}/favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="{ASSET_PATH}/favicon-16x16.png" sizes="16x16">
</head><body>
<div id="swagger-ui" data-spec-url="{SPEC_PATH}"></div>
<script src="{ASSET_PATH}/swagger-ui-bundle.js"></script>
<script src="{ASSET_PATH}/{_INIT_JS_NAME}"></script>
</body></html>
"""


def content_security_policy(public_url: str) -> str:
    """Everything from this origin only, no inline script or style; "Try it out" may also call the
    spec's server, the public URL's origin, when the page was opened under another name. Swagger UI's
    icons are data: URLs."""
    public = urlsplit(public_url)
    return "; ".join(
        (
            "default-src 'self'",
            f"connect-src 'self' {public.scheme}://{public.netloc}",
            "img-src 'self' data:",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


async def docs_page(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    return HTMLResponse(
        _PAGE,
        headers={
            "Content-Security-Policy": content_security_policy(settings.public_url),
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def docs_asset(request: Request) -> Response:
    name = request.path_params["name"]
    if request.path_params["version"] != ASSET_VERSION:
        raise Problem(404, "not_found", "no such docs asset (the docs page names the current ones)")
    if name == _INIT_JS_NAME:
        return Response(INIT_JS, media_type="text/javascript", headers=IMMUTABLE_ASSET_HEADERS)
    if name not in _VENDOR_FILES:
        raise Problem(404, "not_found", "no such docs asset")
    return FileResponse(_VENDOR_DIR / name, headers=IMMUTABLE_ASSET_HEADERS)


routes = [
    Route("/docs", docs_page, methods=["GET"]),
    # Files of the page, not of the API: left out of /openapi.json.
    Route("/docs/assets/{version}/{name}", docs_asset, methods=["GET"], include_in_schema=False),
]
