"""The errors a training run reports to the user in one line (exit status 2, or 3 for divergence)."""
from __future__ import annotations

import errno

# OSErrors the user fixes outside the program (space, permissions, paths), reported in one line.
USER_FIXABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}


class ConfigError(ValueError):
    """A bad setting. `field` is the dotted field path (e.g. "lora.rank") when one is to blame."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RunError(ValueError):
    """A problem with the run's inputs or output directory that the user must fix."""


class DivergedError(RuntimeError):
    """--max-skipped-steps non-finite steps in a row: the run stopped (exit status 3)."""


def exit_status(err: Exception, rank: int | None = None) -> tuple[int | None, str]:
    """(exit status, the line this process prints, maybe empty) for an error that ends a run.

    DivergedError is 3; every bad-input error (ConfigError, RunError, train.data.DataError,
    models.hub.CheckpointError) and an OSError the user fixes outside the program (full disk,
    permissions) are 2; any other OSError is a bug to see whole (status None). rank: this process's
    in a torchrun job (None: alone). Every rank read the same input and stops with the same message,
    so only rank 0 prints it; a file error is this rank's own and says so.
    """
    if isinstance(err, OSError):
        if err.errno not in USER_FIXABLE_ERRNOS:
            return None, ""
        where = f"rank {rank}: " if rank is not None else ""
        return 2, f"{where}error: {err.filename or 'output'}: {err.strerror or err}"
    return 3 if isinstance(err, DivergedError) else 2, f"error: {err}" if not rank else ""
