"""files: a module's logs, outputs and temps on disk, walked for the zips, the S3 copy and
retention, and the zips themselves, streamed as they are written.

Used by the server's downloads, mip/s3.py and retention. A module (a container) writes into
its folders, so nothing here is taken from it on trust: every level is opened from its
parent's descriptor with O_NOFOLLOW, and only what fstat on the descriptor that is read
calls a regular file is served; a symbolic link is never followed, not even one that leads
back inside. Nor is a hard link: a file with more than one name, or that is the journal (its
-wal, -shm) or the key file, told by st_dev/st_ino on that descriptor. Never writes or
removes a file.
"""

import errno
import logging
import os
import stat
import time
import zipfile
import zlib
from itertools import chain

from mip.errors import NotAFolder
from mip.settings import Settings

CHUNK = 256 * 1024
YIELD_BYTES = 64 * 1024  # a zip goes to waitress in pieces of about this size
# Already compressed: stored as they are, since deflating them costs time and saves nothing.
STORED_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gz", ".zip", ".gpkg", ".pth",
                   ".cog", ".jp2", ".webp", ".bz2", ".xz", ".7z")
# a walk holds one descriptor per level it is in: deeper folders are left out, logged
MAX_DEPTH = 64
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the listing must not hold the walk on open()
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

KINDS = ("logs", "outputs", "temps")
log = logging.getLogger("mip.files")


# ---------------------------------------------------------------------------- walking

def open_folder(root: str, *parts: str, label: str) -> int | None:
    """A descriptor of the folder root/parts... (the caller closes it), each part opened
    relative to the one before with O_NOFOLLOW; None when one is missing. `root` is the
    operator's and is trusted; the parts are not. Raises NotAFolder (and logs it), naming
    `label`/parts..., when a part is a symbolic link or not a folder."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    for depth, part in enumerate(parts, 1):
        try:
            fd = open_child(fd, part)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise not_a_folder("/".join((label, *parts[:depth])), e) from None
    return fd


def open_child(fd: int, name: str) -> int:
    """The descriptor of the folder `name` in the folder `fd`, never through a link; `fd`
    is closed whatever happens. Raises OSError (ELOOP for a link, ENOTDIR for a file)."""
    try:
        return open_subfolder(fd, name)
    finally:
        os.close(fd)


def open_subfolder(fd: int, name: str) -> int:
    """open_child() leaving `fd` open."""
    try:
        return os.open(name, FOLDER_FLAGS, dir_fd=fd)
    except NotADirectoryError:
        # Linux answers ENOTDIR, not ELOOP, for a link opened with O_DIRECTORY|O_NOFOLLOW
        if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


def not_a_folder(where: str, e: OSError) -> NotAFolder:
    what = "a symbolic link" if e.errno == errno.ELOOP else (
        "not a folder" if e.errno == errno.ENOTDIR else e.strerror)
    log.warning("refused %s: it is %s; a module may have made it, and it is never followed",
                where, what)
    return NotAFolder(f"{where} is {what}, which is never followed nor served (a module may "
                      "have made it); remove it, or DELETE the module to run it again")


def private_files(settings: Settings) -> dict:
    """{(st_dev, st_ino): what it is} of the server's own files as they are now: the
    journal, its -wal and -shm, the key file. Reading one from the server's process and
    closing it would drop the server's SQLite locks on it, besides letting it out."""
    journal = settings.journal_path
    named = {journal: "the journal", journal + "-wal": "the journal's -wal",
             journal + "-shm": "the journal's -shm", settings.key_file: "the key file"}
    found = {}
    for path, what in named.items():
        try:
            info = os.stat(path)
        except (OSError, TypeError):  # not made yet (no -wal), or no key file set
            continue
        found[(info.st_dev, info.st_ino)] = what
    return found


def hard_link(info: os.stat_result, private: dict) -> str | None:
    """Why the file of `info` is not served, if it is a hard link: one of the server's own
    files, or any file with another name. Where that other name lies cannot be told, and
    could be anywhere on the file system (a users file, another job's data, another
    program's), so every second name is refused; modules that link their own files are
    rare, and copying serves them. Not caught: a link whose other name is gone since, such
    as the -wal SQLite deleted when the server last stopped (one name left, and no longer
    the journal's)."""
    what = private.get((info.st_dev, info.st_ino))
    if what:
        return f"it is {what}, linked here; never served"
    if info.st_nlink > 1:
        return (f"a hard link ({info.st_nlink} names), never served; a module's file must "
                "have one name (copy it rather than link it)")
    return None


def open_file(dir_fd: int, name: str, where: str, private: dict):
    """The file `name` of the folder `dir_fd` opened for reading, if it is a regular file
    with one name and none of the server's `private` files; else None, with a log line for
    anything but a file that vanished."""
    opened = open_checked(name, private, dir_fd)
    if isinstance(opened, str):
        if opened:
            log.warning("skipped %s: %s", where, opened)
        return None
    return os.fdopen(opened, "rb")


def open_checked(path: str, private: dict, dir_fd: int | None = None) -> int | str:
    """A descriptor for reading the regular file `path` (never through a link), or why not
    ("" when it vanished). Judged on an O_PATH descriptor before the file is opened for
    reading: closing a real descriptor of the journal, or of its -wal or -shm, would drop
    every POSIX lock this process holds on it (SQLite's locks, so another process could
    write or reset the WAL index under it); closing an O_PATH one drops none. The read
    descriptor is then opened from that same inode through /proc/self/fd, so a swap in
    between changes nothing."""
    try:
        handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return ""
    except OSError as e:
        return "a symbolic link, never followed" if e.errno == errno.ELOOP else e.strerror
    try:
        info = os.fstat(handle)
        if stat.S_ISLNK(info.st_mode):
            return "a symbolic link, never followed"
        if not stat.S_ISREG(info.st_mode):
            return ("no longer a regular file but "
                    + ("a folder" if stat.S_ISDIR(info.st_mode) else "a special file"))
        linked = hard_link(info, private)
        if linked:
            return linked
        fd = os.open(f"/proc/self/fd/{handle}", FILE_FLAGS & ~os.O_NOFOLLOW)
    except OSError as e:
        return e.strerror
    finally:
        os.close(handle)
    os.set_blocking(fd, True)
    return fd


def walk_files(fd: int, where: str, private: dict, depth: int = 0):
    """(relative name, open file) of the regular files in the folder `fd` and below, each
    folder's files (sorted) before its subfolders. Links (hard ones and the server's
    `private` files included), FIFOs and devices are left out; each file is closed when
    the next one is asked for. `where` names the folder in log lines. Leaves `fd` open."""
    try:
        with os.scandir(fd) as it:
            # types come from the listing itself (d_type): no stat per plain file
            entries = sorted((e.name, e.is_dir(follow_symlinks=False),
                              e.is_file(follow_symlinks=False)) for e in it)
    except OSError as e:
        log.warning("skipped %s: %s", where, e.strerror)
        return
    for name, _, is_file in entries:
        if is_file:
            f = open_file(fd, name, f"{where}/{name}", private)
            if f is not None:
                with f:
                    yield name, f
    for name, is_dir, _ in entries:
        if not is_dir:
            continue
        if depth >= MAX_DEPTH:
            log.warning("skipped %s/%s: deeper than %d folders", where, name, MAX_DEPTH)
            continue
        try:
            sub = open_subfolder(fd, name)
        except FileNotFoundError:
            continue
        except OSError as e:  # swapped for a link or a file since the listing
            log.warning("skipped %s/%s: %s", where, name, "a symbolic link, never followed"
                        if e.errno == errno.ELOOP else e.strerror)
            continue
        try:
            for rel, f in walk_files(sub, f"{where}/{name}", private, depth + 1):
                yield f"{name}/{rel}", f
        finally:
            os.close(sub)


def owning(fds: list, files):
    """`files`, started, closing `fds` when it ends or is closed (or collected): a
    generator that never started would never close them."""
    def walk():
        try:
            yield
            yield from files
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
    it = walk()
    next(it)
    return it


def kind_files(settings: Settings, job: str, module: str, kind: str):
    """(name within the kind, open file) of a module's logs (mipper's log of it and the
    *.log files it wrote), outputs or temps on disk, walked as they are read (a folder of
    many files starts streaming at once); None when it has none of that kind. Raises
    NotAFolder when the job's or the module's folder is a link or not a folder."""
    if kind == "logs":
        return log_files(settings, job, module)
    root = settings.outputs_dir if kind == "outputs" else settings.temps_dir
    fd = open_folder(root, job, module, label=kind)
    if fd is None:
        return None
    return owning([fd], walk_files(fd, f"{kind}/{job}/{module}", private_files(settings)))


def log_files(settings: Settings, job: str, module: str):
    """kind_files() of the logs: <job>/<module>.log, then the module's own *.log files."""
    job_fd = open_folder(settings.outputs_dir, job, label="outputs")
    if job_fd is None:
        return None
    where = f"outputs/{job}"
    try:
        folder = open_subfolder(job_fd, module)
    except FileNotFoundError:
        folder = None
    except OSError as e:
        os.close(job_fd)
        raise not_a_folder(f"{where}/{module}", e) from None
    own_log = f"{module}.log"
    private = private_files(settings)

    def files():
        own = open_file(job_fd, own_log, f"{where}/{own_log}", private)
        if own is not None:
            with own:
                yield own_log, own
        if folder is not None:
            for name, f in walk_files(folder, f"{where}/{module}", private):
                if name.endswith(".log"):
                    yield name, f

    walk = owning([job_fd, folder], files())
    first = next(walk, None)
    if first is None:
        return None
    return chain([first], walk)


def module_files(settings: Settings, job: str, module: str) -> dict:
    """{kind: kind_files() or ()} of what is copied to S3: logs and outputs, and temps
    when asked. Raises NotAFolder."""
    kinds = KINDS if settings.s3_temps else KINDS[:2]
    return {kind: kind_files(settings, job, module, kind) or () for kind in kinds}


def free_mb(path: str) -> int | None:
    """Free space for this user under `path`, in MB; None if it cannot be told."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize // (1024 * 1024)


# ---------------------------------------------------------------------------- zips

class _Sink:
    """A write-only, unseekable file that zipfile writes into and the response drains."""

    def __init__(self):
        self.parts = []
        self.size = 0
        self.pending = 0

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        self.size += len(data)
        self.pending += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts, self.pending = b"".join(self.parts), [], 0
        return data


def incompressible(name: str, head: bytes) -> bool:
    """Stored, not deflated: known compressed formats, and files whose first 64 KiB
    deflate by less than a tenth."""
    if name.lower().endswith(STORED_SUFFIXES):
        return True
    sample = head[:65536]
    return len(sample) >= 4096 and len(zlib.compress(sample, 1)) > 0.9 * len(sample)


def zip_stream(entries):
    """Yield a zip of (archive name, opener) pairs as it is written, in pieces of about
    YIELD_BYTES: nothing on disk, memory bounded by a few chunks, incompressible files
    stored. An opener returns (file, mtime, size) and raises FileNotFoundError for a file
    that vanished since the listing."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for arcname, opener in entries:
            try:
                src, mtime, size = opener()
            except FileNotFoundError:
                continue
            with src:
                info = zipfile.ZipInfo(arcname, time.localtime(max(mtime, 315532800))[:6])
                info.external_attr = 0o644 << 16
                chunk = src.read(CHUNK)
                info.compress_type = (zipfile.ZIP_STORED if incompressible(arcname, chunk)
                                      else zipfile.ZIP_DEFLATED)
                with zf.open(info, "w", force_zip64=size > 2**31) as dst:
                    while chunk:
                        dst.write(chunk)
                        if sink.pending >= YIELD_BYTES:
                            yield sink.take()
                        chunk = src.read(CHUNK)
    yield sink.take()


def local_opener(f):
    """The opener of a file walk_files() opened: its times and size from its descriptor."""
    def opener():
        info = os.fstat(f.fileno())
        return f, info.st_mtime, info.st_size
    return opener


def s3_opener(client, bucket: str, obj: dict):
    def opener():
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"]
        return body, obj["LastModified"].timestamp(), obj["Size"]
    return opener
