"""Errors that map to the documented exit codes (README: Exit codes).

A PgolfError's message is printed as one line, `error: <message>`, and the process exits with its code.
Messages name the file and the problem: `path/to/file: what is wrong`.
"""

import errno

# Errors of the environment, not of pgolf (disk full, read-only, permission...): one line naming the file, exit 3.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                      errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EMFILE)


class PgolfError(Exception):
    exit_code = 1


class UsageError(PgolfError):
    """Wrong flags or an impossible combination of options (exit 2)."""

    exit_code = 2


class InvalidInput(PgolfError):
    """A corrupt, missing or mismatched input file or artifact (exit 3)."""

    exit_code = 3


class OverBudget(PgolfError):
    """The counted artifact is larger than the byte cap (exit 4)."""

    exit_code = 4


class ComplianceError(PgolfError):
    """A legality check (C1-C4) failed (exit 5)."""

    exit_code = 5


def named(error: OSError, path) -> OSError:
    """The same OSError naming `path` (a failed write() carries no file name), for the one-line report."""
    return error if error.filename else type(error)(error.errno, error.strerror, str(path))
