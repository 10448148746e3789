"""`python -m orchestrator ...`: migrate (attach to running QEMUs), demo (launch its own), and
receive (on the destination host, for migrate --dst-receiver)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from orchestrator.app import experiments
from orchestrator.app.checks import InputError, distinct_sockets, positive, private_ram, process_uid, writable_target
from orchestrator.app.metrics import metrics_watch
from orchestrator.app.output import demo_lines, write_json
from orchestrator.app.probe import add_probe_parser, probe_command
from orchestrator.app.progress import Display, ProgressMode, choose
from orchestrator.app.receive import serve
from orchestrator.app.signals import Interrupted, settle, under_signal_policy
from orchestrator.control.errors import ControlError
from orchestrator.control.watch import control_watch
from orchestrator.experiments.errors import ExperimentError
from orchestrator.experiments.recorder import trace_watch
from orchestrator.lab.demo import DEMO_WORKLOADS, parse_size, run_demo
from orchestrator.lab.errors import LabError
from orchestrator.lab.fleet import FAULTS, KINDS, FaultPlan
from orchestrator.migration.attach import Endpoints, attach, attach_remote
from orchestrator.migration.driver import GuestHome, Migration, MigrationOptions, MigrationReport, Watch, run_watched
from orchestrator.migration.engine import EngineError, OnLimit
from orchestrator.migration.engine.throttling import throttles
from orchestrator.native.builds import BuildError
from orchestrator.qemu.errors import QemuError
from orchestrator.qemu.qmp import QmpSession
from orchestrator.qemu.throttle import vcpu_throttle
from orchestrator.trackers import QemuWrites, RecoveryPolicy, Tracker, VfioDmaLogTracker, qemu_write_trackers
from orchestrator.trackers.errors import TrackerError
from orchestrator.trackers.vcpulog import VcpuDirtyLog, log_pages
from orchestrator.transport.auth import load_token
from orchestrator.transport.endpoint import client_context, parse_endpoint
from orchestrator.transport.errors import TransportError
from orchestrator.transport.tcp import TcpOptions
from orchestrator.vfio import RealSyscalls, VfioDevice
from orchestrator.vfio.errors import VfioClientError, VfioUsageError
from orchestrator.writewatch.errors import WriteWatchError

#: Exit statuses: what happened to the guest. 0 migrated (the destination runs it); 1 not
#: migrated, the source has it (running, or paused as its user left it); 2 bad input, nothing
#: changed; 3 the guest runs nowhere (a QEMU died, or the source could not be resumed); 4 the
#: destination runs the guest but something failed after the handover (see the report).
EXIT_OK, EXIT_MIGRATION_FAILED, EXIT_BAD_INPUT, EXIT_GUEST_LOST, EXIT_MIGRATED_WITH_ERRORS = 0, 1, 2, 3, 4
#: What ends a command before anything changed (exit 2): each package's error root, the
#: commands' own input errors, and the file system refusing a path the user gave.
BAD_INPUT = (
    InputError,
    LabError,
    EngineError,
    QemuError,
    TransportError,
    TrackerError,
    VfioClientError,
    WriteWatchError,
    ControlError,
    BuildError,
    ExperimentError,
    OSError,
)


def add_policy_options(p: argparse.ArgumentParser) -> None:
    d = MigrationOptions
    p.add_argument(
        "--downtime-limit",
        type=float,
        default=d.downtime_limit_ms,
        metavar="MS",
        help=f"switch over once the expected downtime fits (default {d.downtime_limit_ms:g})",
    )
    p.add_argument(
        "--max-rounds",
        type=int,
        default=d.max_rounds,
        metavar="N",
        help=f"cap on precopy rounds, round 0 included (default {d.max_rounds})",
    )
    p.add_argument(
        "--max-time",
        type=float,
        default=d.max_time_s,
        metavar="S",
        help=f"time cap in seconds (default {d.max_time_s:g})",
    )
    p.add_argument(
        "--on-limit",
        type=OnLimit,
        choices=tuple(OnLimit),
        default=d.on_limit,
        help="when a cap is hit: cancel (source keeps running) or force the switchover",
    )
    p.add_argument("--json", metavar="PATH|-", help="write the JSON report there ('-' for stdout)")
    experiments.add_policy_choice(p)
    experiments.add_plot_option(p)


def add_tracker_options(p: argparse.ArgumentParser, kinds: tuple[QemuWrites, ...]) -> None:
    p.add_argument(
        "--tracker",
        choices=[k.value for k in kinds],
        default=None,
        help="what finds QEMU's own writes to guest RAM: writewatch (the default: every write through QEMU's "
        "page tables, any accelerator; falls back to content hashing with a message when refused, unless "
        "asked for by name)"
        + (", vcpu (the TCG plugin: vCPU stores only)" if QemuWrites.VCPU in kinds else "")
        + " or content (hashes of all RAM every round)",
    )
    p.add_argument(
        "--trust-seccomp",
        action="store_true",
        help=(
            "let write-watch inject into a QEMU whose seccomp filter cannot be checked here"
            " (never one that is known to deny)"
        ),
    )


def tracker_choice(args: argparse.Namespace) -> tuple[QemuWrites, bool]:
    """The tracker of QEMU's writes, and whether the user named it."""
    return QemuWrites(args.tracker or QemuWrites.WRITEWATCH.value), args.tracker is not None


def options_from(args: argparse.Namespace, verify: bool, **more) -> MigrationOptions:
    """The options, with the policy numbers and the report path checked (`InputError` naming
    the bad one)."""
    custom = experiments.chosen_policy(args)
    writable_target("--plot", args.plot)
    positive("--downtime-limit", args.downtime_limit, "milliseconds")
    positive("--max-time", args.max_time, "seconds")
    positive("--max-rounds", args.max_rounds, "rounds")
    writable_target("--json", args.json)
    options = MigrationOptions(
        downtime_limit_ms=args.downtime_limit,
        max_rounds=args.max_rounds,
        max_time_s=args.max_time,
        on_limit=args.on_limit,
        verify=verify,
        custom_policy=custom,
        **more,
    )
    options.policy()
    return options


def parser(cls: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command line; `cls` is every (sub)parser's class (serve's raises instead of exiting)."""
    top = cls(prog="python -m orchestrator", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="migrate between two QEMUs that are already running")
    m.add_argument("--src-qmp", required=True, type=Path, metavar="SOCK")
    m.add_argument(
        "--dst-qmp", required=True, type=Path, metavar="SOCK", help="destination started with -incoming defer"
    )
    m.add_argument("--src-ram", required=True, type=Path, metavar="FILE", help="the source's share=on RAM file")
    where = m.add_mutually_exclusive_group(required=True)
    where.add_argument("--dst-ram", type=Path, metavar="FILE", help="the destination's RAM file, on this host")
    where.add_argument(
        "--dst-receiver", metavar="HOST:PORT", help="a `receive` on the destination host (needs --token-file and --uri)"
    )
    m.add_argument("--uri", help="QEMU-to-QEMU state stream, e.g. tcp:HOST:PORT (default: a private unix socket)")
    add_stream_options(m)
    m.add_argument(
        "--vfio-device",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="a VFIO device fd to track by DMA logging (repeatable)",
    )
    m.add_argument("--verify", action="store_true", help="compare source and destination RAM while both are paused")
    add_tracker_options(m, tuple(QemuWrites))
    m.add_argument(
        "--vcpu-log",
        type=Path,
        metavar="FILE",
        help="with --tracker vcpu: the dirty log made by `vcpu-log` that the source QEMU's plugin writes",
    )
    add_policy_options(m)
    add_watch_options(m)
    add_trace_option(m)
    add_control_option(m)

    d = sub.add_parser("demo", help="launch two QEMUs running the fixture guest and migrate it live")
    d.add_argument(
        "--workload",
        default="light",
        choices=sorted(DEMO_WORKLOADS),
        help=(
            "what the guest does while it migrates (default light; linux boots a Linux guest: `make linux-guest` first)"
        ),
    )
    d.add_argument("--mem", default="256M", metavar="SIZE", help="guest RAM (default 256M)")
    add_tracker_options(d, tuple(QemuWrites))
    d.add_argument(
        "--accel",
        choices=("tcg", "kvm"),
        default="tcg",
        help="accelerator (kvm needs /dev/kvm, and a tracker other than vcpu)",
    )
    d.add_argument(
        "--qemu",
        metavar="PATH",
        help="the QEMU binary of both VMs (default: $ORCHESTRATOR_QEMU, else qemu-system-x86_64)",
    )
    d.add_argument("--no-verify", action="store_true", help="skip the bit-exact comparison at switchover")
    d.add_argument(
        "--transport",
        choices=("local", "tcp"),
        default="local",
        help="how pages move: local copy, or a TCP stream through a receiver on loopback",
    )
    d.add_argument(
        "--devices",
        default="mlx5,pds",
        metavar="KINDS",
        help=f"emulated DMA devices, comma separated, from {', '.join(KINDS)}; 'none' for none (default mlx5,pds)",
    )
    d.add_argument(
        "--no-device-tracking",
        action="store_true",
        help="devices DMA but nothing tracks them (a negative control: verification must fail)",
    )
    d.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="FAULT[@DEVICE][:ROUND]",
        help=f"inject a device fault before ROUND's collect (repeatable): {', '.join(FAULTS)}",
    )
    add_policy_options(d)
    add_watch_options(d)
    add_trace_option(d)

    v = sub.add_parser(
        "vcpu-log",
        help="create a dirty log for the TCG plugin (migrate --tracker vcpu) and print QEMU's -plugin argument",
    )
    v.add_argument("path", type=Path, metavar="FILE", help="the log to create, e.g. in /dev/shm (must not exist)")
    v.add_argument("--mem", required=True, type=parse_size, metavar="SIZE", help="the guest's RAM size, e.g. 4G")

    r = sub.add_parser(
        "receive", help="on the destination host: receive guest pages into the destination QEMU's RAM file"
    )
    r.add_argument("--listen", required=True, metavar="HOST:PORT")
    r.add_argument("--ram", required=True, type=Path, metavar="FILE", help="the destination QEMU's share=on RAM file")
    r.add_argument(
        "--token-file",
        required=True,
        type=Path,
        metavar="FILE",
        help="the shared secret (mode 0600), the same file content as the sender's",
    )
    r.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve TLS with this certificate (with --tls-key)")
    r.add_argument("--tls-key", type=Path, metavar="PEM")
    r.add_argument("--once", action="store_true", help="exit when the first migration session ends")
    add_metrics_option(r)
    s = sub.add_parser("serve", help="serve a control socket that starts and steers migrations (QMP), until a signal")
    add_control_option(s, required=True)
    add_metrics_option(s)
    add_probe_parser(sub)
    experiments.add_commands(sub)
    return top


def add_trace_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", type=Path, metavar="FILE", help="record every round and event as a trace (JSON Lines)")


@contextlib.asynccontextmanager
async def throttle_watch(mig: Migration) -> AsyncIterator[None]:
    """A policy that throttles gets an actuator on the source's vCPUs for the run (refused
    before anything changes when no cgroup can hold them), released on every way out."""
    if not throttles(mig.engine.policy) or mig.actuator is not None:
        yield
        return
    if not isinstance(mig.src, QmpSession):
        raise InputError("a throttling policy needs the source QEMU's process to throttle its vCPUs")
    async with vcpu_throttle(mig.src, mig.src.peer_pid()) as actuator:
        mig.actuator = actuator
        yield


def add_stream_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", type=Path, metavar="FILE", help="shared secret for --dst-receiver (mode 0600)")
    p.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="use TLS; the receiver's certificate must chain to this CA"
    )
    p.add_argument(
        "--tls-server-name", metavar="NAME", help="name the receiver's certificate must carry (default: its host)"
    )
    p.add_argument("--streams", type=int, default=4, metavar="N", help="parallel connections (default 4)")
    p.add_argument(
        "--max-bandwidth", type=parse_size, metavar="BYTES", help="cap on page-stream bytes per second, e.g. 100M"
    )


def check_migrate_args(args: argparse.Namespace) -> MigrationOptions:
    """Everything that can be checked without touching a QEMU; returns the options."""
    options = options_from(args, args.verify)
    distinct_sockets(args.src_qmp, args.dst_qmp)
    if (args.tracker == QemuWrites.VCPU.value) != (args.vcpu_log is not None):
        raise InputError("--tracker vcpu and --vcpu-log FILE go together")
    if args.dst_receiver is not None and (args.token_file is None or args.uri is None):
        raise InputError("--dst-receiver needs --token-file, and --uri for QEMU's own stream (e.g. tcp:HOST:PORT)")
    positive("--streams", args.streams, "connections")
    if args.max_bandwidth is not None:
        positive("--max-bandwidth", args.max_bandwidth, "bytes per second")
    return options


async def attach_from(args: argparse.Namespace, src: QmpSession, dst: QmpSession) -> Endpoints:
    """A local sink (--dst-ram) or a TCP stream to a receiver (--dst-receiver)."""
    if args.dst_ram is not None:
        return await attach(src, dst, args.src_ram, args.dst_ram)
    tls = client_context(args.tls_ca) if args.tls_ca else None
    options = TcpOptions(
        streams=args.streams, max_bandwidth=args.max_bandwidth, ssl=tls, server_hostname=args.tls_server_name
    )
    return await attach_remote(
        src, dst, args.src_ram, parse_endpoint(args.dst_receiver), load_token(args.token_file), options
    )


def vfio_trackers(paths: list[Path], fds: list[int]) -> list[Tracker]:
    """One DMA-log tracker per device fd; each fd goes into `fds` as soon as it is open, so
    the caller closes every one even when a later open fails. A file that does not offer
    DMA logging is refused here: tracking it would mean all-dirty for the whole run."""
    sys_ = RealSyscalls()
    trackers: list[Tracker] = []
    for path in paths:
        fds.append(os.open(path, os.O_RDWR))
        device = VfioDevice(fds[-1], sys_, name=path.name)
        if not device.probe_dma_logging():
            raise VfioUsageError(
                f"--vfio-device {path} offers no VFIO DMA logging (its DMA_LOGGING_START probe fails): it is not a "
                "VFIO device, its driver has no dirty tracking, or it is a device cdev this process has not bound "
                "(the kernel lets one fd bind a device, and QEMU's holds it)"
            )
        trackers.append(VfioDmaLogTracker(device))
    return trackers


def add_metrics_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics while the command runs (port 0: any free one)",
    )


def add_watch_options(p: argparse.ArgumentParser) -> None:
    """How `migrate` and `demo` show their migration, and what they export."""
    p.add_argument(
        "--progress",
        choices=[m.value for m in ProgressMode if m is not ProgressMode.QUIET],
        default=ProgressMode.AUTO.value,
        help="live (a panel redrawn in place), text (a line per round and tracker event), json (one object per "
        "event per line, the summary last) or auto (live on a terminal, else text); with --json - all of it goes "
        "to stderr",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary: the exit status tells")
    add_metrics_option(p)


def display_from(args: argparse.Namespace) -> Display:
    return choose(ProgressMode(args.progress), args.quiet, report_on_stdout=args.json == "-")


def add_control_option(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--control",
        type=Path,
        required=required,
        metavar="SOCK",
        help="serve a QMP control socket there (mode 0600, in a private directory made for it unless it exists "
        "and is private), for this user only; removed at the end",
    )


def watches_from(args: argparse.Namespace) -> list[Watch]:
    """What watches a migration of `migrate` or `demo`, from the options asked for."""
    display = display_from(args)
    watches: list[Watch] = [display.watch]
    if args.metrics is not None:
        watches.append(metrics_watch(parse_endpoint(args.metrics), display.note))
    if getattr(args, "control", None) is not None:
        watches.append(control_watch(args.control))
    return watches + job_watches(args)


def job_watches(args: argparse.Namespace) -> list[Watch]:
    """What every migration of these options needs, whoever runs it (`migrate`, `demo`, each
    of `serve`'s): the throttle actuator its policy may ask for, and its trace."""
    watches: list[Watch] = [throttle_watch]
    if args.trace is not None:
        writable_target("--trace", str(args.trace))
        watches.append(trace_watch(args.trace, getattr(args, "workload", None)))
    return watches


async def run_migration(
    ep: Endpoints, trackers: list[Tracker], uri: str, options: MigrationOptions, watches: list[Watch]
) -> MigrationReport:
    """The report, also when a signal cancelled the run: the abort (or the switchover that
    was finished anyway) is in it."""
    mig = Migration(ep, trackers, uri, options)
    try:
        report = await run_watched(mig, watches)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.uncancel() > 0:
            raise
        report = mig.report
    settle()  # what follows only reports and closes: a signal now must not change the exit status
    return report


def exit_status(report: MigrationReport, *more_ok: bool) -> int:
    """The exit status that tells what happened to the guest."""
    if report.guest is GuestHome.DESTINATION:
        return EXIT_OK if report.ok and all(more_ok) else EXIT_MIGRATED_WITH_ERRORS
    return EXIT_MIGRATION_FAILED if report.guest is GuestHome.SOURCE else EXIT_GUEST_LOST


def report_json(data: dict, where: str | None) -> None:
    """Write the report; a failure now is said, but the exit status still tells the guest's fate."""
    try:
        write_json(data, where)
    except OSError as exc:
        print(f"error: the JSON report could not be written to {where}: {exc}", file=sys.stderr)


def check_ram_files(args: argparse.Namespace, src: QmpSession, dst: QmpSession) -> None:
    private_ram(args.src_ram, "source", process_uid(src.peer_pid()))
    if args.dst_ram is not None:
        private_ram(args.dst_ram, "destination", process_uid(dst.peer_pid()))


@contextlib.asynccontextmanager
async def attached(
    args: argparse.Namespace, workdir: Path, notice: Callable[[str], None]
) -> AsyncIterator[tuple[Endpoints, list[Tracker], str]]:
    """What a migration of `migrate`'s options runs on (and each of `serve`'s): both QEMUs
    connected and attached, the RAM files checked, the trackers open, and the URI of QEMU's
    own stream (a socket in `workdir` unless given); all closed again on every way out."""
    fds: list[int] = []
    sessions: list[QmpSession] = []
    ep: Endpoints | None = None
    log: VcpuDirtyLog | None = None
    try:
        log = VcpuDirtyLog.open(args.vcpu_log) if args.vcpu_log else None
        for sock in (args.src_qmp, args.dst_qmp):
            sessions.append(await QmpSession.connect(sock))
        ep = await attach_from(args, *sessions)
        check_ram_files(args, *sessions)
        kind, explicit = tracker_choice(args)
        with qemu_write_trackers(
            kind,
            ep.layout,
            sessions[0].peer_pid(),
            explicit=explicit,
            log=log,
            src_ram=str(args.src_ram),
            trust_seccomp=args.trust_seccomp,
            notice=notice,
        ) as ram:
            trackers = ram + vfio_trackers(args.vfio_device, fds)
            yield ep, trackers, args.uri or f"unix:{workdir / 'migrate.sock'}"
    finally:
        if ep is not None:
            ep.sink.close()
        for s in sessions:
            await s.close()
        for fd in fds:
            os.close(fd)
        if log is not None:
            log.close()


async def migrate_command(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-"))
    try:
        options = check_migrate_args(args)
        watches, display = watches_from(args), display_from(args)
        async with attached(args, workdir, display.note) as (ep, trackers, uri):
            report = await run_migration(ep, trackers, uri, options, watches)
        display.summary(report)
        report_json(report.as_dict(), args.json)
        experiments.plot_if_asked(args, report.as_dict())
        return exit_status(report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def demo_command(args: argparse.Namespace) -> int:
    options = options_from(args, not args.no_verify, recovery=RecoveryPolicy(timeout=1.0))
    mem = parse_size(args.mem)
    devices = [] if args.devices == "none" else [k.strip() for k in args.devices.split(",") if k.strip()]
    faults = [FaultPlan.parse(f) for f in args.inject]
    kind, explicit = tracker_choice(args)
    watches, display = watches_from(args), display_from(args)
    display.note(
        f"demo: {args.workload} guest ({DEMO_WORKLOADS[args.workload]}), {args.mem} RAM, tracker {kind.value}, "
        f"devices {', '.join(devices) or 'none'}{'' if not args.no_device_tracking else ' (untracked)'}"
    )
    result = await run_demo(
        args.workload,
        mem,
        kind,
        options,
        devices,
        not args.no_device_tracking,
        faults,
        args.accel,
        transport=args.transport,
        qemu=args.qemu,
        explicit=explicit,
        trust_seccomp=args.trust_seccomp,
        watches=watches,
        notice=display.note,
    )
    rep = result.report
    display.summary(rep, demo_lines(result), {"device_checks": result.devices, "guest_errors": result.guest_errors})
    devices_ok = all(c["state_migrated"] and not c["destination_mismatched_pages"] for c in result.devices.values())
    report_json({**rep.as_dict(), "device_checks": result.devices}, args.json)
    experiments.plot_if_asked(args, rep.as_dict())
    return exit_status(rep, devices_ok, not result.guest_errors)


async def vcpu_log_command(args: argparse.Namespace) -> int:
    log = VcpuDirtyLog.create(args.path, log_pages(args.mem))
    print(f"-plugin {log.plugin_args()}")
    log.close()  # the file stays for QEMU's plugin and for migrate --vcpu-log
    return EXIT_OK


async def serve_command(args: argparse.Namespace) -> int:
    from orchestrator.app.serve import serve_control  # imported here: it builds on this module's migrate path

    return await serve_control(args.control, None if args.metrics is None else parse_endpoint(args.metrics))


async def receive_command(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise InputError("--tls-cert and --tls-key go together")
    private_ram(args.ram, "destination", None)  # QEMU's user is not known here: the mode bits are
    metrics = None if args.metrics is None else parse_endpoint(args.metrics)
    return await serve(args.ram, args.listen, args.token_file, args.tls_cert, args.tls_key, args.once, metrics)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = {
        "migrate": migrate_command,
        "demo": demo_command,
        "receive": receive_command,
        "vcpu-log": vcpu_log_command,
        "serve": serve_command,
        "probe": probe_command,
        **experiments.COMMANDS,
    }[args.command]
    try:
        return asyncio.run(under_signal_policy(command(args)))
    except BAD_INPUT as exc:  # everything checked before a migration starts ends up here
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        print(f"{exc}: nothing migrated, everything this command made is removed", file=sys.stderr)
        return EXIT_MIGRATION_FAILED
