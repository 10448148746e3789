"""IOMMUFD dirty tracking, mirroring tools/testing/selftests/iommu (iommufd_dirty_tracking)."""

import ctypes
import errno

import numpy as np
import pytest

from orchestrator import uapi
from orchestrator.emulated import EmulatedKernel, Mlx5Like, MttyLike, NoDmaLogging

from .util import UserMem, do_report, do_start, expect_errno

APERTURE = 1 << 24  # where the selftest maps its buffer (MOCK_APERTURE_START-like)
NO_SUCH_IOCTL = 0x3BFF  # _IO(';', 0xff): neither iommufd nor its VFIO compat layer knows it


def cmd(struct_cls, **fields):
    obj = struct_cls(size=ctypes.sizeof(struct_cls), **fields)
    return bytearray(bytes(obj))


def out(struct_cls, arg):
    return struct_cls.unpack(arg)


class Setup:
    """open /dev/iommu, a cdev device bound to it, an IOAS with `length` bytes mapped."""

    def __init__(self, kernel, model, length, iova=APERTURE):
        self.kernel, self.model = kernel, model
        self.iommufd = kernel.open_iommufd()
        self.fd = kernel.open_device(model, cdev=True)
        bind = bytearray(bytes(uapi.vfio_device_bind_iommufd(argsz=24, iommufd=self.iommufd)))
        kernel.ioctl(self.fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind)
        self.dev_id = uapi.vfio_device_bind_iommufd.unpack(bind).out_devid
        arg = cmd(uapi.iommu_ioas_alloc)
        kernel.ioctl(self.iommufd, uapi.IOMMU_IOAS_ALLOC, arg)
        self.ioas = out(uapi.iommu_ioas_alloc, arg).out_ioas_id
        self.buffer = UserMem(length)
        flags = uapi.IOMMU_IOAS_MAP_FIXED_IOVA | uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE
        arg = cmd(
            uapi.iommu_ioas_map, flags=flags, ioas_id=self.ioas, user_va=self.buffer.addr, length=length, iova=iova
        )
        kernel.ioctl(self.iommufd, uapi.IOMMU_IOAS_MAP, arg)

    def hwpt_alloc(self, flags=uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING):
        arg = cmd(uapi.iommu_hwpt_alloc, flags=flags, dev_id=self.dev_id, pt_id=self.ioas)
        self.kernel.ioctl(self.iommufd, uapi.IOMMU_HWPT_ALLOC, arg)
        return out(uapi.iommu_hwpt_alloc, arg).out_hwpt_id

    def attach(self, pt_id):
        arg = bytearray(bytes(uapi.vfio_device_attach_iommufd_pt(argsz=16, pt_id=pt_id)))
        self.kernel.ioctl(self.fd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg)
        return uapi.vfio_device_attach_iommufd_pt.unpack(arg).pt_id

    def set_dirty(self, hwpt, enable=True, flags=None):
        f = (uapi.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if enable else 0) if flags is None else flags
        arg = cmd(uapi.iommu_hwpt_set_dirty_tracking, flags=f, hwpt_id=hwpt)
        self.kernel.ioctl(self.iommufd, uapi.IOMMU_HWPT_SET_DIRTY_TRACKING, arg)

    def get_dirty(self, hwpt, iova, length, page_size, data, flags=0, **extra):
        arg = cmd(
            uapi.iommu_hwpt_get_dirty_bitmap,
            hwpt_id=hwpt,
            flags=flags,
            iova=iova,
            length=length,
            page_size=page_size,
            data=data,
            **extra,
        )
        self.kernel.ioctl(self.iommufd, uapi.IOMMU_HWPT_GET_DIRTY_BITMAP, arg)

    def tracking(self):
        """A dirty-tracking HWPT, attached, with tracking on."""
        hwpt = self.hwpt_alloc()
        self.attach(hwpt)
        self.set_dirty(hwpt)
        return hwpt


@pytest.fixture
def kernel():
    return EmulatedKernel()


def test_enforce_dirty(kernel):
    s = Setup(kernel, Mlx5Like(), 1 << 20)
    hwpt = s.hwpt_alloc()
    nodirty = Setup(kernel, MttyLike(iommu_dirty=False), 1 << 20)
    nodirty_fd = kernel.open_device(MttyLike(iommu_dirty=False), cdev=True)
    bind = bytearray(bytes(uapi.vfio_device_bind_iommufd(argsz=24, iommufd=s.iommufd)))
    kernel.ioctl(nodirty_fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind)
    arg = bytearray(bytes(uapi.vfio_device_attach_iommufd_pt(argsz=16, pt_id=hwpt)))
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(nodirty_fd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg))
    expect_errno(errno.EOPNOTSUPP, lambda: nodirty.hwpt_alloc())
    nodirty.hwpt_alloc(flags=0)


def test_set_dirty_tracking_and_capability(kernel):
    s = Setup(kernel, NoDmaLogging(), 1 << 20)
    hwpt = s.hwpt_alloc()
    s.set_dirty(hwpt, True)
    s.set_dirty(hwpt, False)
    expect_errno(errno.EOPNOTSUPP, lambda: s.set_dirty(hwpt, flags=2))
    expect_errno(errno.EOPNOTSUPP, lambda: s.set_dirty(s.hwpt_alloc(flags=0)))
    expect_errno(errno.ENOENT, lambda: s.set_dirty(999))
    expect_errno(errno.ENOENT, lambda: s.set_dirty(s.ioas))  # an IOAS is not a HWPT
    arg = cmd(uapi.iommu_hw_info, dev_id=s.dev_id)
    kernel.ioctl(s.iommufd, uapi.IOMMU_GET_HW_INFO, arg)
    assert out(uapi.iommu_hw_info, arg).out_capabilities & uapi.IOMMU_HW_CAP_DIRTY_TRACKING
    s2 = Setup(kernel, NoDmaLogging(iommu_dirty=False), 1 << 20)
    arg = cmd(uapi.iommu_hw_info, dev_id=s2.dev_id)
    kernel.ioctl(s2.iommufd, uapi.IOMMU_GET_HW_INFO, arg)
    assert out(uapi.iommu_hw_info, arg).out_capabilities == 0


# The selftest's variants (buffer size), plus the _huge ones with 1 MiB IO pages.
VARIANTS = [(size, 4096) for size in (8 << 10, 16 << 10, 128 << 10, 256 << 10, 640 << 10, 128 << 20)] + [
    (128 << 20, 1 << 20)
]


@pytest.mark.parametrize("buffer_size, io_page", VARIANTS)
@pytest.mark.parametrize("offset", [0, 2048, 0xFF1])
@pytest.mark.parametrize("no_clear", [False, True])
def test_mock_dirty_bitmaps(kernel, buffer_size, io_page, offset, no_clear):
    """_test_mock_dirty_bitmaps: every other IO page dirty -> first npte of each 2*npte bits set."""
    page_size = 2048  # MOCK_PAGE_SIZE: the bitmap granularity is finer than the IO page
    model = NoDmaLogging(iommu_page_size=io_page)
    s = Setup(kernel, model, buffer_size)
    hwpt = s.tracking()
    npte = io_page // page_size
    pteset = 2 * npte
    nbits = buffer_size // page_size
    for i in range(0, nbits, pteset):
        model.dma_write(APERTURE + i * page_size, 1)
    bitmap = UserMem(nbits // 8 + 4096)
    flags = uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR if no_clear else 0
    s.get_dirty(hwpt, APERTURE, buffer_size, page_size, bitmap.addr + offset, flags)
    bits = bitmap.bits(offset, nbits).reshape(-1, pteset) if nbits >= pteset else bitmap.bits(offset, nbits)[None, :]
    assert bits[:, :npte].all() and not bits[:, npte:].any()
    bitmap.put(0, bytes(len(bitmap.map)))
    s.get_dirty(hwpt, APERTURE, buffer_size, page_size, bitmap.addr + offset, flags)
    again = bitmap.bits(offset, nbits)
    assert (again.reshape(bits.shape) == bits).all() if no_clear else not again.any()


def test_enable_clears_and_disabled_records_nothing(kernel):
    model = NoDmaLogging()
    s = Setup(kernel, model, 1 << 20)
    hwpt = s.hwpt_alloc()
    s.attach(hwpt)
    model.dma_write(APERTURE, 4096)  # tracking off: no dirty bit
    s.set_dirty(hwpt)
    model.dma_write(APERTURE + 4096, 1)
    s.set_dirty(hwpt)  # enabling again clears
    model.dma_write(APERTURE + 8192, 1)
    bitmap = UserMem(64)
    s.get_dirty(hwpt, APERTURE, 1 << 20, 4096, bitmap.addr)
    assert np.flatnonzero(bitmap.bits(0, 256)).tolist() == [2]
    s.set_dirty(hwpt, False)
    model.dma_write(APERTURE, 1)
    s.get_dirty(hwpt, APERTURE, 1 << 20, 4096, bitmap.addr)  # disabled: succeeds, adds nothing
    assert np.flatnonzero(bitmap.bits(0, 256)).tolist() == [2]


def test_get_dirty_bitmap_errors(kernel):
    model = NoDmaLogging()
    s = Setup(kernel, model, 1 << 20)
    hwpt = s.tracking()
    mem = UserMem(4096)
    ok = dict(hwpt=hwpt, iova=APERTURE, length=1 << 20, page_size=4096, data=mem.addr)
    s.get_dirty(**ok)
    for change, code in [
        (dict(flags=2), errno.EOPNOTSUPP),
        (dict(__reserved=1), errno.EOPNOTSUPP),
        (dict(hwpt=999), errno.ENOENT),
        (dict(iova=2**64 - 4096, length=8192), errno.EOVERFLOW),
        (dict(iova=APERTURE + 512), errno.EINVAL),
        (dict(length=(1 << 20) - 512), errno.EINVAL),
        (dict(page_size=0), errno.EINVAL),
        (dict(page_size=8192, iova=APERTURE + 4096), errno.EINVAL),
        (dict(hwpt=s.hwpt_alloc(flags=0)), errno.EOPNOTSUPP),
    ]:
        expect_errno(code, lambda change=change: s.get_dirty(**{**ok, **change}))


def test_walk_starts_in_a_mapped_area_and_stops_at_the_first_gap(kernel):
    """iopt_area_contig_init finds no area for an iova in a gap: nothing is walked, nothing is
    cleared, and the ioctl still returns 0; a later query from the mapped part finds the bits."""
    model = NoDmaLogging()
    s = Setup(kernel, model, 1 << 20)
    hwpt = s.tracking()
    model.dma_write(APERTURE - 4096, 3 * 4096)  # the first page is unmapped: a hole
    mem = UserMem(64)
    s.get_dirty(hwpt, APERTURE - (1 << 20), 2 << 20, 4096, mem.addr)
    assert not mem.bits(0, 512).any()
    s.get_dirty(hwpt, APERTURE, 1 << 20, 4096, mem.addr)
    assert np.flatnonzero(mem.bits(0, 256)).tolist() == [0, 1]


def test_walk_crosses_adjacent_areas_but_not_a_gap(kernel):
    model = NoDmaLogging()
    s = Setup(kernel, model, 1 << 20)
    hwpt = s.tracking()
    flags = uapi.IOMMU_IOAS_MAP_FIXED_IOVA | uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE
    for iova in (APERTURE + (1 << 20), APERTURE + (3 << 20)):  # adjacent, then after a 1 MiB gap
        arg = cmd(uapi.iommu_ioas_map, flags=flags, ioas_id=s.ioas, user_va=s.buffer.addr, length=1 << 20, iova=iova)
        kernel.ioctl(s.iommufd, uapi.IOMMU_IOAS_MAP, arg)
    for mib in (0, 1, 3):
        model.dma_write(APERTURE + (mib << 20), 1)
    mem = UserMem(4096)
    s.get_dirty(hwpt, APERTURE, 4 << 20, 1 << 20, mem.addr)
    assert np.flatnonzero(mem.bits(0, 4)).tolist() == [0, 1]
    mem.put(0, bytes(8))
    s.get_dirty(hwpt, APERTURE + (3 << 20), 1 << 20, 1 << 20, mem.addr)
    assert mem.bits(0, 1).tolist() == [1]  # not reached before, so not cleared


def test_bad_bitmap_pointer_is_silent(kernel):
    model = NoDmaLogging()
    s = Setup(kernel, model, 1 << 20)
    hwpt = s.tracking()
    model.dma_write(APERTURE, 1)
    s.get_dirty(hwpt, APERTURE, 1 << 20, 4096, 0)  # iova_bitmap_set returns void


def test_query_from_mid_huge_page_reports_from_the_cursor(kernel):
    """Intel and AMD walk a cursor from the query's iova in IO-page steps and record
    (cursor, io_page_size) for a dirty IOPTE: a query starting mid 1 MiB page reports that page
    from the query start on, and the last record overruns the query's end."""
    model = NoDmaLogging(iommu_page_size=1 << 20)
    s = Setup(kernel, model, 4 << 20)
    hwpt = s.tracking()
    model.dma_write(APERTURE + (1 << 20), 1)  # IO page 1: [1M, 2M)
    model.dma_write(APERTURE + (3 << 20), 1)  # IO page 3: [3M, 4M), beyond the cursor walk
    mem = UserMem(4096)
    s.get_dirty(hwpt, APERTURE + (1 << 20) + (512 << 10), 2 << 20, 4096, mem.addr)
    # cursors 1.5M (page 1: dirty) and 2.5M (page 2: clean); bits 0..255 cover [1.5M, 2.5M)
    assert np.flatnonzero(mem.bits(0, 1024)).tolist() == list(range(256))
    mem.put(0, bytes(4096))
    s.get_dirty(hwpt, APERTURE, 4 << 20, 1 << 20, mem.addr)
    assert np.flatnonzero(mem.bits(0, 4)).tolist() == [3]  # page 1 was cleared, page 3 was not read


def test_iommufd_size_rules(kernel):
    s = Setup(kernel, NoDmaLogging(), 1 << 20)
    arg = cmd(uapi.iommu_ioas_alloc)
    arg[0:4] = (11).to_bytes(4, "little")
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(s.iommufd, uapi.IOMMU_IOAS_ALLOC, arg))
    arg = bytearray(cmd(uapi.iommu_ioas_alloc) + b"\0" * 4)
    arg[0:4] = (16).to_bytes(4, "little")
    kernel.ioctl(s.iommufd, uapi.IOMMU_IOAS_ALLOC, arg)  # zero tail: fine
    arg[12] = 1
    expect_errno(errno.E2BIG, lambda: kernel.ioctl(s.iommufd, uapi.IOMMU_IOAS_ALLOC, arg))
    expect_errno(errno.ENOTTY, lambda: kernel.ioctl(s.iommufd, NO_SUCH_IOCTL, bytearray(8)))
    arg = cmd(
        uapi.iommu_ioas_map,
        flags=uapi.IOMMU_IOAS_MAP_FIXED_IOVA | uapi.IOMMU_IOAS_MAP_READABLE,
        ioas_id=s.ioas,
        user_va=s.buffer.addr,
        length=4096,
        iova=APERTURE,
    )
    expect_errno(errno.EEXIST, lambda: kernel.ioctl(s.iommufd, uapi.IOMMU_IOAS_MAP, arg))
    arg = cmd(
        uapi.iommu_ioas_map, flags=uapi.IOMMU_IOAS_MAP_READABLE, ioas_id=s.ioas, user_va=s.buffer.addr, length=4096
    )
    kernel.ioctl(s.iommufd, uapi.IOMMU_IOAS_MAP, arg)
    assert out(uapi.iommu_ioas_map, arg).iova == 4096  # first fit from PAGE_SIZE: IOVA 0 is never chosen


def test_cdev_must_bind_first(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model, cdev=True)
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, uapi.VFIO_DEVICE_FEATURE, bytearray(8)))
    expect_errno(errno.EINVAL, lambda: kernel.read(fd, 1))
    iommufd = kernel.open_iommufd()
    for argsz, flags, ifd in [(15, 0, iommufd), (24, 2, iommufd), (24, 0, -2)]:
        bind = bytearray(bytes(uapi.vfio_device_bind_iommufd(argsz=argsz, flags=flags, iommufd=ifd)))
        expect_errno(errno.EINVAL, lambda bind=bind: kernel.ioctl(fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind))
    bind = bytearray(bytes(uapi.vfio_device_bind_iommufd(argsz=24, iommufd=fd)))
    expect_errno(errno.EBADFD, lambda: kernel.ioctl(fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind))
    bind = bytearray(bytes(uapi.vfio_device_bind_iommufd(argsz=24, iommufd=iommufd)))
    kernel.ioctl(fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind)
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind))  # twice
    arg = bytearray(bytes(uapi.vfio_device_attach_iommufd_pt(argsz=16, pt_id=0xFFFFFFFF)))
    expect_errno(errno.ENOENT, lambda: kernel.ioctl(fd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg))
    group_fd = kernel.open_device(Mlx5Like())
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(group_fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind))
    expect_errno(errno.ENOTTY, lambda: kernel.ioctl(group_fd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg))


def test_hwpt_alloc_pt_id_that_is_no_ioas(kernel):
    """iommufd_hwpt_alloc: a failed pt_id lookup is EINVAL, not ENOENT; a paging HWPT as parent
    asks for a nested domain, which needs user data (EOPNOTSUPP)."""
    s = Setup(kernel, NoDmaLogging(), 1 << 20)
    hwpt = s.hwpt_alloc()
    for pt_id, code in [(999, errno.EINVAL), (s.dev_id, errno.EINVAL), (hwpt, errno.EOPNOTSUPP)]:
        arg = cmd(uapi.iommu_hwpt_alloc, flags=0, dev_id=s.dev_id, pt_id=pt_id)
        expect_errno(code, lambda arg=arg: kernel.ioctl(s.iommufd, uapi.IOMMU_HWPT_ALLOC, arg))
    arg = cmd(uapi.iommu_hwpt_alloc, flags=0, dev_id=999, pt_id=s.ioas)
    expect_errno(errno.ENOENT, lambda: kernel.ioctl(s.iommufd, uapi.IOMMU_HWPT_ALLOC, arg))


def test_attach_to_ioas_uses_an_automatic_domain_without_dirty_ops(kernel):
    model = NoDmaLogging()
    s = Setup(kernel, model, 1 << 20)
    pt = s.attach(s.ioas)
    assert pt != s.ioas
    expect_errno(errno.EOPNOTSUPP, lambda: s.set_dirty(pt))
    arg = bytearray(bytes(uapi.vfio_device_detach_iommufd_pt(argsz=12)))
    kernel.ioctl(s.fd, uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, arg)
    assert model.attached_hwpt is None


def test_device_dma_reaches_both_trackers(kernel):
    model = Mlx5Like()
    s = Setup(kernel, model, 1 << 20)
    hwpt = s.tracking()
    do_start(kernel, s.fd, [(APERTURE, 1 << 20)])
    model.dma_write(APERTURE + 5 * 4096, 1)
    assert np.flatnonzero(do_report(kernel, s.fd, APERTURE, 1 << 20)).tolist() == [5]
    mem = UserMem(64)
    s.get_dirty(hwpt, APERTURE, 1 << 20, 4096, mem.addr)
    assert np.flatnonzero(mem.bits(0, 256)).tolist() == [5]
    kernel.close(s.fd)
    assert model.attached_hwpt is None and not model.logging_active
