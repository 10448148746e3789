"""The demo and test wing: launching QEMU pairs, fixture guests and their workloads, emulated
device fleets. A migration never depends on it."""
