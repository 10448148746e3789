"""/dev/iommu: IOAS, HWPT and IOMMU dirty tracking (drivers/iommu/iommufd/).

Every command starts with a u32 `size`; the core rejects sizes below the command's minimum
(EINVAL), requires bytes past the struct it knows to be zero (E2BIG), and copies back at most
`size` bytes. Object ids share one table per iommufd; looking up the wrong type is ENOENT.

Implemented: IOAS_ALLOC, IOAS_MAP, HWPT_ALLOC, GET_HW_INFO, HWPT_SET_DIRTY_TRACKING and
HWPT_GET_DIRTY_BITMAP. Every other command (DESTROY, IOAS_UNMAP, IOAS_IOVA_RANGES, OPTION, ...)
is ENOTTY here although a real kernel implements it.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from orchestrator.emulated.dirtylog import UnitLog
from orchestrator.emulated.errors import kernel_error
from orchestrator.emulated.ioctl_arg import IoctlArg, offsetofend
from orchestrator.emulated.iova_bitmap import IovaBitmap
from orchestrator.emulated.models.base import DeviceModel
from orchestrator.emulated.runs import U64_MAX
from orchestrator.uapi import (
    IOMMU_GET_HW_INFO,
    IOMMU_HW_CAP_DIRTY_TRACKING,
    IOMMU_HW_INFO_TYPE_NONE,
    IOMMU_HWPT_ALLOC,
    IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
    IOMMU_HWPT_ALLOC_NEST_PARENT,
    IOMMU_HWPT_DATA_NONE,
    IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
    IOMMU_HWPT_GET_DIRTY_BITMAP,
    IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
    IOMMU_HWPT_SET_DIRTY_TRACKING,
    IOMMU_IOAS_ALLOC,
    IOMMU_IOAS_MAP,
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
    iommu_hw_info,
    iommu_hwpt_alloc,
    iommu_hwpt_get_dirty_bitmap,
    iommu_hwpt_set_dirty_tracking,
    iommu_ioas_alloc,
    iommu_ioas_map,
)


class IoPageTable:
    """io_pagetable: the IOVA areas an IOAS maps, sorted and disjoint. `iova_alignment` is
    the kernel's PAGE_SIZE here (the IOAS's minimum); `max_alloc_alignment` caps the alignment
    of IOVAs the kernel chooses: HPAGE_SIZE with CONFIG_TRANSPARENT_HUGEPAGE, else PAGE_SIZE."""

    def __init__(self, iova_alignment: int, max_alloc_alignment: int) -> None:
        self.iova_alignment = iova_alignment
        self.max_alloc_alignment = max_alloc_alignment
        self._starts: list[int] = []
        self._areas: list[tuple[int, int]] = []  # (iova, last)

    def map(self, iova: int | None, length: int, uptr: int) -> int:
        mask = self.iova_alignment - 1
        if length == 0 or (length | uptr | (iova or 0)) & mask:
            raise kernel_error(errno.EINVAL)
        if iova is None:
            iova = self._first_fit(length, uptr)
        elif iova + length - 1 > U64_MAX:
            raise kernel_error(errno.EOVERFLOW)
        if any(True for _ in self.mapped_parts(iova, iova + length - 1)):
            raise kernel_error(errno.EEXIST)
        i = bisect.bisect_left(self._starts, iova)
        self._starts.insert(i, iova)
        self._areas.insert(i, (iova, iova + length - 1))
        return iova

    def _first_fit(self, length: int, uptr: int) -> int:
        """iopt_alloc_iova: the lowest hole at or above PAGE_SIZE (an IOVA of 0 is never
        chosen), aligned to the smallest of the length's power of two, the user address's
        lowest set bit (to keep huge pages mappable) and `max_alloc_alignment`."""
        if length >= U64_MAX // 2:
            raise kernel_error(errno.EOVERFLOW)
        align = 1 << (length - 1).bit_length()  # roundup_pow_of_two
        if uptr:
            align = min(align, uptr & -uptr)
        align = min(align, self.max_alloc_alignment)
        if align < self.iova_alignment:
            raise kernel_error(errno.EINVAL)
        candidate = self.iova_alignment
        for start, last in self._areas:
            candidate = -(-candidate // align) * align
            if candidate + length - 1 < start:
                break
            candidate = max(candidate, last + 1)
        candidate = -(-candidate // align) * align
        if candidate + length - 1 > U64_MAX - self.iova_alignment:
            raise kernel_error(errno.ENOSPC)
        return candidate

    def mapped_parts(self, iova: int, last: int) -> Iterator[tuple[int, int]]:
        """Every mapped part of [iova, last], as inclusive (start, last); holes are skipped."""
        i = max(bisect.bisect_right(self._starts, iova) - 1, 0)
        for start, end in self._areas[i:]:
            if start > last:
                break
            if end >= iova:
                yield max(start, iova), min(end, last)

    def contig_chunks(self, iova: int, last: int) -> Iterator[tuple[int, int]]:
        """iopt_for_each_contig_area: starts at the area holding `iova` (none: no chunk) and
        stops at the first gap, so nothing past a hole is walked."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0 or self._areas[i][1] < iova:
            return
        cur = iova
        while True:
            end = self._areas[i][1]
            yield cur, min(end, last)
            i += 1
            if end >= last or i == len(self._areas) or self._starts[i] != end + 1:
                return
            cur = end + 1


@dataclass(eq=False)
class Ioas:
    id: int
    iopt: IoPageTable
    auto_hwpt: Hwpt | None = None


@dataclass(eq=False)
class Hwpt:
    """A paging HWPT (an iommu_domain). `dirty_ops` only when allocated with DIRTY_TRACKING."""

    id: int
    ioas: Ioas
    dirty_ops: bool
    io_page_size: int
    tracking: bool = False
    log: UnitLog = field(init=False)

    def __post_init__(self) -> None:
        self.log = UnitLog(self.io_page_size.bit_length() - 1)

    def record_dma(self, iova: int, length: int) -> None:
        """A device write through this domain sets the dirty bit of each mapped IOPTE it hits."""
        if self.tracking:
            for start, last in self.ioas.iopt.mapped_parts(iova, min(iova + length - 1, U64_MAX)):
                self.log.mark(start, last + 1)

    def set_dirty_tracking(self, enable: bool) -> None:
        if enable:
            self.log.clear()  # "a clean snapshot": enabling clears every dirty bit first
        self.tracking = enable

    def read_and_clear_dirty(self, iova: int, last: int, bitmap: IovaBitmap, clear: bool) -> None:
        """__iommu_read_and_clear_dirty: the driver op runs once per contiguous chunk; a gap ends
        the walk and its -EINVAL, like a driver error, is dropped by iommu_read_and_clear_dirty.

        Per chunk the walk is Intel's and AMD's: a cursor starts at the chunk's iova and steps by
        the IO page size; the IOPTE holding the cursor is read (and cleared) and, if dirty,
        recorded as (cursor, io_page_size). A chunk starting mid IO page thus reports its head
        page from the chunk start and every record runs one offset into the next page."""
        if not self.tracking:
            return  # the drivers refuse (-EINVAL) with tracking off; the result is dropped
        shift, page = self.log.shift, self.io_page_size
        for cur, end in self.ioas.iopt.contig_chunks(iova, last):
            visited = (end - cur) // page + 1  # cursors cur, cur + page, ... <= end
            first_page = cur >> shift
            first_u, last_u = self.log.take(first_page << shift, (first_page + visited) << shift, clear=clear)
            bitmap.set_units(first_u, last_u, page, base=cur & (page - 1))


@dataclass(eq=False)
class IommufdDevice:
    """A device bound to an iommufd (its dev_id)."""

    id: int
    model: DeviceModel


@dataclass(frozen=True)
class _Op:
    struct: type[ctypes.Structure]
    min_size: int
    handler: Callable[[Iommufd, Any], None]


class Iommufd:
    """One open /dev/iommu: its object table and ioctls."""

    def __init__(self, iova_alignment: int, max_alloc_alignment: int) -> None:
        self.iova_alignment = iova_alignment
        self.max_alloc_alignment = max_alloc_alignment
        self._objects: dict[int, object] = {}
        self._next_id = 1

    # -- objects ------------------------------------------------------------------------------

    def _add(self, make: Callable[[int], Any]) -> Any:
        obj = make(self._next_id)
        self._objects[self._next_id] = obj
        self._next_id += 1
        return obj

    def _get(self, obj_id: int, kind: type) -> Any:
        obj = self._objects.get(obj_id)
        if not isinstance(obj, kind):
            raise kernel_error(errno.ENOENT)
        return obj

    def bind(self, model: DeviceModel) -> IommufdDevice:
        return self._add(lambda i: IommufdDevice(i, model))

    def unbind(self, dev: IommufdDevice) -> None:
        self.detach(dev)
        self._objects.pop(dev.id, None)

    def attach(self, dev: IommufdDevice, pt_id: int) -> int:
        """Attach to a HWPT, or to an IOAS through its automatic (non-dirty) domain."""
        obj = self._objects.get(pt_id)
        if isinstance(obj, Ioas):
            if obj.auto_hwpt is None:
                obj.auto_hwpt = self._add(lambda i: Hwpt(i, obj, False, dev.model.iommu_page_size))
            hwpt = obj.auto_hwpt
        elif isinstance(obj, Hwpt):
            hwpt = obj
            if hwpt.dirty_ops and not dev.model.iommu_dirty:
                raise kernel_error(errno.EINVAL)  # dirty tracking is enforced on attach
        else:
            raise kernel_error(errno.ENOENT)
        dev.model.attached_hwpt = hwpt
        return hwpt.id

    def detach(self, dev: IommufdDevice) -> None:
        dev.model.attached_hwpt = None

    # -- file ops -----------------------------------------------------------------------------

    def ioctl(self, request: int, arg: bytearray) -> int:
        op = _OPS.get(request)
        if op is None:
            raise kernel_error(errno.ENOTTY)
        user = IoctlArg(arg)
        size = int.from_bytes(user.read(0, 4), "little")
        if size < op.min_size:
            raise kernel_error(errno.EINVAL)
        known = ctypes.sizeof(op.struct)
        if size > known and any(user.read(known, size - known)):
            raise kernel_error(errno.E2BIG)
        raw = user.read(0, min(size, known)).ljust(known, b"\0")
        cmd = op.struct.from_buffer_copy(raw)
        op.handler(self, cmd)
        user.write(0, bytes(cmd)[: min(size, known)])
        return 0

    def read(self, n: int) -> bytes:
        raise kernel_error(errno.EINVAL)

    def write(self, data: bytes) -> int:
        raise kernel_error(errno.EINVAL)

    def release(self) -> None:
        """Objects stay alive while bound devices still reference them, as with refcounts."""

    # -- commands -----------------------------------------------------------------------------

    def _ioas_alloc(self, cmd: iommu_ioas_alloc) -> None:
        if cmd.flags:
            raise kernel_error(errno.EOPNOTSUPP)
        cmd.out_ioas_id = self._add(lambda i: Ioas(i, IoPageTable(self.iova_alignment, self.max_alloc_alignment))).id

    def _ioas_map(self, cmd: iommu_ioas_map) -> None:
        known = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE
        if cmd.flags & ~known or getattr(cmd, "__reserved"):
            raise kernel_error(errno.EOPNOTSUPP)
        if cmd.iova >= U64_MAX or cmd.length >= U64_MAX:
            raise kernel_error(errno.EOVERFLOW)
        ioas = self._get(cmd.ioas_id, Ioas)
        if not cmd.flags & (IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE):
            raise kernel_error(errno.EINVAL)
        fixed = cmd.iova if cmd.flags & IOMMU_IOAS_MAP_FIXED_IOVA else None
        cmd.iova = ioas.iopt.map(fixed, cmd.length, cmd.user_va)

    def _hwpt_alloc(self, cmd: iommu_hwpt_alloc) -> None:
        if getattr(cmd, "__reserved"):
            raise kernel_error(errno.EOPNOTSUPP)
        if (cmd.data_type == IOMMU_HWPT_DATA_NONE) != (cmd.data_len == 0):
            raise kernel_error(errno.EINVAL)
        dev = self._get(cmd.dev_id, IommufdDevice)
        ioas = self._objects.get(cmd.pt_id)
        if isinstance(ioas, Hwpt):
            raise kernel_error(errno.EOPNOTSUPP)  # a nested HWPT needs user data these lack
        if not isinstance(ioas, Ioas):
            raise kernel_error(errno.EINVAL)  # iommufd_hwpt_alloc: any failed pt_id lookup
        if cmd.data_type != IOMMU_HWPT_DATA_NONE:
            raise kernel_error(errno.EOPNOTSUPP)
        if cmd.flags & ~(IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING):
            raise kernel_error(errno.EOPNOTSUPP)
        dirty = bool(cmd.flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
        if dirty and not dev.model.iommu_dirty:
            raise kernel_error(errno.EOPNOTSUPP)
        cmd.out_hwpt_id = self._add(lambda i: Hwpt(i, ioas, dirty, dev.model.iommu_page_size)).id

    def _get_hw_info(self, cmd: iommu_hw_info) -> None:
        if cmd.flags or any(getattr(cmd, "__reserved")):
            raise kernel_error(errno.EOPNOTSUPP)
        dev = self._get(cmd.dev_id, IommufdDevice)
        cmd.data_len = 0
        cmd.out_data_type = IOMMU_HW_INFO_TYPE_NONE
        cmd.out_capabilities = IOMMU_HW_CAP_DIRTY_TRACKING if dev.model.iommu_dirty else 0

    def _set_dirty_tracking(self, cmd: iommu_hwpt_set_dirty_tracking) -> None:
        if cmd.flags & ~IOMMU_HWPT_DIRTY_TRACKING_ENABLE:
            raise kernel_error(errno.EOPNOTSUPP)
        hwpt = self._get(cmd.hwpt_id, Hwpt)
        if not hwpt.dirty_ops:
            raise kernel_error(errno.EOPNOTSUPP)
        hwpt.set_dirty_tracking(bool(cmd.flags & IOMMU_HWPT_DIRTY_TRACKING_ENABLE))

    def _get_dirty_bitmap(self, cmd: iommu_hwpt_get_dirty_bitmap) -> None:
        if cmd.flags & ~IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR or getattr(cmd, "__reserved"):
            raise kernel_error(errno.EOPNOTSUPP)
        hwpt = self._get(cmd.hwpt_id, Hwpt)
        last = cmd.iova + ((cmd.length - 1) & U64_MAX)
        if last > U64_MAX:
            raise kernel_error(errno.EOVERFLOW)
        end = (last + 1) & U64_MAX
        if (cmd.iova | end) & (self.iova_alignment - 1):
            raise kernel_error(errno.EINVAL)
        if cmd.page_size == 0 or (cmd.iova | end) & (cmd.page_size - 1):
            raise kernel_error(errno.EINVAL)
        if not hwpt.dirty_ops:
            raise kernel_error(errno.EOPNOTSUPP)
        bitmap = IovaBitmap(cmd.iova, cmd.length, cmd.page_size, cmd.data)
        hwpt.read_and_clear_dirty(cmd.iova, last, bitmap, clear=not cmd.flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR)


_OPS: dict[int, _Op] = {
    IOMMU_IOAS_ALLOC: _Op(iommu_ioas_alloc, offsetofend(iommu_ioas_alloc, "out_ioas_id"), Iommufd._ioas_alloc),
    IOMMU_IOAS_MAP: _Op(iommu_ioas_map, offsetofend(iommu_ioas_map, "iova"), Iommufd._ioas_map),
    IOMMU_HWPT_ALLOC: _Op(iommu_hwpt_alloc, offsetofend(iommu_hwpt_alloc, "__reserved"), Iommufd._hwpt_alloc),
    IOMMU_GET_HW_INFO: _Op(iommu_hw_info, offsetofend(iommu_hw_info, "__reserved"), Iommufd._get_hw_info),
    IOMMU_HWPT_SET_DIRTY_TRACKING: _Op(
        iommu_hwpt_set_dirty_tracking,
        offsetofend(iommu_hwpt_set_dirty_tracking, "__reserved"),
        Iommufd._set_dirty_tracking,
    ),
    IOMMU_HWPT_GET_DIRTY_BITMAP: _Op(
        iommu_hwpt_get_dirty_bitmap, offsetofend(iommu_hwpt_get_dirty_bitmap, "data"), Iommufd._get_dirty_bitmap
    ),
}
