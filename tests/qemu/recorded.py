"""What real QEMU 7.2 sends in the switchover choreography, as the real-QEMU tests here assert
it. The QEMU double (`tests/fakes/qemu.py`) is checked against the same lists, so the two
cannot drift apart silently. Event names leave MIGRATION_PASS out."""

#: A running guest migrated: STOP before pre-switchover, RESUME on the destination.
SOURCE_STATUSES = ["setup", "active", "pre-switchover", "device", "completed"]
DESTINATION_STATUSES = ["setup", "active", "completed"]
SOURCE_EVENTS = ["MIGRATION", "MIGRATION", "STOP", "MIGRATION", "MIGRATION", "MIGRATION"]
DESTINATION_EVENTS = ["MIGRATION", "MIGRATION", "RESUME", "MIGRATION"]

#: A guest its user had paused migrated: no STOP at switchover, and it stays paused there.
PAUSED_SOURCE_EVENTS = ["MIGRATION"] * 5
PAUSED_DESTINATION_EVENTS = ["MIGRATION"] * 3

#: The end of the source's statuses after `migrate_cancel`, in any phase.
CANCEL_STATUSES = ["cancelling", "cancelled"]
#: The end of its events after a cancel in pre-switchover: a guest that ran runs again ...
CANCEL_EVENTS = ["MIGRATION", "RESUME", "MIGRATION"]
#: ... and one its user had paused does not: it stays paused.
PAUSED_CANCEL_EVENTS = ["MIGRATION", "MIGRATION", "MIGRATION"]
#: Its run state then: QEMU 7.2 leaves postmigrate, 10.0 restores the state it had (paused).
PAUSED_AFTER_CANCEL = ("postmigrate", "paused")
