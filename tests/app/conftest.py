"""The app's watches run against the QEMU-doubles rig, as the driver's tests do."""

from tests.driver.conftest import make_rig

__all__ = ["make_rig"]
