"""The `darkroom` command: `dev`, `accounts create`, `webhooks listen`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from jobs.settings import Settings, SettingsError
from jobs.store import NewAccount, Store
from webhooks import listen


async def create_account(settings: Settings, name: str) -> NewAccount:
    store = Store.connect(settings.require_redis())
    try:
        return await store.create_account(name)
    finally:
        await store.close()


def account_json(created: NewAccount) -> dict[str, str]:
    return {
        "account_id": created.account.id,
        "api_key": created.api_key,
        "webhook_secret": created.account.webhook_secret,
    }


def _accounts_create(args: argparse.Namespace) -> int:
    created = asyncio.run(create_account(Settings.from_env(), args.name))
    if args.json:
        print(json.dumps(account_json(created)))
    else:
        print(f"Account {created.account.id} ({created.account.name})")
        print(f"  API key (shown once): {created.api_key}")
        print(f"  Webhook secret:       {created.account.webhook_secret}")
    return 0


def _webhooks_listen(args: argparse.Namespace) -> int:
    try:
        secrets = listen.listen_secrets(args.secret)
    except ValueError as exc:
        print(f"darkroom webhooks listen: {exc}", file=sys.stderr)
        return 2
    try:
        listen.serve(secrets, args.port, host=args.host)
    except OSError as exc:  # the port is taken, or the host is not an address of this machine
        reason = exc.strerror or exc
        print(
            f"darkroom webhooks listen: cannot listen on {args.host}:{args.port} ({reason}); try --port",
            file=sys.stderr,
        )
        return 1
    return 0


def _dev(args: argparse.Namespace) -> int:
    from server.dev import run_dev  # imports uvicorn and process management only when needed

    return run_dev(host=args.host, port=args.port, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="darkroom", description="Darkroom image-processing service")
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="run Redis, web and a worker locally (Ctrl-C stops all)")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=None, help="web port (default $PORT or 8000)")
    dev.add_argument("--workers", type=int, default=1, help="worker processes")
    dev.set_defaults(run=_dev)

    accounts_parser = commands.add_parser("accounts", help="manage accounts")
    accounts = accounts_parser.add_subparsers(dest="action", required=True)
    create = accounts.add_parser("create", help="create an account and print its API key and webhook secret")
    create.add_argument("--name", required=True)
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(run=_accounts_create)

    webhooks_parser = commands.add_parser("webhooks", help="webhook tools")
    webhooks = webhooks_parser.add_subparsers(dest="action", required=True)
    listener = webhooks.add_parser("listen", help="receive, verify and print deliveries locally")
    listener.add_argument(
        "--secret",
        action="append",
        required=True,
        metavar="[LABEL=]whsec_…",
        help="a secret to verify with, optionally labelled (callback=whsec_…, ep_…=whsec_…); repeat it to"
        " hear callbacks and endpoints at once: each delivery is printed with the label of the one that"
        " verified it",
    )
    listener.add_argument("--port", type=int, default=8787)
    listener.add_argument("--host", default="127.0.0.1")
    listener.set_defaults(run=_webhooks_listen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except SettingsError as exc:
        print(f"darkroom: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
