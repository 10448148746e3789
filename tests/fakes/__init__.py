"""Doubles of what the migration driver talks to (QEMU over QMP, device state, a page sink, a
tracker), recording what was done to them in one journal and failing where a test says."""
