"""A stand-in CDR for tests: the real protocol (docs/cdr.md) on a free loopback port.

    with StandInCdr("token") as cdr:
        cdr.add_cog("abc", b"...")
        client = CdrClient(cdr.url, "token")

It checks the Bearer token, keeps registrations, serves cogs (optionally breaking a
download halfway), checks published results against the CDR's own schemas (schema/cdr/, with
jsonschema, not through cdr.py) and answers 422 as the CDR does, records every call and
every result it accepts, fails calls on demand, and delivers signed events to the latest
registration's callback. It signs with its own HMAC code, not cdr.py's.

Missed events: every event it delivers (or, with miss(), fails to deliver because mip is
down) becomes a notification of the registration's name and version, listed by
`GET /user/me/notifications/{name}?version=V` and delivered again by
`PUT /user/me/resend/notification/{id}` to the latest registration of that name. No public
source shows the real CDR's items beyond `id` and `event{event, created_date}`, so the
stand-in serves one of two shapes, named by `notification_ids` and in `shape`:
  "event": an item's `id` is the delivered event's `id`;
  "own":   an item's `id` is the notification's own, unrelated to the event's.
In both, `event` is {event, created_date} without the payload, and created_date is naive
ISO 8601 UTC (as a pydantic datetime without a zone is written).
"""

import email.parser
import email.policy
import functools
import hashlib
import hmac
import http.server
import json
import os
import re
import threading
import urllib.parse
import uuid
from datetime import UTC
from datetime import datetime

import jsonschema
import requests

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "schema", "cdr")


# ---------------------------------------------------------------------------- checks

@functools.cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator of the CDR's own schema `name` (schema/cdr/<name>.json)."""
    with open(os.path.join(SCHEMA_DIR, f"{name}.json"), encoding="utf-8") as f:
        return jsonschema.Draft202012Validator(json.load(f))


def schema_errors(name: str, payload) -> list:
    """FastAPI-style 422 details of what in payload fails the CDR's schema, the missing
    field named in `loc` as the CDR's pydantic models name it; [] if it passes."""
    details = []
    for error in validator(name).iter_errors(payload):
        # as pydantic does, name the innermost failure, not "none of anyOf matched"
        error = jsonschema.exceptions.best_match([error])
        loc = ["body", *error.absolute_path]
        if error.validator == "required" and isinstance(error.instance, dict):
            loc += [f for f in error.validator_value if f not in error.instance][:1]
        details.append({"type": error.validator, "loc": loc, "msg": error.message[:200]})
    return details


def missing(payload, fields) -> list:
    """422 details for the fields absent from a registration body."""
    if not isinstance(payload, dict):
        return [{"type": "type", "loc": ["body"], "msg": "not an object"}]
    return [{"type": "required", "loc": ["body", f], "msg": "field required"}
            for f in fields if payload.get(f) is None]


def unsent_files(results, file_names: list) -> list:
    """422 details for projections whose file was not sent along."""
    details = []
    for n, result in enumerate(results.get("georeference_results") or []):
        for k, projection in enumerate(result.get("projections") or []):
            if projection["file_name"] not in file_names:
                details.append({"type": "file", "msg": "no file part of that name",
                                "loc": ["body", "georeference_results", n, "projections", k,
                                        "file_name"]})
    return details


def parse_multipart(content_type: str, body: bytes) -> tuple:
    """({field: text}, [(file name, bytes)]) of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields, files = {}, []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files.append((name, part.get_filename(), data))
        else:
            fields[name] = data.decode("utf-8")
    return fields, files


# ---------------------------------------------------------------------------- server

class StandInCdr:
    """A CDR on 127.0.0.1 (port 0) in a background thread; see the module docstring.

    `secret_check`, if given, is called with each registration's webhook_secret and a
    registration whose secret it refuses (returns False) gets 400."""

    SHAPES = ("event", "own")

    def __init__(self, token: str, secret_check=None, notification_ids: str = "event"):
        if notification_ids not in self.SHAPES:
            raise ValueError(f"notification_ids: expected one of {self.SHAPES}")
        self.token = token
        self.secret_check = secret_check
        self.shape = notification_ids
        self.lock = threading.Lock()
        self.registrations = {}
        self.last_registration = None  # kept after it is removed: a missed event's owner
        self.notifications = []  # {id, event {event, created_date}, name, version, body}
        self.resent = []  # notification ids resent on request
        self.cogs = {}
        self.broken = set()
        self.release = threading.Event()  # cleared: downloads wait (30 s at most)
        self.release.set()
        self.failures = {}
        self.published = []
        self.refused = []  # (kind, 422 details) of every result refused
        self.requests = []
        self.server = None
        self.thread = None
        self.url = None

    def start(self) -> "StandInCdr":
        handler = type("Handler", (_Handler,), {"cdr": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 5) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout)
            self.server = None

    def __enter__(self) -> "StandInCdr":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_cog(self, cog_id: str, data: bytes) -> None:
        """Serve data as the image of cog_id."""
        with self.lock:
            self.cogs[cog_id] = data

    def break_download(self, cog_id: str) -> None:
        """Downloads of cog_id announce the whole size, then stop halfway."""
        with self.lock:
            self.broken.add(cog_id)

    def fail_next(self, path: str, times: int, status: int = 500) -> None:
        """The next `times` calls of path (any method) answer `status`."""
        with self.lock:
            self.failures[path] = [times, status]

    def latest_registration(self) -> dict:
        with self.lock:
            if not self.registrations:
                raise LookupError("no registration to deliver to")
            return list(self.registrations.values())[-1]

    def miss(self, event: str, payload, event_id=None) -> dict:
        """An event meant for the latest (or last removed) registration that never reached
        it: only its notification is kept, as when mip was down. The notification."""
        with self.lock:
            registration = self.last_registration
        if registration is None:
            raise LookupError("no registration ever made")
        body = json.dumps({"id": event_id or uuid.uuid4().hex, "event": event,
                           "payload": payload}).encode("utf-8")
        return self.notify(registration, body)

    def notify(self, registration: dict, body: bytes) -> dict:
        """Keep a notification of a delivery of `body` to `registration`."""
        event = json.loads(body)
        created = datetime.now(UTC).replace(tzinfo=None).isoformat()
        notification = {"id": event["id"] if self.shape == "event" else uuid.uuid4().hex,
                        "event": {"event": event["event"], "created_date": created},
                        "name": registration["name"], "version": registration["version"],
                        "body": body}
        with self.lock:
            self.notifications.append(notification)
        return notification

    def list_notifications(self, name: str, version: str | None) -> list:
        with self.lock:
            return [{"id": n["id"], "event": n["event"]} for n in self.notifications
                    if n["name"] == name and version in (None, n["version"])]

    def resend(self, notification_id: str) -> bool:
        """Deliver a notification's event again, signed, to the latest registration of its
        name, in the background; False if there is no such notification."""
        with self.lock:
            found = [n for n in self.notifications if n["id"] == notification_id]
            targets = [r for r in self.registrations.values()
                       if found and r["name"] == found[-1]["name"]]
            self.resent.append(notification_id)
        if not found or not targets:
            return False
        threading.Thread(target=self.post, args=(targets[-1], found[-1]["body"]),
                         daemon=True).start()
        return True

    def post(self, registration: dict, body: bytes) -> None:
        try:
            self.send(registration, body, None, None, None)
        except requests.RequestException:
            pass  # no source shows the CDR retrying a failed delivery

    def deliver(self, event: str, payload, event_id=None, secret=None, signature=None,
                content_type=None) -> requests.Response:
        """POST {id, event, payload} to the latest registration's callback_url, signed with
        its webhook_secret (or `secret`) unless `signature` is given ("" omits it).
        content_type None sends application/json; "" sends none. Kept as a notification."""
        registration = self.latest_registration()
        body = json.dumps({"id": event_id or uuid.uuid4().hex, "event": event,
                           "payload": payload}).encode("utf-8")
        self.notify(registration, body)
        return self.send(registration, body, secret, signature, content_type)

    def send(self, registration: dict, body: bytes, secret, signature,
             content_type) -> requests.Response:
        if signature is None:
            key = (secret if secret is not None else registration["webhook_secret"])
            signature = hmac.new(key.encode("utf-8"), body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json" if content_type is None
                   else content_type}
        if signature:
            headers["x-cdr-signature-256"] = signature
        if registration.get("auth_header"):
            headers[registration["auth_header"]] = registration.get("auth_token", "")
        # a Content-Type of "" is dropped, as the past CDR bug sent none
        headers = {k: v for k, v in headers.items() if v != ""}
        return requests.post(registration["callback_url"], data=body, headers=headers,
                             timeout=10)

    # -- what the handler calls, under the lock

    def take_failure(self, path: str) -> int | None:
        with self.lock:
            failure = self.failures.get(path)
            if not failure or failure[0] <= 0:
                return None
            failure[0] -= 1
            return failure[1]

    def register(self, body) -> tuple:
        problems = missing(body, ("name", "version", "callback_url", "webhook_secret"))
        if problems:
            return 422, {"detail": problems}
        if self.secret_check is not None and not self.secret_check(body["webhook_secret"]):
            return 400, {"detail": "webhook_secret refused"}
        with self.lock:
            for known in self.registrations.values():
                if (known["name"], known["version"]) == (body["name"], body["version"]):
                    return 409, {"detail": "already registered"}
            registration_id = uuid.uuid4().hex
            self.registrations[registration_id] = {**body, "id": registration_id}
            self.last_registration = self.registrations[registration_id]
        return 200, {"id": registration_id}

    def publish(self, kind: str, payload: dict, file_names: list) -> dict:
        with self.lock:
            self.published.append((kind, payload, file_names))
        return {"id": f"{payload['system']}_{payload['system_version']}_{payload['cog_id']}",
                "job_id": uuid.uuid4().hex}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes of the stand-in; `cdr` is set on a subclass per StandInCdr."""

    cdr: StandInCdr

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.handle_call("GET")

    def do_POST(self) -> None:
        self.handle_call("POST")

    def do_DELETE(self) -> None:
        self.handle_call("DELETE")

    def do_PUT(self) -> None:
        self.handle_call("PUT")

    def handle_call(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        self.query = urllib.parse.parse_qs(query)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.cdr.lock:
            self.cdr.requests.append((method, path))
        status = self.cdr.take_failure(path)
        if status is not None:
            return self.answer(status, {"detail": "injected failure"})
        if path.startswith(("/v1/", "/user/")) and not self.authorised():
            return self.answer(401, {"detail": "Not authenticated"})
        status, answer = self.route(method, path, body)
        self.answer(status, answer)

    def authorised(self) -> bool:
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.cdr.token}".encode())

    def route(self, method: str, path: str, body: bytes) -> tuple:
        cdr = self.cdr
        cog = re.fullmatch(r"/cogs/([^/]+)\.cog\.tif", path)
        if method == "GET" and cog:
            return self.send_cog(cog.group(1))
        if (method, path) == ("GET", "/v1/health/check"):
            return 204, None
        if (method, path) == ("GET", "/user/me/registrations"):
            with cdr.lock:
                return 200, [{k: v for k, v in r.items() if k != "webhook_secret"}
                             for r in cdr.registrations.values()]
        if (method, path) == ("POST", "/user/me/register"):
            return cdr.register(parse_json(body))
        registration = re.fullmatch(r"/user/me/register/([^/]+)", path)
        if method == "DELETE" and registration:
            with cdr.lock:
                found = cdr.registrations.pop(registration.group(1), None)
            return (200, {}) if found else (404, {"detail": "no such registration"})
        notifications = re.fullmatch(r"/user/me/notifications/([^/]+)", path)
        if method == "GET" and notifications:
            version = (self.query.get("version") or [None])[0]
            return 200, cdr.list_notifications(notifications.group(1), version)
        resend = re.fullmatch(r"/user/me/resend/notification/([^/]+)", path)
        if method == "PUT" and resend:
            if not cdr.resend(resend.group(1)):
                return 404, {"detail": "no such notification"}
            return 200, {}
        meta = re.fullmatch(r"/v1/maps/cog/([^/]+)", path)
        if method == "GET" and meta:
            cog_id = meta.group(1)
            if cog_id not in cdr.cogs:
                return 404, {"detail": "cog not found"}
            return 200, {"cog_id": cog_id, "cog_url": f"{cdr.url}/cogs/{cog_id}.cog.tif"}
        if (method, path) == ("POST", "/v1/maps/publish/features"):
            results = parse_json(body)
            return self.accept("features", results, schema_errors("FeatureResults", results),
                               [])
        if (method, path) == ("POST", "/v1/maps/publish/georef"):
            return self.accept_georef(body)
        return 404, {"detail": "Not Found"}

    def accept(self, kind: str, results, problems: list, file_names: list) -> tuple:
        if problems:
            with self.cdr.lock:
                self.cdr.refused.append((kind, problems))
            return 422, {"detail": problems}
        return 200, self.cdr.publish(kind, results, file_names)

    def accept_georef(self, body: bytes) -> tuple:
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            return 422, {"detail": "expected multipart/form-data"}
        fields, files = parse_multipart(content_type, body)
        if "georef_result" not in fields:
            return 422, {"detail": [{"loc": ["body", "georef_result"],
                                     "msg": "field required"}]}
        if any(name != "files" for name, _, _ in files):
            return 422, {"detail": "file parts must be named files"}
        results = parse_json(fields["georef_result"].encode("utf-8"))
        names = [file_name for _, file_name, _ in files]
        problems = schema_errors("GeoreferenceResults", results)
        return self.accept("georef", results, problems or unsent_files(results, names), names)

    def send_cog(self, cog_id: str) -> tuple:
        self.cdr.release.wait(30)
        with self.cdr.lock:
            data = self.cdr.cogs.get(cog_id)
            broken = cog_id in self.cdr.broken
        if data is None:
            return 404, {"detail": "no such cog"}
        self.send_response(200)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        # a broken download: half the announced bytes, then the connection closes
        self.wfile.write(data[:len(data) // 2] if broken else data)
        self.close_connection = True
        return None, None

    def answer(self, status: int | None, answer) -> None:
        if status is None:
            return
        self.send_response(status)
        if status == 204:
            self.end_headers()
            return
        data = json.dumps(answer).encode("utf-8")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def parse_json(body: bytes):
    """The body as JSON, or None (which fails the schema checks)."""
    try:
        return json.loads(body)
    except ValueError:
        return None
