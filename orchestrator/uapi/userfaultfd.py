"""`include/uapi/linux/userfaultfd.h` and the PAGEMAP_SCAN part of `include/uapi/linux/fs.h`:
what the write-watch tracker needs to track another process's writes."""

from __future__ import annotations

import ctypes

from orchestrator.uapi.ioctl import _IOR, _IOWR
from orchestrator.uapi.vfio import c_u64

UFFD_API = 0xAA
UFFDIO = 0xAA

# struct uffdio_api.features
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

# userfaultfd(2) flags: O_CLOEXEC and O_NONBLOCK on x86_64, and kernel-mode faults refused.
UFFD_USER_MODE_ONLY = 1

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", c_u64), ("features", c_u64), ("ioctls", c_u64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", c_u64), ("len", c_u64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_u64), ("ioctls", c_u64)]


UFFDIO_API = _IOWR(UFFDIO, 0x3F, ctypes.sizeof(uffdio_api))
UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, ctypes.sizeof(uffdio_register))
UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, ctypes.sizeof(uffdio_range))

# PAGEMAP_SCAN categories (struct page_region.categories, pm_scan_arg masks)
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7

# pm_scan_arg.flags
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1


class page_region(ctypes.Structure):
    _fields_ = [("start", c_u64), ("end", c_u64), ("categories", c_u64)]


class pm_scan_arg(ctypes.Structure):
    _fields_ = [
        ("size", c_u64),
        ("flags", c_u64),
        ("start", c_u64),
        ("end", c_u64),
        ("walk_end", c_u64),
        ("vec", c_u64),
        ("vec_len", c_u64),
        ("max_pages", c_u64),
        ("category_inverted", c_u64),
        ("category_mask", c_u64),
        ("category_anyof_mask", c_u64),
        ("return_mask", c_u64),
    ]


PAGEMAP_SCAN = _IOWR("f", 16, ctypes.sizeof(pm_scan_arg))
