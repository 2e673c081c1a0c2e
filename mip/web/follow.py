"""follow: a run's log and a module's own log, read from a byte offset so that a client can
follow them as they grow (GET /runs/{run_id}/log?offset=N, GET /modules/{job}/{module}/log).

Handlers of two rows of mip_server.py's route table (run_log, module_log). The answer is the bytes
from N to the log's size when the request came, and `X-Log-Offset` is where the next
request starts. It serves only the paths the journal records for a run or an execution,
and only inside their own folders: never runners.log, nor a file a module linked there
(by a symbolic link, or a hard link: mip/files.py's rule).
"""

import os

import bottle

from mip.files import open_checked
from mip.files import private_files
from mip.web import openapi
from mip.web.context import get_module
from mip.web.context import get_run
from mip.web.context import query_int

MAX_OFFSET = 10**12  # far past any log; larger offsets are refused as nonsense
CHUNK = 64 * 1024
OFFSET_QUERY = {"offset": openapi.whole(MAX_OFFSET)}
OFFSET_HEADER = {"X-Log-Offset": {
    "description": "the byte offset to ask for next (?offset=); below the offset asked "
                   "for when the log was replaced (a module run again): start again from 0",
    "required": True, "schema": {"type": "integer", "minimum": 0}}}


def run_log(ctx, run_id):
    """The run log, whole or from ?offset= (bytes); X-Log-Offset says where to go on.
    Raises 404 if the run is unknown, 400 for a bad offset."""
    run = get_run(ctx, run_id)
    settings = ctx.cfg.settings
    folder = os.path.join(settings.runs_dir, "logs")
    return answer(run["log_path"], folder, query_int("offset", 0, MAX_OFFSET),
                  private_files(settings))


def module_log(ctx, job, module):
    """The module's own log in its latest execution, while it runs and after, whole or
    from ?offset= (bytes). Raises 404 if the module has not run in the job."""
    execution = get_module(ctx, job, module)
    settings = ctx.cfg.settings
    folder = os.path.join(settings.outputs_dir, execution["job"])
    return answer(execution["log_path"], folder, query_int("offset", 0, MAX_OFFSET),
                  private_files(settings))


def answer(path: str | None, folder: str, offset: int, private: dict):
    """Set the headers and return the body of a log answer."""
    body, next_offset = read_from(path, folder, offset, private)
    bottle.response.content_type = "text/plain; charset=utf-8"
    bottle.response.set_header("X-Log-Offset", str(next_offset))
    # a poll at an offset that brought nothing must not be answered from a cache next time
    bottle.response.set_header("Cache-Control", "no-store")
    return body


def read_from(path: str | None, folder: str, offset: int, private: dict) -> tuple:
    """(the bytes of the log from `offset` to its present end, as an iterable, the offset
    after them). A log not written yet, or deleted, reads as empty at 0, and so does a hard
    link (mip/files.hard_link: to one of the server's `private` files or not); an offset
    past the end gives nothing and the present size."""
    if not path or not inside(path, folder):
        return b"", 0
    # judged before it is opened for reading (a FIFO, a link, one of the server's files)
    fd = open_checked(path, private)
    if isinstance(fd, str):
        return b"", 0
    f = open(fd, "rb")
    size = os.fstat(fd).st_size
    if offset >= size:
        f.close()
        return b"", size
    f.seek(offset)
    # up to the size measured now: X-Log-Offset must match what is sent, while the log grows
    return chunks(f, size - offset), size


def chunks(f, left: int):
    """`left` bytes of the open file f, in pieces; closes f, also when the client goes."""
    try:
        while left > 0:
            data = f.read(min(CHUNK, left))
            if not data:
                return
            left -= len(data)
            yield data
    finally:
        f.close()


def inside(path: str, folder: str) -> bool:
    """True when `path`, symlinks followed, lies inside `folder` (at any depth)."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, base]) == base and real != base
