"""The control socket: a unix socket speaking QMP to the owner only, over the migrations of
one `Migrations`.

Only the user this process runs as may connect: the socket (0600) is created inside a
private directory (0700, made here unless the owner already keeps one; never a symlink, and
checked again after the bind to be the directory the socket went into), and every
connection's SO_PEERCRED uid is checked besides, so a socket the file modes would let through
(a wider directory, a chmod) still refuses another user before a byte is read or sent. Several clients
are served at once; each negotiated one gets the events of every migration as QMP events
(`id` added to their data when the socket serves several). Closing removes the socket, and
the directory if it was made here, on every exit path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orchestrator
from orchestrator.control import commands
from orchestrator.control.commands import Context
from orchestrator.control.errors import CommandError, ControlError, ErrorClass
from orchestrator.control.protocol import NEED_DATA, Answer, Command, QmpConnection
from orchestrator.migration.driver import Migration
from orchestrator.migration.events import EventStream

log = logging.getLogger(__name__)

#: A unix socket's path must fit `sun_path` (108 bytes with its terminating NUL).
MAX_PATH = 107
#: How long closing waits for each client to be sent what its migrations said last.
FLUSH_S = 2.0
_VERSION = [int(p) for p in orchestrator.__version__.split(".")[:3]]
GREETING_VERSION = {
    "qemu": {"major": _VERSION[0], "minor": _VERSION[1], "micro": _VERSION[2]},
    "package": f"orchestrator {orchestrator.__version__}",
}


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of a unix socket, as the kernel recorded it
    when that process connected (SO_PEERCRED: it cannot be forged by the peer)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


@dataclass
class _Directory:
    """The socket's directory, held open from its check until the socket is removed, so what
    the server binds in, checks again and cleans is the directory it checked, whatever its
    path names meanwhile (a path component repointed by someone else)."""

    path: Path
    fd: int
    made: bool  # made here: removed with the socket

    def still_at_path(self) -> bool:
        """The path names this very directory (lstat: a symlink there is itself, never equal)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    def remove(self, name: str) -> None:
        """Remove the socket `name` from this directory, the directory if it was made here and
        its path still names it, and let go of it."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.fd)
            if self.made and self.still_at_path():
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(self.path)
        finally:
            os.close(self.fd)


def _private_directory(directory: Path, owner: int) -> _Directory:
    """Make `directory` (0700), or accept an existing one that is the owner's and closed to
    everyone else (it stays when the socket goes). A symlink is refused either way: one in a
    shared directory could point at another user's private directory, or be repointed later."""
    try:
        os.mkdir(directory, 0o700)
        made = True
    except FileExistsError:
        made = False
    except FileNotFoundError:
        raise ControlError(
            f"the control socket's directory {directory} cannot be made: its parent is missing"
        ) from None
    if stat.S_ISLNK(os.lstat(directory).st_mode):
        raise ControlError(f"the control socket's directory {directory} is a symbolic link: give a real directory")
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except NotADirectoryError:
        raise ControlError(f"the control socket's directory {directory} is not a directory") from None
    except OSError as exc:  # ELOOP: it became a symlink since the lstat
        raise ControlError(f"the control socket's directory {directory} cannot be opened as itself: {exc}") from None
    try:
        if made:
            os.fchmod(fd, 0o700)  # exactly, whatever the umask took away
        st = os.fstat(fd)
        if st.st_uid != owner or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ControlError(
                f"the control socket's directory {directory} is not private (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}): give a directory that does not exist yet, or one only uid "
                f"{owner} can enter (chmod 0700)"
            )
    except BaseException:
        os.close(fd)
        raise
    return _Directory(directory, fd, made)


def _remove_stray_socket(path: Path, owner: int) -> None:
    """The socket bound through a path that no longer named the checked directory: removed if
    what the path names now is a socket of the owner's (never another user's file)."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == owner:
            path.unlink()


@dataclass(eq=False)  # one per connection, kept in a set by identity
class _Client:
    writer: asyncio.StreamWriter
    connection: QmpConnection
    forwarders: set[asyncio.Task[None]] = field(default_factory=set)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)


class ControlServer:
    """Serve `path` while entered (`async with ControlServer(...)`); `tag_ids`: events carry
    the migration's id (a socket over several)."""

    def __init__(self, path: Path, context: Context, tag_ids: bool = False) -> None:
        self.path = Path(path)
        self.context = context
        self.tag_ids = tag_ids
        self.owner = os.geteuid()
        self.refused: list[int] = []  # uids turned away, in order
        self._directory: _Directory | None = None
        self._server: asyncio.Server | None = None
        self._clients: set[_Client] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        context.migrations.on_added(self._added)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if len(os.fsencode(self.path)) > MAX_PATH:
            raise ControlError(
                f"the control socket path {self.path} is longer than {MAX_PATH} bytes: choose a shorter one"
            )
        if self.path.exists() or self.path.is_symlink():
            raise ControlError(
                f"{self.path} exists: another control socket may be serving there (remove it if it is stale)"
            )
        self._directory = directory = _private_directory(self.path.parent, self.owner)
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=self.path)
            if not directory.still_at_path():
                _remove_stray_socket(self.path, self.owner)
                raise ControlError(
                    f"the control socket's directory {directory.path} was replaced while the socket was made"
                )
            # The private directory already kept everyone out meanwhile.
            os.chmod(self.path.name, 0o600, dir_fd=directory.fd)
        except BaseException:
            if self._server is not None:
                self._server.close()
                self._server = None
            await self._remove()
            raise

    async def close(self) -> None:
        """Stop accepting, give each client what its migrations still said (bounded), hang up,
        and remove the socket (and the directory made for it). Safe to call twice."""
        try:
            if self._server is not None:
                self._server.close()
            forwarders = [t for c in self._clients for t in c.forwarders]
            if forwarders:
                await asyncio.wait(forwarders, timeout=FLUSH_S)
            for client in self._clients:
                client.writer.close()  # its handler reads the end and returns
            if self._handlers:
                _, stuck = await asyncio.wait(self._handlers, timeout=FLUSH_S)
                for task in stuck:  # still inside a command
                    task.cancel()
                await asyncio.gather(*stuck, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            await self._remove()

    async def _remove(self) -> None:
        if self._directory is not None:
            directory, self._directory = self._directory, None
            directory.remove(self.path.name)

    # -- connections ------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            if uid != self.owner:
                self.refused.append(uid)
                log.warning("control socket %s: refused a connection from uid %d", self.path, uid)
                return
            client = _Client(writer, QmpConnection(GREETING_VERSION))
            self._clients.add(client)
            try:
                await self._converse(client, reader)
            finally:
                self._clients.discard(client)
                for forwarder in client.forwarders:
                    forwarder.cancel()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: nothing to answer
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _converse(self, client: _Client, reader: asyncio.StreamReader) -> None:
        conn = client.connection
        client.send(conn.greeting())
        await client.writer.drain()
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                data = await reader.read(1 << 16)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, Answer):
                client.send(event.data)
                if event.negotiated:
                    for ident, migration in self.context.migrations:
                        self._follow(client, ident, migration, replay=False)
                if event.fatal:
                    await client.writer.drain()
                    return
            elif isinstance(event, Command):
                client.send(await self._execute(conn, event))
            await client.writer.drain()

    async def _execute(self, conn: QmpConnection, command: Command) -> bytes:
        try:
            value = await commands.execute(self.context, command.name, command.arguments)
        except CommandError as exc:
            return conn.error(command, exc.error_class, exc.desc)
        except Exception as exc:  # a bug must not take the socket (and its migrations' steering) down
            log.exception("control socket %s: %s failed", self.path, command.name)
            return conn.error(command, ErrorClass.GENERIC, f"{command.name} failed: {type(exc).__name__}: {exc}")
        return conn.reply(command, value)

    # -- events -------------------------------------------------------------------------
    def _added(self, ident: str, migration: Migration) -> None:
        """A migration joins: every negotiated client follows it from its first event."""
        for client in list(self._clients):
            if client.connection.negotiated:
                self._follow(client, ident, migration, replay=True)

    def _follow(self, client: _Client, ident: str, migration: Migration, replay: bool) -> None:
        stream = migration.subscribe(replay=replay)
        task = asyncio.ensure_future(self._forward(client, ident, stream))
        client.forwarders.add(task)
        task.add_done_callback(client.forwarders.discard)

    async def _forward(self, client: _Client, ident: str, stream: EventStream) -> None:
        """One migration's events to one client; a client that reads slowly loses the oldest
        (the stream is bounded), it never holds the migration up."""
        try:
            async for ev in stream:
                data = {**ev.data, "id": ident} if self.tag_ids else ev.data
                client.send(client.connection.event(ev.name.value, data, ev.wall_s))
                await client.writer.drain()
        except ConnectionError:
            pass
        finally:
            stream.close()
