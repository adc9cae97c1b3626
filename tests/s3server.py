"""A real S3 API server for tests: moto's, run as a separate process on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import boto3
from botocore.config import Config

START_TIMEOUT_SECONDS = 30.0
REGION = "us-east-1"
# moto takes any credentials; the clients in and out of process find these in their environment.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "darkroom-test",
    "AWS_SECRET_ACCESS_KEY": "darkroom-test-secret",
    "AWS_DEFAULT_REGION": REGION,
}


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class S3Server:
    def __init__(self) -> None:
        self.port = _free_loopback_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("moto's S3 server did not start")
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def client(self) -> Any:
        """A plain boto3 client, for tests to look into the bucket behind Darkroom's back."""
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self) -> str:
        name = f"darkroom-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name
