"""The QEMU side: QMP session, guest RAM layout, process launcher, switchover steps.

One job per module: `qmp` (connection, commands, timestamped events), `mtree` (parsing the
flat memory view), `layout` (RAM backends and their guest-physical placement), `launcher`
(QEMU processes and their files), `migration` (the QMP steps of a switchover), `errors`.
"""
