"""switches: the rule every extra switch obeys before it may reach a module's command line.

Not run directly. mipper (its `--extra-switch`, and every run the server starts) and the
server (POST /runs and rerun, before anything is recorded) both call `check()`.

Extra switches come after the catalogue's, and a module's argument parser keeps the last
value it reads, so without this rule any API user could point a module's own path switches
anywhere the server's user can write. The rule:
- a switch (`--name` or `-name`, split from `=value` first) may not be one the catalogue
  sets for that module, nor a prefix of one: argparse takes `--out` for `--output_path`;
- a value that is a path (absolute, or with a `..` part; alone or after `=`) must resolve,
  symlinks followed, inside the job's own output or temp folder; the input and repo folders
  stay read-only to extra switches;
- no control characters (they would forge lines in the module's log, and NUL cannot
  reach a command line at all).
This file never imports mipper or the server: they pass it plain strings.
"""

import os
import re

from mip.errors import Invalid
from mip.sanitize import CONTROL

SWITCH = re.compile(r"-+[A-Za-z_]")


class Refused(Invalid):
    """An extra switch breaks the rule; `code` says which part (the API's error code)."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code)


def check(module: str, args, taken, roots, base: str | None, view=()) -> None:
    """Check one module's extra switches. `taken`: the switch names the catalogue sets for
    it (without dashes); `roots`: the host folders a path may resolve inside; `base`: the
    folder a relative path is taken from (None: a relative path with `..` is refused);
    `view`: (path the module sees, host path) pairs, for a module in a container.
    Raises Refused."""
    taken = {_norm(name) for name in taken}
    for arg in args:
        if CONTROL.search(arg):
            raise Refused("switch_not_allowed", f"extra_switches.{module}: {arg!r} holds a "
                                                "control character")
        value = arg
        if SWITCH.match(arg):
            name, _, value = arg.partition("=")
            norm = _norm(name.lstrip("-"))
            clash = sorted(t for t in taken if t.startswith(norm))
            if clash:
                raise Refused("switch_not_allowed",
                              f"extra_switches.{module}: {name} is not allowed: the catalogue "
                              f"sets --{clash[0]} for {module}, and a module takes a prefix "
                              "of a switch for the switch itself")
        for candidate in {value, value.partition("=")[2]}:
            if _is_path(candidate):
                _check_path(module, candidate, roots, base, view)


def _norm(name: str) -> str:
    # many parsers take --output-path and --output_path alike
    return name.replace("-", "_")


def _is_path(value: str) -> bool:
    return os.path.isabs(value) or ".." in value.replace("\\", "/").split("/")


def _check_path(module: str, value: str, roots, base, view) -> None:
    host = _host_path(value, base, view)
    real = os.path.realpath(host) if host is not None else None
    for root in roots:
        root = os.path.realpath(root)
        if real is not None and (real == root or real.startswith(root + os.sep)):
            return
    raise Refused("path_not_allowed",
                  f"extra_switches.{module}: {value!r} is outside the job's own output and "
                  "temp folders, the only places an extra switch may name")


def _host_path(value: str, base: str | None, view) -> str | None:
    """The host path a module's path argument stands for; None if it has none."""
    if not os.path.isabs(value):
        return os.path.join(base, value) if base is not None else None
    if not view:
        return value
    for seen, host in view:
        seen = seen.rstrip("/")
        if value == seen or value.startswith(seen + "/"):
            return host + value[len(seen):]
    return None
