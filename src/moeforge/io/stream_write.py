"""Sequential file output that the kernel writes back as it goes and then forgets ("write-behind").

Why: a shard is written once and not read again until the smoke test. Left in the page cache, its
gigabytes of dirty pages are written back late, in a burst the final fsync waits for, and their
reclaim crowds out the source weights that the other shard jobs are reading. Direct I/O
(``O_DIRECT``) avoids the cache, but each write then waits for the disk one at a time, a shallow
queue that leaves the disk idle between writes. Here every buffer is written through the
page cache, its writeback is started at once (``POSIX_FADV_DONTNEED`` on dirty pages starts it without
waiting), and the pages written a few buffers earlier, clean by then, are dropped: the disk gets
deep queues of sequential writes at the speed of one buffered write of the whole file, and the
cache holds at most a few buffers of output. Every byte passes these buffers in file order, so the
caller hashes and scans the bytes it writes in the same pass instead of reading the file back.

Two buffers take turns: while one is hashed and written on a background thread (``hashlib`` and
``os.write`` release the GIL), the job reads and scans the next bytes into the other. Durability is
the caller's: ``files.atomic_path`` fsyncs the finished file before it takes its name.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Callable

#: Buffer size: large enough that one system call moves a lot, small enough to be negligible next to
#: a job's memory.
BUFFER_BYTES = 16 << 20
#: How far behind the last write the written pages are dropped: by then their writeback has ended, so
#: they are clean and dropping them frees them (pages still being written are left, harmlessly).
_DROP_BEHIND = 4 * BUFFER_BYTES
_ADVISE = getattr(os, "posix_fadvise", None)  # Linux; elsewhere the writes are plain buffered ones

Consume = Callable[[memoryview], object]


class StreamWriter:
    """Writes a new file sequentially. ``consume`` (the file's hash) sees every byte in file order, one
    buffer at a time, on the writing thread; a call's own ``consume`` sees that call's bytes in the job's
    thread, in pieces of at most one buffer, as they are buffered."""

    def __init__(self, path: os.PathLike[str] | str, consume: Consume = lambda piece: None) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        # The job fills ``_view`` while the other buffer (``_spare``) is written, if it is.
        self._view, self._spare = memoryview(bytearray(BUFFER_BYTES)), memoryview(bytearray(BUFFER_BYTES))
        # At most one write is in flight: the spare's, waited for before the spare is filled again.
        self._in_flight: Future[None] | None = None
        self._filled = 0
        self._written = 0
        self._consume = consume
        # One worker: writes reach the file in the order they were handed over.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-write")

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
        """Write what is buffered and close the file."""
        try:
            self._finish_write()
            self._consume_and_write(self._view[:self._filled])
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file without writing what is buffered."""
        if self._fd >= 0:
            self._pool.shutdown(wait=True, cancel_futures=True)
            os.close(self._fd)
            self._fd = -1

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
        start = self._written
        self._written += len(data)
        while data:
            data = data[os.write(self._fd, data):]
        if _ADVISE is not None and self._written > start:
            _ADVISE(self._fd, start, self._written - start, os.POSIX_FADV_DONTNEED)  # starts the writeback
            if start >= _DROP_BEHIND:
                _ADVISE(self._fd, start - _DROP_BEHIND, self._written - start, os.POSIX_FADV_DONTNEED)
