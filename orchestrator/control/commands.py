"""What each control-socket command does on a `Migration`, named after QEMU's command where
it means the same (`query-migrate`, `migrate-set-parameters` with `downtime-limit` in
milliseconds and `max-bandwidth` in bytes per second, `migrate_cancel`), so a stack drives the
orchestrator with the QMP client and the code it already has; what QEMU has no command for is
`x-orch-`. Per-migration commands take an optional `id` (the latest migration without one).
A serving socket (`Context.launcher` set) also starts migrations: `x-orch-migrate` takes the
`migrate` command's options by their names, checked here for type, by the launcher for sense.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.control.arguments import Kind, Param, checked
from orchestrator.control.errors import CommandError, ErrorClass
from orchestrator.control.registry import Migrations
from orchestrator.migration.driver import Migration
from orchestrator.migration.engine import EngineError

#: Starts a migration from `x-orch-migrate`'s arguments: returns it attached and running,
#: or raises `CommandError` saying what is wrong with them.
Launcher = Callable[[dict[str, Any]], Awaitable[Migration]]

#: QEMU's own bound on `downtime-limit` (2000 s), in milliseconds.
MAX_DOWNTIME_LIMIT_MS = 2_000_000

ID = Param("id", Kind.STRING)

#: `x-orch-migrate`'s parameters: the `migrate` command's options, by the same names (a
#: bandwidth cap is `migrate-set-parameters`' once it runs).
MIGRATE_PARAMETERS = (
    Param("src-qmp", Kind.STRING, required=True),
    Param("dst-qmp", Kind.STRING, required=True),
    Param("src-ram", Kind.STRING, required=True),
    Param("dst-ram", Kind.STRING),
    Param("dst-receiver", Kind.STRING),
    Param("token-file", Kind.STRING),
    Param("tls-ca", Kind.STRING),
    Param("tls-server-name", Kind.STRING),
    Param("streams", Kind.INTEGER),
    Param("uri", Kind.STRING),
    Param("vfio-device", Kind.STRINGS),
    Param("verify", Kind.BOOLEAN),
    Param("tracker", Kind.STRING),
    Param("vcpu-log", Kind.STRING),
    Param("trust-seccomp", Kind.BOOLEAN),
    Param("downtime-limit", Kind.NUMBER),
    Param("max-rounds", Kind.INTEGER),
    Param("max-time", Kind.NUMBER),
    Param("on-limit", Kind.STRING),
    Param("policy", Kind.STRING),
    Param("set", Kind.STRINGS),
    Param("trace", Kind.STRING),
)


@dataclass
class Context:
    """What a socket's commands act on; `launcher` makes it a serving socket."""

    migrations: Migrations
    launcher: Launcher | None = None


Run = Callable[[Context, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Spec:
    params: tuple[Param, ...]
    run: Run
    serving: bool = False  # only where migrations can be started


def _steer(call: Callable[[], object]) -> None:
    """A request the migration's phase may refuse (NotNow) or its policy cannot take."""
    try:
        call()
    except EngineError as exc:
        raise CommandError(str(exc)) from None


async def _query_migrate(ctx: Context, args: dict[str, Any]) -> Any:
    return ctx.migrations.get(args.get("id"))[1].info().as_qmp()


async def _set_parameters(ctx: Context, args: dict[str, Any]) -> Any:
    mig = ctx.migrations.get(args.get("id"))[1]
    _steer(lambda: mig.set_parameters(args.get("downtime-limit"), args.get("max-bandwidth")))
    return {}


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


async def _query_parameters(ctx: Context, args: dict[str, Any]) -> Any:
    info = ctx.migrations.get(args.get("id"))[1].info()
    out: dict[str, Any] = {"max-bandwidth": _number(info.max_bandwidth or 0)}
    if info.downtime_limit_ms is not None:
        out["downtime-limit"] = _number(info.downtime_limit_ms)
    return out


async def _cancel(ctx: Context, args: dict[str, Any]) -> Any:
    ctx.migrations.get(args.get("id"))[1].cancel()  # like QEMU's: nothing to do once it ended
    return {}


async def _force_switchover(ctx: Context, args: dict[str, Any]) -> Any:
    _steer(ctx.migrations.get(args.get("id"))[1].force_switchover)
    return {}


async def _query_commands(ctx: Context, args: dict[str, Any]) -> Any:
    return [{"name": name} for name in available(ctx)]


async def _migrate(ctx: Context, args: dict[str, Any]) -> Any:
    assert ctx.launcher is not None  # `available` offers the command only with one
    migration = await ctx.launcher(args)
    return {"id": ctx.migrations.add(migration)}


async def _query_migrations(ctx: Context, args: dict[str, Any]) -> Any:
    out = []
    for ident, mig in ctx.migrations:
        info = mig.info()
        out.append(
            {
                "id": ident,
                "status": info.status.value,
                "src-qmp": str(mig.src.socket_path),
                "dst-qmp": str(mig.dst.socket_path),
                "guest": info.guest,
                "decision": info.decision,
                **({"error-desc": info.error} if info.error else {}),
            }
        )
    return out


DOWNTIME = Param("downtime-limit", Kind.NUMBER, minimum=1e-6, maximum=MAX_DOWNTIME_LIMIT_MS, unit="ms")
BANDWIDTH = Param("max-bandwidth", Kind.INTEGER, minimum=0, unit="bytes per second (0 lifts the cap)")

#: qmp_capabilities is the protocol's own (`protocol.QmpConnection` answers it); it is listed.
COMMANDS: dict[str, Spec] = {
    "query-migrate": Spec((ID,), _query_migrate),
    "migrate-set-parameters": Spec((ID, DOWNTIME, BANDWIDTH), _set_parameters),
    "query-migrate-parameters": Spec((ID,), _query_parameters),
    "migrate_cancel": Spec((ID,), _cancel),
    "x-orch-force-switchover": Spec((ID,), _force_switchover),
    "query-commands": Spec((), _query_commands),
    "x-orch-migrate": Spec(MIGRATE_PARAMETERS, _migrate, serving=True),
    "x-orch-query-migrations": Spec((), _query_migrations, serving=True),
}


def available(ctx: Context) -> list[str]:
    return ["qmp_capabilities", *(n for n, s in COMMANDS.items() if ctx.launcher is not None or not s.serving)]


async def execute(ctx: Context, name: str, arguments: dict[str, Any]) -> Any:
    """The command's return value; `CommandError` with the QMP class a client gets."""
    spec = COMMANDS.get(name)
    if spec is None or (spec.serving and ctx.launcher is None):
        raise CommandError(f"the command {name} has not been found", ErrorClass.COMMAND_NOT_FOUND)
    return await spec.run(ctx, checked(name, spec.params, arguments))
