"""`Darkroom` (blocking) and `AsyncDarkroom` (asyncio): the same flows (`darkroom_client.flows`), run by
a loop that performs their effects with `httpx.Client` or `httpx.AsyncClient`.

Each resource method is the flow of the same name, wrapped once by `blocking` or `awaiting`: the
signature, the docstring and the behaviour are the flow's, in one place.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar

import httpx

from darkroom_client.core import Core, Effect, Flow, RetryPolicy, Send, Sleep, Stepper
from darkroom_client.flows import BatchFlows, DeliveryFlows, EndpointFlows, ImageFlows
from darkroom_client.types import Page

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Uploads of large photos on slow links: generous for reading and writing, short for connecting.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)

Result = TypeVar("Result")
Item = TypeVar("Item")
Flows = TypeVar("Flows")
Params = ParamSpec("Params")


def _target_mode(response: httpx.Response) -> str:
    """A `Save`'s file is appended to after a 206 (the rest of a range), else written anew."""
    return "ab" if response.status_code == 206 else "wb"


class _BlockingRunner:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def run(self, flow: Flow[Result]) -> Result:
        stepper = Stepper(flow)
        while stepper.effect is not None:
            try:
                outcome = self._perform(stepper.effect)
            except httpx.TransportError as exc:
                stepper.fail(exc)
            else:
                stepper.answer(outcome)
        return stepper.result

    def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
            return None
        if isinstance(effect, Send):
            return self.http.send(effect.request, follow_redirects=effect.follow_redirects)
        response = self.http.send(effect.request, stream=True, follow_redirects=True)
        try:
            if response.is_success:
                with effect.path.open(_target_mode(response)) as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            else:
                response.read()
        finally:
            response.close()
        return response


class _AsyncRunner:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def run(self, flow: Flow[Result]) -> Result:
        stepper = Stepper(flow)
        while stepper.effect is not None:
            try:
                outcome = await self._perform(stepper.effect)
            except httpx.TransportError as exc:
                stepper.fail(exc)
            else:
                stepper.answer(outcome)
        return stepper.result

    async def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        if isinstance(effect, Send):
            return await self.http.send(effect.request, follow_redirects=effect.follow_redirects)
        response = await self.http.send(effect.request, stream=True, follow_redirects=True)
        try:
            if response.is_success:
                # Chunks are small (httpx reads 64 KB at most); writing them in line keeps the order
                # simple and costs the loop less than a thread hop each.
                with effect.path.open(_target_mode(response)) as out:
                    async for chunk in response.aiter_bytes():
                        out.write(chunk)
            else:
                await response.aread()
        finally:
            await response.aclose()
        return response


class _Resource(Generic[Flows]):
    def __init__(self, runner: Any, flows: Flows) -> None:
        self._runner = runner
        self._flows = flows


def blocking(
    flow: Callable[Concatenate[Flows, Params], Flow[Result]],
) -> Callable[Concatenate[_Resource[Flows], Params], Result]:
    @functools.wraps(flow)
    def method(resource: _Resource[Flows], /, *args: Params.args, **kwargs: Params.kwargs) -> Result:
        result: Result = resource._runner.run(flow(resource._flows, *args, **kwargs))
        return result

    return method


def awaiting(
    flow: Callable[Concatenate[Flows, Params], Flow[Result]],
) -> Callable[Concatenate[_Resource[Flows], Params], Coroutine[Any, Any, Result]]:
    @functools.wraps(flow)
    async def method(resource: _Resource[Flows], /, *args: Params.args, **kwargs: Params.kwargs) -> Result:
        result: Result = await resource._runner.run(flow(resource._flows, *args, **kwargs))
        return result

    return method


def paginated(
    page: Callable[Concatenate[Flows, str | None, Params], Flow[Page[Item]]],
) -> Callable[Concatenate[_Resource[Flows], Params], Iterator[Item]]:
    """Every item of every page, fetched a page at a time as the iteration goes."""

    @functools.wraps(page)
    def method(resource: _Resource[Flows], /, *args: Params.args, **kwargs: Params.kwargs) -> Iterator[Item]:
        cursor: str | None = None
        while True:
            found: Page[Item] = resource._runner.run(page(resource._flows, cursor, *args, **kwargs))
            yield from found.data
            if not found.has_more or found.next_cursor is None:
                return
            cursor = found.next_cursor

    return method


def async_paginated(
    page: Callable[Concatenate[Flows, str | None, Params], Flow[Page[Item]]],
) -> Callable[Concatenate[_Resource[Flows], Params], AsyncIterator[Item]]:
    @functools.wraps(page)
    async def method(
        resource: _Resource[Flows], /, *args: Params.args, **kwargs: Params.kwargs
    ) -> AsyncIterator[Item]:
        cursor: str | None = None
        while True:
            found: Page[Item] = await resource._runner.run(page(resource._flows, cursor, *args, **kwargs))
            for item in found.data:
                yield item
            if not found.has_more or found.next_cursor is None:
                return
            cursor = found.next_cursor

    return method


class Images(_Resource[ImageFlows]):
    upload = blocking(ImageFlows.upload)
    from_url = blocking(ImageFlows.from_url)
    direct_upload = blocking(ImageFlows.direct_upload)
    get = blocking(ImageFlows.get)
    list = paginated(ImageFlows.list_page)
    list_page = blocking(ImageFlows.list_page)
    delete = blocking(ImageFlows.delete)
    download = blocking(ImageFlows.download)
    download_to = blocking(ImageFlows.download_to)
    wait = blocking(ImageFlows.wait)
    wait_many = blocking(ImageFlows.wait_many)


class AsyncImages(_Resource[ImageFlows]):
    upload = awaiting(ImageFlows.upload)
    from_url = awaiting(ImageFlows.from_url)
    direct_upload = awaiting(ImageFlows.direct_upload)
    get = awaiting(ImageFlows.get)
    list = async_paginated(ImageFlows.list_page)
    list_page = awaiting(ImageFlows.list_page)
    delete = awaiting(ImageFlows.delete)
    download = awaiting(ImageFlows.download)
    download_to = awaiting(ImageFlows.download_to)
    wait = awaiting(ImageFlows.wait)
    wait_many = awaiting(ImageFlows.wait_many)


class Batches(_Resource[BatchFlows]):
    create = blocking(BatchFlows.create)
    add = blocking(BatchFlows.add)
    seal = blocking(BatchFlows.seal)
    get = blocking(BatchFlows.get)
    list = paginated(BatchFlows.list_page)
    list_page = blocking(BatchFlows.list_page)
    wait = blocking(BatchFlows.wait)
    download_archive = blocking(BatchFlows.download_archive)


class AsyncBatches(_Resource[BatchFlows]):
    create = awaiting(BatchFlows.create)
    add = awaiting(BatchFlows.add)
    seal = awaiting(BatchFlows.seal)
    get = awaiting(BatchFlows.get)
    list = async_paginated(BatchFlows.list_page)
    list_page = awaiting(BatchFlows.list_page)
    wait = awaiting(BatchFlows.wait)
    download_archive = awaiting(BatchFlows.download_archive)


class WebhookEndpoints(_Resource[EndpointFlows]):
    create = blocking(EndpointFlows.create)
    get = blocking(EndpointFlows.get)
    list = blocking(EndpointFlows.list)
    update = blocking(EndpointFlows.update)
    delete = blocking(EndpointFlows.delete)
    send_test = blocking(EndpointFlows.send_test)


class AsyncWebhookEndpoints(_Resource[EndpointFlows]):
    create = awaiting(EndpointFlows.create)
    get = awaiting(EndpointFlows.get)
    list = awaiting(EndpointFlows.list)
    update = awaiting(EndpointFlows.update)
    delete = awaiting(EndpointFlows.delete)
    send_test = awaiting(EndpointFlows.send_test)


class Deliveries(_Resource[DeliveryFlows]):
    get = blocking(DeliveryFlows.get)
    list = paginated(DeliveryFlows.list_page)
    list_page = blocking(DeliveryFlows.list_page)
    retry = blocking(DeliveryFlows.retry)


class AsyncDeliveries(_Resource[DeliveryFlows]):
    get = awaiting(DeliveryFlows.get)
    list = async_paginated(DeliveryFlows.list_page)
    list_page = awaiting(DeliveryFlows.list_page)
    retry = awaiting(DeliveryFlows.retry)


class Darkroom:
    """The Darkroom API, blocking: `Darkroom(api_key, base_url)`, then `.images`, `.batches`,
    `.webhook_endpoints`, `.deliveries`. Use it as a context manager, or `close()` it.

    `http_client` replaces the `httpx.Client` made here (proxies, certificates, event hooks); every POST
    carries an `Idempotency-Key`, and retries follow `retry`."""

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        retry: RetryPolicy | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        core = Core(api_key, base_url, retry or RetryPolicy())
        self._http = http_client or httpx.Client(timeout=DEFAULT_TIMEOUT)
        runner = _BlockingRunner(self._http)
        self.images = Images(runner, ImageFlows(core))
        self.batches = Batches(runner, BatchFlows(core))
        self.webhook_endpoints = WebhookEndpoints(runner, EndpointFlows(core))
        self.deliveries = Deliveries(runner, DeliveryFlows(core))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class AsyncDarkroom:
    """`Darkroom` for asyncio: the same resources and methods, awaited (`async for` over `list`).
    Use it as an async context manager, or `await aclose()`."""

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        retry: RetryPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        core = Core(api_key, base_url, retry or RetryPolicy())
        self._http = http_client or httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)
        runner = _AsyncRunner(self._http)
        self.images = AsyncImages(runner, ImageFlows(core))
        self.batches = AsyncBatches(runner, BatchFlows(core))
        self.webhook_endpoints = AsyncWebhookEndpoints(runner, EndpointFlows(core))
        self.deliveries = AsyncDeliveries(runner, DeliveryFlows(core))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()
