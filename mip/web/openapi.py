"""openapi: the OpenAPI 3.1 document of the server's API (GET /openapi.json).

mip_server.py declares each route once, as a row of its route table, with its handler,
what it reads and every status it can answer (`route(..., errors=(404, 409))`); this file
turns that route table, the module catalogue and schema/*.json into the document, which
openapi-spec-validator accepts and which schemathesis fuzzes in the test suite
(tests/test_openapi.py).
"""

import re
from typing import NamedTuple

# the server's name check (catalogue.NAME_RE, matched whole): letters, digits, '_', '.', '-',
# at most 64, not starting with '.'
NAME = {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"}
# journal.new_run_id: UTC date-time to the microsecond, then a random tail
RUN_ID = {"type": "string", "pattern": "^[0-9]{8}-[0-9]{6}-[0-9]{6}-[0-9a-f]{4}$"}

# what each status means on any route; a route lists the ones it can answer in errors=
STATUSES = {
    400: "bad request: undecodable path, bad name in the path or query, bad Content-Length, "
         "or a body that is empty, not JSON or nested too deep",
    401: "no or wrong credentials (basic auth)",
    403: "missing or wrong signature (the CDR webhook), or cross_origin: a POST or DELETE "
         "whose Origin (or Referer) is another site's",
    404: "no such run, job, module, map, schema or result, or the CDR link is off",
    405: "the path exists, not with this method (Allow lists those it has)",
    409: "conflict with the job's state (bound to another map, not passed, or a run of it "
         "queued or running), or an Idempotency-Key sent before with another submission "
         "(idempotency_key_reused) or still being answered (idempotency_key_in_use)",
    413: "the body is over the size limit",
    422: "the body is valid JSON but refused: schema, unknown module, switch not allowed, "
         "path outside the job, an unreadable map, or GPU modules on a host without a GPU "
         "under MIP_REQUIRE_GPU=1",
    429: "too many failed logins from this address (see Retry-After)",
    502: "a store or service the server depends on could not be reached",
    503: "at capacity: run queue full or too many downloads at once; or the journal cannot "
         "be written for now, or was deleted or replaced (journal_unavailable); see "
         "Retry-After",
    507: "not enough free disk space to take a run",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                               "required": True, "schema": {"type": "integer", "minimum": 0}}}
HEADERS = {401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
           429: RETRY_AFTER, 503: RETRY_AFTER}
# a request whose Accept prefers text/html (a browser's) gets these as a console page
# saying the same (console.error_pages); every other client gets the JSON
AS_PAGE = (401, 404, 500)


class Route(NamedTuple):
    """One row of the route table: what the document says of one method on one path."""

    method: str
    path: str
    summary: str
    body: str | dict | None = None  # a schema/ name, or an inline schema of an optional body
    answer: str | dict | None = None  # a schema/ name, a schema, or a media type
    auth: bool = True
    errors: tuple = ()  # statuses this route answers beyond those every route has
    query: dict | None = None  # query parameter name -> schema
    headers: dict | None = None  # request header name -> {"description", "schema"}
    answer_headers: dict | None = None  # headers of the 200 answer: name -> header object
    handler: object = None  # called as handler(ctx, **path_args, **bound) (mip_server.py)
    bound: dict | None = None  # fixed keyword arguments of the handler for this route


def statuses(route: Route) -> list:
    """Every status a route can answer besides 200, sorted. The before_request hook answers
    400 and 413 on any route (bad path, bad or too large Content-Length) and bottle answers
    405 to another method on any path; authentication adds 401 and 429; a path parameter
    adds 400 (bad name) and 404; origin.py answers 403 to a POST or DELETE from another
    site's page; and any route answers 503 journal_unavailable once the journal was deleted
    or replaced under the server (a write also while it cannot be written for a while)."""
    codes = {400, 405, 413, 503, *route.errors}
    if route.method in ("POST", "DELETE"):
        codes.add(403)
    if route.auth:
        codes |= {401, 429}
    if "{" in route.path:
        codes.add(404)
    return sorted(codes)


def whole(high: int) -> dict:
    """The schema of a whole-number query parameter from 0 to `high`."""
    return {"type": "integer", "minimum": 0, "maximum": high}


def document(routes: list, schemas: dict, version: str, modules=()) -> dict:
    """The OpenAPI 3.1 document of the route table. `schemas` maps schema/ names to
    documents; `modules` are the catalogue's module names, which RunPayload is narrowed
    to (the server refuses others)."""
    paths = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = operation(route, schemas)
    components = {}
    for name, doc in schemas.items():
        components.update(lift_defs(name, doc))
    if modules:
        components["RunPayload"] = with_modules(components["RunPayload"], list(modules))
    return {"openapi": "3.1.0",
            "info": {"title": "mip: TA1 Module Integration server", "version": version},
            "paths": paths,
            "components": {"schemas": components,
                           "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}}}}


# the tag of each route, by the first part of its path: /docs groups the routes by these
TAGS = {"runs": "runs", "jobs": "jobs", "modules": "modules", "maps": "maps", "cdr": "cdr",
        "ui": "console", "docs": "console"}


def tag(path: str) -> str:
    """runs, jobs, modules, maps, cdr, console, or operations (health, info, schemas, ...)."""
    return TAGS.get(path.strip("/").split("/")[0], "operations")


def first_sentence(doc: str) -> str:
    """A docstring's first sentence, whole even where it wraps onto the next lines."""
    text = " ".join(doc.split("\n\n")[0].split())
    end = re.search(r"[.!?](\s|$)", text)
    return text[:end.start() + 1] if end else text


def operation(route: Route, schemas: dict) -> dict:
    op = {"summary": route.summary, "tags": [tag(route.path)],
          "responses": {"200": answer(route.answer)}}
    if route.answer_headers:
        op["responses"]["200"]["headers"] = route.answer_headers
    params = [{"name": p, "in": "path", "required": True, "schema": path_schema(p, schemas)}
              for p in re.findall(r"{(\w+)}", route.path)]
    params += [{"name": name, "in": "query", "required": False, "schema": schema}
               for name, schema in (route.query or {}).items()]
    params += [{"name": name, "in": "header", "required": False, **fields}
               for name, fields in (route.headers or {}).items()]
    if params:
        op["parameters"] = params
    if isinstance(route.body, str):
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{route.body}"}}}}
    elif route.body:
        op["requestBody"] = {"required": False,
                             "content": {"application/json": {"schema": route.body}}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    page = dict(error, **{"text/html": {"schema": {"type": "string"}}})
    for code in statuses(route):
        as_page = code in AS_PAGE and route.method == "GET"  # a browser's page is a GET
        op["responses"][str(code)] = {"description": STATUSES[code],
                                      "content": page if as_page else error}
        if code in HEADERS:
            op["responses"][str(code)]["headers"] = HEADERS[code]
    if route.auth:
        op["security"] = [{"basic": []}]
    return op


def path_schema(name: str, schemas: dict) -> dict:
    if name == "run_id":
        return RUN_ID
    if name == "name":  # GET /schema/{name}: a schema/ name, with or without .json
        return {"type": "string", "enum": [*schemas, *(f"{n}.json" for n in schemas)]}
    return NAME


def answer(kind) -> dict:
    """The 200 response of a route whose answer is a media type, a schema or a schema name,
    or a tuple of those for a route that answers in several (by the request's Accept)."""
    if isinstance(kind, tuple):
        parts = [answer(k) for k in kind]
        return {"description": "success",
                "content": {t: c for p in parts for t, c in p["content"].items()}}
    if isinstance(kind, str) and "/" in kind:
        schema = {"type": "string"} if kind.startswith("text/") else {
            "type": "string", "format": "binary"}
        return {"description": "success", "content": {kind: {"schema": schema}}}
    schema = ref(kind) if isinstance(kind, str) else dict(kind or {"type": "object"})
    if isinstance(schema.get("items"), str):
        schema["items"] = ref(schema["items"])
    return {"description": "success", "content": {"application/json": {"schema": schema}}}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def lift_defs(name: str, doc: dict) -> dict:
    """A schema/ document as components: its `$defs` become components of their own named
    `<name>_<def>` and its `#/$defs/...` references point there (left under the
    component, they would dangle: `#` is now the OpenAPI document)."""
    doc = rewrite_refs(doc, name)
    out = {name: {k: v for k, v in doc.items() if k not in ("$schema", "$id", "$defs")}}
    for key, sub in doc.get("$defs", {}).items():
        out[f"{name}_{key}"] = sub
    return out


def rewrite_refs(node, name: str):
    if isinstance(node, dict):
        out = {k: rewrite_refs(v, name) for k, v in node.items()}
        target = out.get("$ref")
        if isinstance(target, str) and target.startswith("#/$defs/"):
            out["$ref"] = f"#/components/schemas/{name}_{target[len('#/$defs/'):]}"
        return out
    if isinstance(node, list):
        return [rewrite_refs(v, name) for v in node]
    return node


def with_modules(payload: dict, modules: list) -> dict:
    """RunPayload with module names narrowed to the catalogue's (and ALL)."""
    props = dict(payload["properties"])
    props["modules"] = dict(props["modules"], items={"enum": ["ALL", *modules]})
    props["extra_switches"] = dict(props["extra_switches"], propertyNames={"enum": modules})
    return dict(payload, properties=props)


# POST /runs/{run_id}/rerun: an optional body whose key is checked as RunPayload's
RERUN_BODY = {"type": "object", "additionalProperties": False,
              "properties": {"openai_key": ref("RunPayload/properties/openai_key")}}
