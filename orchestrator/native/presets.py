"""The fixture guest's named workloads, as its kernel command lines (keys in fixtures/README.md).

One home for the names the demo, the benchmarks and the simulator share: the guest that runs
them is built from this room's sources (`csrc/guest/`).
"""

from __future__ import annotations

GUEST_PRESETS: dict[str, str] = {
    "idle": "pattern=idle",
    "light": "pattern=sweep wss=32M rate=32M",
    "sweep": "pattern=sweep wss=128M rate=0",
    "heavy": "pattern=random wss=128M rate=0",
    "hotcold": "pattern=hotcold wss=128M rate=0",
    # light, plus 32 fw_cfg DMA reads a second: device-model writes no vCPU store makes
    "fwcfg": "pattern=sweep wss=32M rate=32M fwcfg=256M",
}
