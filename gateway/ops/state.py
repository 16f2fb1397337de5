"""[state]: the stores the ledger and the shared budgets live in, made from the config (`make_stores`).

`backend = "sqlite"` (the default) is one file beside the keyring, shared by the workers of one host;
`backend = "redis"` is one Redis for a fleet (redisstore.py). Either way the ledger answers
StoreUnavailable when its store is away (the decision is then 451 4.3.0), and both budgets fall back to
the process's own (guessbudget.FallbackBudget). docs/operations.md, "A fleet on Redis", has the policy.

A Redis URL may carry a password (redis://:secret@host, ?password=secret): `redact` is applied to the URL
and to every error text before either reaches a log line or an error message.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import ConfigError
from ..policy.guard import GuardSettings
from ..policy.guessbudget import BudgetRule, FallbackBudget, SqliteBudget
from ..policy.ledger import LedgerStore, StoreUnavailable
from .ledgerstore import SqliteLedgerStore, open_store

if TYPE_CHECKING:
    from .config import Config, StateConfig
    from .redisstore import RedisState

log = logging.getLogger("gateway.state")

SCHEMES = ("redis", "rediss", "unix")
STATE_FILE = "state.sqlite"


def url_secrets(url: str) -> tuple[str, ...]:
    """The secrets a Redis URL may hold: the password of its userinfo, or of a ?password= parameter.

    Read by hand rather than with urlsplit, which raises on a malformed host or port: an error about a
    malformed URL must still leave its password out.
    """
    rest = url.partition("://")[2]
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo = netloc.rpartition("@")[0]
    found = [userinfo.partition(":")[2]]
    query = rest.partition("?")[2].partition("#")[0]
    found += [value for name, value in urllib.parse.parse_qsl(query) if name == "password"]
    # The text may show a secret percent-encoded or decoded; redact both forms.
    forms = {form for secret in found if secret for form in (secret, urllib.parse.unquote(secret))}
    return tuple(form for form in forms if form)


def redact(text: str, url: str) -> str:
    """`text` (the URL itself, an error) with every secret of `url` replaced by "***"."""
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def url_problem(url: str) -> str | None:
    """What is wrong with a [state] url, as the end of a config error; None when it will do."""
    example = (
        'for example "redis://10.0.0.5:6379/0", "rediss://:PASSWORD@redis.example.com:6380/0"'
        ' or "unix:///run/redis/redis.sock"'
    )
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (it raises on a port that is not a number)
    except ValueError:
        return f"is not a URL with a valid port ({example})"
    if parts.scheme not in SCHEMES:
        return f"must start with redis://, rediss:// or unix:// ({example})"
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            return f"needs an absolute socket path after unix:// ({example})"
    elif not parts.hostname:
        return f"names no host ({example})"
    return None


def state_path(config: Config) -> Path:
    """The SQLite file: [state] path, or state.sqlite beside the keyring."""
    return config.state.path or config.keyring_path.parent / STATE_FILE


@dataclass
class Stores:
    """What [state] makes: the ledger's store and the two budgets, on one backend. Close it once."""

    backend: str
    ledger: LedgerStore
    guess_budget: FallbackBudget
    null_sender_rate: FallbackBudget
    redis: RedisState | None = None

    async def available(self) -> bool:
        """A readiness detail: whether the store answers now."""
        if self.redis is not None:
            return await self.redis.ping()
        try:
            await self.ledger.lookup([bytes(32)])
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self.ledger.close()
        await self.guess_budget.close()
        await self.null_sender_rate.close()
        if self.redis is not None:
            await self.redis.close()


def budget_rules(config: Config) -> tuple[BudgetRule, BudgetRule]:
    """The guess budget ([limits] guess_rate and guess_burst, per client and network) and the null-sender
    rate (per network only)."""
    state: StateConfig = config.state
    guess = BudgetRule(
        "guess-budget",
        config.limits.guess_rate,
        config.limits.guess_burst,
        GuardSettings.max_guess_delay,
        state.guess_network_factor,
    )
    # A null-sender message over the rate is refused (4xx), never held: max_delay 0 makes any wait a
    # "disconnect", which charges nothing, so a network that keeps trying is not pushed further back.
    null_sender = BudgetRule(
        "null-sender-rate",
        state.null_sender_rate,
        state.null_sender_burst,
        max_delay=0.0,
        network_factor=1,
        per_client=False,
    )
    return guess, null_sender


def budgets_shared(config: Config, processes: int) -> bool:
    """Whether a front end of `processes` processes needs the [state] store for its budgets: a fleet on
    Redis, or several workers of one host on SQLite. One process on SQLite counts every guess it answers
    in its own budget (guessbudget.LocalBudget), with no file to write (a read-only /etc under systemd's
    ProtectSystem=strict) and no write per failed guess."""
    return config.state.backend.value == "redis" or processes > 1


def workers_that_start(config: Config) -> Config:
    """`config` as serve can run it: several workers on SQLite share the [state] file, made here by the main
    process before it forks them (a worker that cannot make it would die, be replaced and die again).

    One process needs no such file (budgets_shared), so a config that ran before on one process, beside a
    keyring in a read-only folder with the ledger off or elsewhere, must not stop because `workers = "auto"`
    became the default: "auto" (the gateway's choice) falls back to one worker with one warning line. A
    number of workers is the operator's: a file that cannot be made stops start-up with one line naming it.
    """
    if config.workers == 1 or config.state.backend.value != "sqlite":
        return config
    path = state_path(config)
    try:
        asyncio.run(_make_state_file(path))
    except StoreUnavailable as error:
        reason = str(error).removeprefix(f"ledger store {path}: ")
    else:
        return config
    where = "" if config.state.path else " (not set: state.sqlite beside the keyring)"
    fix = (
        "set [state] path to a file in a folder the gateway's user may write (the systemd unit's "
        "StateDirectory=: /var/lib/batv-gateway/state.sqlite)"
    )
    if not config.workers_auto:
        raise ConfigError(
            f"{config.path or '<config>'}: [state] path{where}: cannot make {path} ({reason}), the file "
            f"that [gateway] workers = {config.workers} share; {fix}, or set [gateway] workers = 1"
        )
    log.warning(
        '%s: [gateway] workers = "auto" would run %d workers, but the [state] file they share, %s%s, cannot '
        "be made (%s): serving with 1 worker; %s, or set [gateway] workers = 1",
        config.path or "<config>",
        config.workers,
        path,
        where,
        reason,
        fix,
    )
    return replace(config, workers=1)


async def _make_state_file(path: Path) -> None:
    store = await SqliteLedgerStore.open(path)
    await store.close()


async def make_stores(config: Config) -> Stores:
    """Open the [state] stores. A Redis that is away now is not an error (the client connects when it
    can); an SQLite file that cannot be made is StoreUnavailable."""
    state = config.state
    guess, null_sender = budget_rules(config)
    backend = state.backend.value
    if backend == "redis":
        from .redisstore import RedisBudget, RedisLedgerStore, RedisState

        assert state.url is not None  # config.py requires it with backend = "redis"
        redis = RedisState(state.url, state.key_prefix, state.connect_timeout, state.command_timeout)
        return Stores(
            backend,
            RedisLedgerStore(redis),
            FallbackBudget(RedisBudget(guess, redis), backend, state.retry_after),
            FallbackBudget(RedisBudget(null_sender, redis), backend, state.retry_after),
            redis,
        )
    path = state_path(config)
    ledger = await SqliteLedgerStore.open(path)
    return Stores(
        backend,
        ledger,
        FallbackBudget(SqliteBudget(guess, path), backend, state.retry_after),
        FallbackBudget(SqliteBudget(null_sender, path), backend, state.retry_after),
    )


@dataclass
class LedgerOpened:
    """The ledger's store as a front end opened it (`open_ledger`); `close` closes only what it made."""

    store: LedgerStore
    where: str  # for the start-up line: the SQLite file, or the [state] backend
    _owned: Stores | LedgerStore | None = None

    async def close(self) -> None:
        owned, self._owned = self._owned, None
        if owned is not None:
            await owned.close()


async def open_ledger(config: Config, ledger_on: bool, stores: Stores | None = None) -> LedgerOpened | None:
    """The ledger's store for a front end, or None when it is off; one start-up line says which.

    `ledger_on`: the keyring has a ledger secret. On Redis the ledger is the fleet's (an answer to mail
    that host A sent passes host B): `stores`' own when the front end made them, else [state]'s, made here
    and closed with it. Otherwise the SQLite file at [ledger] path (ledgerstore.open_store).
    """
    settings = config.ledger
    if not settings.enabled:
        log.info("ledger off ([ledger] enabled = false): bounces to untagged addresses are refused")
        return None
    if not ledger_on:
        log.info(
            "ledger off: the keyring %s has no ledger secret, so bounces to untagged addresses are "
            "refused at RCPT; run 'batv-gateway keys ledger-secret' and restart to turn it on",
            config.keyring_path,
        )
        return None
    if config.state.backend.value == "redis":
        owned = stores is None
        if stores is None:
            stores = await make_stores(config)
        opened = LedgerOpened(stores.ledger, f"{stores.backend} ([state])", stores if owned else None)
    else:
        store = await open_store(config)
        opened = LedgerOpened(store, str(config.ledger_path), store)
    log.info(
        "ledger on: %s, answers accepted for %d days, %d per message",
        opened.where,
        settings.days,
        settings.max_replies,
    )
    return opened
