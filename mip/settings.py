"""settings: the folders and limits every part reads from the environment, once, at start.

Read by mipper and the server (`Settings.from_env(os.environ)`); a bad value raises
MipError naming the variable, which the entry points print as one line before exiting.
This file reads variables and checks them; it never creates a file or starts anything.
"""

import os
from dataclasses import dataclass
from dataclasses import field

from mip import gpus
from mip import runners
from mip.errors import MipError

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
SCHEMA_DIR = os.path.join(HERE, "schema")
# Never handed to mipper by the server: the server's own secrets.
SERVER_SECRETS = ("MIP_PASSWORD", "MIP_CLIENT_PASSWORD", "MIP_CDR_TOKEN", "MIP_CDR_SECRET",
                  "MIP_NOTIFY_SECRET")
# Never handed to a module either: mipper's AWS credentials (for S3 and ECS) and the
# OpenAI key, which reaches modules only as OPENAI_API_KEY.
SECRET_VARS = (*SERVER_SECRETS, "MIP_OPENAI_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN")


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
