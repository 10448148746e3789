"""One live migration: the sans-IO engine that owns its sequence, the driver that performs
the engine's actions against real QEMUs, attaching to them, and moving device state."""
