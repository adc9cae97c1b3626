"""Checking a URL a partner wants us to call (callback, endpoint), at the moment it is given to us."""

from __future__ import annotations

import asyncio
import functools

from jobs.settings import Settings
from webhooks.addresses import TransportError, check_url, parse_destination, resolve

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT = 5.0


def url_problem(url: str, settings: Settings) -> str | None:
    """What is wrong with a URL we are to call, judged from its text alone (no DNS), or None."""
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    return _text_problem(url, settings.allow_private_callbacks)


# A partner sends the same few callback URLs with every image: each verdict, a function of the text
# alone, is kept rather than parsed again on every request.
@functools.lru_cache(maxsize=1024)
def _text_problem(url: str, allow_private: bool) -> str | None:
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "must not contain spaces or control characters"
    return check_url(url, allow_private=allow_private)


async def host_problem(url: str, settings: Settings) -> str | None:
    """The problem with the host of a URL to deliver to whose text `url_problem` accepted, or None. It must
    resolve to public addresses only (unless DARKROOM_ALLOW_PRIVATE_CALLBACKS); every delivery checks
    again, since DNS answers change."""
    if settings.allow_private_callbacks:
        return None
    try:
        destination = parse_destination(url, allow_private=False)
        if destination.literal is None:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                await resolve(destination.host, destination.port, allow_private=False)
    except TransportError as problem:
        return str(problem)
    except TimeoutError:
        return f"its host did not resolve within {RESOLVE_TIMEOUT:g} s"
    return None
