"""`/docs` is served whole by Darkroom: a page with no inline script under a strict CSP, and Swagger UI's
files at versioned URLs (no query string) that browsers may cache for good."""

from __future__ import annotations

import re

import httpx

from server.docs import ASSET_PATH, content_security_policy


async def test_the_docs_page_loads_only_its_own_versioned_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-cache"
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert re.search(r"<script>|<style|style=|on\w+=", page.text) is None
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {"swagger-ui.css", "swagger-ui-bundle.js", "init.js"} <= {a.rsplit("/", 1)[1] for a in assets}
    for asset in assets:
        assert asset.startswith(f"{ASSET_PATH}/") and "?" not in asset
        served = await client.get(asset)
        assert served.status_code == 200, asset
        assert served.headers["cache-control"] == "public, max-age=31536000, immutable"
    init = await client.get(f"{ASSET_PATH}/init.js")
    assert init.headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle" in init.text


async def test_docs_assets_of_another_version_or_outside_the_list_are_not_found(
    client: httpx.AsyncClient,
) -> None:
    older = await client.get("/docs/assets/swagger-ui-4.0.0-000000000000/swagger-ui-bundle.js")
    assert older.status_code == 404
    assert older.headers["content-type"] == "application/problem+json"
    for name in ("index.html", "..%2F__init__.py", "swagger-initializer.js"):
        assert (await client.get(f"{ASSET_PATH}/{name}")).status_code == 404, name


def test_try_it_out_may_call_the_public_origin_under_whatever_name_the_page_was_opened() -> None:
    policy = content_security_policy("https://api.example.com/darkroom")
    assert "connect-src 'self' https://api.example.com;" in policy
