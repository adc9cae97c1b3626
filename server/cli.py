"""The `darkroom` command: `dev`, `accounts create|update|show`, `webhooks listen`, and the client's
`upload` and `batch` (darkroom_client.cli), which talk to a running service over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

from darkroom_client import cli as client_cli
from redis.exceptions import RedisError

from jobs.plans import DEFAULT_TIER, PLAN_NUMBERS, TIERS, Plan, plan_with
from jobs.records import Account
from jobs.settings import Settings, SettingsError
from jobs.store import NewAccount, Store
from webhooks import listen

Result = TypeVar("Result")

# An operator's command against a Redis that hangs (frozen, or its network gone) says so and exits, rather
# than hanging with it; the commands' own work answers in milliseconds.
REDIS_COMMAND_TIMEOUT_SECONDS = 5.0


async def _with_store(settings: Settings, use: Callable[[Store], Awaitable[Result]]) -> Result:
    store = Store.connect(settings.require_redis(), command_timeout=REDIS_COMMAND_TIMEOUT_SECONDS)
    try:
        return await use(store)
    finally:
        await store.close()


async def create_account(settings: Settings, name: str, plan: Plan = TIERS[DEFAULT_TIER]) -> NewAccount:
    return await _with_store(settings, lambda store: store.create_account(name, plan))


def account_json(created: NewAccount) -> dict[str, str]:
    return {
        "account_id": created.account.id,
        "api_key": created.api_key,
        "webhook_secret": created.account.webhook_secret,
    }


def _account_name(text: str) -> str:
    name = text.strip()
    if not name:
        raise argparse.ArgumentTypeError("must not be blank")
    return name


def _plan_numbers(args: argparse.Namespace) -> dict[str, int | None]:
    numbers: dict[str, int | None] = {name: getattr(args, name) for name in PLAN_NUMBERS}
    return numbers


def _print_plan(plan: Plan) -> None:
    print(f"  Plan:                 {plan.name}")
    print(f"    requests/minute:    {plan.requests_per_minute:,}")
    print(f"    uploads/minute:     {plan.uploads_per_minute:,}")
    print(f"    max processing:     {plan.max_processing:,}")
    print(f"    share:              {plan.share}")


def _accounts_create(args: argparse.Namespace) -> int:
    plan = plan_with(TIERS[args.plan], _plan_numbers(args))
    created = asyncio.run(create_account(Settings.from_env(), args.name, plan))
    if args.json:
        print(json.dumps(account_json(created)))
    else:
        print(f"Account {created.account.id} ({created.account.name})")
        print(f"  API key (shown once): {created.api_key}")
        print(f"  Webhook secret:       {created.account.webhook_secret}")
        _print_plan(plan)
    return 0


def _account_shown(account: Account) -> dict[str, Any]:
    """What `accounts show --json` prints: never the API key's hash or the webhook secrets."""
    return {
        "account_id": account.id,
        "name": account.name,
        "created_at": account.created_at,
        "plan": asdict(account.plan),
    }


def _show(account: Account | None, account_id: str, as_json: bool) -> int:
    if account is None:
        print(f"darkroom: no account {account_id}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(_account_shown(account)))
    else:
        print(f"Account {account.id} ({account.name}), created {account.created_at}")
        _print_plan(account.plan)
    return 0


def _accounts_update(args: argparse.Namespace) -> int:
    numbers = _plan_numbers(args)

    def new_plan(current: Plan) -> Plan:
        return plan_with(TIERS[args.plan] if args.plan is not None else current, numbers)

    async def update(store: Store) -> Account | None:
        return await store.change_plan(args.account_id, new_plan)

    account = asyncio.run(_with_store(Settings.from_env(), update))
    return _show(account, args.account_id, args.json)


def _accounts_show(args: argparse.Namespace) -> int:
    account = asyncio.run(_with_store(Settings.from_env(), lambda store: store.get_account(args.account_id)))
    return _show(account, args.account_id, args.json)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _add_plan_arguments(parser: argparse.ArgumentParser, *, default_tier: str | None) -> None:
    tiers = ", ".join(
        f"{tier.name} ({tier.requests_per_minute:,} requests and {tier.uploads_per_minute:,} uploads/min)"
        for tier in TIERS.values()
    )
    parser.add_argument(
        "--plan",
        choices=list(TIERS),
        default=default_tier,
        help=f"a tier: {tiers}; the flags below change it",
    )
    parser.add_argument(
        "--requests-per-minute", type=_positive, metavar="N", help="authenticated requests a minute"
    )
    parser.add_argument("--uploads-per-minute", type=_positive, metavar="N", help="images created a minute")
    parser.add_argument("--max-processing", type=_positive, metavar="N", help="images rendering at once")
    parser.add_argument(
        "--share", type=_positive, metavar="N", help="weight when workers share between accounts"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


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
    create.add_argument("--name", required=True, type=_account_name, help="shown with the account")
    _add_plan_arguments(create, default_tier=DEFAULT_TIER)
    create.set_defaults(run=_accounts_create)
    update = accounts.add_parser("update", help="change an account's plan (its limits apply at once)")
    update.add_argument("account_id")
    _add_plan_arguments(update, default_tier=None)
    update.set_defaults(run=_accounts_update)
    show = accounts.add_parser("show", help="print an account's name and plan")
    show.add_argument("account_id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_accounts_show)

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

    client_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except SettingsError as exc:
        print(f"darkroom: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:  # `accounts`: a sentence for an operator, not a traceback
        print(f"darkroom: cannot reach Redis ({exc})", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
