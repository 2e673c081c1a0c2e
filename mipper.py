"""mipper: runs TA1 modules for one job and map as a luigi graph, recording each in the journal.

    source env.sh
    python mipper.py --job alpha --map WY_CO_Peach --module map_crop
    python mipper.py --job alpha --map WY_CO_Peach --module ALL --force-rerun
    python mipper.py --list-modules
    python mipper.py --list-deps geopackage

Also a library: the server imports the catalogue and settings from here and starts each
run as `python mipper.py --run-id ID ...` in a process group of its own.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from dataclasses import field

import jsonschema
import luigi
import yaml

import gpus
import journal
import runners
import switches
import untrusted
from journal import Status

# one version for mipper, the server and the client (mip_client.py keeps a copy: it stands
# alone; tests/test_papercuts.py checks they agree)
VERSION = "0.1.0"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_DIR = os.path.join(HERE, "schema")
ALL = "ALL"
CHUNK_READ = 1024 * 1024
# used with fullmatch: `$` would let a name end in a newline
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
TOKENS = ("$INPUT_DIR", "$OUTPUT_DIR", "$TEMP_DIR", "$REPO_DIR", "$MAP_NAME", "$GPU_ID")
# Never handed to mipper by the server: the server's own secrets.
SERVER_SECRETS = ("MIP_PASSWORD", "MIP_CLIENT_PASSWORD", "MIP_CDR_TOKEN", "MIP_CDR_SECRET",
                  "MIP_NOTIFY_SECRET")
# Never handed to a module either: mipper's AWS credentials (for S3 and ECS) and the
# OpenAI key, which reaches modules only as OPENAI_API_KEY.
SECRET_VARS = (*SERVER_SECRETS, "MIP_OPENAI_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN")

log = logging.getLogger("mip.mipper")


# ---------------------------------------------------------------------------- errors

class MipError(Exception):
    """An expected failure, reported as one line without a traceback."""


class CatalogueError(MipError):
    """config.yml is missing, unreadable or invalid."""


class UsageError(MipError):
    """A bad job, map or module name, or a job bound to another map."""


class ModuleFailed(MipError):
    """A module exited non-zero, could not start, or lacks an expected output."""


# ---------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Settings:
    """Folders and limits shared by mipper and the server, read once from the environment."""

    inputs_dir: str
    outputs_dir: str
    temps_dir: str
    runs_dir: str
    repos_dir: str
    config_path: str
    workers: int = 4
    openai_key: str | None = field(default=None, repr=False)
    s3_bucket: str | None = None
    s3_prefix: str = "mip"
    s3_temps: bool = False
    runner_settings: runners.RunnerSettings = field(default_factory=runners.RunnerSettings)
    luigi_scheduler_url: str | None = None
    min_free_mb: int = 1024  # below this, in the runs, outputs or temps folder, no new run
    key_file: str | None = None  # the keystore's Fernet key (default: in the runs folder)
    gpu_settings: gpus.GpuSettings = field(default_factory=gpus.GpuSettings)

    @classmethod
    def from_env(cls, env) -> "Settings":
        """Read the TA1_* and MIP_* variables; raises MipError naming a bad one."""
        dirs = {}
        for name in ("TA1_INPUTS_DIR", "TA1_OUTPUTS_DIR", "TA1_TEMPS_DIR", "TA1_RUNS_DIR",
                     "TA1_REPOS_DIR"):
            if not env.get(name):
                raise MipError(f"{name} is not set; run `source env.sh` first")
            dirs[name] = os.path.abspath(env[name])
        return cls(
            inputs_dir=dirs["TA1_INPUTS_DIR"],
            outputs_dir=dirs["TA1_OUTPUTS_DIR"],
            temps_dir=dirs["TA1_TEMPS_DIR"],
            runs_dir=dirs["TA1_RUNS_DIR"],
            repos_dir=dirs["TA1_REPOS_DIR"],
            config_path=os.path.abspath(env.get("MIP_CONFIG") or os.path.join(HERE, "config.yml")),
            workers=int_setting(env, "MIP_WORKERS", 4, 1, 64),
            openai_key=env.get("MIP_OPENAI_KEY") or None,
            s3_bucket=env.get("MIP_S3_BUCKET") or None,
            s3_prefix=env.get("MIP_S3_PREFIX", "mip").strip("/"),
            s3_temps=env.get("MIP_S3_TEMPS", "0") == "1",
            runner_settings=runner_settings(env),
            luigi_scheduler_url=env.get("MIP_LUIGI_SCHEDULER_URL") or None,
            min_free_mb=int_setting(env, "MIP_MIN_FREE_MB", 1024, 0, 10**9),
            key_file=os.path.abspath(env.get("MIP_KEY_FILE") or os.path.join(
                dirs["TA1_RUNS_DIR"], "keystore.key")),
            gpu_settings=gpu_settings(env),
        )

    @property
    def journal_path(self) -> str:
        return os.path.join(self.runs_dir, "journal.db")

    def make_dirs(self) -> None:
        for path in (self.inputs_dir, os.path.join(self.inputs_dir, "maps"), self.outputs_dir,
                     self.temps_dir, self.runs_dir, os.path.join(self.runs_dir, "logs"),
                     self.repos_dir):
            os.makedirs(path, exist_ok=True)


def gpu_settings(env) -> gpus.GpuSettings:
    try:
        return gpus.GpuSettings.from_env(env)
    except ValueError as e:
        raise MipError(str(e)) from None


def runner_settings(env) -> runners.RunnerSettings:
    try:
        return runners.RunnerSettings.from_env(env)
    except ValueError as e:
        raise MipError(str(e)) from None


def int_setting(env, name: str, default: int, low: int, high: int) -> int:
    """An integer environment variable within [low, high]; raises MipError otherwise."""
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise MipError(f"{name}={raw!r}: expected a whole number") from None
    if not low <= value <= high:
        raise MipError(f"{name}={value}: expected {low} to {high}")
    return value


# ---------------------------------------------------------------------------- catalogue

@dataclass(frozen=True)
class Module:
    """One catalogue entry."""

    name: str
    version: str
    requires: tuple
    command: tuple
    options: dict
    outputs: tuple
    gpu: bool = False
    runner: str | None = None  # this module's own runner, over MIP_RUNNER
    base_runner: str = "inline"  # the catalogue's runner, under MIP_RUNNER
    container: dict = field(default_factory=dict)  # folders as a container sees them
    image: str | None = None
    user: str | None = None
    task_definition: str | None = None
    container_name: str | None = None


def load_catalogue(path: str) -> dict:
    """The modules of config.yml by name, in file order; raises CatalogueError in one line."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise CatalogueError(f"{path}: cannot read the module catalogue: {e.strerror}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise CatalogueError(f"{path}:{line} is not valid YAML") from None
    with open(os.path.join(SCHEMA_DIR, "Catalogue.json"), encoding="utf-8") as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise CatalogueError(f"{path}: {_catalogue_place(data, error.absolute_path)}: "
                             f"{error.message}")
    modules = {}
    for entry in data["modules"]:
        name = entry["name"]
        if name in modules or name == ALL:
            raise CatalogueError(f"{path}: module {name!r}: field 'name': used twice or reserved")
        modules[name] = Module(
            name=name, version=entry["version"], requires=tuple(entry["requires"]),
            command=tuple(entry["command"]), options=dict(entry["options"]),
            outputs=tuple(entry["outputs"]), gpu=entry.get("gpu", False),
            runner=entry.get("runner"), base_runner=data.get("runner", "inline"),
            container=data.get("container", {}), image=entry.get("image"),
            user=entry.get("user"), task_definition=entry.get("task_definition"),
            container_name=entry.get("container_name"))
    for module in modules.values():
        for req in module.requires:
            if req not in modules:
                raise CatalogueError(f"{path}: module {module.name!r}: field 'requires': "
                                     f"unknown module {req!r}")
        for key, value in [*module.options.items(), *(("outputs", o) for o in module.outputs)]:
            for text in value if isinstance(value, list) else [value]:
                leftover = re.search(r"\$[A-Z_]+", substitute(str(text), dict.fromkeys(TOKENS, "")))
                if leftover:
                    raise CatalogueError(f"{path}: module {module.name!r}: field {key!r}: "
                                         f"unknown variable {leftover.group()}")
    _check_acyclic(path, modules)
    return modules


def _catalogue_place(data, where) -> str:
    where = list(where)
    if len(where) >= 2 and where[0] == "modules" and isinstance(where[1], int):
        entry = data["modules"][where[1]]
        name = entry.get("name", f"#{where[1] + 1}") if isinstance(entry, dict) else where[1] + 1
        rest = ".".join(str(p) for p in where[2:]) or "entry"
        return f"module {name!r}: field {rest!r}"
    return f"field {'.'.join(str(p) for p in where) or 'top level'!r}"


def _check_acyclic(path: str, modules: dict) -> None:
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            raise CatalogueError(f"{path}: module {name!r}: field 'requires': dependency cycle "
                                 + " -> ".join([*trail, name]))
        state[name] = "open"
        for req in modules[name].requires:
            visit(req, [*trail, name])
        state[name] = "done"

    for name in modules:
        visit(name, [])


def substitute(text: str, values: dict) -> str:
    """Replace the $TOKENS as plain text, as the original config.yml expects."""
    for token in TOKENS:
        text = text.replace(token, values[token])
    return text


def expand_modules(catalogue: dict, names) -> list:
    """Module names with ALL expanded, in catalogue order; raises UsageError for unknown ones."""
    names = list(names)
    if not names:
        raise UsageError("no module given; name one or more, or ALL")
    unknown = [n for n in names if n != ALL and n not in catalogue]
    if unknown:
        raise UsageError(f"unknown module {unknown[0]!r}; known: {', '.join(catalogue)}, {ALL}")
    if ALL in names:
        return list(catalogue)
    return [n for n in catalogue if n in names]


def ancestors(catalogue: dict, names) -> list:
    """The named modules and everything they need, in catalogue order."""
    seen = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(catalogue[name].requires)
    return [n for n in catalogue if n in seen]


def check_name(kind: str, value: str) -> str:
    """Refuse names that could escape a folder; raises UsageError."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise UsageError(f"bad {kind} name {value!r}: use letters, digits, '_', '.', '-', "
                         "at most 64, not starting with '.'")
    return value


def map_file(settings: Settings, map_name: str) -> str:
    return os.path.join(settings.inputs_dir, "maps", map_name, f"{map_name}.tif")


def list_maps(settings: Settings) -> list:
    """Names of the maps present under $TA1_INPUTS_DIR/maps, sorted."""
    try:
        names = sorted(os.listdir(os.path.join(settings.inputs_dir, "maps")))
    except OSError:
        return []
    return [n for n in names if NAME_RE.fullmatch(n) and os.path.isfile(map_file(settings, n))]


def check_map(settings: Settings, map_name: str) -> None:
    """Raises UsageError unless the map exists."""
    check_name("map", map_name)
    if not os.path.isfile(map_file(settings, map_name)):
        known = ", ".join(list_maps(settings)) or "none"
        raise UsageError(f"no map {map_name!r}: expected $TA1_INPUTS_DIR/maps/{map_name}/"
                         f"{map_name}.tif; maps present: {known}")


def token_values(settings: Settings, job: str, map_name: str, container=None) -> dict:
    """What each $TOKEN of the catalogue stands for in this job and map, as seen on this
    host or, given the catalogue's `container:` section, inside a container."""
    where = container or {}
    return {
        "$INPUT_DIR": where.get("input_dir", settings.inputs_dir),
        "$OUTPUT_DIR": os.path.join(where.get("output_dir", settings.outputs_dir), job),
        "$TEMP_DIR": os.path.join(where.get("temp_dir", settings.temps_dir), job),
        "$REPO_DIR": where.get("repo_dir", settings.repos_dir),
        "$MAP_NAME": map_name,
        "$GPU_ID": gpus.DEVICE_SEEN,
    }


def module_switches(module: Module, values: dict) -> list:
    """The module's options as switches: `--name value`, a list as several values, "" as
    a bare flag."""
    switches = []
    for key, value in module.options.items():
        switches.append(f"--{key}")
        for item in value if isinstance(value, list) else [value]:
            if item != "":
                switches.append(substitute(str(item), values))
    return switches


def inline_command(settings: Settings, module: Module) -> list:
    """The catalogue's `command`: a leading `python` is this interpreter, and a relative
    path that exists next to the catalogue is made absolute."""
    base = os.path.dirname(settings.config_path)
    argv = [sys.executable if module.command[0] == "python" else module.command[0]]
    for part in module.command[1:]:
        local = os.path.join(base, part)
        argv.append(local if not os.path.isabs(part) and os.path.exists(local) else part)
    return argv


def module_runner(settings: Settings, module: Module) -> str:
    return module.runner or settings.runner_settings.runner or module.base_runner


def launch(settings: Settings, module: Module, job: str, map_name: str, run_id: str,
           extra=(), env=None) -> runners.Launch:
    """Everything a runner needs to execute the module in this job. A container sees the
    data folders where the catalogue's `container:` section says; an ECS task sees them at
    the same paths as here (a shared file system)."""
    in_docker = module_runner(settings, module) == "docker"
    container = module.container if in_docker else None
    env = dict(env or {})
    secrets = {k: env.pop(k) for k in ("OPENAI_API_KEY",) if k in env}
    mounts = ()
    if in_docker:
        # the inputs and the module sources are read-only to a module
        mounts = tuple((host, module.container.get(key, host), ro) for key, host, ro in (
            ("input_dir", settings.inputs_dir, True), ("output_dir", settings.outputs_dir, False),
            ("temp_dir", settings.temps_dir, False), ("repo_dir", settings.repos_dir, True)))
    return runners.Launch(
        module=module.name,
        name=f"mip-{job}-{module.name}-{run_id}",
        run_id=run_id,
        command=tuple(inline_command(settings, module)),
        switches=tuple(module_switches(module, token_values(settings, job, map_name, container))
                       + list(extra)),
        env=env,
        secrets=secrets,
        cwd=os.path.join(settings.temps_dir, job, module.name),
        gpu=module.gpu,
        image=module.image or f"inferlink/ta1_{module.name}",
        user=module.user or settings.runner_settings.docker_user,
        mounts=mounts,
        task_definition=module.task_definition or f"ta1_{module.name}",
        container_name=module.container_name or module.name,
    )


def local_gpu_modules(settings: Settings, catalogue: dict, names) -> list:
    """The modules among `names` that want a GPU of this host (an ECS task gets its GPU
    from ECS)."""
    return [n for n in gpus.needing_gpu(catalogue, names)
            if module_runner(settings, catalogue[n]) != "ecs"]


def gpu_refusal(settings: Settings, catalogue: dict, targets) -> str | None:
    """Why a run of `targets` (with what they need) may not start here, under
    MIP_REQUIRE_GPU=1 on a host without a GPU; None when it may."""
    gpu = settings.gpu_settings
    if not gpu.require or gpu.devices:
        return None
    needing = local_gpu_modules(settings, catalogue, ancestors(catalogue, targets))
    if not needing:
        return None
    return (f"MIP_REQUIRE_GPU=1 and this host has no GPU (MIP_GPUS=none, or none found): "
            f"{', '.join(needing)} need{'s' if len(needing) == 1 else ''} one")


def check_extra(settings: Settings, catalogue: dict, job: str, extra: dict) -> None:
    """Apply the rule of switches.py to every module's extra switches, with the paths that
    module sees (a container's, for the docker runner). Raises UsageError for an unknown
    module, switches.Refused for a switch that breaks the rule."""
    roots = (os.path.join(settings.outputs_dir, job), os.path.join(settings.temps_dir, job))
    for name, args in extra.items():
        if name not in catalogue:
            raise UsageError(f"extra switches for unknown module {name!r}")
        module = catalogue[name]
        base, view = os.path.join(settings.temps_dir, job, name), ()
        if module_runner(settings, module) == "docker":
            # a container's working folder is the image's: relative `..` paths are refused
            base = None
            view = [(module.container.get(key, host), host) for key, host in (
                ("output_dir", settings.outputs_dir), ("temp_dir", settings.temps_dir))]
        switches.check(name, args, module.options, roots, base, view)


def module_outputs(settings: Settings, module: Module, job: str, map_name: str) -> list:
    """The module's expected outputs, as full paths."""
    values = token_values(settings, job, map_name)
    return [substitute(path, values) for path in module.outputs]


def module_env(settings: Settings, env, openai_key: str | None) -> dict:
    """The environment a module runs with: ours without secrets, plus OPENAI_API_KEY."""
    clean = {k: v for k, v in env.items() if k not in SECRET_VARS}
    key = openai_key or settings.openai_key
    if key:
        clean["OPENAI_API_KEY"] = key
    return clean


# ---------------------------------------------------------------------------- storage (S3)

class UploadFailed(MipError):
    """Copying a module's data to S3 failed; the message says why."""


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
            for name, path in files:
                key = folder + name
                there = existing.pop(key, None)
                if (there and there["Size"] == os.path.getsize(path)
                        and there["ETag"] == s3_etag(path)):
                    kept += 1
                    continue
                client.upload_file(path, bucket, key, Config=transfer)
                sent += 1
            stale = list(existing)
            for start in range(0, len(stale), 1000):
                client.delete_objects(Bucket=bucket, Delete={
                    "Objects": [{"Key": k} for k in stale[start:start + 1000]], "Quiet": True})
    except (BotoCoreError, ClientError, OSError) as e:
        raise UploadFailed(f"upload to {uri} failed: {e}") from None
    log.info("module %s: %d files sent to %s, %d already there", module, sent, uri, kept)
    return uri


S3_PART = 16 * 1024 * 1024


def s3_etag(path: str) -> str:
    """The ETag S3 gives a file uploaded by upload_module (in parts of S3_PART from that
    size on), so that bytes already there are not sent again. Stores that make other ETags
    (server-side KMS encryption) just get every file again."""
    size = os.path.getsize(path)
    parts = []
    with open(path, "rb") as f:
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


# ---------------------------------------------------------------------------- a run

@dataclass
class Run:
    """Everything one mipper run needs; shared with luigi tasks (forked, so read-only)."""

    settings: Settings
    catalogue: dict
    db: journal.Journal
    run_id: str
    job: str
    map_name: str
    graph: list
    to_run: set
    extra: dict
    env: dict
    passed_before: dict = field(default_factory=dict)  # module -> last pass when planned

    def done(self, name: str) -> bool:
        """True when the module need not run: it passed before and nothing forces it, or it
        passed since this run was planned (here, or in another mipper sharing a central
        luigi scheduler)."""
        if name not in self.to_run:
            return True
        last = self.db.latest_execution(self.job, name)
        return (last is not None and last["status"] == "passed"
                and last["id"] > self.passed_before.get(name, 0))

    def run_module(self, module: Module, how: runners.Launch, log_path: str,
                   used: dict) -> tuple:
        """Run the module with its log open; (exit code, message when it failed). `used`
        gets what it used of the host (gpus.RESOURCE_KEYS)."""
        name = module.name
        job_out = os.path.join(self.settings.outputs_dir, self.job)
        with open(log_path, "wb") as out:
            out.write(f"# {name} {module.version}: {journal.utcnow()}\n"
                      f"# switches: {shlex.join(how.switches)}\n".encode())
            if how.gpu_device is not None:
                out.write(f"# GPU: device {how.gpu_device}, after "
                          f"{used['waited_for_gpu_seconds']} s waiting for it\n".encode())
            out.flush()
            try:
                # again at the last moment: a module run since the run was checked may have
                # made a symlink that now leads a path out of the job
                check_extra(self.settings, self.catalogue, self.job,
                            {name: self.extra.get(name, ())})
                with gpus.GpuSampler(how.gpu_device) as sampler:
                    code, message = runners.run(module_runner(self.settings, module), how,
                                                out, self.settings.runner_settings, used)
                used.update(sampler.figures())
            except runners.RunnerError as e:
                code, message = None, str(e)
            except switches.Refused as e:
                code, message = None, f"extra switches refused: {e}"
            if message is None:
                missing = [os.path.relpath(p, job_out)
                           for p in module_outputs(self.settings, module, self.job, self.map_name)
                           if not os.path.exists(p)]
                if missing:
                    message = f"exited 0 but did not write {', '.join(missing)}"
            status = Status.FAILED if message else Status.PASSED
            out.write(f"# {name} {status.value}"
                      f"{': ' + message if message else ''}: {journal.utcnow()}\n".encode())
        return code, message

    def execute(self, name: str) -> None:
        """Run one module to its end and record it; raises ModuleFailed."""
        module = self.catalogue[name]
        job_out = os.path.join(self.settings.outputs_dir, self.job)
        for folder in (os.path.join(job_out, name),
                       os.path.join(self.settings.temps_dir, self.job, name)):
            # a rerun starts clean, so that stale outputs cannot pass for new ones
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        log_path = os.path.join(job_out, f"{name}.log")
        how = launch(self.settings, module, self.job, self.map_name, self.run_id,
                     self.extra.get(name, ()), self.env)
        exec_id = self.db.start_execution(self.run_id, self.job, name, log_path)
        log.info("module %s started", name)
        started = time.monotonic()
        used = gpus.resources()
        slot = None
        try:
            slot = self.take_gpu(module, exec_id)
            if slot is not None:
                how = dataclasses.replace(how, gpu_device=slot.device, gpu_fd=slot.fd)
                used.update(gpu_device=slot.device, waited_for_gpu_seconds=slot.waited)
                self.db.set_execution_progress(exec_id, None, used)
            code, message = self.run_module(module, how, log_path, used)
        except gpus.NoGpu as e:
            code, message = None, str(e)
        except Exception as e:  # noqa: BLE001 - the execution must not stay `running`
            # a full outputs disk: the module's log cannot be written, or it fails oddly
            code, message = None, f"mipper could not run the module or keep its log: {e}"
        finally:
            gpus.release(slot)
        self.db.finish_execution(exec_id, Status.FAILED if message else Status.PASSED, code,
                                 message, used)
        took = time.monotonic() - started
        if message:
            log.info("module %s failed after %.1f s: %s", name, took, message)
            raise ModuleFailed(f"{name}: {message}")
        log.info("module %s passed in %.1f s", name, took)
        if self.settings.s3_bucket:
            record_upload(self.settings, self.db, self.db.latest_execution(self.job, name))

    def take_gpu(self, module: Module, exec_id: int) -> gpus.Slot | None:
        """A GPU slot for a GPU module run on this host, waiting (as `running`, with the
        message gpus.WAITING) while every device is held; None when the module needs
        none, runs on ECS, or the host has no GPU. Raises gpus.NoGpu."""
        devices = self.settings.gpu_settings.devices
        if not devices or not local_gpu_modules(self.settings, self.catalogue, [module.name]):
            return None

        def waiting():
            self.db.set_execution_progress(exec_id, gpus.WAITING)
            log.info("module %s is waiting for a GPU", module.name)

        return gpus.take(self.settings.runs_dir, devices,
                         f"run {self.run_id} job {self.job} module {module.name}", waiting)


# The run of this process. luigi tasks reach it here, since luigi tasks carry only
# string parameters and are forked (workers > 1) rather than pickled.
RUN: Run | None = None


class ModuleTask(luigi.Task):
    """One module of the current run; complete when the run need not execute it."""

    job = luigi.Parameter()
    module = luigi.Parameter()

    def requires(self):
        return [ModuleTask(job=self.job, module=r) for r in RUN.catalogue[self.module].requires]

    def complete(self):
        return RUN.done(self.module)

    def run(self):
        RUN.execute(self.module)


def scheduler_options(settings: Settings) -> dict:
    """luigi's local scheduler, or the central one (luigid) that mippers on several hosts
    share, so that a job's module never runs twice at once. With the central one, a worker
    waits for the tasks another mipper is running instead of giving up on them."""
    if not settings.luigi_scheduler_url:
        return {"local_scheduler": True}
    config = luigi.configuration.get_config()
    if not config.has_section("worker"):
        config.add_section("worker")
    config.set("worker", "keep_alive", "true")
    config.set("worker", "wait_interval", "0.5")
    return {"local_scheduler": False, "scheduler_url": settings.luigi_scheduler_url}


def wait_for_other_runs(db: journal.Journal, job: str, graph: list,
                        hours: float = 24) -> None:
    """With a central scheduler, luigi's worker ends once the tasks left are running in
    another mipper; wait (a day at most) for those modules to end, so that this run's
    outcome is theirs."""
    deadline = time.monotonic() + hours * 3600
    while time.monotonic() < deadline:
        busy = [n for n in graph
                if (db.latest_execution(job, n) or {}).get("status") == "running"]
        if not busy:
            return
        log.info("waiting for %s, run by another mipper", " ".join(busy))
        time.sleep(1)


def plan(catalogue: dict, db: journal.Journal, job: str, targets: list,
         force_rerun: bool) -> tuple:
    """(graph, to_run): the targets with their predecessors, and those that must execute:
    not passed yet, forced, or downstream of one that executes."""
    graph = ancestors(catalogue, targets)
    to_run = set()
    # repeat until nothing changes: the catalogue need not list predecessors first
    changed = True
    while changed:
        changed = False
        for name in graph:
            if name in to_run:
                continue
            last = db.latest_execution(job, name)
            if (last is None or last["status"] != "passed" or (force_rerun and name in targets)
                    or any(r in to_run for r in catalogue[name].requires)):
                to_run.add(name)
                changed = True
    return graph, to_run


def run(settings: Settings, job: str, map_name: str, modules, force_rerun: bool = False,
        extra: dict | None = None, run_id: str | None = None, env=None) -> int:
    """Run the modules (and what they need) for a job on a map; returns an exit code.

    With `run_id`, the run was recorded by the server; otherwise it is recorded here.
    Raises UsageError or CatalogueError for bad input.
    """
    global RUN
    env = os.environ if env is None else env
    catalogue = load_catalogue(settings.config_path)
    check_name("job", job)
    targets = expand_modules(catalogue, modules)
    extra = extra or {}
    check_extra(settings, catalogue, job, extra)
    check_map(settings, map_name)
    refusal = gpu_refusal(settings, catalogue, targets)
    if refusal:
        raise UsageError(refusal)
    settings.make_dirs()
    db = journal.Journal(settings.journal_path)
    db.migrate()
    log_path = None
    if run_id is None:
        payload = {"job": job, "modules": list(modules), "map": map_name,
                   "force_rerun": force_rerun, "extra_switches": extra}
        try:
            run_id = db.create_run(job, map_name, list(modules), force_rerun, payload,
                                   os.path.join(settings.runs_dir, "logs"))
        except journal.JournalError as e:
            raise UsageError(str(e)) from None
        log_path = db.run(run_id)["log_path"]
    elif db.run(run_id) is None:
        raise UsageError(f"no run {run_id!r} in the journal")
    with run_logs(settings, job, log_path):
        if not db.set_run_status(run_id, Status.RUNNING, pid=os.getpid()):
            log.info("run %s was cancelled before it started", run_id)
            return EXIT_FAILED
        graph, to_run = plan(catalogue, db, job, targets, force_rerun)
        log.info("run %s: job %s, map %s, modules %s; to execute: %s", run_id, job, map_name,
                 " ".join(targets), " ".join(n for n in graph if n in to_run) or "nothing")
        without = local_gpu_modules(settings, catalogue, [n for n in graph if n in to_run])
        if without and not settings.gpu_settings.devices:
            log.warning("this host has no GPU (MIP_GPUS=none, or none found): %s run without "
                        "one", " ".join(without))
        RUN = Run(settings, catalogue, db, run_id, job, map_name, graph, to_run, extra,
                  module_env(settings, env, env.get("MIP_OPENAI_KEY")),
                  {n: db.last_pass(job, n) for n in to_run})
        try:
            result = luigi.build([ModuleTask(job=job, module=t) for t in targets],
                                 workers=settings.workers, detailed_summary=True,
                                 log_level="CRITICAL", **scheduler_options(settings))
            status = Status.PASSED if judge(RUN) else Status.FAILED
        except KeyboardInterrupt:
            db.end_running_executions(run_id, Status.CANCELLED, "interrupted")
            db.set_run_status(run_id, Status.CANCELLED)
            log.info("run %s interrupted", run_id)
            return EXIT_FAILED
        finally:
            RUN = None
        # a module whose end could not be recorded (its worker died) must not stay running
        if db.end_running_executions(run_id, Status.FAILED, journal.LOST_EXECUTION):
            status = Status.FAILED
            stop_lost(settings, catalogue, run_id, graph)
        if not db.set_run_status(run_id, status):
            status = Status(db.run(run_id)["status"])
        log.info("run %s %s (luigi: %s)", run_id, status.value, result.status.name)
        return EXIT_OK if status == Status.PASSED else EXIT_FAILED


def stop_lost(settings: Settings, catalogue: dict, run_id: str, graph: list) -> None:
    """Stop what the modules of a luigi worker that died left running: their processes
    (found by the run id the server puts in their environment), containers and tasks.
    Left alone, such a module would hold its GPU slot, unseen, for a run that has ended;
    the server stops leftovers only when mipper itself dies."""
    used = {module_runner(settings, catalogue[n]) for n in graph}
    try:
        stopped = runners.stop_run(run_id, None, used, settings.runner_settings)
    except runners.RunnerError as e:
        log.warning("what the run's lost modules started may still run: %s", e)
        return
    if stopped:
        # which containers and tasks stays in runners.log, on the host
        log.info("stopped %d processes, containers or tasks left by lost modules", len(stopped))
        runners.log.info("run %s: stopped %s", run_id, ", ".join(stopped))


def judge(run: Run) -> bool:
    """True when every module of the run's graph is done (and in S3, when asked for); the
    log says what is not. luigi's own verdict is not enough: see plan() and done()."""
    settings, db, job, graph = run.settings, run.db, run.job, run.graph
    if settings.luigi_scheduler_url:
        wait_for_other_runs(db, job, graph)
    passed = all(run.done(n) for n in graph)
    ran = {e["module"] for e in db.executions(run.run_id)}
    skipped = [n for n in graph if not run.done(n) and n not in ran]
    if skipped:
        log.info("not run, since a module they need failed: %s", " ".join(skipped))
    if settings.s3_bucket:
        # modules that passed in earlier runs but whose upload failed or never happened
        upload_missing(settings, db, job, [n for n in graph if n not in ran])
        missing = [n for n in graph if (db.latest_execution(job, n) or {}).get(
            "upload_status") not in ("uploaded", None)]
        if missing:
            log.info("not in S3 (upload failed): %s", " ".join(missing))
            passed = False
    return passed


@contextlib.contextmanager
def run_logs(settings: Settings, job: str, log_path: str | None):
    """Where a run logs besides stderr: its own log file when mipper recorded the run (the
    server sends stderr there itself), and runners.log, where how each module was run
    (containers, tasks) stays on the host, never in the logs the API serves."""
    handlers = {"mip.runner": logging.FileHandler(os.path.join(settings.runs_dir,
                                                               "runners.log"))}
    handlers["mip.runner"].setFormatter(
        untrusted.OneLineFormatter(f"%(asctime)s {job} %(message)s"))
    logging.getLogger("mip.runner").propagate = False
    if log_path:
        handlers["mip"] = logging.FileHandler(log_path)
        handlers["mip"].setFormatter(untrusted.OneLineFormatter(LOG_FORMAT))
    for name, handler in handlers.items():
        logging.getLogger(name).addHandler(handler)
    try:
        yield
    finally:
        for name, handler in handlers.items():
            logging.getLogger(name).removeHandler(handler)
            handler.close()


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


MAIN_PID = os.getpid()


def stop_on_sigterm(signum, frame) -> None:
    """Cancelling a run sends SIGTERM to its process group: stop what the runners started
    (a container or an ECS task outlives the processes that started it), then exit. The
    main process waits for luigi's worker processes to do the same, so that the run's
    end means its modules have stopped."""
    runners.terminate()
    if os.getpid() == MAIN_PID:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.05)
            except ChildProcessError:
                break
    os._exit(128 + signum)


def setup_logging() -> None:
    """Our lines to stderr; luigi's own chatter (and its tracebacks of our
    ModuleFailed) kept out, since each failure is already logged in one line."""
    handler = logging.StreamHandler()
    handler.setFormatter(untrusted.OneLineFormatter(LOG_FORMAT))
    logger = logging.getLogger("mip")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for name in ("luigi", "luigi-interface", "luigi.scheduler"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# ---------------------------------------------------------------------------- main

def upload_job(settings: Settings, job: str | None) -> int:
    """`--upload`: copy every passed module of a job to S3 again; raises UsageError."""
    if not settings.s3_bucket:
        raise UsageError("--upload needs MIP_S3_BUCKET")
    check_name("job", job or "")
    db = journal.Journal(settings.journal_path)
    db.migrate()
    if db.job_map(job) is None:
        raise UsageError(f"no job {job!r} in the journal")
    ok = upload_missing(settings, db, job, db.job_modules(job), again=True)
    return EXIT_OK if ok else EXIT_FAILED


def parse_extra(items) -> dict:
    """`MODULE=ARG` items into {module: [arg, ...]}, in order; raises UsageError."""
    extra = {}
    for item in items or ():
        name, sep, arg = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--extra-switch {item!r}: expected MODULE=ARG")
        extra.setdefault(name, []).append(arg)
    return extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="mipper.py", description="Run TA1 modules for a job and map (luigi graph).")
    parser.add_argument("--job", help="job name (a workspace bound to one map)")
    parser.add_argument("--map", help="map name, under $TA1_INPUTS_DIR/maps/<map>/<map>.tif")
    parser.add_argument("--module", action="append", default=[],
                        help="module to run (repeatable); ALL for every module")
    parser.add_argument("--force-rerun", action="store_true",
                        help="rerun the named modules (and what depends on them) even if passed")
    parser.add_argument("--extra-switch", action="append", metavar="MODULE=ARG",
                        help="one argument appended to MODULE's command line (repeatable)")
    parser.add_argument("--upload", action="store_true",
                        help="copy every passed module of --job to S3 again, then exit")
    parser.add_argument("--run-id", help="run id recorded by the server (internal)")
    parser.add_argument("--list-modules", action="store_true", help="print the catalogue")
    parser.add_argument("--list-deps", metavar="MODULE",
                        help="print what MODULE needs, predecessors first")
    parser.add_argument("--version", action="version", version=f"mipper {VERSION}")
    args = parser.parse_args(argv)
    setup_logging()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        settings = Settings.from_env(os.environ)
        if args.list_modules or args.list_deps:
            catalogue = load_catalogue(settings.config_path)
            if args.list_modules:
                for m in catalogue.values():
                    print(f"{m.name} {m.version} requires: {' '.join(m.requires) or '-'}")
            else:
                target = expand_modules(catalogue, [args.list_deps])
                print("\n".join(n for n in ancestors(catalogue, target) if n not in target))
            return EXIT_OK
        if args.upload:
            return upload_job(settings, args.job)
        if not args.job or not args.map or not args.module:
            parser.error("--job, --map and --module are required to run modules")
        return run(settings, args.job, args.map, args.module, args.force_rerun,
                   parse_extra(args.extra_switch), args.run_id)
    except (UsageError, CatalogueError, switches.Refused) as e:
        print(f"mipper: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MipError as e:
        print(f"mipper: error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
