"""catalogue: the modules of config.yml, the $TOKENS of their options, their graph, and
how each one is launched (the switches, the environment, the extra-switch rule applied).

Read by mipper (to run modules) and the server (to check a submission before recording
it). Raises CatalogueError for a bad config.yml and UsageError for a bad name; it never
runs a module itself.
"""

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from dataclasses import field

import yaml

from mip import gpus
from mip import runners
from mip import switches
from mip.errors import CatalogueError
from mip.errors import UsageError
from mip.settings import SCHEMA_DIR
from mip.settings import SECRET_VARS
from mip.settings import Settings

ALL = "ALL"
# used with fullmatch: `$` would let a name end in a newline
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
TOKENS = ("$INPUT_DIR", "$OUTPUT_DIR", "$TEMP_DIR", "$REPO_DIR", "$MAP_NAME", "$GPU_ID")
# libyaml's loader where PyYAML was built with it: the pure-Python one takes tens of ms
# over config.yml, at every server start and every run
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# The server puts here, for each mipper it starts, the digests (catalogue_digest) of the
# catalogue texts it checked against schema/Catalogue.json. A mipper whose config.yml
# still has such a digest skips that check, and with it jsonschema's import (about a
# tenth of a CPU-second per run); any other text, or a changed schema, is checked anew.
CHECKED_ENV = "MIP_CATALOGUE_CHECKED"
CHECKED = set()  # the digests of the catalogue texts this process checked


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
    checks: tuple = ()  # what its outputs must hold (mip/checks.py)


def catalogue_digest(schema: bytes, text: bytes) -> str:
    """What a check of `text` against `schema` vouches for."""
    return hashlib.sha256(hashlib.sha256(schema).digest() + text).hexdigest()


def check_schema(path: str, schema: dict, data) -> None:
    """Raises CatalogueError naming the first place where `data` fails the schema."""
    import jsonschema  # here: a run whose catalogue the server checked never needs it

    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(data))
    if error is not None:
        raise CatalogueError(f"{path}: {_catalogue_place(data, error.absolute_path)}: "
                             f"{error.message}")


def load_catalogue(path: str, checked=()) -> dict:
    """The modules of config.yml by name, in file order; raises CatalogueError in one line.
    `checked`: digests of texts already checked against the schema (CHECKED_ENV)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
        data = yaml.load(text.decode("utf-8"), Loader=YAML_LOADER)
    except OSError as e:
        raise CatalogueError(f"{path}: cannot read the module catalogue: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise CatalogueError(f"{path}:{line} is not valid YAML") from None
    with open(os.path.join(SCHEMA_DIR, "Catalogue.json"), "rb") as f:
        schema = f.read()
    digest = catalogue_digest(schema, text)
    if digest not in CHECKED and digest not in checked:
        check_schema(path, json.loads(schema), data)
        CHECKED.add(digest)
    modules = {}
    for entry in data["modules"]:
        name = entry["name"]
        if name in modules or name == ALL:
            raise CatalogueError(f"{path}: module {name!r}: field 'name': used twice or reserved")
        modules[name] = Module(
            name=name, version=entry["version"], requires=tuple(entry["requires"]),
            command=tuple(entry["command"]), options=dict(entry["options"]),
            outputs=tuple(entry["outputs"]), gpu=entry.get("gpu", False),
            checks=tuple(entry.get("checks", ())),
            runner=entry.get("runner"), base_runner=data.get("runner", "inline"),
            container=data.get("container", {}), image=entry.get("image"),
            user=entry.get("user"), task_definition=entry.get("task_definition"),
            container_name=entry.get("container_name"))
    for module in modules.values():
        for req in module.requires:
            if req not in modules:
                raise CatalogueError(f"{path}: module {module.name!r}: field 'requires': "
                                     f"unknown module {req!r}")
        for key, value in [*module.options.items(), *(("outputs", o) for o in module.outputs),
                           *(("checks", c["path"]) for c in module.checks)]:
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


def module_checks(settings: Settings, module: Module, job: str, map_name: str) -> list:
    """The module's output checks (mip/checks.py), with their paths in full."""
    values = token_values(settings, job, map_name)
    return [dict(check, path=substitute(check["path"], values)) for check in module.checks]


def module_env(settings: Settings, env, openai_key: str | None) -> dict:
    """The environment a module runs with: ours without secrets, plus OPENAI_API_KEY."""
    clean = {k: v for k, v in env.items() if k not in SECRET_VARS}
    key = openai_key or settings.openai_key
    if key:
        clean["OPENAI_API_KEY"] = key
    return clean
