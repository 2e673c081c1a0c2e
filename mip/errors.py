"""errors: the core's few flat exceptions, and the exit codes of the entry points.

Raised by the core and the links; the server maps each class to an HTTP status in one table
(mip_server.py, ERRORS), and mipper and the server's start-up print them as one line. Each
carries the message a person reads and a `code`, the `error` field of the API's answer.
Nothing here knows HTTP.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class MipError(Exception):
    """An expected failure, reported as one line without a traceback."""

    code = "error"

    def __init__(self, message: str, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after  # seconds a client should wait, where that helps


class CatalogueError(MipError):
    """config.yml is missing, unreadable or invalid."""


class UsageError(MipError):
    """A bad job, map or module name, or a job bound to another map."""


class ModuleFailed(MipError):
    """A module exited non-zero, could not start, or lacks an expected output."""


class UploadFailed(MipError):
    """Copying a module's data to S3 failed; the message says why."""


class Invalid(MipError):
    """A submission the server will not take as it is: the message names the field."""

    code = "invalid_payload"


class NotFound(MipError):
    """No such run, job, module, map, cog or file."""

    code = "not_found"


class NotAFolder(NotFound):
    """A job's or module's folder on disk is a symbolic link (or a file): never followed."""

    code = "not_a_folder"


class Conflict(MipError):
    """The request is fine but the state forbids it now."""

    code = "conflict"


class JobBusy(Conflict):
    """The job has a run queued or running."""

    code = "job_busy"


class JobBoundToOtherMap(Conflict):
    """A job is bound to the map of its first run."""

    code = "job_bound_to_other_map"


class Busy(MipError):
    """The server cannot take this now; `retry_after` says when to try again."""

    code = "busy"


class QueueFull(Busy):
    """MIP_MAX_QUEUED runs are already waiting."""

    code = "queue_full"


class DiskFull(MipError):
    """A data folder or the journal's disk has too little free space."""

    code = "insufficient_storage"


class Unavailable(MipError):
    """A store the request needs (S3, the CDR) cannot be reached."""

    code = "storage_unavailable"


class JournalUnavailable(Busy):
    """The journal cannot be written for now (locked, read-only), or was deleted or
    replaced while in use; the message names the file."""

    code = "journal_unavailable"
