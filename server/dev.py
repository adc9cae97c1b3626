"""`darkroom dev`: one command for a whole local Darkroom (Redis with AOF, web, workers)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from jobs import bulk_lane
from jobs.settings import Settings
from jobs.store import Store
from jobs.worker import WORKER_LOG_ARGS
from server.children import child_process_options
from server.cli import account_json, create_account
from server.embedded_redis import EmbeddedRedis
from server.http_limits import WEB_PROTOCOL
from server.resources import Readiness

DEV_ACCOUNT_FILE = "dev-account.json"
# Longer than a worker gives its bulk lane, so that a worker stopping in order is never cut short.
STOP_GRACE_SECONDS = bulk_lane.STOP_GRACE_SECONDS + 5
READY_TIMEOUT_SECONDS = 30
SUPERVISE_POLL_SECONDS = 0.2


def _ensure_dev_account(settings: Settings, saved: Path) -> tuple[dict[str, str], bool]:
    """The dev account survives restarts (its key is kept in the data dir, readable only by you)."""
    known = json.loads(saved.read_text()) if saved.exists() else None
    account, created = asyncio.run(_dev_account(settings, known))
    if account != known:
        saved.unlink(missing_ok=True)
        # Created owner-only, so the key is never readable by others, not even for a moment.
        with os.fdopen(os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            json.dump(account, file, indent=2)
    return account, created


async def _dev_account(settings: Settings, known: dict[str, str] | None) -> tuple[dict[str, str], bool]:
    """The saved account if its key still works (the Redis data may have been wiped), else a new one."""
    if known is not None:
        store = Store.connect(settings.require_redis())
        try:
            account = await store.authenticate(known["api_key"])
            if account is not None:
                # The secret that signs now: a `POST /v1/webhook-secret/rotate` made the saved one stop
                # verifying 24 h later, and the banner's `webhooks listen` then rejected every delivery.
                return {**known, "webhook_secret": account.webhook_secret}, False
        finally:
            await store.close()
    return account_json(await create_account(settings, "dev")), True


def _banner(settings: Settings, account: dict[str, str], created: bool) -> str:
    key, secret, public_url = account["api_key"], account["webhook_secret"], settings.public_url
    # The command as the user typed it (`.venv/bin/darkroom` when the venv is not activated).
    darkroom = sys.argv[0] if Path(sys.argv[0]).name == "darkroom" else "darkroom"
    return f"""
Darkroom is running at {public_url}   (data in {settings.data_dir}; Ctrl-C stops everything)

  {"Created" if created else "Using"} the dev account {account["account_id"]}
    API key:        {key}
    Webhook secret: {secret}

  More accounts:
    REDIS_URL={settings.redis_url} {darkroom} accounts create --name NAME

  Try it:
    {darkroom} webhooks listen --secret {secret} &
    curl -s {public_url}/v1/images -H "Authorization: Bearer {key}" \\
      -F file=@photo.jpg -F 'operations=[{{"type":"resize","params":{{"width":512}}}}]' \\
      -F callback_url=http://127.0.0.1:8787/
  or open {public_url}/dashboard and sign in with the API key.
"""


def run_dev(host: str, port: int | None, workers: int) -> int:
    base_env = dict(os.environ)
    port = port or int(base_env.get("PORT", "8000"))
    problem = _port_problem(host, port)
    if problem is not None:
        print(f"darkroom dev: {problem}", file=sys.stderr)
        return 1
    data_dir = Settings.from_env(base_env).data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    redis = None
    if not base_env.get("REDIS_URL"):
        redis = EmbeddedRedis(data_dir / "redis")
        redis.start()
    env = {
        **base_env,
        "REDIS_URL": base_env.get("REDIS_URL") or (redis.url if redis else ""),
        "DARKROOM_DATA_DIR": str(data_dir),
        "PORT": str(port),
        "DARKROOM_PUBLIC_URL": base_env.get("DARKROOM_PUBLIC_URL", f"http://{host}:{port}"),
        "DARKROOM_ALLOW_PRIVATE_CALLBACKS": base_env.get("DARKROOM_ALLOW_PRIVATE_CALLBACKS", "1"),
        # Read by a person in the terminal, not by a log pipeline.
        "DARKROOM_LOG_FORMAT": base_env.get("DARKROOM_LOG_FORMAT", "text"),
    }
    settings = Settings.from_env(env)
    processes: list[subprocess.Popen[bytes]] = []
    # SIGTERM (a process manager, `kill`) stops everything in order as Ctrl-C does, rather than ending
    # this process alone and Redis with the others at once; and SIGINT does even when a script started
    # us in its background, where the shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        account, created = _ensure_dev_account(settings, data_dir / DEV_ACCOUNT_FILE)
        web = [sys.executable, "-m", "uvicorn", "server.app:app", "--host", host, "--port", str(port)]
        # Each request is logged once, by the app (server/request_log.py), not again by uvicorn.
        web += ["--http", WEB_PROTOCOL, "--no-access-log"]
        worker = [sys.executable, "-m", "arq", "jobs.worker.WorkerSettings", *WORKER_LOG_ARGS]
        for command in [web, *[worker] * workers]:
            processes.append(subprocess.Popen(command, env=env, **child_process_options()))
        not_ready = readiness_problem(f"http://{host}:{port}/readyz", processes)
        if not_ready is not None:
            print(f"darkroom dev: {not_ready}", file=sys.stderr)
            return 1
        print(_banner(settings, account, created), flush=True)
        return _supervise(processes, env, redis)
    except KeyboardInterrupt:
        return 0
    finally:
        stop_in_order(processes)
        if redis is not None:
            redis.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _port_problem(host: str, port: int) -> str | None:
    """Another server on the port would answer our readiness check, and the banner would hand out a key
    that server does not know: refuse to start instead."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = exc.strerror or exc
            return f"cannot listen on {host}:{port} ({reason}); is another darkroom dev running? Try --port"
    return None


def readiness_problem(readyz: str, processes: list[subprocess.Popen[bytes]]) -> str | None:
    """None once the service is ready (the banner invites a first request), else why it is not: a web
    process that answers but is not ready (an S3 bucket missing, say) is named with the checks that fail."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    failing = None
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            return "a process exited while starting (its output is above)"
        try:
            answer = httpx.get(readyz, timeout=1)
        except httpx.TransportError:
            pass
        else:
            if answer.status_code == 200:
                return None
            failing = _failing_checks(answer)
        time.sleep(0.1)
    if failing is None:
        return f"the web process did not answer within {READY_TIMEOUT_SECONDS} s (its output is above)"
    return f"not ready after {READY_TIMEOUT_SECONDS} s ({readyz}): {failing}"


def _failing_checks(answer: httpx.Response) -> str:
    try:
        checks = Readiness.model_validate_json(answer.content).checks.model_dump()
    except ValueError:
        return f"{answer.status_code} {answer.text[:200]}"
    return "; ".join(f"{name}: {state}" for name, state in checks.items() if state != "ok")


def _supervise(
    processes: list[subprocess.Popen[bytes]], env: dict[str, str], redis: EmbeddedRedis | None
) -> int:
    """Block until Ctrl-C, or until the web process (`processes[0]`) exits, which ends the session. A
    worker killed by a signal (the OOM killer, a `kill -9`) is started again, as a process manager would:
    its job runs again once its lock expires. A worker that exits by itself (it could not start, or was
    asked to stop) ends the session too. The embedded Redis, however it stopped, is started again on its
    port and append-only file; web and workers wait for it meanwhile and carry on."""
    while True:
        if redis is not None and redis.exited:
            print("darkroom dev: redis-server stopped; starting it again", file=sys.stderr, flush=True)
            redis.restart()
        for index, process in enumerate(processes):
            code = process.poll()
            if code is None:
                continue
            command = [str(part) for part in process.args] if isinstance(process.args, list) else []
            name = " ".join(command[2:4])  # "uvicorn server.app:app", "arq jobs.worker.WorkerSettings"
            if index == 0 or code >= 0:
                print(f"darkroom dev: {name} exited with {code}", file=sys.stderr)
                return code or 1
            print(f"darkroom dev: {name} exited with {code}; starting it again", file=sys.stderr, flush=True)
            processes[index] = subprocess.Popen(command, env=env, **child_process_options())
        time.sleep(SUPERVISE_POLL_SECONDS)


def stop_in_order(processes: list[subprocess.Popen[bytes]]) -> None:
    """Ctrl-C to each, then wait for each; one still running after its grace is killed with whatever it
    started."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            # Its whole process group (it has its own session): a worker's bulk lane too, which a
            # starved machine may still be stopping at its lower priority, and would outlive us.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
