"""The migrations one control socket answers for, by id. A command without an `id` means the
latest one (QEMU has one migration, and reports the last), so a stack written for QEMU needs
no ids; finished migrations are kept for their final `query-migrate`, the oldest dropped
beyond `keep_finished`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from orchestrator.control.errors import CommandError
from orchestrator.migration.driver import Migration

Added = Callable[[str, Migration], None]


class Migrations:
    def __init__(self, keep_finished: int = 32) -> None:
        self.keep_finished = keep_finished
        self._by_id: dict[str, Migration] = {}
        self._numbers = itertools.count(1)
        self._added: list[Added] = []

    def on_added(self, callback: Added) -> None:
        """Call `callback(id, migration)` for each migration added from now on."""
        self._added.append(callback)

    def add(self, migration: Migration) -> str:
        ident = f"m{next(self._numbers)}"
        self._by_id[ident] = migration
        finished = [i for i, m in self._by_id.items() if m.sequence.finished]
        for old in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._by_id[old]
        for callback in list(self._added):
            callback(ident, migration)
        return ident

    def get(self, ident: str | None) -> tuple[str, Migration]:
        if not self._by_id:
            raise CommandError("no migration has been started")
        if ident is None:
            ident = next(reversed(self._by_id))
        if ident not in self._by_id:
            raise CommandError(f"no migration '{ident}' (x-orch-query-migrations lists them)")
        return ident, self._by_id[ident]

    def __iter__(self) -> Iterator[tuple[str, Migration]]:
        return iter(list(self._by_id.items()))

    def __len__(self) -> int:
        return len(self._by_id)
