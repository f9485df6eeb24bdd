"""Bad input: count and skip with a reject report, or (strict) stop at the first one.

Every rejected record is written to the reject file as `file:line<TAB>reason`, so nothing
disappears silently, and the summary tells how many records each reason cost.
"""

from __future__ import annotations

import collections
import os

from tpt_jax.errors import TptError


class BadInputError(TptError):
    """A malformed input record or unreadable input file, with data.strict=true."""


class RejectLog:
    """Collects the rejected records of one worker (not thread-safe)."""

    def __init__(self, strict: bool = False, path: str | None = None):
        self.strict = strict
        self.path = path
        self.counts: collections.Counter[str] = collections.Counter()
        self.first_error: str | None = None  # set in strict mode, for callers behind tf.data
        # Files that could not be read to their end: what they yielded is incomplete, so the
        # caller must not record their output as done.
        self.unreadable_files: list[str] = []
        self._file = None

    def reject(self, source: str, line: int | None, reason: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        if self.strict:
            self.first_error = f"{where}: {reason} (data.strict=true stops at the first bad record)"
            raise BadInputError(self.first_error)
        self.counts[reason.split(":")[0]] += 1
        if self.path is not None:
            if self._file is None:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                # "w": one report per run of the work item, so a rerun rewrites it, never doubles it.
                self._file = open(self.path, "w")  # noqa: SIM115 (closed in close())
            self._file.write(f"{where}\t{reason}\n")

    def unreadable(self, source: str, error: Exception) -> None:
        """A file that could not be opened or decompressed to its end."""
        reason = f"{type(error).__name__}: {error}"
        self.unreadable_files.append(f"{source} ({reason})")
        self.reject(source, None, f"unreadable file: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no bad input"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        where = f" (details in {self.path})" if self.path else ""
        return f"{self.total} records skipped: {parts}{where}"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
