"""`Darkroom` (blocking) and `AsyncDarkroom` (asyncio): the same flows (`darkroom_client.flows`), run by
a loop that performs their effects with `httpx.Client` or `httpx.AsyncClient`.

Each resource is one class for both: its methods are the flows of the same name, bound by a descriptor
that runs them with the client's runner. The signature, the docstring and the behaviour are the flow's,
in one place; the resource's type parameter (`Blocking` or `Awaited`) makes a method's result `Image`
for `Darkroom` and an awaitable of `Image` for `AsyncDarkroom`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

import httpx

from darkroom_client.core import (
    CONNECT_TIMEOUT_SECONDS,
    Arrival,
    Core,
    Effect,
    Flow,
    RetryPolicy,
    Send,
    Sleep,
    Stepper,
)
from darkroom_client.flows import BatchFlows, DeliveryFlows, EndpointFlows, ImageFlows
from darkroom_client.types import Page

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Uploads of large photos on slow links: generous for reading and writing, short for connecting.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=CONNECT_TIMEOUT_SECONDS)

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

    def items(self, page_at: Callable[[str | None], Flow[Page[Item]]]) -> Iterator[Item]:
        cursor: str | None = None
        while True:
            found = self.run(page_at(cursor))
            yield from found.data
            if not found.has_more or found.next_cursor is None:
                return
            cursor = found.next_cursor

    def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
            return None
        if isinstance(effect, Arrival):
            try:
                return effect.future.result(effect.seconds)
            except concurrent.futures.TimeoutError:
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

    async def items(self, page_at: Callable[[str | None], Flow[Page[Item]]]) -> AsyncIterator[Item]:
        cursor: str | None = None
        while True:
            found = await self.run(page_at(cursor))
            for item in found.data:
                yield item
            if not found.has_more or found.next_cursor is None:
                return
            cursor = found.next_cursor

    async def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        if isinstance(effect, Arrival):
            # Waited on without cancelling it on timeout: the future is the listener's, shared by every
            # wait for the same image.
            arrived = asyncio.wrap_future(effect.future)
            done, _ = await asyncio.wait({arrived}, timeout=effect.seconds)
            return arrived.result() if done else None
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


class Blocking:
    """Marks the resources of `Darkroom`: their methods answer."""


class Awaited:
    """Marks the resources of `AsyncDarkroom`: their methods are awaited."""


Mode = TypeVar("Mode", Blocking, Awaited)


class _Resource(Generic[Flows, Mode]):
    def __init__(self, runner: _BlockingRunner | _AsyncRunner, flows: Flows) -> None:
        self._runner = runner
        self._flows = flows


class _Method(Generic[Flows, Params, Result]):
    """A flow as a resource's method: run to its result by a `Darkroom`'s runner, or to a coroutine by
    an `AsyncDarkroom`'s. One definition serves both; only the type differs."""

    def __init__(self, flow: Callable[Concatenate[Flows, Params], Flow[Result]]) -> None:
        self._flow = flow
        self.__doc__ = flow.__doc__

    @overload
    def __get__(self, resource: _Resource[Flows, Blocking], owner: type[Any]) -> Callable[Params, Result]: ...

    @overload
    def __get__(
        self, resource: _Resource[Flows, Awaited], owner: type[Any]
    ) -> Callable[Params, Coroutine[Any, Any, Result]]: ...

    def __get__(self, resource: _Resource[Flows, Any], owner: type[Any]) -> Callable[Params, Any]:
        flow, runner, flows = self._flow, resource._runner, resource._flows

        @functools.wraps(flow)
        def method(*args: Params.args, **kwargs: Params.kwargs) -> Any:
            return runner.run(flow(flows, *args, **kwargs))

        return method


class _Listing(Generic[Flows, Params, Item]):
    """A page flow as a resource's `list`: every item of every page, fetched a page at a time as the
    iteration goes (`for`, or `async for` with `AsyncDarkroom`)."""

    def __init__(self, page: Callable[Concatenate[Flows, str | None, Params], Flow[Page[Item]]]) -> None:
        self._page = page
        self.__doc__ = page.__doc__

    @overload
    def __get__(
        self, resource: _Resource[Flows, Blocking], owner: type[Any]
    ) -> Callable[Params, Iterator[Item]]: ...

    @overload
    def __get__(
        self, resource: _Resource[Flows, Awaited], owner: type[Any]
    ) -> Callable[Params, AsyncIterator[Item]]: ...

    def __get__(self, resource: _Resource[Flows, Any], owner: type[Any]) -> Callable[Params, Any]:
        page, runner, flows = self._page, resource._runner, resource._flows

        def listing(*args: Params.args, **kwargs: Params.kwargs) -> Any:
            return runner.items(lambda cursor: page(flows, cursor, *args, **kwargs))

        return listing


class Images(_Resource[ImageFlows, Mode]):
    upload = _Method(ImageFlows.upload)
    from_url = _Method(ImageFlows.from_url)
    direct_upload = _Method(ImageFlows.direct_upload)
    get = _Method(ImageFlows.get)
    list = _Listing(ImageFlows.list_page)
    list_page = _Method(ImageFlows.list_page)
    delete = _Method(ImageFlows.delete)
    download = _Method(ImageFlows.download)
    download_to = _Method(ImageFlows.download_to)
    wait = _Method(ImageFlows.wait)
    wait_many = _Method(ImageFlows.wait_many)


class Batches(_Resource[BatchFlows, Mode]):
    create = _Method(BatchFlows.create)
    add = _Method(BatchFlows.add)
    seal = _Method(BatchFlows.seal)
    get = _Method(BatchFlows.get)
    list = _Listing(BatchFlows.list_page)
    list_page = _Method(BatchFlows.list_page)
    wait = _Method(BatchFlows.wait)
    download_archive = _Method(BatchFlows.download_archive)


class WebhookEndpoints(_Resource[EndpointFlows, Mode]):
    create = _Method(EndpointFlows.create)
    get = _Method(EndpointFlows.get)
    list = _Method(EndpointFlows.list)
    update = _Method(EndpointFlows.update)
    delete = _Method(EndpointFlows.delete)
    send_test = _Method(EndpointFlows.send_test)


class Deliveries(_Resource[DeliveryFlows, Mode]):
    get = _Method(DeliveryFlows.get)
    list = _Listing(DeliveryFlows.list_page)
    list_page = _Method(DeliveryFlows.list_page)
    retry = _Method(DeliveryFlows.retry)


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
        self.images: Images[Blocking] = Images(runner, ImageFlows(core))
        self.batches: Batches[Blocking] = Batches(runner, BatchFlows(core))
        self.webhook_endpoints: WebhookEndpoints[Blocking] = WebhookEndpoints(runner, EndpointFlows(core))
        self.deliveries: Deliveries[Blocking] = Deliveries(runner, DeliveryFlows(core))

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
        self.images: Images[Awaited] = Images(runner, ImageFlows(core))
        self.batches: Batches[Awaited] = Batches(runner, BatchFlows(core))
        self.webhook_endpoints: WebhookEndpoints[Awaited] = WebhookEndpoints(runner, EndpointFlows(core))
        self.deliveries: Deliveries[Awaited] = Deliveries(runner, DeliveryFlows(core))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()
