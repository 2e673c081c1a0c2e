"""untrusted: what arrives from outside, made harmless before the server acts on it or logs it.

Not run directly. The server reads JSON bodies with `parse_json`, checks paths with
`decoded_path`, and the server and mipper log through `OneLineFormatter`; `escape` is for
text written to a log by other means (the request log line).
Never imports the server or mipper.
"""

import json
import logging
import re
from datetime import UTC
from datetime import datetime

MAX_JSON_DEPTH = 64  # a RunPayload is 3 levels deep, a CDR event 4
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class TooDeep(ValueError):
    """A JSON body nested deeper than MAX_JSON_DEPTH."""


def escape(text: str) -> str:
    """`text` with control characters (C0, DEL, C1, Unicode line breaks) as `\\xNN` or
    `\\uNNNN`, so that it can never start a new log line."""
    return CONTROL.sub(_escaped, text)


def _escaped(match) -> str:
    char = ord(match.group())
    return f"\\x{char:02x}" if char < 0x100 else f"\\u{char:04x}"


class OneLineFormatter(logging.Formatter):
    """One record, one line: the message (values from requests included) is escaped, and a
    traceback follows on indented lines, so no text can pass for a record of its own.
    Stamped in ISO 8601 UTC with a Z, as the journal's times and the modules' logs are."""

    def formatTime(self, record, datefmt=None) -> str:
        then = datetime.fromtimestamp(record.created, UTC)
        return then.strftime("%Y-%m-%dT%H:%M:%S.") + f"{then.microsecond // 1000:03d}Z"

    def formatMessage(self, record) -> str:
        return escape(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info) -> str:
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    return "\n".join("    " + escape(line) for line in text.splitlines())


def parse_json(raw: bytes):
    """The body as JSON. Raises TooDeep past MAX_JSON_DEPTH levels (deeper values would
    exhaust the stack wherever they are walked: the parser, the schema check, json.dumps),
    and ValueError for a body that is not UTF-8 JSON."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise TooDeep(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if depth(data) > MAX_JSON_DEPTH:
        raise TooDeep(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def depth(data) -> int:
    """How deep lists and objects nest in a parsed JSON value (a scalar is 0), without
    recursion; stops counting past MAX_JSON_DEPTH."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, level)
        if level > MAX_JSON_DEPTH:
            break
        stack.extend((v, level + 1) for v in value)
    return deepest


def decoded_path(raw_path: str) -> str:
    """The request path as the client meant it. A WSGI server hands the path over as
    latin-1 text of its bytes; bottle then decodes it as UTF-8 with errors ignored, so
    `/runs/%FF%FE` would become `/runs/` and be served as `/runs`. Raises ValueError for
    a path that is not UTF-8."""
    try:
        return raw_path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise ValueError("the path is not UTF-8 text") from None
