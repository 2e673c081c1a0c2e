"""settings: every MIP_* and TA1_* variable the server and mipper read, once, at start.

VARS is the one table of them: name, type, default and what each does. `read(env, name)` is
the only way a variable is read, and it takes only names in VARS, so a setting cannot be read
without being listed; tests/test_settings.py holds docs/settings.md to the same table.
The frozen dataclasses below group the values for their readers: `Settings` (mipper and the
server), `ServerSettings` (the server alone, with the runner, GPU, CDR, notice and retention
groups the links and the core take from here). A bad value raises SettingError naming the
variable, which the entry points print as one line before exiting with 2.

This file reads and checks; the one file it may make is a missing MIP_PASSWORD_FILE. It never
imports the links, the web layer or the server (the password hasher is handed in).
mip_client.py reads its own MIP_CLIENT_* variables: it stands alone, and they are not here.
"""

import ipaddress
import math
import os
import re
import secrets
import urllib.parse
from dataclasses import dataclass
from dataclasses import field

from mip import VERSION
from mip.errors import MipError


class SettingError(MipError, ValueError):
    """A variable with a bad or missing value; the message names it and what it expected."""


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
SCHEMA_DIR = os.path.join(HERE, "schema")
# Never handed to mipper by the server: the server's own secrets.
SERVER_SECRETS = ("MIP_PASSWORD", "MIP_CLIENT_PASSWORD", "MIP_CDR_TOKEN", "MIP_CDR_SECRET",
                  "MIP_NOTIFY_SECRET")
# Never handed to a module either: mipper's AWS credentials (for S3 and ECS) and the
# OpenAI key, which reaches modules only as OPENAI_API_KEY.
SECRET_VARS = (*SERVER_SECRETS, "MIP_OPENAI_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN")
RUNNERS = ("inline", "docker", "ecs")
MAX_DEVICES = 64
DAY = 86400
REQUIRED = object()  # the default of a variable that must be set


# ---------------------------------------------------------------------------- types

@dataclass(frozen=True)
class Text:
    """Any text, as given."""

    label: str = "text"

    def parse(self, name: str, raw: str):
        return raw


@dataclass(frozen=True)
class Path:
    """A file or folder, made absolute against the working folder."""

    label: str = "path"

    def parse(self, name: str, raw: str):
        return os.path.abspath(raw)


@dataclass(frozen=True)
class Int:
    low: int
    high: int

    @property
    def label(self) -> str:
        return f"integer {self.low} to {self.high}"

    def parse(self, name: str, raw: str):
        try:
            value = int(raw)
        except ValueError:
            raise SettingError(f"{name}={raw!r}: expected a whole number") from None
        return self.check(name, value, self.low, self.high)

    @staticmethod
    def check(name: str, value: int, low: int, high: int) -> int:
        if not low <= value <= high:
            raise SettingError(f"{name}={value}: expected {low} to {high}")
        return value


@dataclass(frozen=True)
class Flag:
    # MIP_METRICS_OPEN words its refusal otherwise (tests/test_metrics.py holds it to that)
    refusal: str = "{name}={raw!r}: expected 0 or 1"
    label: str = "0 or 1"

    def parse(self, name: str, raw: str):
        if raw not in ("0", "1"):
            raise SettingError(self.refusal.format(name=name, raw=raw[:20]))
        return raw == "1"


@dataclass(frozen=True)
class Choice:
    options: tuple

    @property
    def label(self) -> str:
        return ", ".join(self.options)

    def parse(self, name: str, raw: str):
        if raw not in self.options:
            raise SettingError(f"{name}={raw!r}: expected one of {', '.join(self.options)}")
        return raw


@dataclass(frozen=True)
class Seconds:
    """A number of seconds, fractions allowed."""

    label: str = "seconds (a number)"

    def parse(self, name: str, raw: str):
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise SettingError(f"{name}: expected a number of seconds")
        return value


@dataclass(frozen=True)
class Words:
    """A list separated by commas or spaces."""

    label: str = "comma-separated list"

    def parse(self, name: str, raw: str):
        return tuple(w for w in raw.replace(",", " ").split() if w)


@dataclass(frozen=True)
class Networks:
    label: str = "comma-separated addresses or CIDR networks"

    def parse(self, name: str, raw: str):
        nets = []
        for item in (i.strip() for i in raw.split(",")):
            if item:
                try:
                    nets.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise SettingError(f"{name}: {item!r} is not an address or a network "
                                       "(CIDR)") from None
        return tuple(nets)


@dataclass(frozen=True)
class ProxyAddress:
    """One IP address, or `*`: waitress compares the peer's address with it as text, so a
    host name or a list would silently never match."""

    label: str = "IP address, or *"

    def parse(self, name: str, raw: str):
        raw = raw.strip()
        if raw == "*":
            return raw
        try:
            return str(ipaddress.ip_address(raw.removeprefix("[").removesuffix("]")))
        except ValueError:
            raise SettingError(f"{name}={raw!r}: expected the proxy's IP address "
                               "(127.0.0.1 for a proxy on this host) or *") from None


@dataclass(frozen=True)
class Devices:
    label: str = "device ids, or none"

    def parse(self, name: str, raw: str):
        raw = raw.strip()
        if raw.lower() == "none":
            return ()
        parts = [d.strip() for d in raw.split(",") if d.strip()]
        # ASCII digits only: str.isdigit() takes "²" (int() refuses it) and "٣" (int()
        # reads 3); compared as numbers, so that 0 and 00 are one device
        ids = [int(d) for d in parts if re.fullmatch(r"[0-9]{1,2}", d)]
        if not parts or len(ids) != len(parts) or max(ids) >= MAX_DEVICES \
                or len(set(ids)) != len(ids):
            raise SettingError(f"{name}={raw[:40]!r}: expected device ids such as 0,1,2,3 "
                               "(each once, below 64), or none")
        return tuple(str(i) for i in ids)


# ---------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Var:
    """One variable: its type parses the text; the default stands when it is unset or blank
    (None: unset, or worked out from others as `help` says)."""

    name: str
    kind: object
    default: object
    help: str


TEXT, URL, PATH = Text(), Text("URL"), Path()

VARS = {v.name: v for v in (
    # the folders and the catalogue (mipper and the server)
    Var("TA1_INPUTS_DIR", PATH, REQUIRED, "maps (`maps/<map>/<map>.tif`) and module inputs"),
    Var("TA1_OUTPUTS_DIR", PATH, REQUIRED, "`<job>/<module>/` outputs and their logs"),
    Var("TA1_TEMPS_DIR", PATH, REQUIRED, "`<job>/<module>/` temp files"),
    Var("TA1_RUNS_DIR", PATH, REQUIRED, "the journal, run logs, runners.log, GPU locks, key"),
    Var("TA1_REPOS_DIR", PATH, REQUIRED, "module source trees"),
    Var("MIP_CONFIG", PATH, os.path.join(HERE, "config.yml"), "the module catalogue"),
    Var("MIP_WORKERS", Int(1, 64), 4, "modules run in parallel inside one run (luigi workers)"),
    Var("MIP_OPENAI_KEY", TEXT, None, "default OpenAI key, given to modules as OPENAI_API_KEY"),
    Var("MIP_LUIGI_SCHEDULER_URL", URL, None, "a central luigi scheduler shared by mippers"),
    Var("MIP_MIN_FREE_MB", Int(0, 10**9), 1024,
        "free MB the runs, outputs and temps folders each need for a new run"),
    Var("MIP_KEY_FILE", PATH, None, "the key sealing queued runs' OpenAI keys "
        "(default `$TA1_RUNS_DIR/keystore.key`)"),
    Var("MIP_S3_BUCKET", TEXT, None, "copy each passed module's outputs and logs to this bucket"),
    Var("MIP_S3_PREFIX", TEXT, "mip", "key prefix in the bucket"),
    Var("MIP_S3_TEMPS", Flag(), False, "1: copy temps too"),
    # how modules run (mipper; the server, to clean up after a dead run)
    Var("MIP_RUNNER", Choice(RUNNERS), None, "how modules run, unless the catalogue says"),
    Var("MIP_DOCKER", Text("program"), "docker", "the docker program (docker runner)"),
    Var("MIP_DOCKER_USER", TEXT, None, "`--user` for containers with no `user:` of their own"),
    Var("MIP_ECS_CLUSTER", TEXT, "default", "ECS cluster (ecs runner)"),
    Var("MIP_ECS_LAUNCH_TYPE", TEXT, "FARGATE", "launch type, unless a capacity provider"),
    Var("MIP_ECS_CAPACITY_PROVIDER", TEXT, None, "capacity provider to run tasks on instead"),
    Var("MIP_ECS_SUBNETS", Words(), (), "subnets, for awsvpc networking"),
    Var("MIP_ECS_SECURITY_GROUPS", Words(), (), "security groups, for awsvpc networking"),
    Var("MIP_ECS_LOG_GROUP", TEXT, "/ecs/ta1", "the log group of the tasks' awslogs streams"),
    Var("MIP_ECS_LOG_PREFIX", TEXT, "ta1", "the tasks' log stream prefix"),
    Var("MIP_ECS_POLL_SECONDS", Seconds(), 30.0, "longest wait between two looks at a task"),
    Var("MIP_GPUS", Devices(), None, "GPU device ids modules take turns on, or none "
        "(default: found by NVML or nvidia-smi)"),
    Var("MIP_REQUIRE_GPU", Flag(), False, "1: refuse runs needing a GPU on a host without one"),
    # the server
    Var("MIP_HOST", Text("address"), "127.0.0.1", "address the server binds (--host wins)"),
    Var("MIP_PORT", Int(0, 65535), 8080, "port; 0 picks a free one (--port wins)"),
    Var("MIP_THREADS", Int(1, 256), 8, "request threads"),
    Var("MIP_MAX_RUNS", Int(1, 256), 2, "runs executing at once"),
    Var("MIP_MAX_QUEUED", Int(1, 100_000), 200, "runs waiting to start; past it, 503"),
    Var("MIP_MAX_DOWNLOADS", Int(1, 255), None,
        "zip downloads sent at once, below MIP_THREADS (default: half of it)"),
    Var("MIP_AUTH_FAILURES", Int(1, 10000), 10, "wrong credentials a minute from one address"),
    Var("MIP_JOURNAL_WRITE_SECONDS", Int(1, 3600), 4,
        "seconds an API write waits for a locked or failing journal before a 503"),
    Var("MIP_CONSOLE_POLL_MS", Int(100, 60_000), 1500,
        "milliseconds between two looks of an open console page at what it shows"),
    Var("MIP_ANSWER_CACHE_MB", Int(0, 65536), 64,
        "MB each cache of answers that can no longer change keeps; 0: none"),
    Var("MIP_CONNECTION_LIMIT", Int(1, 100_000), 1000,
        "open connections the server accepts; idle ones count too"),
    Var("MIP_CHANNEL_TIMEOUT", Int(1, DAY), 60,
        "seconds a connection may sit idle (no request under way) before it is closed"),
    Var("MIP_CLEANUP_INTERVAL", Int(1, DAY), 10, "seconds between two looks for idle ones"),
    Var("MIP_USER", TEXT, "mip", "basic-auth user of MIP_PASSWORD or MIP_PASSWORD_FILE"),
    Var("MIP_PASSWORD", TEXT, None, "that user's password"),
    Var("MIP_PASSWORD_FILE", PATH, None, "file holding that user's password, made if missing"),
    Var("MIP_USERS_FILE", PATH, None, "several users: `name:pbkdf2_sha256$...` lines"),
    Var("MIP_METRICS_OPEN", Flag("{name} must be 0 or 1, not {raw!r}"), False,
        "1: GET /metrics answers without credentials"),
    Var("MIP_TRUSTED_PROXY", ProxyAddress(), None,
        "the TLS proxy whose X-Forwarded-* headers are believed"),
    # the CDR link
    Var("MIP_CDR_URL", URL, None, "the CDR's base URL; no MIP_CDR_*: no CDR link"),
    Var("MIP_CDR_TOKEN", TEXT, None, "our CDR token"),
    Var("MIP_CDR_SECRET", TEXT, None, "the secret the CDR signs deliveries with"),
    Var("MIP_CDR_CALLBACK_URL", URL, None, "the public URL of our webhook"),
    Var("MIP_CDR_SYSTEM", TEXT, "mip", "the system name results are published under"),
    Var("MIP_CDR_VERSION", TEXT, VERSION, "the version results are published under"),
    Var("MIP_CDR_INBOX_MAX", Int(1, 10**8), 100_000,
        "CDR events waiting for their run to be queued; past it, the webhook answers 503"),
    Var("MIP_CDR_RECONCILE_MINUTES", Int(1, 7 * 24 * 60), 30,
        "minutes between two asks for the CDR notifications we missed (one at start)"),
    Var("MIP_CDR_BACKOFF", Seconds(), 0.5,
        "seconds before a failed CDR call or map download is tried again, then doubled"),
    # completion notices
    Var("MIP_NOTIFY_URL", URL, None, "POST every run's RunStatus here when it ends"),
    Var("MIP_NOTIFY_SECRET", TEXT, None, "the key notices are signed with"),
    Var("MIP_NOTIFY_ALLOW", Networks(), (), "private addresses notices may go to"),
    Var("MIP_NOTIFY_ATTEMPTS", Int(1, 100), 8, "tries of one notice"),
    Var("MIP_NOTIFY_BACKOFF", Int(1, DAY), 60, "seconds before the second try, then doubled"),
    Var("MIP_NOTIFY_TIMEOUT", Int(1, 120), 10, "seconds to connect, and for each read"),
    # retention
    Var("MIP_RETAIN_TEMPS_DAYS", Int(0, 100_000), None, "days temps are kept (unset: always)"),
    Var("MIP_RETAIN_OUTPUTS_DAYS", Int(0, 100_000), None, "days outputs are kept"),
    Var("MIP_RETAIN_RUNS_DAYS", Int(0, 100_000), None, "days finished runs' records are kept"),
    Var("MIP_SWEEP_FREE_MB", Int(0, 10**9), 0, "free-space floor of the sweeper (0: none)"),
    Var("MIP_SWEEP_OUTPUTS", Flag(), False, "1: below the floor, remove outputs kept in S3"),
    Var("MIP_SWEEP_SECONDS", Int(1, DAY), 600, "seconds between two sweeps"),
)}


def read(env, name: str):
    """The value of `name` (a VARS entry; KeyError for any other) in `env`: its default
    when unset or blank. Raises SettingError naming it when bad or required and missing."""
    var = VARS[name]
    raw = env.get(name) or ""
    if not raw.strip():
        if var.default is REQUIRED:
            raise SettingError(f"{name} is not set; run `source env.sh` first")
        return var.default
    return var.kind.parse(name, raw)


# ---------------------------------------------------------------------------- the groups

@dataclass(frozen=True)
class RunnerSettings:
    """How the docker and ecs runners reach their engines."""

    runner: str | None = None
    docker: str = "docker"
    docker_user: str | None = None
    ecs_cluster: str = "default"
    ecs_launch_type: str = "FARGATE"
    ecs_capacity_provider: str | None = None
    ecs_subnets: tuple = ()
    ecs_security_groups: tuple = ()
    ecs_log_group: str = "/ecs/ta1"
    ecs_log_prefix: str = "ta1"
    ecs_poll_seconds: float = 30.0

    @classmethod
    def from_env(cls, env) -> "RunnerSettings":
        """Raises SettingError (a ValueError) naming a bad variable."""
        return cls(
            runner=read(env, "MIP_RUNNER"),
            docker=read(env, "MIP_DOCKER"),
            docker_user=read(env, "MIP_DOCKER_USER"),
            ecs_cluster=read(env, "MIP_ECS_CLUSTER"),
            ecs_launch_type=read(env, "MIP_ECS_LAUNCH_TYPE"),
            ecs_capacity_provider=read(env, "MIP_ECS_CAPACITY_PROVIDER"),
            ecs_subnets=read(env, "MIP_ECS_SUBNETS"),
            ecs_security_groups=read(env, "MIP_ECS_SECURITY_GROUPS"),
            ecs_log_group=read(env, "MIP_ECS_LOG_GROUP"),
            ecs_log_prefix=read(env, "MIP_ECS_LOG_PREFIX"),
            ecs_poll_seconds=max(0.05, read(env, "MIP_ECS_POLL_SECONDS")),
        )


@dataclass(frozen=True)
class GpuSettings:
    """The host's devices (`MIP_GPUS`, found when unset) and whether a GPU module may run
    without one (`MIP_REQUIRE_GPU`)."""

    devices: tuple = ()  # host device ids as text, such as ("0", "1")
    require: bool = False

    @classmethod
    def from_env(cls, env) -> "GpuSettings":
        """Raises SettingError (a ValueError) naming a bad variable."""
        devices = read(env, "MIP_GPUS")
        require = read(env, "MIP_REQUIRE_GPU")
        if devices is None:
            # imported here: gpus takes GpuSettings from this file
            from mip import gpus

            devices = gpus.detect()
        return cls(devices=devices, require=require)


@dataclass(frozen=True)
class Settings:
    """Folders and limits shared by mipper and the server."""

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
    runner_settings: RunnerSettings = field(default_factory=RunnerSettings)
    luigi_scheduler_url: str | None = None
    min_free_mb: int = 1024  # below this, in the runs, outputs or temps folder, no new run
    key_file: str | None = None  # the keystore's Fernet key (default: in the runs folder)
    gpu_settings: GpuSettings = field(default_factory=GpuSettings)

    @classmethod
    def from_env(cls, env) -> "Settings":
        """Read the TA1_* and MIP_* variables; raises SettingError naming a bad one."""
        runs_dir = read(env, "TA1_RUNS_DIR")
        return cls(
            inputs_dir=read(env, "TA1_INPUTS_DIR"),
            outputs_dir=read(env, "TA1_OUTPUTS_DIR"),
            temps_dir=read(env, "TA1_TEMPS_DIR"),
            runs_dir=runs_dir,
            repos_dir=read(env, "TA1_REPOS_DIR"),
            config_path=read(env, "MIP_CONFIG"),
            workers=read(env, "MIP_WORKERS"),
            openai_key=read(env, "MIP_OPENAI_KEY"),
            s3_bucket=read(env, "MIP_S3_BUCKET"),
            s3_prefix=read(env, "MIP_S3_PREFIX").strip("/"),
            s3_temps=read(env, "MIP_S3_TEMPS"),
            runner_settings=RunnerSettings.from_env(env),
            luigi_scheduler_url=read(env, "MIP_LUIGI_SCHEDULER_URL"),
            min_free_mb=read(env, "MIP_MIN_FREE_MB"),
            key_file=read(env, "MIP_KEY_FILE") or os.path.join(runs_dir, "keystore.key"),
            gpu_settings=GpuSettings.from_env(env),
        )

    @property
    def journal_path(self) -> str:
        return os.path.join(self.runs_dir, "journal.db")

    def make_dirs(self) -> None:
        for path in (self.inputs_dir, os.path.join(self.inputs_dir, "maps"), self.outputs_dir,
                     self.temps_dir, self.runs_dir, os.path.join(self.runs_dir, "logs"),
                     self.repos_dir):
            os.makedirs(path, exist_ok=True)


@dataclass(frozen=True)
class CdrSettings:
    """Where the CDR is, how we talk to it, and the name we publish under."""

    url: str
    token: str = field(repr=False)
    secret: str = field(repr=False)
    callback_url: str
    system: str
    version: str
    inbox_max: int = 100_000
    reconcile_minutes: int = 30
    backoff: float = 0.5

    @classmethod
    def from_env(cls, env) -> "CdrSettings | None":
        """None when no MIP_CDR_* setting is given; raises SettingError naming one missing."""
        needed = ("MIP_CDR_URL", "MIP_CDR_TOKEN", "MIP_CDR_SECRET", "MIP_CDR_CALLBACK_URL")
        given = {n: read(env, n) for n in needed}
        # read even without a link, so that a bad value is refused all the same
        inbox_max = read(env, "MIP_CDR_INBOX_MAX")
        reconcile_minutes = read(env, "MIP_CDR_RECONCILE_MINUTES")
        backoff = read(env, "MIP_CDR_BACKOFF")
        if backoff < 0:
            raise SettingError(f"MIP_CDR_BACKOFF={backoff:g}: expected 0 or more seconds")
        if not any(given.values()):
            return None
        missing = [n for n in needed if not given[n]]
        if missing:
            raise SettingError(f"{missing[0]} is not set; the CDR link needs "
                               f"{', '.join(needed)}")
        return cls(url=given["MIP_CDR_URL"], token=given["MIP_CDR_TOKEN"],
                   secret=given["MIP_CDR_SECRET"], callback_url=given["MIP_CDR_CALLBACK_URL"],
                   system=read(env, "MIP_CDR_SYSTEM"), version=read(env, "MIP_CDR_VERSION"),
                   inbox_max=inbox_max, reconcile_minutes=reconcile_minutes,
                   backoff=backoff)


def origin(url: str) -> str:
    """scheme://host:port of a URL: what logs and answers show, since a path or query may
    hold a receiver's token."""
    try:
        parts = urllib.parse.urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}".rstrip(":")
    except ValueError:
        return "(bad URL)"


@dataclass(frozen=True)
class NoticeSettings:
    """MIP_NOTIFY_*: the URL told of every run, the signing secret, the allowed addresses,
    and how hard a delivery is tried. The link (links/notices.py, check_settings) holds
    the URL to its address rule at start."""

    url: str | None = None
    secret: str | None = field(default=None, repr=False)
    allow: tuple = ()  # ip_network objects MIP_NOTIFY_ALLOW lets through
    attempts: int = 8
    backoff: int = 60  # seconds before the second try; doubled for each one after
    timeout: int = 10  # seconds for connecting, and for each read

    def __repr__(self) -> str:  # the secret stays out of any log of the settings
        return f"NoticeSettings(url={self.url and origin(self.url)!r}, allow={self.allow!r})"

    @classmethod
    def from_env(cls, env) -> "NoticeSettings":
        """Raises SettingError naming the variable that is wrong."""
        return cls(url=read(env, "MIP_NOTIFY_URL"), secret=read(env, "MIP_NOTIFY_SECRET"),
                   allow=read(env, "MIP_NOTIFY_ALLOW"),
                   attempts=read(env, "MIP_NOTIFY_ATTEMPTS"),
                   backoff=read(env, "MIP_NOTIFY_BACKOFF"),
                   timeout=read(env, "MIP_NOTIFY_TIMEOUT"))


@dataclass(frozen=True)
class RetentionSettings:
    """How long files and records are kept, and the free-space floor of the sweeper."""

    temps_days: int | None = None  # None: kept for good
    outputs_days: int | None = None
    runs_days: int | None = None
    sweep_free_mb: int = 0  # 0: no floor
    sweep_outputs: bool = False  # may the floor remove outputs already in S3
    interval: int = 600  # seconds between two sweeps

    @classmethod
    def from_env(cls, env, min_free_mb: int) -> "RetentionSettings":
        """Raises SettingError naming a bad variable."""
        floor = read(env, "MIP_SWEEP_FREE_MB")
        if floor and floor <= min_free_mb:
            raise SettingError(
                f"MIP_SWEEP_FREE_MB={floor} must be above MIP_MIN_FREE_MB={min_free_mb}: the "
                "sweeper must free space before runs are refused for the lack of it")
        return cls(temps_days=read(env, "MIP_RETAIN_TEMPS_DAYS"),
                   outputs_days=read(env, "MIP_RETAIN_OUTPUTS_DAYS"),
                   runs_days=read(env, "MIP_RETAIN_RUNS_DAYS"), sweep_free_mb=floor,
                   sweep_outputs=read(env, "MIP_SWEEP_OUTPUTS"),
                   interval=read(env, "MIP_SWEEP_SECONDS"))

    @property
    def active(self) -> bool:
        return (self.sweep_free_mb > 0
                or any(d is not None for d in (self.temps_days, self.outputs_days,
                                               self.runs_days)))


@dataclass(frozen=True)
class ServerSettings:
    """The server's settings, from the environment and the command line."""

    settings: Settings
    host: str = "127.0.0.1"
    port: int = 8080
    max_runs: int = 2
    max_queued: int = 200
    threads: int = 8
    users: dict = field(default_factory=dict, repr=False)  # name -> password hash
    auth: bool = True
    password_file: str | None = None
    cdr_settings: CdrSettings | None = None
    max_downloads: int = 4  # zip downloads at once; below `threads`
    auth_failures: int = 10  # wrong credentials per minute from one address
    metrics_open: bool = False  # GET /metrics without credentials (MIP_METRICS_OPEN=1)
    notify: NoticeSettings = field(default_factory=NoticeSettings)
    retention_settings: RetentionSettings = field(default_factory=RetentionSettings)
    trusted_proxy: str | None = None  # the TLS proxy's address (MIP_TRUSTED_PROXY), or "*"
    # waitress's; its own defaults (100, 120, 30) let 100 idle connections shut everyone out
    connection_limit: int = 1000
    channel_timeout: int = 60
    cleanup_interval: int = 10
    answer_cache_mb: int = 64  # bodies each answer cache keeps (MIP_ANSWER_CACHE_MB)
    console_poll_ms: int = 1500  # an open console page's polls (MIP_CONSOLE_POLL_MS)
    journal_write_seconds: int = 4  # then 503 journal_unavailable (MIP_JOURNAL_WRITE_SECONDS)

    @classmethod
    def from_env(cls, env, hash_password, host=None, port=None,
                 no_auth=False) -> "ServerSettings":
        """`hash_password(text)` makes MIP_PASSWORD's entry of `users`: its hash, or what
        stands for one until it is made (web/auth.py has both). Raises SettingError
        naming the variable that is wrong or missing."""
        settings = Settings.from_env(env)
        users, password_file = ({}, None) if no_auth else read_users(env, hash_password)
        threads = read(env, "MIP_THREADS")
        # downloads stay below the request threads, so that some always answer the rest
        max_downloads = read(env, "MIP_MAX_DOWNLOADS")
        if max_downloads is None:
            max_downloads = max(1, threads // 2)
        Int.check("MIP_MAX_DOWNLOADS", max_downloads, 1, max(1, threads - 1))
        return cls(settings=settings, host=host or read(env, "MIP_HOST"),
                   port=port if port is not None else read(env, "MIP_PORT"),
                   max_runs=read(env, "MIP_MAX_RUNS"), max_queued=read(env, "MIP_MAX_QUEUED"),
                   threads=threads, max_downloads=max_downloads,
                   auth_failures=read(env, "MIP_AUTH_FAILURES"),
                   users=users, auth=not no_auth, password_file=password_file,
                   metrics_open=read(env, "MIP_METRICS_OPEN"),
                   cdr_settings=CdrSettings.from_env(env),
                   notify=NoticeSettings.from_env(env),
                   retention_settings=RetentionSettings.from_env(env, settings.min_free_mb),
                   trusted_proxy=read(env, "MIP_TRUSTED_PROXY"),
                   connection_limit=read(env, "MIP_CONNECTION_LIMIT"),
                   channel_timeout=read(env, "MIP_CHANNEL_TIMEOUT"),
                   cleanup_interval=read(env, "MIP_CLEANUP_INTERVAL"),
                   answer_cache_mb=read(env, "MIP_ANSWER_CACHE_MB"),
                   console_poll_ms=read(env, "MIP_CONSOLE_POLL_MS"),
                   journal_write_seconds=read(env, "MIP_JOURNAL_WRITE_SECONDS"))


# ---------------------------------------------------------------------------- credentials

def read_users(env, hash_password) -> tuple:
    """({user: hash}, password file or None) from MIP_USERS_FILE, MIP_PASSWORD or
    MIP_PASSWORD_FILE; a missing MIP_PASSWORD_FILE is created with a random password.
    Raises SettingError when no credentials are configured, or when MIP_USER is also a user
    of the users file (one of the two passwords would silently be ignored)."""
    users, password_file = {}, None
    user = read(env, "MIP_USER")
    password = read(env, "MIP_PASSWORD")
    if not password:
        password_file = read(env, "MIP_PASSWORD_FILE")
        password = password_file and read_or_make_password(password_file)
    listed = {}
    users_file = read(env, "MIP_USERS_FILE")
    if users_file:
        listed = read_users_file(users_file)
    if password and user in listed:
        given = "MIP_PASSWORD_FILE" if password_file else "MIP_PASSWORD"
        raise SettingError(f"user {user!r} is named by MIP_USER (with {given}) and by "
                           f"MIP_USERS_FILE {users_file}: name each user in one place")
    if password:
        users[user] = hash_password(password)
    users.update(listed)
    if not users:
        raise SettingError("no credentials: set MIP_USER and MIP_PASSWORD (or MIP_USERS_FILE, "
                           "or MIP_PASSWORD_FILE), e.g. `source env.sh`; or start with "
                           "--no-auth to serve without authentication")
    return users, password_file


def read_or_make_password(path: str) -> str:
    """The password kept in `path`, made once (owner-only) when the file does not exist."""
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(18) + "\n")
    with open(path, encoding="utf-8") as f:
        password = f.read().strip()
    if not password:
        raise SettingError(f"MIP_PASSWORD_FILE {path} is empty")
    return password


def read_users_file(path: str) -> dict:
    """`user:hash` lines (blank lines and # comments skipped); raises SettingError."""
    users = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise SettingError(f"MIP_USERS_FILE {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not name or not stored.startswith("pbkdf2_sha256$"):
            raise SettingError(f"MIP_USERS_FILE {path} line {number}: expected "
                               "user:pbkdf2_sha256$... (see --hash-password)")
        users[name] = stored
    return users
