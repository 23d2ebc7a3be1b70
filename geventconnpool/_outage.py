"""What a streak of failed connects writes at WARNING: every cause, and few lines in all."""

from __future__ import annotations

from typing import Optional, Tuple, Type


class OutageLog:
    """Decides which failed connects of a streak deserve a WARNING line.

    A streak is the run of failed connects since the last one that succeeded.
    Its first failure is a WARNING, and so is each failure whose cause (the
    error's type and message) differs from the one before: a server that comes
    back with another certificate must not hide behind "connection refused".
    While one cause lasts, a summary is a WARNING at most every
    :attr:`SUMMARY_EVERY` seconds; every other failure is for DEBUG.  It reads
    no clock: the caller passes the time, so that a test can make it up.
    """

    #: The longest silence, in seconds, at WARNING while a streak lasts.
    SUMMARY_EVERY = 60.0

    def __init__(self) -> None:
        self.attempts = 0
        """The failed connects of the current streak; 0 when there is none."""
        self.started_at = 0.0
        self._cause: Optional[Tuple[Type[BaseException], str]] = None
        self._warned_at = 0.0

    def failed(self, error: BaseException, now: float) -> Optional[str]:
        """Count a failed connect; return the WARNING line it deserves, or None for a DEBUG one."""
        self.attempts += 1
        if self.attempts == 1:
            self.started_at = now
        cause = (type(error), str(error))
        if cause != self._cause:
            self._cause = cause
            self._warned_at = now
            return f"failed to open a connection, retrying: {error!r}"
        if now - self._warned_at >= self.SUMMARY_EVERY:
            self._warned_at = now
            return f"still failing after {self.attempts} attempts in {now - self.started_at:.1f} s: {error!r}"
        return None

    def succeeded(self, now: float) -> Optional[str]:
        """End the streak; return the INFO line that says so, or None if there was no streak."""
        if not self.attempts:
            return None
        message = f"connected again after {self.attempts} failed attempts in {now - self.started_at:.1f} s"
        self.attempts = 0
        self._cause = None
        return message
