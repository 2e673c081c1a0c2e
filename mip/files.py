"""files: a module's logs, outputs and temps on disk, listed for the zips and the S3 copy,
and the zips themselves, streamed as they are written.

Used by the server's downloads, mip/s3.py and retention. Never writes or removes a file.
"""

import os
import time
import zipfile
import zlib

from mip.settings import Settings

CHUNK = 256 * 1024
YIELD_BYTES = 64 * 1024  # a zip goes to waitress in pieces of about this size
# Already compressed: stored as they are, since deflating them costs time and saves nothing.
STORED_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gz", ".zip", ".gpkg", ".pth",
                   ".cog", ".jp2", ".webp", ".bz2", ".xz", ".7z")

KINDS = ("logs", "outputs", "temps")


def kind_files(settings: Settings, job: str, module: str, kind: str):
    """(name within the kind, path) of a module's logs (mipper's log of it and the *.log
    files it wrote), outputs or temps on disk, listed as they are read (a folder of many
    files starts streaming at once); None when it has none of that kind."""
    out_dir = os.path.join(settings.outputs_dir, job, module)
    if kind == "logs":
        own_log = os.path.join(settings.outputs_dir, job, f"{module}.log")
        # not a link: a module (a container) may have put one in its log's place
        own = os.path.isfile(own_log) and not os.path.islink(own_log)
        files = [(f"{module}.log", own_log)] if own else []
        files += [(name, path) for name, path in walk_files(out_dir) if name.endswith(".log")]
        return files or None
    folder = out_dir if kind == "outputs" else os.path.join(settings.temps_dir, job, module)
    return walk_files(folder) if os.path.isdir(folder) else None


def module_files(settings: Settings, job: str, module: str) -> dict:
    """{kind: files} of what is copied to S3: logs and outputs, and temps when asked."""
    kinds = KINDS if settings.s3_temps else KINDS[:2]
    return {kind: list(kind_files(settings, job, module, kind) or ()) for kind in kinds}


def walk_files(root: str):
    """(relative name, path) of the regular files under `root`, each folder's files (sorted)
    before its subfolders; symlinks are followed only when they point to a file in `root`."""
    real_root = os.path.realpath(root) + os.sep
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            # types come from the listing itself: no stat and no realpath per plain file
            if entry.is_dir(follow_symlinks=False):
                subfolders.append((entry.path, f"{rel}{entry.name}/"))
            elif entry.is_file(follow_symlinks=False) or (
                    entry.is_symlink() and os.path.realpath(entry.path).startswith(real_root)
                    and os.path.isfile(entry.path)):
                yield f"{rel}{entry.name}", entry.path
        stack.extend(reversed(subfolders))


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


def local_opener(path: str):
    def opener():
        f = open(path, "rb")
        info = os.fstat(f.fileno())
        return f, info.st_mtime, info.st_size
    return opener


def s3_opener(client, bucket: str, obj: dict):
    def opener():
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"]
        return body, obj["LastModified"].timestamp(), obj["Size"]
    return opener
