"""Native artifacts shipped as sources (the fixture guest, the TCG dirty-log plugin, the
fw_cfg blob) and their build into a per-user cache on first use."""
