"""The CDR link: calls to the CDR, webhook signatures, and our outputs in the CDR's schemas.

A library, not a program: the server imports it.

    client = cdr.CdrClient("https://api.cdr.land", token)
    results = cdr.feature_results(settings, job, map_name, cog_id, "mip", "0.1.0")
    cdr.validate("FeatureResults", results)
    client.publish_features(results)

The protocol is described in docs/cdr.md. Every payload is checked against the
CDR's own schemas (schema/cdr/*.json, exported from cdr_schemas 0.4.18) before it is sent,
and so is every delivery. Sections: errors, client, signatures, results, validation, and the
server's link (registration, deliveries, publishing passed runs).
"""

import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import tempfile
import threading
import time
from datetime import UTC
from datetime import datetime

import jsonschema
import requests

from mip import maps
from mip.catalogue import check_name
from mip.catalogue import load_catalogue
from mip.errors import Busy
from mip.errors import DiskFull
from mip.errors import MipError
from mip.errors import UsageError
from mip.maps import map_file
from mip.settings import SCHEMA_DIR
from mip.settings import CdrSettings
from mip.settings import Settings

CDR_SCHEMA_DIR = os.path.join(SCHEMA_DIR, "cdr")
MAX_MAP_BYTES = 5 * 1024**3
# CDR integrations refuse larger uploads before sending: the CDR capped them near 300 MB
MAX_UPLOAD_BYTES = 300 * 1024**2
CHUNK = 1024 * 1024
BODY_CHARS = 500
DEFAULT_MODEL_VERSION = "0.1.0"

log = logging.getLogger("mip.cdr")


# ---------------------------------------------------------------------------- errors

class CdrError(Exception):
    """A CDR call or payload failed: `status` is the HTTP status (None when no answer came)
    and `body` the CDR's answer text, truncated; `retry` says whether trying again may help."""

    def __init__(self, message: str, status: int | None = None, body: str = "",
                 retry: bool = False):
        super().__init__(message)
        self.status = status
        self.body = body[:BODY_CHARS]
        self.retry = retry


class Skipped(CdrError):
    """A result not published on purpose (estimated GCPs): the message says why."""


# ---------------------------------------------------------------------------- client

class CdrClient:
    """Calls to one CDR with a Bearer token, through one requests.Session."""

    def __init__(self, base_url: str, token: str, timeout: float = 30, retries: int = 4,
                 backoff: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = requests.Session()
        # per call, not on the session: download() must not send the token elsewhere
        self._auth = {"Authorization": f"Bearer {token}"}

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "CdrClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def url(self, path: str) -> str:
        """The base URL and path joined by exactly one '/'."""
        return f"{self.base_url}/{path.lstrip('/')}"

    def health(self) -> bool:
        """True if the CDR answers its health check; one attempt, False on any failure."""
        try:
            response = self._send("GET", self.url("/v1/health/check"), headers=self._auth)
        except CdrError as e:
            log.warning("CDR health check failed: %s", e)
            return False
        return response.status_code in (200, 204)

    def registrations(self) -> list:
        """Our registrations (dicts with id, name, ...); raises CdrError."""
        answer = _json(self._call("GET", "/user/me/registrations"))
        if not isinstance(answer, list):
            raise CdrError("GET /user/me/registrations: expected a JSON list", body=str(answer))
        return answer

    def register(self, name: str, version: str, callback_url: str, secret: str,
                 events=("ping", "map.process"), auth_header: str = "",
                 auth_token: str = "") -> str:
        """Register for deliveries to callback_url; returns the registration id.
        Raises CdrError (409 or 400 when this name and version are already registered)."""
        body = {"name": name, "version": version, "callback_url": callback_url,
                "webhook_secret": secret, "auth_header": auth_header,
                "auth_token": auth_token, "events": list(events)}
        answer = _json(self._call("POST", "/user/me/register", json=body))
        if not isinstance(answer, dict) or not answer.get("id"):
            raise CdrError("POST /user/me/register: no id in the answer", body=str(answer))
        return str(answer["id"])

    def unregister(self, registration_id: str) -> None:
        """Remove a registration; raises CdrError (404 if unknown)."""
        self._call("DELETE", f"/user/me/register/{registration_id}")

    def notifications(self, system: str, version: str) -> list:
        """The CDR's past deliveries to this system and version (dicts with `id` and
        `event` {event, created_date}); raises CdrError."""
        answer = _json(self._call("GET", f"/user/me/notifications/{system}",
                                  params={"version": version}))
        if not isinstance(answer, list):
            raise CdrError(f"GET /user/me/notifications/{system}: expected a JSON list",
                           body=str(answer))
        return answer

    def resend(self, notification_id: str) -> None:
        """Ask the CDR to deliver a past notification again; raises CdrError."""
        self._call("PUT", f"/user/me/resend/notification/{notification_id}")

    def cog_url(self, cog_id: str) -> str:
        """The public URL of a cog's image; raises CdrError (404 if the cog is unknown)."""
        answer = _json(self._call("GET", f"/v1/maps/cog/{cog_id}"))
        if not isinstance(answer, dict) or not answer.get("cog_url"):
            raise CdrError(f"GET /v1/maps/cog/{cog_id}: no cog_url", body=str(answer))
        return answer["cog_url"]

    def publish_features(self, results: dict) -> dict:
        """POST a FeatureResults; returns the CDR's answer (id, job_id). Raises CdrError."""
        body = json.dumps(results).encode("utf-8")
        _check_upload_size("/v1/maps/publish/features", len(body))
        headers = {"Content-Type": "application/json"}
        return _json(self._call("POST", "/v1/maps/publish/features", data=body,
                                headers=headers))

    def publish_georef(self, results: dict, files=()) -> dict:
        """POST a GeoreferenceResults and its projected GeoTIFFs (part name `files`, file
        name = basename); returns the CDR's answer. Raises CdrError, also before sending
        when the upload is too large or a file is unreadable."""
        path = "/v1/maps/publish/georef"
        document = json.dumps(results).encode("utf-8")
        try:
            size = len(document) + sum(os.path.getsize(f) for f in files)
        except OSError as e:
            raise CdrError(f"{path}: cannot read {e.filename}: {e.strerror}") from None
        _check_upload_size(path, size)

        def attempt():
            # opened per attempt: a retry must send the files from their start again
            opened = [open(f, "rb") for f in files]
            try:
                # a part without a file name is a form field; as a part, it keeps the body
                # multipart even when there are no files
                parts = [("georef_result", (None, document))]
                parts += [("files", (os.path.basename(f.name), f, "image/tiff")) for f in opened]
                return self._send("POST", self.url(path), headers=self._auth, files=parts)
            finally:
                for f in opened:
                    f.close()

        return _json(self._retrying(attempt))

    def download(self, url: str, dest: str, connect_timeout: float = 10,
                 read_timeout: float = 300) -> int:
        """Stream a public URL (sent without our token) to dest atomically; returns its
        size. Raises CdrError for a failed, short or too large download, leaving no file."""
        return self._retrying(lambda: self._download_once(url, dest,
                                                          (connect_timeout, read_timeout)))

    def _download_once(self, url: str, dest: str, timeout: tuple) -> int:
        folder = os.path.dirname(os.path.abspath(dest))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                # identity: the byte count must be comparable with Content-Length
                with self._send("GET", url, timeout=timeout, stream=True,
                                headers={"Accept-Encoding": "identity"}) as response:
                    size = _stream(response, f, url)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a map is no secret
            os.replace(tmp, dest)
        except BaseException:
            _remove(tmp)
            raise
        return size

    def _call(self, method: str, path: str, **kw) -> requests.Response:
        url = self.url(path)
        headers = {**self._auth, **kw.pop("headers", {})}
        return self._retrying(lambda: self._send(method, url, headers=headers, **kw))

    def _retrying(self, attempt):
        """attempt(), tried again after backoff, 2*backoff, ... while the error allows."""
        for n in range(self.retries + 1):
            try:
                return attempt()
            except CdrError as e:
                if not e.retry or n == self.retries:
                    raise
                delay = self.backoff * 2**n
                log.warning("%s; trying again in %.1f s", e, delay)
                time.sleep(delay)

    def _send(self, method: str, url: str, **kw) -> requests.Response:
        """One request; raises CdrError for no answer or a 4xx/5xx one."""
        kw.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, url, **kw)
        except requests.RequestException as e:
            raise CdrError(f"{method} {url}: {type(e).__name__}: {e}", retry=True) from None
        if response.status_code >= 400:
            status = response.status_code
            body = response.text
            response.close()
            raise CdrError(f"{method} {url}: HTTP {status}: {body[:200]}", status, body,
                           retry=status >= 500)
        return response


def _json(response: requests.Response):
    try:
        return response.json()
    except ValueError:
        raise CdrError(f"{response.request.method} {response.url}: the answer is not JSON",
                       response.status_code, response.text) from None


def _check_upload_size(path: str, size: int) -> None:
    if size > MAX_UPLOAD_BYTES:
        raise CdrError(f"{path}: {size} bytes is over the {MAX_UPLOAD_BYTES}-byte upload cap")


def _stream(response: requests.Response, f, url: str) -> int:
    """Copy the body to f; raises CdrError if it is too large or shorter than announced."""
    announced = response.headers.get("Content-Length")
    expected = int(announced) if announced and announced.isdigit() else None
    if expected is not None and expected > MAX_MAP_BYTES:
        raise CdrError(f"GET {url}: {expected} bytes is over the {MAX_MAP_BYTES}-byte limit")
    size = 0
    try:
        for chunk in response.iter_content(CHUNK):
            size += len(chunk)
            if size > MAX_MAP_BYTES:
                raise CdrError(f"GET {url}: over the {MAX_MAP_BYTES}-byte limit")
            f.write(chunk)
    except requests.RequestException as e:
        raise CdrError(f"GET {url}: download broken: {e}", retry=True) from None
    if expected is not None and size != expected:
        raise CdrError(f"GET {url}: {size} of {expected} bytes", retry=True)
    return size


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------- signatures

def sign(secret: str, body: bytes) -> str:
    """The CDR's x-cdr-signature-256: lowercase hex HMAC-SHA256 of the raw body."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str | None) -> bool:
    """True if signature is the body's signature, compared in constant time."""
    if not signature:
        return False
    # as bytes: compare_digest refuses str with non-ASCII characters, which a header may hold
    given = signature.strip().lower().encode("utf-8", "replace")
    return hmac.compare_digest(sign(secret, body).encode("ascii"), given)


# ---------------------------------------------------------------------------- results

# legend_segment's labelme labels (those of the real module too) -> Area_Extraction category
AREA_CATEGORIES = {
    "map": "map_area",
    "legend": "legend_area",
    "legend_polygons": "polygon_legend_area",
    "legend_points_lines": "line_point_legend_area",
    "legend_lines": "line_legend_area",
    "legend_points": "point_legend_area",
    "cross_section": "cross_section",
    "correlation_diagram": "correlation_diagram",
}
DASH_PATTERNS = ("", "solid", "dash", "dotted")


def feature_results(settings: Settings, job: str, map_name: str, cog_id: str, system: str,
                    version: str) -> dict:
    """A FeatureResults of a job's legend items, extracted features and map areas, in
    pixels. A missing output leaves its part empty; raises CdrError if none can be read."""
    outputs = _Outputs(settings, job, map_name)
    segmentation = outputs.read("legend_segment", "{m}_map_segmentation.json")
    results = {
        "system": system,
        "system_version": version,
        "cog_id": cog_id,
        "polygon_feature_results": outputs.legend_results("polygon"),
        "line_feature_results": outputs.legend_results("line"),
        "point_feature_results": outputs.legend_results("point"),
        "cog_area_extractions": _areas(segmentation, outputs.provenance("legend_segment")),
        "cog_metadata_extractions": [],
    }
    if not outputs.found:
        raise CdrError(f"job {job!r}, map {map_name!r}: no module output to publish")
    return results


def georef_results(settings: Settings, job: str, map_name: str, cog_id: str, system: str,
                   version: str) -> tuple:
    """(GeoreferenceResults, files to upload) from georeference's GCPs: GCP-only, so the
    list is empty. The GCPs' latitude/longitude are EPSG:4326 (each GCP says so in its
    `crs`); the map's own CRS is the likely CRS. Raises Skipped when the GCPs are estimated
    placeholders, CdrError if the georeference output is missing or unreadable."""
    outputs = _Outputs(settings, job, map_name)
    data = outputs.read("georeference", "{m}.json")
    if data is None:
        raise CdrError(f"job {job!r}, map {map_name!r}: no georeference output")
    estimated = data.get("estimated", False)
    if not isinstance(estimated, bool):
        raise CdrError(f"georeference output of map {map_name!r}: `estimated` is "
                       f"{estimated!r}, not true or false")
    if estimated:
        raise Skipped(f"georeference estimated the GCPs of map {map_name!r} (the map carries "
                      "no georeferencing): placeholders are never published to the CDR")
    crs = data.get("crs")
    model = outputs.provenance("georeference")
    gcps = [_gcp(raw, model) for raw in data.get("gcps") or []]
    segmentation = outputs.read("legend_segment", "{m}_map_segmentation.json")
    map_areas = [area for area in _areas(segmentation, outputs.provenance("legend_segment"))
                 if area["category"] == "map_area"]
    result = {"likely_CRSs": [crs] if crs else [],
              "map_area": map_areas[0] if map_areas else None, "projections": []}
    return {"cog_id": cog_id, "system": system, "system_version": version, "gcps": gcps,
            "georeference_results": [result]}, []


def _gcp(raw, model: dict):
    """One GroundControlPoint from georeference's flat record. Only what the module wrote
    is carried over: a field it left out stays out, so the schema check names it instead
    of a made-up value going to the CDR. `crs` is that of the GCP's latitude/longitude
    (EPSG:4326 by contract), never the map's own."""
    if not isinstance(raw, dict):
        return raw

    def given(*keys):
        return {k: raw[k] for k in keys if k in raw}

    gcp = {**given("gcp_id"),
           "map_geom": {**given("latitude", "longitude"), "type": "Point"},
           "px_geom": {**given("rows_from_top", "columns_from_left"), "type": "Point"},
           "confidence": raw.get("confidence"), **model, **given("crs")}
    if isinstance(gcp.get("gcp_id"), int):
        gcp["gcp_id"] = str(gcp["gcp_id"])  # a number is an id all the same
    return gcp


# kind -> (module, its output, the result's features field, geometry type)
EXTRACTIONS = {
    "polygon": ("polygon_extract", "{m}_polygons.geojson", "polygon_features", "Polygon"),
    "line": ("line_extract", "{m}_lines.geojson", "line_features", "LineString"),
    "point": ("point_extract", "output-per-symbol/{m}_points.geojson", "point_features",
              "Point"),
}


class _Outputs:
    """Reads one job's module outputs for one map, remembering whether any was found."""

    def __init__(self, settings, job: str, map_name: str):
        self.root = os.path.join(settings.outputs_dir, job)
        self.map_name = map_name
        self.found = False
        try:
            self.catalogue = load_catalogue(settings.config_path)
        except MipError as e:
            log.warning("model versions default to %s: %s", DEFAULT_MODEL_VERSION, e)
            self.catalogue = {}

    def read(self, module: str, name: str) -> dict | None:
        """A module's JSON object, or None if it is missing or malformed."""
        path = os.path.join(self.root, module, name.format(m=self.map_name))
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable %s: %s", path, e)
            return None
        if not isinstance(data, dict):
            log.warning("skipping %s: not a JSON object", path)
            return None
        self.found = True
        return data

    def provenance(self, module: str) -> dict:
        entry = self.catalogue.get(module)
        return {"model": module,
                "model_version": entry.version if entry else DEFAULT_MODEL_VERSION}

    def legend_results(self, kind: str) -> list:
        """One *LegendAndFeaturesResult per legend item of a kind, in legend order, with
        the features extracted for it; features of an item the legend lacks get one too."""
        module, output, field, geom_type = EXTRACTIONS[kind]
        items = self.legend_items(kind)
        by_item = {}
        for feature in (self.read(module, output) or {}).get("features", []):
            name = str((feature.get("properties") or {}).get("legend_id", "unknown"))
            by_item.setdefault(name, []).append(feature)
            items.setdefault(name, _item(kind, name, "", "", "", None))
        provenance = self.provenance(module)
        return [{**item, field: _collection(by_item.get(name, []), geom_type, provenance)}
                for name, item in items.items()]

    def legend_items(self, kind: str) -> dict:
        """{name: legend item fields} from legend_item_segment's swatches, completed by
        legend_item_description's records."""
        swatch_file = "{m}_PolygonType.geojson" if kind == "polygon" else \
            "{m}_PointLineType.geojson"
        items = {}
        for swatch in (self.read("legend_item_segment", swatch_file) or {}).get("features", []):
            props = swatch.get("properties") or {}
            if props.get("type") == kind and props.get("name"):
                name = str(props["name"])
                items[name] = _item(kind, name, props.get("abbreviation"), "",
                                    props.get("color"), _ring_bbox(swatch.get("geometry")))
        described = self.read("legend_item_description", f"{{m}}_{kind}.json") or {}
        for name, record in described.items():
            if not isinstance(record, dict):
                log.warning("legend_item_description: skipping item %r: not an object", name)
                continue
            items[name] = _item(kind, name, record.get("symbol name", ""),
                                record.get("description", ""), record.get("color", ""),
                                record.get("bbox"))
        return items


def _item(kind: str, name: str, abbreviation, description, color, bbox) -> dict:
    """A legend item's fields, named as the CDR's model of its kind names them."""
    # a polygon unit's name goes in `label`, a line's or point's in `name`; only the
    # polygon model has a colour
    item = {"id": name, "label" if kind == "polygon" else "name": name,
            "abbreviation": _text(abbreviation), "description": _text(description)}
    if kind == "polygon":
        item["color"] = _text(color)
    if isinstance(bbox, list | tuple) and bbox:
        item["legend_bbox"] = list(bbox)
    return item


def _text(value) -> str:
    """A module's text field, or the model's default "" where it wrote none (or null)."""
    return value if isinstance(value, str) else ""


def _ring_bbox(geometry) -> list | None:
    try:
        ring = geometry["coordinates"][0]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        return [min(xs), min(ys), max(xs), max(ys)]
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _collection(features: list, geom_type: str, provenance: dict) -> dict:
    """A FeatureCollection of single geometries (the CDR's geometry types are Point,
    LineString and Polygon): a Multi* feature becomes one feature per part, so a map unit's
    MultiPolygon gives one Polygon feature per connected part."""
    out = []
    for feature in features:
        geometry = feature.get("geometry") or {}
        props = feature.get("properties") or {}
        if geometry.get("type") == geom_type:
            parts = [geometry["coordinates"]]
        elif geometry.get("type") == "Multi" + geom_type:
            parts = geometry["coordinates"]
        else:
            log.warning("skipping a %s feature of %r: a %s result holds %s features",
                        geometry.get("type"), props.get("legend_id"), geom_type, geom_type)
            continue
        properties = {**provenance, "confidence": props.get("confidence", props.get("score")),
                      **_extra_properties(geom_type, props)}
        for part in parts:
            # the legend item's name and a running number: unique within the payload
            out.append({"type": "Feature", "id": f"{props.get('legend_id', 'f')}_{len(out) + 1}",
                        "geometry": {"type": geom_type, "coordinates": part},
                        "properties": properties})
    return {"type": "FeatureCollection", "features": out}


def _extra_properties(geom_type: str, props: dict) -> dict:
    """The line or point properties the module wrote, where the schema knows them."""
    extra = {}
    if geom_type == "LineString":
        if props.get("dash_pattern") in DASH_PATTERNS:
            extra["dash_pattern"] = props["dash_pattern"]
        if isinstance(props.get("symbol"), str):
            extra["symbol"] = props["symbol"]
    elif geom_type == "Point":
        # point_extract must give every point its bbox: a missing one goes as null, which
        # the schema check refuses, rather than as the CDR's default "no bbox"
        extra["bbox"] = props.get("bbox")
        for key in ("dip", "dip_direction"):
            value = props.get(key)
            # the schema wants whole degrees or null
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            extra[key] = round(value) if is_number else None
    return extra


def _areas(segmentation: dict | None, provenance: dict) -> list:
    """legend_segment's labelme shapes as Area_Extraction, skipping unknown labels."""
    areas = []
    for shape in (segmentation or {}).get("shapes", []):
        category = AREA_CATEGORIES.get(shape.get("label"))
        points = shape.get("points") or []
        if category is None or len(points) < 2:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        bbox = [min(xs), min(ys), max(xs), max(ys)]
        if len(points) == 2:
            # a labelme rectangle: two opposite corners
            ring = [[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]],
                    [bbox[0], bbox[3]]]
        else:
            ring = [list(p) for p in points]
        areas.append({"type": "Polygon", "coordinates": [ring + [ring[0]]], "bbox": bbox,
                      "category": category, "text": "", "confidence": None, **provenance})
    return areas


# ---------------------------------------------------------------------------- validation

SCHEMAS = ("FeatureResults", "GeoreferenceResults", "Event", "MapEventPayload")
MESSAGE_CHARS = 300


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    with open(os.path.join(CDR_SCHEMA_DIR, f"{name}.json"), encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def problem(name: str, payload) -> str | None:
    """What makes a payload fail the CDR's schema schema/cdr/<name>.json (one of SCHEMAS),
    as "<JSON path of the field>: <why>", or None if it passes."""
    if name not in SCHEMAS:
        raise ValueError(f"no CDR schema named {name!r}")
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(payload))
    if error is None:
        return None
    where = error.json_path
    if error.validator == "required" and isinstance(error.instance, dict):
        # name the missing field itself, not the object that lacks it
        absent = [f for f in error.validator_value if f not in error.instance]
        where = f"{where}.{absent[0]}" if absent else where
    message = error.message
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS] + "..."
    return f"{where}: {message}"


def validate(name: str, payload) -> None:
    """Check a payload against the CDR's schema `name` (one of SCHEMAS); raises CdrError
    naming the failing field."""
    if name not in SCHEMAS:
        raise CdrError(f"no CDR schema named {name!r}")
    found = problem(name, payload)
    if found is not None:
        raise CdrError(f"{name} fails the CDR's schema at {found}")

# ---------------------------------------------------------------------------- the server's link

INBOX_RETRY_AFTER = 60  # seconds the CDR is told to wait when the inbox is full
PREFETCH = 2  # maps fetched ahead of the run queue: enough to keep it fed, few on disk
WAIT_RETRY = 30  # seconds before a refused submission is tried again unless a run ends
MAX_ATTEMPTS = 3  # deliveries of one failed event the reconciler asks for
WAIT_LOG = 60  # seconds between two "the inbox waits" lines


class BadEvent(ValueError):
    """A signed delivery whose body is not an event we can act on."""


def _moment(text) -> datetime | None:
    """An ISO 8601 time as an aware datetime (naive taken as UTC), or None."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def missed_events(items: list, known: dict, newest: str | None) -> tuple:
    """(notification ids to resend, how they were matched) among the CDR's notifications.

    No public source says whether a notification's `id` is the delivered event's `id`, nor
    whether its `event` holds the event's own `id`, so both are tried: when any of them is
    an event the journal holds (`known`, {event id: row}), ids are matched ("event id"), and
    an item is resent if its event is not held, or held as failed for a reason that may
    pass, tried fewer than MAX_ATTEMPTS times. Otherwise ("created_date") an item is resent
    if its event was created after the newest event the journal holds (`newest`), or when
    its time cannot be read. Only map.process items count."""
    wanted = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("event"), dict):
            continue
        if item["event"].get("event") == "map.process" and item.get("id"):
            wanted.append(item)
    ids = {id(item): [str(c) for c in (item["event"].get("id"), item["id"]) if c]
           for item in wanted}
    if any(c in known for cs in ids.values() for c in cs) or newest is None:
        resend = []
        for item in wanted:
            held = next((known[c] for c in ids[id(item)] if c in known), None)
            if held is None or (held["status"] == "failed" and held["retry"]
                                and held["attempts"] < MAX_ATTEMPTS):
                resend.append(str(item["id"]))
        return resend, "event id"
    after = _moment(newest)
    resend = []
    for item in wanted:
        created = _moment(item["event"].get("created_date"))
        if created is None or created > after:
            resend.append(str(item["id"]))
    return resend, "created_date"


class CdrLink:
    """The server's side of the CDR: registration, the inbox of deliveries, reconciling
    missed ones, and publishing passed runs.

    `submit(payload) -> run_id` queues a run and raises MipError when it cannot. A delivered
    map.process event is written to the journal before it is answered and waits there (the
    inbox) until its run can be queued: the inbox thread fetches the maps of the oldest
    PREFETCH events, submits their runs in order, and when the run queue is full (QueueFull)
    or the disk is, waits until a run ends or the refusal's retry time has passed. So none
    is lost to a full queue or a restart; the webhook refuses (503) only past
    MIP_CDR_INBOX_MAX waiting events.
    """

    def __init__(self, cs: CdrSettings, settings, db, submit, client=None):
        self.cs = cs
        self.settings = settings
        self.db = db
        self.submit = submit
        self.client = client or CdrClient(cs.url, cs.token, backoff=cs.backoff)
        self.registration_id = None
        self.registered = threading.Event()
        self.tasks = queue.Queue()  # publications
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.wake = threading.Event()  # the inbox has something new: an event, a map, room
        self.fetching = {}  # event id -> its download thread
        self.fetched = set()  # ids of the events whose map we downloaded, until submitted
        self.refused_until = 0.0  # monotonic time before which no submission is tried
        self.wait_logged = 0.0
        self.resent = {}  # notification id -> times asked for by this process
        self.threads = []

    def start(self) -> None:
        """Register in the background, and take up what a previous server left undone."""
        cut = self.db.reset_downloading()
        waiting = self.db.inbox_size()
        if waiting:
            log.info("CDR inbox: %d events taken up again after a restart (%d downloads "
                     "start again)", waiting, cut)
        for target in (self.register_loop, self.work, self.inbox_loop, self.reconcile_loop,
                       self.publish_missed):
            thread = threading.Thread(target=target, daemon=True, name=f"cdr-{target.__name__}")
            thread.start()
            self.threads.append(thread)

    def publish_missed(self) -> None:
        """Publish the CDR runs that passed while no server watched them. In the background:
        finding them reads every submitted event, which start-up must not wait for."""
        try:
            for job in self.db.unpublished_cdr_jobs():
                self.queue_publish(job)
        except Exception:  # noqa: BLE001 - the next start tries again
            log.exception("CDR: looking for passed runs never published failed")
        finally:
            self.db.close()

    def stop(self, timeout: float = 5) -> None:
        """Stop working and remove our registration."""
        self.stopping.set()
        self.wake.set()
        self.tasks.put(None)
        for thread in self.threads + list(self.fetching.values()):
            thread.join(timeout)
        if self.registration_id:
            try:
                self.client.unregister(self.registration_id)
                log.info("CDR registration %s removed", self.registration_id)
            except CdrError as e:
                log.warning("could not remove CDR registration %s: %s", self.registration_id, e)
            self.registration_id = None

    def status(self) -> dict:
        return {"system": self.cs.system, "version": self.cs.version,
                "registered": self.registration_id is not None,
                "callback_url": self.cs.callback_url}

    # ------------------------------------------------------------------ registration

    def register_loop(self) -> None:
        """Replace our stale registrations by a new one; retried with backoff until it works,
        since without it no event arrives."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                for old in self.client.registrations():
                    if old.get("name") == self.cs.system:
                        self.client.unregister(old["id"])
                        log.info("removed stale CDR registration %s", old["id"])
                self.registration_id = self.client.register(
                    self.cs.system, self.cs.version, self.cs.callback_url, self.cs.secret)
                log.info("registered with the CDR as %s %s (registration %s), callback %s",
                         self.cs.system, self.cs.version, self.registration_id,
                         self.cs.callback_url)
                self.registered.set()
                return
            except CdrError as e:
                log.error("CDR REGISTRATION FAILED, no events will arrive until it works "
                          "(retry in %.0f s): %s %s", delay, e, e.body or "")
                self.stopping.wait(delay)
                delay = min(delay * 2, 60)

    # ------------------------------------------------------------------ deliveries

    def deliver(self, body) -> None:
        """Act on a verified delivery: ping and unknown events are only logged; map.process
        goes to the inbox. Raises BadEvent naming what fails the CDR's Event or
        MapEventPayload schema, Busy when the inbox is full."""
        found = problem("Event", body)
        if found is not None or not body["id"]:
            raise BadEvent(f"not a CDR event {{\"id\", \"event\", \"payload\"}}: "
                           f"{found or '$.id: empty'}")
        event = body["event"]
        if event == "ping":
            log.info("CDR ping %s", body["id"])
            return
        if event != "map.process":
            log.info("CDR event %s (%s) ignored", event, body["id"])
            return
        payload = body["payload"]
        found = problem("MapEventPayload", payload)
        if found is not None:
            raise BadEvent(f"map.process payload {{\"cog_id\", \"cog_url\"}}: "
                           f"{found.replace('$', '$.payload', 1)}")
        cog_id, cog_url = payload["cog_id"], payload["cog_url"]
        if not cog_url.startswith(("https://", "http://")):
            raise BadEvent("payload.cog_url must be an http(s) URL")
        self.take(body["id"], cog_id, cog_url)

    def take(self, event_id: str, cog_id, cog_url: str, again: bool = False) -> str:
        """Record a request to process a cog in the inbox, unless the cog is already in
        hand, queued or running (or, unless `again`, done), or the event was delivered
        before and has not failed; returns the event's status. A failed event delivered
        again is tried again. Raises BadEvent for a cog id that cannot name a job, Busy
        when MIP_CDR_INBOX_MAX events already wait."""
        try:
            check_name("cog", cog_id)
        except UsageError as e:
            raise BadEvent(f"payload.cog_id: {e}") from None
        with self.lock:
            known = self.db.event(event_id)
            if known and known["status"] != "failed":
                log.info("CDR event %s delivered again; nothing started", event_id)
                return "duplicate"
            run = self.db.latest_run(cog_id)
            done = ("not_started", "running") if again else ("not_started", "running", "passed")
            if self.db.cog_in_hand(cog_id) or (run and run["status"] in done):
                why = f"cog {cog_id} is already {run['status'] if run else 'being fetched'}"
                if known:
                    self.db.set_event(event_id, "duplicate", message=why)
                else:
                    self.db.add_event(event_id, "map.process", cog_id, cog_url, "duplicate", why)
                log.info("CDR event %s: %s; nothing started", event_id, why)
                return "duplicate"
            self.check_room(event_id)
            if known:
                self.db.retake_event(event_id, cog_url)
                log.info("CDR event %s (failed before: %s) delivered again: tried again",
                         event_id, known["message"])
            else:
                self.db.add_event(event_id, "map.process", cog_id, cog_url, "received")
                log.info("CDR event %s: process cog %s", event_id, cog_id)
        self.wake.set()
        return "received"

    def check_room(self, event_id: str) -> None:
        """Raises Busy when the inbox holds MIP_CDR_INBOX_MAX events."""
        waiting = self.db.inbox_size()
        if waiting >= self.cs.inbox_max:
            log.warning("CDR event %s refused (503): the inbox holds %d events "
                        "(MIP_CDR_INBOX_MAX=%d)", event_id, waiting, self.cs.inbox_max)
            raise Busy(f"{waiting} CDR events already wait to be run (MIP_CDR_INBOX_MAX); "
                       f"try again in {INBOX_RETRY_AFTER} s", "cdr_inbox_full",
                       retry_after=INBOX_RETRY_AFTER)

    # ------------------------------------------------------------------ the inbox

    def inbox_loop(self) -> None:
        """Feed the run queue from the inbox until the link stops. Never raises."""
        while not self.stopping.is_set():
            try:
                delay = self.pump()
            except Exception:  # noqa: BLE001 - a journal error must not stop the inbox
                log.exception("CDR inbox: trying again in %d s", WAIT_RETRY)
                delay = WAIT_RETRY
            self.wake.wait(delay)
            self.wake.clear()

    def pump(self) -> float:
        """Fetch the maps of the oldest PREFETCH waiting events and submit the runs of
        those whose map is here, oldest first, until the queue refuses; the seconds to
        wait unless something wakes the inbox first."""
        while not self.stopping.is_set():
            ready = []
            for event in self.db.inbox(PREFETCH):
                if event["event_id"] in self.fetching:
                    continue
                if os.path.isfile(map_file(self.settings, event["cog_id"])):
                    ready.append(event)
                else:
                    self.fetch(event)
            if not ready:
                return WAIT_RETRY  # woken when an event comes or a download ends
            wait = self.refused_until - time.monotonic()
            if wait > 0:
                return wait
            for event in ready:
                wait = self.queue_run(event)
                if wait:
                    self.refused_until = time.monotonic() + wait
                    return wait
        return 0

    def fetch(self, event: dict) -> None:
        """Download the event's map in a thread of its own; the inbox is woken after.
        Nothing is written to the journal unless the download fails: the webhook's writes
        share its lock, and a restart simply fetches again."""
        thread = threading.Thread(target=self.download, args=(event,), daemon=True,
                                  name=f"cdr-fetch-{event['cog_id']}")
        self.fetching[event["event_id"]] = thread
        thread.start()

    def download(self, event: dict) -> None:
        """Fetch an event's map; a failed download or a map GDAL cannot read fails the
        event with the reason. Never raises."""
        event_id, cog_id, url = event["event_id"], event["cog_id"], event["cog_url"]
        path = map_file(self.settings, cog_id)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            size = self.client.download(url, path)
            unreadable = maps.unreadable(path)
            if unreadable:
                # removed, so that a resend downloads it again rather than reuse a bad copy
                _remove(path)
                why = f"the map at {url} is not an image GDAL reads: {unreadable}"
                self.db.set_event(event_id, "failed", message=why)
                log.error("CDR event %s: %s", event_id, why)
            else:
                self.fetched.add(event_id)
                log.info("CDR event %s: map %s downloaded (%d bytes)", event_id, cog_id, size)
        except (CdrError, OSError) as e:
            why = f"download of {url} failed: {e}"
            self.db.set_event(event_id, "failed", message=why, retry=True)
            log.error("CDR event %s: %s; a resend or POST /cdr/cogs/%s tries again",
                      event_id, why, cog_id)
        except Exception as e:  # noqa: BLE001 - the inbox goes on with the other events
            log.exception("CDR event %s: the download of map %s failed", event_id, cog_id)
            self.db.set_event(event_id, "failed", message=f"download of {url} failed: {e}",
                              retry=True)
        finally:
            self.fetching.pop(event_id, None)
            self.wake.set()

    def queue_run(self, event: dict) -> float | None:
        """Submit a whole-graph run for the event; None when the event has moved on
        (submitted or failed), else the seconds to wait while the queue or disk is full."""
        event_id, cog_id = event["event_id"], event["cog_id"]
        run = self.db.latest_run(cog_id)
        if run and run["status"] in ("not_started", "running") and \
                run["submit_time"] >= event["received"]:
            # submitted before a crash kept us from recording it
            self.db.set_event(event_id, "submitted", run_id=run["run_id"])
            return None
        try:
            run_id = self.submit({"job": cog_id, "map": cog_id, "modules": ["ALL"],
                                  "force_rerun": False})
        except (Busy, DiskFull) as e:
            if time.monotonic() - self.wait_logged > WAIT_LOG:
                self.wait_logged = time.monotonic()
                log.info("CDR inbox: %d events wait for the run queue: %s",
                         self.db.inbox_size(), e)
            return e.retry_after or WAIT_RETRY
        except MipError as e:
            self.db.set_event(event_id, "failed", message=f"run not submitted: {e}",
                              fetched=event_id in self.fetched or None)
            self.fetched.discard(event_id)
            log.error("CDR event %s: run not submitted: %s", event_id, e)
            return None
        self.db.set_event(event_id, "submitted", run_id=run_id,
                          fetched=event_id in self.fetched or None)
        self.fetched.discard(event_id)
        return None

    # ------------------------------------------------------------------ missed events

    def reconcile_loop(self) -> None:
        """Once registered, and every MIP_CDR_RECONCILE_MINUTES, ask the CDR to resend
        what we missed. Never raises."""
        while not self.stopping.is_set():
            if not self.registered.wait(1):
                continue
            try:
                self.reconcile()
            except CdrError as e:
                log.warning("CDR reconcile failed (trying again in %d min): %s",
                            self.cs.reconcile_minutes, e)
            except Exception:  # noqa: BLE001 - the next pass tries again
                log.exception("CDR reconcile failed")
            self.stopping.wait(self.cs.reconcile_minutes * 60)

    def reconcile(self) -> int:
        """Ask the CDR for our notifications and to resend the map.process events the
        journal lacks or holds as failed for a reason that may pass (missed_events); how
        many were asked for. Failed events that cannot be matched to a notification (the
        created_date way) are put back in the inbox here instead."""
        items = self.client.notifications(self.cs.system, self.cs.version)
        items = [i for i in items if isinstance(i, dict)]
        ids = [str(c) for i in items for c in (
            (i.get("event") or {}).get("id") if isinstance(i.get("event"), dict) else None,
            i.get("id")) if c]
        resend, matched = missed_events(items, self.db.events_by_id(ids),
                                        self.db.newest_event_time())
        asked = 0
        for notification_id in resend:
            if self.resent.get(notification_id, 0) >= MAX_ATTEMPTS or self.stopping.is_set():
                continue
            self.resent[notification_id] = self.resent.get(notification_id, 0) + 1
            self.client.resend(notification_id)
            asked += 1
        retaken = 0
        if matched == "created_date":
            for event in self.db.retryable_events(MAX_ATTEMPTS):
                retaken += self.db.retake_event(event["event_id"], None)
            if retaken:
                self.wake.set()
        log.info("CDR reconcile: %d notifications, matched by %s; %d resends asked for, "
                 "%d failed events tried again", len(items), matched, asked, retaken)
        return asked

    # ------------------------------------------------------------------ publishing

    def work(self) -> None:
        """Publish the jobs queued for it, one at a time, until the link stops."""
        while True:
            job = self.tasks.get()
            if job is None or self.stopping.is_set():
                return
            try:
                self.publish(job)
            except Exception:  # noqa: BLE001 - one bad publication must not stop the others
                log.exception("CDR publishing of job %s failed", job)

    def run_finished(self, run: dict) -> None:
        """A run ended, so the queue has room: wake the inbox. Publish a run that came
        from the CDR once it has passed."""
        self.refused_until = 0.0
        self.wake.set()
        if run["status"] == "passed" and self.db.event_for_run(run["run_id"]):
            self.queue_publish(run["job"])

    def queue_publish(self, job: str) -> None:
        for kind in ("features", "georef"):
            self.db.set_publication(job, kind, "pending")
        self.tasks.put(job)

    def publish(self, job: str) -> None:
        """Publish a job's features and georeference; the outcome of each is recorded:
        `published`, `skipped` (estimated GCPs) or `failed` (a payload failing the CDR's
        schema is not sent, and the message names the failing field)."""
        map_name = self.db.job_map(job)
        args = (self.settings, job, map_name, map_name, self.cs.system, self.cs.version)
        for kind in ("features", "georef"):
            try:
                if kind == "features":
                    results = feature_results(*args)
                    _check_before_sending("FeatureResults", results)
                    answer = self.client.publish_features(results)
                else:
                    results, files = georef_results(*args)
                    _check_before_sending("GeoreferenceResults", results)
                    answer = self.client.publish_georef(results, files)
            except Skipped as e:
                self.db.set_publication(job, kind, "skipped", message=str(e))
                log.warning("job %s: %s not published to the CDR: %s", job, kind, e)
                continue
            except CdrError as e:
                self.db.set_publication(job, kind, "failed", message=str(e))
                log.error("CDR publishing of %s for job %s failed: %s", kind, job, e)
                continue
            self.db.set_publication(job, kind, "published", answer.get("id"),
                                    answer.get("job_id"))
            log.info("job %s: %s published to the CDR as %s", job, kind, answer.get("id"))


def _check_before_sending(name: str, results: dict) -> None:
    """Raises CdrError ("not sent: ...", naming the field) if results fail the schema."""
    try:
        validate(name, results)
    except CdrError as e:
        raise CdrError(f"not sent: {e}") from None
