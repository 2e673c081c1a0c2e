"""s3: copies of a module's logs, outputs (and temps, if asked) in S3, through boto3.

Used by mipper after a module passes, and by retention and the downloads when a local copy
is gone. boto3 is imported only when a copy is made: most runs never need it. Reads each file
through the descriptor mip/files.py's walk opened, never by its path. Raises UploadFailed;
never deletes a local file.
"""

import hashlib
import logging
import os

from mip import journal
from mip.errors import NotAFolder
from mip.errors import UploadFailed
from mip.files import module_files
from mip.settings import Settings

CHUNK_READ = 1024 * 1024
log = logging.getLogger("mip.mipper")


def s3_client():
    """An S3 client with boto3's usual credentials, region and AWS_ENDPOINT_URL, and short
    timeouts, so that a store that is down fails an upload in seconds, not minutes."""
    # imported here: boto3 takes a noticeable time to import, and most runs never need it
    import boto3
    import botocore.config

    config = botocore.config.Config(connect_timeout=5, read_timeout=60,
                                    retries={"max_attempts": 3, "mode": "standard"})
    return boto3.client("s3", config=config)


def s3_key_prefix(settings: Settings, job: str, module: str) -> str:
    """`<prefix>/<job>/<module>`, the folder of a module's data in the bucket."""
    return "/".join(p for p in (settings.s3_prefix, job, module) if p)


def upload_module(settings: Settings, job: str, module: str, client=None) -> str:
    """Copy a module's data to s3://bucket/<prefix>/<job>/<module>/<kind>/..., skipping
    objects already there with the same bytes, and deleting objects the module no longer
    has; returns the URI of the module's folder. Raises UploadFailed."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError

    bucket = settings.s3_bucket
    base = s3_key_prefix(settings, job, module)
    uri = f"s3://{bucket}/{base}/"
    try:
        client = client or s3_client()
        transfer = TransferConfig(multipart_threshold=S3_PART, multipart_chunksize=S3_PART,
                                  max_concurrency=8)
        sent = kept = 0
        for kind, files in module_files(settings, job, module).items():
            folder = f"{base}/{kind}/"
            existing = {obj["Key"]: obj for obj in list_objects(client, bucket, folder)}
            # each file is read through the descriptor the walk checked, never by its path:
            # a module may swap a file for a link at any time
            for name, f in files:
                key = folder + name
                there = existing.pop(key, None)
                if (there and there["Size"] == os.fstat(f.fileno()).st_size
                        and there["ETag"] == s3_etag(f)):
                    kept += 1
                    continue
                # by the descriptor's own name, which is the open file whatever the module
                # does to its path since; boto3 then reads each part from disk, where
                # upload_fileobj would hold up to ten 16 MB parts in memory
                client.upload_file(f"/proc/self/fd/{f.fileno()}", bucket, key, Config=transfer)
                sent += 1
            stale = list(existing)
            for start in range(0, len(stale), 1000):
                client.delete_objects(Bucket=bucket, Delete={
                    "Objects": [{"Key": k} for k in stale[start:start + 1000]], "Quiet": True})
    except (BotoCoreError, ClientError, OSError) as e:
        raise UploadFailed(f"upload to {uri} failed: {e}") from None
    except NotAFolder as e:
        raise UploadFailed(f"nothing uploaded to {uri}: {e}") from None
    log.info("module %s: %d files sent to %s, %d already there", module, sent, uri, kept)
    return uri


S3_PART = 16 * 1024 * 1024


def s3_etag(f) -> str:
    """The ETag S3 gives an open file uploaded by upload_module (in parts of S3_PART from
    that size on), so that bytes already there are not sent again. Stores that make other
    ETags (server-side KMS encryption) just get every file again."""
    size = os.fstat(f.fileno()).st_size
    parts = []
    f.seek(0)
    for _ in range(max(1, -(-size // S3_PART))):
        part = hashlib.md5(usedforsecurity=False)
        left = S3_PART
        while left and (block := f.read(min(CHUNK_READ, left))):
            part.update(block)
            left -= len(block)
        parts.append(part)
    if size < S3_PART:
        return f'"{parts[0].hexdigest()}"'
    whole = hashlib.md5(b"".join(p.digest() for p in parts), usedforsecurity=False)
    return f'"{whole.hexdigest()}-{len(parts)}"'


def list_objects(client, bucket: str, prefix: str):
    """Every object under `prefix` (the listing is paged by 1,000)."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", ())


def record_upload(settings: Settings, db: journal.Journal, execution: dict) -> bool:
    """Upload an execution's data and record the outcome; True if it is in S3."""
    job, module = execution["job"], execution["module"]
    uri = f"s3://{settings.s3_bucket}/{s3_key_prefix(settings, job, module)}/"
    try:
        uri = upload_module(settings, job, module)
    except UploadFailed as e:
        db.set_upload(execution["id"], "failed", uri, str(e))
        log.info("module %s: %s", module, e)
        return False
    db.set_upload(execution["id"], "uploaded", uri, None)
    return True


def upload_missing(settings: Settings, db: journal.Journal, job: str, modules,
                   again: bool = False) -> bool:
    """Upload the passed modules whose data is not in S3 yet (all of them with `again`);
    True if every one is there."""
    ok = True
    for module in modules:
        last = db.latest_execution(job, module)
        if last and last["status"] == "passed" and (again or last["upload_status"] != "uploaded"):
            ok = record_upload(settings, db, last) and ok
    return ok
