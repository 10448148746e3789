"""Property: whatever goes wrong at whichever step, and whatever goes wrong again while the
abort runs, the guest runs on exactly one side or the report says it runs nowhere, and a
source that keeps it has its capabilities back (or the report says they could not be)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.migration.driver import GuestHome
from tests.fakes.faults import Act, Fault
from tests.fakes.rig import Rig, clean_journal, qemu_step

#: Commands only an abort or a give-back sends, where a second fault can land.
ABORT_STEPS = ("migrate_cancel", "cont", "query-migrate", "migrate-set-capabilities")


#: (side, step) of every QMP command and event of a clean migration.
QEMU_STEPS = [qemu_step(e) for e in clean_journal() if e.startswith(("src", "dst")) and not e.endswith(" died")]


@st.composite
def faults(draw: st.DrawFn) -> tuple[bool, dict[str, list[Fault]]]:
    side, step = draw(st.sampled_from(QEMU_STEPS))
    plan: dict[str, list[Fault]] = {"src": [], "dst": []}
    # Dying right after the destination's last reply is dying after the migration ended.
    acts = [a for a in Act if not (a is Act.DIE_AFTER and (side, step) == ("dst", "query-status"))]
    plan[side].append(Fault(step, draw(st.sampled_from(acts)), draw(st.integers(1, 2))))
    if draw(st.booleans()):
        plan["src"].append(
            Fault(draw(st.sampled_from(ABORT_STEPS)), draw(st.sampled_from(list(Act))), draw(st.integers(1, 3)))
        )
    return draw(st.booleans()), plan


@settings(max_examples=80, deadline=None, derandomize=True)
@given(faults())
def test_the_guest_ends_up_in_one_place(case: tuple[bool, dict[str, list[Fault]]]) -> None:
    paused, plan = case

    async def run() -> None:
        rig = Rig.build(paused=paused, **plan)
        try:
            rep = await rig.migration().run()
            await rig.check_guest_home(rep)
            if rep.status == "completed":
                assert rep.guest is GuestHome.DESTINATION
        finally:
            await rig.close()

    asyncio.run(run())
