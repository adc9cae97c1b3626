"""The dashboard's live tables over a real `uvicorn` and worker (tests/test_processes.py's `stack`): the
event stream waits on change notifications, reading Redis only when something changed."""

from __future__ import annotations

import queue
import re
import threading
import time

import httpx
import redis

from tests import imagegen
from tests.test_processes import RESIZE_TO_160, Stack, create_account, upload
from tests.test_processes import children as children  # the fixture
from tests.test_processes import stack as stack  # the fixture

# Long enough for the per-second reads the stream used to make to show.
IDLE_SECONDS = 2.5
EVENT_TIMEOUT = 15.0


class EventStream:
    """A GET of server-sent events read on a thread: each event's lines as it arrives, None at the end."""

    def __init__(self, http: httpx.Client, path: str) -> None:
        self.events: queue.Queue[list[str] | None] = queue.Queue()
        self._request = http.stream("GET", path)
        self.response = self._request.__enter__()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        lines: list[str] = []
        try:
            for line in self.response.iter_lines():
                if line:
                    lines.append(line)
                elif lines:
                    self.events.put(lines)
                    lines = []
        except httpx.HTTPError:
            pass  # closed by `close` while the server still sends
        finally:
            self.events.put(None)

    def next(self) -> list[str] | None:
        return self.events.get(timeout=EVENT_TIMEOUT)

    def close(self) -> None:
        self.response.close()
        self._reader.join(EVENT_TIMEOUT)
        self._request.__exit__(None, None, None)


def signed_in(http: httpx.Client, api_key: str) -> str:
    """Signs in; the session's CSRF token."""
    form = http.get("/dashboard/sign-in")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    assert (
        http.post("/dashboard/sign-in", data={"api_key": api_key, "csrf_token": token[1]}).status_code == 303
    )
    found = re.search(r'name="csrf_token" value="([^"]+)"', http.get("/dashboard").text)
    assert found is not None
    return found[1]


def table_reads(store: redis.Redis) -> int:
    """How many times Redis listed an account's newest records (what reading a table starts with)."""
    stats = store.info("commandstats")
    return int(stats.get("cmdstat_zrevrangebylex", {}).get("calls", 0))


def test_the_images_stream_reads_nothing_while_idle_and_sends_each_change(stack: Stack) -> None:
    account = create_account(stack.env, "partner")
    store = redis.Redis.from_url(stack.env["REDIS_URL"])
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        token = signed_in(http, account.api_key)
        stream = EventStream(http, "/dashboard/events?table=images")
        try:
            assert stream.next() == ["retry: 500"]
            first = stream.next()
            assert first is not None and first[0] == "event: images"

            before = table_reads(store)
            time.sleep(IDLE_SECONDS)  # nothing happens: there is no event to wait for
            assert table_reads(store) == before

            image = upload(stack.base_url, account, imagegen.jpeg(64, 48), RESIZE_TO_160, "")
            shown = ""
            while "completed" not in shown:
                event = stream.next()
                assert event is not None and event[0] == "event: images"
                shown = "\n".join(event)
                assert image["id"] in shown

            signed_out = http.post("/dashboard/sign-out", data={"csrf_token": token})
            assert signed_out.status_code == 303
            # The stream ends with the session, within a session check.
            assert stream.next() is None
        finally:
            stream.close()
            store.close()
