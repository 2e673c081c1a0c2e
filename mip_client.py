#!/usr/bin/env python3
"""mip_client: the command-line client of the mip server, in one file that needs only
Python 3.8+ and `requests` (pip install requests).

    export MIP_CLIENT_USER=mip MIP_CLIENT_PASSWORD=...
    python mip_client.py --post --url http://127.0.0.1:8080/runs --input a.json --output b.json
    python mip_client.py --get --url http://127.0.0.1:8080/runs/$RUN_ID --wait
    python mip_client.py --get --url http://127.0.0.1:8080/runs/$RUN_ID --follow
    python mip_client.py --help        # every option, with the walk-through as examples

JSON answers are pretty-printed to stdout (and written to --output); zip answers are saved
to --output or under the file name the server gives. Every POST carries an Idempotency-Key
of its own, and a request is tried again (with the same key) after a connection error, 429
or 503: a retried submission never makes a second run. Exit codes: 0 success, 1 failure (an
error answer, an unreachable server, a run that did not pass under --wait or --follow),
2 usage.
"""

import argparse
import email.message
import email.utils
import getpass
import json
import os
import re
import ssl
import sys
import tempfile
import time
import urllib.parse
import uuid
from typing import Optional
from typing import Union

try:
    import requests
except ImportError:  # the one package it needs: a copy on another machine says so plainly
    sys.exit("mip_client: error: the requests package is missing: pip install requests")

VERSION = "0.1.0"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_TIMEOUT = 60.0  # seconds, for connecting and for each read
CHUNK = 256 * 1024
POLL_FIRST = 0.5  # --wait polls after 0.5 s, then 1.5 times later each time, up to 5 s
POLL_MAX = 5.0
POLL_RETRIES = 5  # consecutive unreachable polls before --wait gives up
PROGRESS_DELAY = 0.5  # a download shows a progress line once it has taken this long
FINISHED = ("passed", "failed", "cancelled")
FOLLOW_FIRST = 0.5  # --follow polls the log after 0.5 s, then slower while it is quiet
FOLLOW_MAX = 2.0
FOLLOW_SETTLE = 1.0  # a run's last log lines may be written just after its end is recorded
FOLLOW_LAST_READS = 5  # reads after the end, until one brings nothing new
TRIES = 5  # tries of one request in all, after a connection error, 429 or 503
RETRY_FIRST = 1.0  # seconds before the second try when the server names none; doubled each time
RETRY_AFTER_MAX = 30.0  # the longest wait a Retry-After may ask for
KEY_RE = re.compile(r"[!-~]{1,255}")  # what the server takes as an Idempotency-Key


# ---------------------------------------------------------------------------- errors

class MipClientError(Exception):
    """An expected failure: one line on stderr, exit 1."""

    exit_code = EXIT_FAILED


class UsageError(MipClientError):
    """A command line that cannot work: one line on stderr, exit 2."""

    exit_code = EXIT_USAGE


class Unreachable(MipClientError):
    """No answer at all: the connection was refused, broke off or could not be made."""


class ClientError(MipClientError):
    """A non-2xx answer, with its HTTP status, the server's `error` code and `message`, and
    its Retry-After header (None without one)."""

    def __init__(self, status: int, error: str, message: str, url: str = "",
                 retry_after: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.url = url
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status} {self.error})"


# ---------------------------------------------------------------------------- command line

EPILOG = """\
credentials:
  MIP_CLIENT_USER and MIP_CLIENT_PASSWORD give the user name and password. --user NAME
  overrides the name (the password still comes from MIP_CLIENT_PASSWORD, or is asked for
  when stdin is a terminal); --user NAME:PASSWORD gives both, but other users of the
  machine can see a command line. MIP_OPENAI_KEY, when set, is added to POST payloads
  that have no "openai_key". MIP_CLIENT_URL, when set, lets --url be a path (--url /runs).

examples (a.json holds {"map": "WY_CO_Peach", "job": "alpha", "modules": ["map_crop"]}):
  export MIP_CLIENT_USER=mip MIP_CLIENT_PASSWORD='the password'
  # submit a run; its RunStatus (with run_id) is printed and written to b.json
  python mip_client.py --post --url http://127.0.0.1:8080/runs --input a.json --output b.json
  RUN_ID=$(python -c 'import json; print(json.load(open("b.json"))["run_id"])')
  # the status of the run, and of the job
  python mip_client.py --get --url http://127.0.0.1:8080/runs/$RUN_ID --output c.json
  python mip_client.py --get --url http://127.0.0.1:8080/jobs/alpha --output d.json
  # wait until the run ends (exit 0 if it passed, 1 if not)
  python mip_client.py --get --url http://127.0.0.1:8080/runs/$RUN_ID --wait
  # print the run's log as it grows, until the run ends (exit 0 if it passed, 1 if not)
  python mip_client.py --get --url http://127.0.0.1:8080/runs/$RUN_ID --follow
  # the logs, and the outputs
  python mip_client.py --get \\
      --url http://127.0.0.1:8080/modules/alpha/map_crop/logs --output d.zip
  python mip_client.py --get \\
      --url http://127.0.0.1:8080/modules/alpha/map_crop/outputs --output e.zip

daily use:
  # submit from the command line and wait for the end
  python mip_client.py --post --url http://127.0.0.1:8080/runs --wait \\
      --data '{"map": "WY_CO_Peach", "job": "beta", "modules": ["georeference"]}'
  # save a zip under the server's name (here beta_georeference_outputs.zip)
  python mip_client.py --get --url http://127.0.0.1:8080/jobs/beta/georeference/outputs
  # rerun a run (what failed runs again) and follow it; cancel one: neither needs a body
  python mip_client.py --post --url http://127.0.0.1:8080/runs/$RUN_ID/rerun --wait
  python mip_client.py --post --url http://127.0.0.1:8080/runs/$RUN_ID/cancel
  # delete a module's files (it runs again next time), a whole job, or a finished run;
  # ?s3=1 deletes the S3 copies too
  python mip_client.py --delete --url http://127.0.0.1:8080/jobs/beta/georeference
  python mip_client.py --delete --url 'http://127.0.0.1:8080/jobs/beta?s3=1'

retries: every POST carries an Idempotency-Key (a new UUID, or --idempotency-key KEY). A
request that meets a connection error, 429 or 503 is sent again with the same key, at most
--tries times in all, after the server's Retry-After (at most 30 s) or 1, 2, 4, 8 s: an
answer lost on the way never makes a second run.

exit codes: 0 success; 1 an error answer, an unreachable server, or (--wait, --follow) a
run that failed or was cancelled; 2 a usage error.
"""


class Parser(argparse.ArgumentParser):
    """argparse with the house error line (`mip_client: error: ...`, exit 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"mip_client: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mip_client.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Send one GET, POST or DELETE to the mip server and show or save the "
                    "answer.",
        epilog=EPILOG)
    method = parser.add_mutually_exclusive_group(required=True)
    method.add_argument("--get", action="store_true", help="send a GET request")
    method.add_argument("--post", action="store_true",
                        help="send a POST request, with --input or --data as its body, or "
                             "an empty one (cancel, rerun)")
    add_delete(method)
    parser.add_argument("--url", required=True,
                        help="URL of the request, e.g. http://127.0.0.1:8080/runs")
    body = parser.add_mutually_exclusive_group()
    body.add_argument("--input", metavar="FILE",
                      help="JSON file to POST (a RunPayload for /runs); - reads stdin")
    body.add_argument("--data", metavar="JSON", help="JSON text to POST, instead of --input")
    parser.add_argument("--output", metavar="FILE",
                        help="write the answer to FILE (JSON, or a zip; a zip into a folder "
                             "keeps the server's file name). Without it, JSON is only "
                             "printed and a zip is saved under the server's file name")
    parser.add_argument("--user", metavar="NAME[:PASSWORD]",
                        help="user name (default $MIP_CLIENT_USER); see 'credentials' below")
    parser.add_argument("--wait", action="store_true",
                        help="after POST /runs (or GET /runs/ID), follow the run until it ends, "
                             "showing its status changes on stderr; prints the final "
                             "RunStatus and exits 0 only if the run passed")
    parser.add_argument("--follow", action="store_true",
                        help="after POST /runs (or GET /runs/ID), print the run's log to "
                             "stdout as it grows, until the run ends; exits 0 only if the "
                             "run passed")
    parser.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                        help="with --wait or --follow: give up after SECONDS (exit 1; the "
                             "run goes on)")
    parser.add_argument("--idempotency-key", metavar="KEY",
                        help="with --post: the Idempotency-Key to send (default: a new random "
                             "one); the same KEY and body again answer the run the first "
                             "made instead of a second run")
    parser.add_argument("--tries", type=int, default=TRIES, metavar="N",
                        help="send a request at most N times, trying again after a "
                             "connection error, 429 or 503 (honouring Retry-After, at most "
                             f"{RETRY_AFTER_MAX:g} s; default {TRIES}; 1: never again)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"network timeout of each request (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--version", action="version", version=f"mip_client {VERSION}")
    return parser


def add_delete(method) -> None:
    """--delete: a job, a module's files or a run, e.g. --delete --url .../jobs/JOB?s3=1."""
    method.add_argument("--delete", action="store_true",
                        help="send a DELETE request: .../jobs/JOB, .../jobs/JOB/MODULE (its "
                             "files) or .../runs/ID; add ?s3=1 to delete the S3 copies too")


def method_flag(args: argparse.Namespace) -> str:
    return "--delete" if args.delete else "--get"


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, env) -> None:
    """Refuse what argparse cannot express; fills args.url with an absolute URL."""
    if args.idempotency_key is not None and not args.post:
        parser.error("--idempotency-key goes with --post")
    if args.idempotency_key is not None and not KEY_RE.fullmatch(args.idempotency_key):
        parser.error("--idempotency-key must be 1 to 255 printable ASCII characters without "
                     "spaces")
    if not args.post and (args.input is not None or args.data is not None):
        parser.error(f"--input and --data go with --post, not {method_flag(args)}")
    if args.tries < 1:
        parser.error("--tries must be 1 or more")
    if args.timeout <= 0:
        parser.error("--timeout must be a positive number of seconds")
    if args.wait_timeout is not None and args.wait_timeout <= 0:
        parser.error("--wait-timeout must be a positive number of seconds")
    if args.wait_timeout is not None and not (args.wait or args.follow):
        parser.error("--wait-timeout goes with --wait or --follow")
    check_follow(parser, args)
    try:
        args.url = absolute_url(args.url, env.get("MIP_CLIENT_URL"))
    except UsageError as e:
        parser.error(str(e))
    if args.follow and (args.delete or run_base(args.url, args.post) is None):
        parser.error("--follow follows a run: use it with --post --url .../runs (or "
                     ".../runs/ID/rerun) or --get --url .../runs/ID")
    if args.wait and (args.delete or run_base(args.url, args.post) is None):
        parser.error("--wait follows a run: use it with --post --url .../runs (or "
                     ".../runs/ID/rerun) or --get --url .../runs/ID")
    if args.output == "":
        parser.error("--output needs a file name")


def check_follow(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--follow prints the log to stdout: it goes without --wait and --output."""
    if args.follow and args.wait:
        parser.error("--follow and --wait go apart: --follow prints the log, --wait the "
                     "status changes")
    if args.follow and args.output is not None:
        parser.error("--follow prints the log to stdout; redirect it to keep it, instead "
                     "of --output")


def absolute_url(url: str, base: Optional[str]) -> str:
    """`url` checked; a path is joined to $MIP_CLIENT_URL. Raises UsageError."""
    if url.startswith("/"):
        if not base:
            raise UsageError(f"--url {url!r} is a path: give a full URL "
                             "(http://host:port/...) or set MIP_CLIENT_URL, e.g. "
                             "export MIP_CLIENT_URL=http://127.0.0.1:8080")
        url = base.rstrip("/") + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {shown(url)!r} is not an http(s) URL, e.g. "
                         "http://127.0.0.1:8080/runs")
    return url


def run_base(url: str, post: bool) -> Optional[str]:
    """For --wait: the URL up to the `/runs` of a run URL, or None if `url` is not one."""
    path = urllib.parse.urlsplit(url).path.rstrip("/")
    pattern = r"(.*)/runs(/[^/]+/rerun)?" if post else r"(.*)/runs/[^/]+"
    match = re.fullmatch(pattern, path)
    if match is None:
        return None
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, match.group(1) + "/runs", "", ""))


def shown(url: str) -> str:
    """`url` without any user:password in it, for messages."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def credentials(user_arg: Optional[str], env, stdin=None) -> Optional[tuple]:
    """(user, password) from --user and the environment; None when no user is given (the
    server may run without auth). Raises UsageError when a password cannot be found."""
    stdin = stdin or sys.stdin
    if user_arg is not None:
        user, sep, password = user_arg.partition(":")
        if not user:
            raise UsageError("--user needs a name: --user NAME or --user NAME:PASSWORD")
        if sep:
            return user, password
    else:
        user = env.get("MIP_CLIENT_USER")
        if not user:
            return None
    password = env.get("MIP_CLIENT_PASSWORD")
    if password is None:
        if not stdin.isatty():
            raise UsageError(f"no password for user {user!r}: set MIP_CLIENT_PASSWORD or use "
                             "--user NAME:PASSWORD")
        password = getpass.getpass(f"password for {user}: ")
    return user, password


def read_body(args: argparse.Namespace, env) -> Union[dict, list, str, None]:
    """The POST body from --input or --data, plus MIP_OPENAI_KEY when it applies.
    Raises UsageError for a missing file or invalid JSON."""
    if args.input is None and args.data is None:
        return None
    if args.data is not None:
        text, where = args.data, "--data"
    elif args.input == "-":
        text, where = sys.stdin.read(), "--input -"
    else:
        where = f"--input {args.input}"
        try:
            with open(args.input, encoding="utf-8-sig") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{where}: {getattr(e, 'strerror', None) or e}") from None
    try:
        body = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{where} is not valid JSON: {e}") from None
    return with_openai_key(body, env.get("MIP_OPENAI_KEY"))


def with_openai_key(body, key: Optional[str]):
    """`body` with "openai_key" added when `key` is set and the body is an object without one."""
    if key and isinstance(body, dict) and "openai_key" not in body:
        return dict(body, openai_key=key)
    return body


# ---------------------------------------------------------------------------- requests

def make_session(auth: Optional[tuple]) -> requests.Session:
    session = requests.Session()
    session.auth = auth
    session.headers["User-Agent"] = f"mip_client/{VERSION}"
    return session


def send(session: requests.Session, method: str, url: str, body, timeout: float,
         headers: Optional[dict] = None) -> requests.Response:
    """The streamed answer to one request (a POST without `body` sends an empty one); the
    caller closes it. Raises ClientError for a non-2xx answer, Unreachable when the server
    cannot be reached and MipClientError when it does not answer in time or its
    certificate is refused (which no later try changes)."""
    kwargs = {"timeout": timeout, "stream": True, "headers": dict(headers or {})}
    if body is not None:
        kwargs["data"] = json.dumps(body).encode()
        kwargs["headers"]["Content-Type"] = "application/json"
    try:
        resp = session.request(method, url, **kwargs)
    except requests.ConnectTimeout:
        raise Unreachable(f"cannot reach {shown(url)} within {timeout:g} s "
                          "(--timeout)") from None
    except requests.Timeout:
        raise MipClientError(f"no answer from {shown(url)} within {timeout:g} s "
                             "(--timeout)") from None
    except requests.ConnectionError as e:
        if any(isinstance(x, ssl.SSLCertVerificationError) for x, _ in wrapped(e)):
            raise MipClientError(f"the certificate of {shown(url)} is refused: {reason(e)} "
                                 "(a private CA: name its file in REQUESTS_CA_BUNDLE)") from None
        raise Unreachable(f"cannot reach {shown(url)}: {reason(e)}") from None
    except requests.RequestException as e:
        raise MipClientError(f"{method} {shown(url)} failed: {reason(e)}") from None
    if not 200 <= resp.status_code < 300:
        with resp:
            raise answer_error(resp, url)
    return resp


def send_with_retries(session: requests.Session, method: str, url: str, body,
                      timeout: float, headers: Optional[dict] = None, tries: int = TRIES,
                      sleep=time.sleep) -> requests.Response:
    """send(), tried again after a connection error, 429 or 503, at most `tries` times in
    all, each time with the same headers (so a POST keeps its Idempotency-Key) and after
    the wait the server's Retry-After asks (at most RETRY_AFTER_MAX s), else after
    RETRY_FIRST s doubled each time; a note on stderr says so. Raises what send() raises."""
    for attempt in range(1, tries + 1):
        try:
            return send(session, method, url, body, timeout, headers)
        except ClientError as e:
            if e.status not in (429, 503) or attempt == tries:
                raise
            pause = retry_pause(e.retry_after, attempt)
            why = str(e)
        except Unreachable as e:
            if attempt == tries:
                raise
            pause = retry_pause(None, attempt)
            why = str(e)
        note(f"{why}; trying again in {pause:g} s (try {attempt + 1} of {tries})")
        sleep(pause)
    raise MipClientError("no try was made (tries < 1)")


def retry_pause(retry_after: Optional[str], attempt: int) -> float:
    """Seconds to wait after try `attempt`: the Retry-After header's (seconds or an HTTP
    date), at most RETRY_AFTER_MAX, else RETRY_FIRST doubled per try before."""
    fallback = min(RETRY_FIRST * 2 ** (attempt - 1), RETRY_AFTER_MAX)
    if not retry_after:
        return fallback
    text = retry_after.strip()
    if text.isascii() and text.isdigit():
        return min(float(text), RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(text)
        return max(0.0, min(when.timestamp() - time.time(), RETRY_AFTER_MAX))
    except (TypeError, ValueError, OverflowError):
        return fallback


def wrapped(exc: BaseException):
    """(exception, depth) of `exc` and of every exception it wraps, in its args, cause,
    context or urllib3's `reason`, each once."""
    seen = set()
    todo = [(exc, 0)]
    while todo:
        e, level = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e, level
        inner = [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        inner += [x for x in (e.__cause__, e.__context__, getattr(e, "reason", None))
                  if isinstance(x, BaseException)]
        todo += [(x, level + 1) for x in inner]


def reason(exc: BaseException) -> str:
    """The innermost reason of a requests exception: the OS error (e.g. 'Connection refused')
    when there is one, else the deepest exception it wraps."""
    deepest, depth = exc, 0
    for e, level in wrapped(exc):
        if isinstance(e, OSError) and e.strerror:
            return one_line(e.strerror)
        if level > depth:
            deepest, depth = e, level
    return one_line(str(deepest) or type(deepest).__name__)


def answer_error(resp: requests.Response, url: str) -> ClientError:
    """A ClientError from an error answer: the server's JSON error shape when it has one."""
    error, message = "", ""
    try:
        data = json.loads(resp.content[:65536])
        if isinstance(data, dict):
            error = str(data.get("error") or "")
            message = str(data.get("message") or "")
    except (ValueError, requests.RequestException):
        pass
    if not message:
        try:
            text = resp.content[:300].decode("utf-8", "replace").strip()
        except requests.RequestException:
            text = ""
        message = text or resp.reason or "error"
    error = error or (resp.reason or "error").lower().replace(" ", "_")
    return ClientError(resp.status_code, error, one_line(message), url,
                       resp.headers.get("Retry-After"))


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def is_json(resp: requests.Response) -> bool:
    kind = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def is_download(resp: requests.Response) -> bool:
    """A zip or any other file the server sends as an attachment, not JSON nor text."""
    kind = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    disposition = resp.headers.get("Content-Disposition", "").lower()
    return disposition.startswith("attachment") or not (is_json(resp) or kind.startswith("text/")
                                                        or kind == "")


def disposition_name(header: Optional[str]) -> str:
    """The file name of a Content-Disposition header, reduced to a plain name in the
    current folder. Raises MipClientError when there is no usable one."""
    name = None
    if header:
        msg = email.message.Message()
        msg["Content-Disposition"] = header
        name = msg.get_filename()
    if name:
        name = name.replace("\\", "/").rsplit("/", 1)[-1]
    if not name or name.startswith(".") or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise MipClientError("the answer is a file but the server gave no usable file name "
                             "(Content-Disposition); name one with --output FILE")
    return name


# ---------------------------------------------------------------------------- output

class Progress:
    """A one-line progress display on a terminal's stderr, shown once a download has taken
    more than PROGRESS_DELAY seconds; silent when the stream is not a terminal."""

    def __init__(self, name: str, total: Optional[int], stream=None, clock=time.monotonic):
        self.name = name
        self.total = total
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = clock()
        self.last = 0.0
        self.shown = False
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False

    def update(self, done: int) -> None:
        now = self.clock()
        if not self.enabled or now - self.start < PROGRESS_DELAY or now - self.last < 0.1:
            return
        self.last = now
        self.draw(done, now)

    def draw(self, done: int, now: float) -> None:
        rate = done / max(now - self.start, 1e-6)
        if self.total:
            share = min(done / self.total, 1.0)
            bar = "#" * int(share * 24)
            line = (f"{self.name} [{bar:<24}] {share:4.0%} {size(done)} / {size(self.total)}"
                    f"  {size(rate)}/s")
        else:
            line = f"{self.name} {size(done)}  {size(rate)}/s"
        self.stream.write(f"\r{line:<79}")
        self.stream.flush()
        self.shown = True

    def finish(self, done: Optional[int] = None) -> None:
        """End the line (after a last update when `done` is given), if one was shown."""
        if self.shown:
            if done is not None:
                self.draw(done, self.clock())
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def atomic_write(path: str, chunks, progress: Optional[Progress] = None) -> int:
    """Write `chunks` to a temporary file next to `path`, then rename it to `path`: no
    partial file is left on failure. The byte count. Raises MipClientError."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=".part")
    except OSError as e:
        raise MipClientError(f"cannot write {path}: {e.strerror}") from None
    done = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                done += len(chunk)
                if progress:
                    progress.update(done)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files
        os.replace(tmp, path)
    except BaseException as e:
        if progress:
            progress.finish()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise MipClientError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    if progress:
        progress.finish(done)
    return done


def body_chunks(resp: requests.Response, url: str):
    """The answer's bytes as they arrive. Raises MipClientError when the download breaks."""
    try:
        yield from resp.iter_content(CHUNK)
    except requests.RequestException as e:
        raise MipClientError(f"the download from {shown(url)} broke off: {reason(e)}") from None


def save_download(resp: requests.Response, url: str, output: Optional[str]) -> None:
    """Save a file answer to `output` (a file, or a folder to keep the server's name), or
    under the server's name in the current folder; says where and how big on stderr."""
    if output == "-":
        for chunk in body_chunks(resp, url):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    if output is None or os.path.isdir(output):
        name = disposition_name(resp.headers.get("Content-Disposition"))
        path = os.path.join(output, name) if output else name
    else:
        path = output
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    progress = Progress(os.path.basename(path), total)
    done = atomic_write(path, body_chunks(resp, url), progress)
    if total is not None and done != total:
        print(f"mip_client: warning: {path}: got {done} of {total} bytes", file=sys.stderr)
    print(f"wrote {path} ({done:,} bytes)", file=sys.stderr)


def show_json(data, output: Optional[str]) -> None:
    """Pretty-print `data` to stdout, and write the same text to `output` when given."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    if output and output != "-":
        atomic_write(output, [text.encode()])


def show_answer(resp: requests.Response, url: str, output: Optional[str]):
    """Show or save a 2xx answer; the decoded JSON, or None for other answers."""
    if is_download(resp):
        save_download(resp, url, output)
        return None
    raw = b"".join(body_chunks(resp, url))
    if is_json(resp):
        try:
            data = json.loads(raw) if raw.strip() else None
        except ValueError:
            data = None
        else:
            show_json(data, output)
            return data
    sys.stdout.buffer.write(raw)
    sys.stdout.buffer.flush()
    if output and output != "-":
        atomic_write(output, [raw])
    return None


# ---------------------------------------------------------------------------- --wait

def wait_for_run(session: requests.Session, status_url: str, first: dict, timeout: float,
                 wait_timeout: Optional[float], sleep=time.sleep) -> dict:
    """Poll a run until it ends, printing its status changes (and its modules') on stderr;
    its last RunStatus. Raises MipClientError when it cannot be followed."""
    run_id = first.get("run_id", "?")
    started = time.monotonic()
    status = first
    seen = {}
    interval = POLL_FIRST
    failures = 0
    report_changes(run_id, status, seen)
    while status.get("status") not in FINISHED:
        pause = interval
        if wait_timeout is not None:
            left = wait_timeout - (time.monotonic() - started)
            if left <= 0:
                raise MipClientError(f"run {run_id} still {status.get('status')} after "
                                     f"{wait_timeout:g} s (--wait-timeout); it goes on on the "
                                     "server")
            pause = min(pause, left)
        sleep(pause)
        interval = min(interval * 1.5, POLL_MAX)
        try:
            with send(session, "GET", status_url, None, timeout) as resp:
                data = resp.json()
        except ClientError:
            raise
        except (MipClientError, ValueError) as e:
            failures += 1
            if failures >= POLL_RETRIES:
                raise
            note(f"{e}; trying again")
            continue
        failures = 0
        if isinstance(data, dict) and "status" in data:
            status = data
            report_changes(run_id, status, seen)
    return status


def report_changes(run_id: str, status: dict, seen: dict) -> None:
    """One stderr line per change of the run's status or of one of its modules'."""
    modules = status.get("module_status") or {}
    for name, state in modules.items():
        if seen.get(("module", name)) != state:
            seen[("module", name)] = state
            note(f"  {name}: {state}")
    if seen.get("run") != status.get("status"):
        seen["run"] = status.get("status")
        note(f"run {run_id}: {status.get('status')}")


def show_resources(data) -> None:
    """Under a ModuleStatus, one stderr line of what the module used (its `resources`)."""
    if not isinstance(data, dict) or not isinstance(data.get("resources"), dict):
        return
    used = data["resources"]

    def known(key, unit, scale=1.0, digits=1):
        value = used.get(key)
        return "?" if not isinstance(value, (int, float)) else f"{value / scale:.{digits}f}{unit}"

    gpu = used.get("gpu_device")
    note(f"{data.get('module')} {data.get('status')}: CPU {known('cpu_seconds', ' s')}, "
         f"peak memory {known('peak_rss_bytes', ' MB', 1e6, 0)}, "
         + (f"GPU {gpu} (waited {known('waited_for_gpu_seconds', ' s')}, peak "
            f"{known('gpu_memory_peak_bytes', ' MB', 1e6, 0)}, "
            f"mean use {known('gpu_util_mean', '%')})" if gpu is not None else "no GPU"))


def note(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- --follow

def follow_run(session: requests.Session, status_url: str, first: dict, timeout: float,
               wait_timeout: Optional[float], out=None, sleep=time.sleep) -> dict:
    """Write the run's log to `out` (stdout's bytes) as it grows, reading it from where the
    last read ended (?offset=, X-Log-Offset), until the run ends and its log is read to the
    end; its last RunStatus. Raises MipClientError when it cannot be followed."""
    out = out or sys.stdout.buffer
    run_id = first.get("run_id", "?")
    started = time.monotonic()
    status, offset = first, 0
    interval = FOLLOW_FIRST

    def again(call, *args):
        """call(*args), tried again after a pause when the server cannot be reached for a while;
        an error answer (ClientError) is final."""
        for tries in range(1, POLL_RETRIES + 1):
            try:
                return call(*args)
            except ClientError:
                raise
            except (MipClientError, ValueError) as e:
                if tries == POLL_RETRIES:
                    raise
                note(f"{e}; trying again")
                sleep(interval)

    note(f"run {run_id}: {status.get('status')}; its log follows")
    while status.get("status") not in FINISHED:
        if wait_timeout is not None and time.monotonic() - started >= wait_timeout:
            raise MipClientError(f"run {run_id} still {status.get('status')} after "
                                 f"{wait_timeout:g} s (--wait-timeout); it goes on on the "
                                 "server")
        offset, got = again(read_log, session, status_url, offset, timeout, out)
        interval = FOLLOW_FIRST if got else min(interval * 1.5, FOLLOW_MAX)
        sleep(interval)
        data = again(get_json, session, status_url, timeout)
        if isinstance(data, dict) and "status" in data:
            status = data
    sleep(FOLLOW_SETTLE)
    for _ in range(FOLLOW_LAST_READS):
        offset, got = again(read_log, session, status_url, offset, timeout, out)
        if not got:
            break
    return status


def get_json(session: requests.Session, url: str, timeout: float):
    """The decoded JSON answer of a GET. Raises ValueError when it is not JSON."""
    with send(session, "GET", url, None, timeout) as resp:
        return resp.json()


def read_log(session: requests.Session, status_url: str, offset: int, timeout: float,
             out) -> tuple:
    """Write the run's log from `offset` to `out`; (the next offset, bytes written)."""
    with send(session, "GET", f"{status_url}/log?offset={offset}", None, timeout) as resp:
        data = b"".join(body_chunks(resp, status_url))
        header = resp.headers.get("X-Log-Offset", "")
    if not header.isdigit():
        raise MipClientError(f"{shown(status_url)}/log gave no X-Log-Offset: the server is "
                             "too old for --follow")
    following = int(header)
    if following < offset:
        # a log only shrinks when it is deleted; what comes now is a new one
        note("the run's log was replaced; reading it from the start")
        return 0, 0
    out.write(data)
    out.flush()
    return following, len(data)


# ---------------------------------------------------------------------------- main

def run(args: argparse.Namespace, env) -> int:
    """Send the request, show the answer, and follow the run with --wait or --follow; an
    exit code.
    Raises MipClientError."""
    auth = credentials(args.user, env)
    body = read_body(args, env)
    method = "POST" if args.post else "DELETE" if args.delete else "GET"
    headers = {}
    if args.post:
        headers["Idempotency-Key"] = args.idempotency_key or str(uuid.uuid4())
    with make_session(auth) as session:
        with send_with_retries(session, method, args.url, body, args.timeout, headers,
                               args.tries) as resp:
            if not (args.wait or args.follow):
                data = show_answer(resp, args.url, args.output)
                show_resources(data)
                show_warnings(data)
                return EXIT_OK
            try:
                first = resp.json()
            except ValueError:
                first = None
        option = "--follow" if args.follow else "--wait"
        if not isinstance(first, dict) or not first.get("run_id") or "status" not in first:
            raise MipClientError(f"{option}: the answer of {shown(args.url)} is not a "
                                 "RunStatus")
        status_url = f"{run_base(args.url, args.post)}/{urllib.parse.quote(first['run_id'])}"
        return watch_run(session, status_url, first, args)


def watch_run(session: requests.Session, status_url: str, first: dict,
              args: argparse.Namespace) -> int:
    """--wait (the final RunStatus to stdout) or --follow (the log to stdout, the end on
    stderr), until the run ends; an exit code."""
    verb, watch = ("following", follow_run) if args.follow else ("waiting", wait_for_run)
    try:
        final = watch(session, status_url, first, args.timeout, args.wait_timeout)
    except KeyboardInterrupt:
        print(f"\nmip_client: stopped {verb}; run {first['run_id']} goes on on the server",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.follow:
        show_json(final, args.output)
    if final.get("status") == "passed" and warnings_of(final):
        note(ended(final))
    elif args.follow:
        note(f"run {final.get('run_id')}: {final.get('status')}")
    if final.get("status") != "passed":
        hint = "" if args.follow else f"; its log: GET {status_url}/log"
        why = "; ".join(failure_reasons(session, status_url, final, args.timeout))
        print(f"mip_client: error: run {final.get('run_id')} {final.get('status')}"
              f"{f' ({why})' if why else ''}{hint}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def warnings_of(data) -> list:
    """The `warnings` of a RunStatus, JobStatus or ModuleStatus ([] from an older server)."""
    found = data.get("warnings") if isinstance(data, dict) else None
    return [w for w in found if isinstance(w, str)] if isinstance(found, list) else []


def ended(final: dict) -> str:
    """`run X passed with 1 warning: ...`: one warning on the line, several each on a line
    of their own below it."""
    found = warnings_of(final)
    head = (f"run {final.get('run_id')} {final.get('status')} with {len(found)} "
            f"warning{'' if len(found) == 1 else 's'}:")
    if len(found) == 1:
        return f"{head} {found[0]}"
    return head + "".join(f"\n  - {w}" for w in found)


def show_warnings(data) -> None:
    """Under a status answer, on stderr: what it warns of, one line each."""
    for w in warnings_of(data):
        note(f"warning: {w}")


def failure_reasons(session: requests.Session, status_url: str, final: dict,
                    timeout: float) -> list:
    """`module X failed: <why>` for each failed module of a run, from its ModuleStatus; the
    reason is what the module itself logged, so the user need not open its log to know."""
    job = (final.get("payload") or {}).get("job")
    failed = [m for m, s in (final.get("module_status") or {}).items() if s == "failed"]
    base = status_url.rsplit("/runs/", 1)[0]
    lines = []
    for module in failed if job else []:
        url = f"{base}/modules/{urllib.parse.quote(job)}/{urllib.parse.quote(module)}"
        try:
            message = get_json(session, url, timeout).get("message")
        except (MipClientError, requests.RequestException, ValueError, AttributeError):
            message = None
        lines.append(f"module {module} failed: {message or 'no reason recorded'}")
    return lines


def main(argv=None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        check_args(parser, args, os.environ)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return run(args, os.environ)
    except MipClientError as e:
        print(f"mip_client: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nmip_client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
