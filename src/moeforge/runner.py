"""The bridge from a Snakemake ``script:`` to the library: one log holding everything, and clean failures.

Everything a step prints reaches the rule's log file as well as the console: moeforge's logging,
Python warnings, the logging of libraries (transformers, huggingface_hub), progress bars, prints
and, for an unexpected failure, the traceback. So ``snakemake --show-failed-logs`` shows the cause
instead of an empty log. A user-caused problem (MoeforgeError) stays one message and a non-zero
exit, without a traceback from library internals.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from moeforge.errors import MoeforgeError
from moeforge.io.progress import MIB
from moeforge.killed_job import Watcher

#: File-system conditions a user fixes outside moeforge: reported in one line, not a traceback.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free disk space (or point results/ at a larger disk) and rerun; finished outputs are kept",
    errno.EDQUOT: "free space within your quota and rerun; finished outputs are kept",
    errno.EROFS: "the file system is read-only: run from a writable working directory",
    errno.EACCES: "check the permissions of the working directory and of the Hugging Face cache",
    errno.EPERM: "the file or directory may not be changed (immutable, or owned by another user): check it with "
                 "lsattr and ls -l, or run from a working directory of your own",
}
#: The conditions of a full file system: named by the directory that filled, not by the file involved.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FORMAT = "%(levelname)s moeforge: %(message)s"


class _Tee(io.TextIOBase):
    """A console stream that also writes into the log file; once the log is closed, the console alone.

    Libraries keep the sys.stderr they found (a logging handler made while the step ran, a progress
    bar), so a reference that outlives the step must keep working after the log is closed.
    """

    def __init__(self, console: TextIO, log: TextIO) -> None:
        super().__init__()
        self._console = console
        self._log = log

    def write(self, text: str) -> int:
        self._console.write(text)
        if not self._log.closed:
            self._log.write(text)
        return len(text)

    def flush(self) -> None:
        self._console.flush()
        if not self._log.closed:
            self._log.flush()

    def isatty(self) -> bool:
        """As the console: progress bars and colours decide by it."""
        return self._console.isatty()

    def fileno(self) -> int:
        return self._console.fileno()

    @property
    def encoding(self) -> str:
        return self._console.encoding


def _console_handlers(streams: tuple[TextIO, ...]) -> list[logging.StreamHandler]:
    """Logging handlers bound to the console before the step: transformers and huggingface_hub make
    their own at import, with propagation off, so their records never reach the root logger."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    return [handler for logger in loggers for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler) and handler.stream in streams]


@contextlib.contextmanager
def _teed_into(log: TextIO) -> Iterator[None]:
    """stdout, stderr and console logging handlers also write into `log`; all restored afterwards."""
    consoles = (sys.stdout, sys.stderr)
    tees = {console: _Tee(console, log) for console in consoles}
    moved = [(handler, handler.stream) for handler in _console_handlers(consoles)]
    sys.stdout, sys.stderr = tees[consoles[0]], tees[consoles[1]]
    for handler, console in moved:
        handler.setStream(tees[console])
    try:
        yield
    finally:
        for handler, console in moved:
            handler.setStream(console)
        sys.stdout, sys.stderr = consoles


@contextlib.contextmanager
def _moeforge_logging() -> Iterator[None]:
    """INFO records on the (teed) stderr while the step runs; the caller's logging setup afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        handler.flush()
        root.handlers = saved_handlers
        root.setLevel(saved_level)


@contextlib.contextmanager
def _output_to_log(log_paths: Any) -> Iterator[None]:
    """Everything printed while the step runs goes to the console and to the rule's log (if it has one).

    The log is line-buffered, so a job killed at its time limit still leaves what it printed.
    """
    with contextlib.ExitStack() as stack:
        for path in list(log_paths or [])[:1]:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            log = stack.enter_context(open(path, "w", encoding="utf-8", buffering=1))
            stack.enter_context(_teed_into(log))
            stack.enter_context(_log_only_into(log))
        stack.enter_context(_moeforge_logging())
        yield


#: Records for the rule's log alone, not the console: a tool's own output of hundreds of lines (llama.cpp's
#: converter), which the console summarises in one line. Without a log, they are dropped.
LOG_ONLY = "moeforge.log_only"


@contextlib.contextmanager
def _log_only_into(log: TextIO) -> Iterator[None]:
    logger = logging.getLogger(LOG_ONLY)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter(_FORMAT))
    saved = logger.handlers[:], logger.propagate, logger.level
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        handler.flush()
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (an output's directory may not exist yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free(path: Path) -> str:
    return f"{shutil.disk_usage(path).free / MIB:.1f} MiB free now"


def _full_file_system(exc: OSError, smk: Any) -> str:
    """Where space ran out: the directory of the job's first output (results/, resources/ or .snakemake/ as the
    rule declares it), with the space left there now.

    ``exc.filename`` may be a file the job was reading when the write behind it failed, so it is named only
    as a second place, and only when it lies on another file system than the outputs.
    """
    output = next(iter(getattr(smk, "output", None) or []), None)
    directory = _existing(Path(output).parent if output else Path.cwd())
    shown = directory.relative_to(Path.cwd()) if directory.is_relative_to(Path.cwd()) else directory
    text = f"{shown}: {exc.strerror} (the file system of this job's outputs; {_free(directory)})"
    if exc.filename:
        other = _existing(Path(str(exc.filename)))
        if other.stat().st_dev != directory.stat().st_dev:
            text += f"; the failing operation was on {exc.filename} ({_free(other)} on its file system)"
    return text


def _report(exc: Exception, smk: Any) -> None:
    """One line for a problem the user fixes; the full traceback for anything else (a bug to report)."""
    log = logging.getLogger("moeforge")
    if isinstance(exc, MoeforgeError):
        log.error("%s", exc)
    elif isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        log.error("%s -> %s", _full_file_system(exc, smk), _ENVIRONMENT_ERRNOS[exc.errno])
    elif isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        where = exc.filename or next(iter(getattr(smk, "output", None) or []), "output")
        log.error("%s: %s -> %s", where, exc.strerror, _ENVIRONMENT_ERRNOS[exc.errno])
    else:
        log.error("unexpected %s: %s (a moeforge bug or an input it does not handle; the traceback follows)",
                  type(exc).__name__, exc, exc_info=exc)


def _watch_for_kill(smk: Any) -> contextlib.AbstractContextManager:
    """While the step runs, a watcher that explains in the log a death the step cannot report (SIGKILL)."""
    logs = list(getattr(smk, "log", None) or [])
    if not logs:
        return contextlib.nullcontext()
    mem_mb = getattr(getattr(smk, "resources", None), "mem_mb", None)
    return Watcher(Path(logs[0]), str(getattr(smk, "rule", "job")), mem_mb)


def run(smk: Any, step: Callable[[Any], Any]) -> None:
    """Run one workflow step with all its output in the rule's log; exit 1 on any failure."""
    code = 0
    with _output_to_log(getattr(smk, "log", None)), _watch_for_kill(smk):
        try:
            step(smk)
        except Exception as exc:  # every failure is reported here, so the log shows its cause
            _report(exc, smk)
            code = 1
    if code:
        sys.exit(code)

