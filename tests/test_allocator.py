"""glibc malloc settings of the server process (service.core.allocator)."""

import ctypes
import ctypes.util
import platform

import pytest

from service.core import allocator


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_decoding_sized_block_comes_from_the_heap_not_a_fresh_mmap():
    """With glibc's defaults an 8 MB block is mmapped (and unmapped when freed); after
    ``keep_freed_memory`` it is carved from the heap and stays there for the next one."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert allocator.keep_freed_memory()
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(8 * 2**20)
    try:
        assert libc.mallinfo2().hblkhd - before < 2**20  # no new mmapped region for it
    finally:
        libc.free(block)
