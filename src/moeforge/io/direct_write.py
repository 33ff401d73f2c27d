"""Sequential file output through page-aligned buffers, with O_DIRECT where the file system allows it.

Why: a shard is written once and not read again until the smoke test, yet buffered writes cost
the kernel about 3 s of CPU per GB on the machines measured (page allocation and reclaim of the
page cache): more than all of moeforge's own work on the bytes. Written directly, aligned blocks
go from these buffers to the disk (0.2-0.3 s/GB); the page cache keeps the source weights that the other
shard jobs read, instead of output nobody reads soon, which also matters when the model is larger
than memory. Every byte passes these buffers in file order, so the caller hashes and scans the
bytes it writes in the same pass instead of reading the file back.

Two buffers take turns: while one is hashed and written on a background thread (``hashlib`` and
``os.write`` release the GIL), the job reads and scans the next bytes into the other. A shard job
spends about as long reading as hashing and as writing; one after the other they took the sum,
side by side they take nearer the longest.

File systems without direct I/O (tmpfs before Linux 6.6, some network file systems) refuse the
flag at open or at the first write; the writer then goes on buffered, with the same result. Where
direct writes are allowed but slow (an NFS mount that makes each one a synchronous round trip),
``MOEFORGE_DIRECT_WRITE=0`` in the environment turns them off.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Callable

#: Buffer size: a multiple of every block size direct I/O requires, large enough that one system
#: call moves a lot, small enough to be negligible next to a job's memory.
BUFFER_BYTES = 16 << 20
#: Direct writes must be multiples of the logical block size; 4096 covers every current disk.
_BLOCK = 4096
_DIRECT = getattr(os, "O_DIRECT", 0)

Consume = Callable[[memoryview], object]


class DirectWriter:
    """Writes a new file sequentially. ``consume`` (the file's hash) sees every byte in file order, one
    buffer at a time, on the writing thread; a call's own ``consume`` sees that call's bytes in the job's
    thread, in pieces of at most one buffer, as they are buffered."""

    def __init__(self, path: os.PathLike[str] | str, consume: Consume = lambda piece: None) -> None:
        self._fd, self._direct = _open(path)
        self._buffers = [mmap.mmap(-1, BUFFER_BYTES) for _ in range(2)]
        # The job fills ``_view`` while the other buffer (``_spare``) is written, if it is.
        self._view, self._spare = (memoryview(buffer) for buffer in self._buffers)
        # At most one write is in flight: the spare's, waited for before the spare is filled again.
        self._in_flight: Future[None] | None = None
        self._filled = 0
        self._consume = consume
        # One worker: writes reach the file in the order they were handed over.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-write")

    def write(self, data: bytes | memoryview, consume: Consume | None = None) -> None:
        """Append ``data``; this call's ``consume`` sees it in pieces as it is buffered."""
        source = memoryview(data).cast("B")
        while source:
            n = min(len(source), BUFFER_BYTES - self._filled)
            piece = self._view[self._filled:self._filled + n]
            piece[:] = source[:n]
            self._take(piece, n, consume)
            source = source[n:]

    def copy_from(self, src: BinaryIO, offset: int, count: int, consume: Consume | None,
                  on_short: Callable[[int], Exception]) -> None:
        """Append ``count`` bytes of ``src`` from ``offset``, read straight into the buffer; a file that
        ends first raises ``on_short(offset where it ended)``."""
        src.seek(offset)
        while count:
            n = min(count, BUFFER_BYTES - self._filled)
            piece = self._view[self._filled:self._filled + n]
            got = src.readinto(piece)
            if not got:
                raise on_short(src.tell())
            self._take(piece[:got], got, consume)
            count -= got

    def close(self) -> None:
        """Write what is buffered (the unaligned tail through the page cache) and close the file."""
        try:
            self._finish_write()
            self._consume(self._view[:self._filled])
            aligned = self._filled - self._filled % _BLOCK
            self._write_out(self._view[:aligned])
            if self._direct and aligned != self._filled:
                self._stop_direct()
            self._write_out(self._view[aligned:self._filled])
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file and free the buffers without writing what is buffered."""
        if self._fd >= 0:
            self._pool.shutdown(wait=True, cancel_futures=True)
            os.close(self._fd)
            self._fd = -1
            # A piece still referenced (by a caller's traceback) keeps its mapping until it is freed.
            for view in (self._view, self._spare):
                with contextlib.suppress(BufferError):
                    view.release()
            for buffer in self._buffers:
                with contextlib.suppress(BufferError):
                    buffer.close()

    def _take(self, piece: memoryview, n: int, consume: Consume | None) -> None:
        if consume is not None:
            consume(piece)
        self._filled += n
        if self._filled == BUFFER_BYTES:
            self._finish_write()
            self._in_flight = self._pool.submit(self._consume_and_write, self._view)
            self._view, self._spare = self._spare, self._view
            self._filled = 0

    def _finish_write(self) -> None:
        """Wait for the write in flight; its failure is raised here, in the job's thread."""
        write, self._in_flight = self._in_flight, None
        if write is not None:
            write.result()

    def _consume_and_write(self, data: memoryview) -> None:
        self._consume(data)
        self._write_out(data)

    def _write_out(self, data: memoryview) -> None:
        while data:
            try:
                done = os.write(self._fd, data)
            except OSError as exc:
                if not (self._direct and exc.errno == errno.EINVAL):
                    raise
                self._stop_direct()  # accepted at open, refused at write: go on buffered
                continue
            data = data[done:]

    def _stop_direct(self) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_DIRECT)
        self._direct = False


def _open(path: os.PathLike[str] | str) -> tuple[int, bool]:
    """A new file for writing, direct when the file system supports it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if _DIRECT and os.environ.get("MOEFORGE_DIRECT_WRITE", "1") != "0":
        try:
            return os.open(path, flags | _DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False
