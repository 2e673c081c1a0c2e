"""schemas: the JSON Schemas of schema/, loaded once, and the check of a body against one
of them.

Used by the server (RunPayload, and the documents it serves). Raises Invalid naming the
field that fails; a secret's value is never echoed back.
"""

import json
import os

import jsonschema

from mip.errors import Invalid
from mip.settings import SCHEMA_DIR

SCHEMA_NAMES = ("RunPayload", "RunStatus", "JobStatus", "ModuleStatus", "ModuleDescription",
                "Error", "Catalogue")


def load_schemas() -> dict:
    """Every schema/*.json; {name: (document, validator)}. Not checked against the
    metaschema here: that costs a tenth of a second at every start, and the files only
    change with the code, so tests/test_docs.py checks every one of them instead."""
    out = {}
    for name in SCHEMA_NAMES:
        with open(os.path.join(SCHEMA_DIR, f"{name}.json"), encoding="utf-8") as f:
            doc = json.load(f)
        out[name] = (doc, jsonschema.Draft202012Validator(doc))
    return out


# what each pattern of the schemas asks, said to the person whose value breaks it
PATTERNS = {
    "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$": "is not a valid name: use letters, digits, '_', "
                                          "'.', '-', at most 64, not starting with '.'",
    "^https?://[^\\s]+$": "is not a notice URL: expected http:// or https:// and no spaces",
    "^[^\\u0000]*$": "holds a NUL character, which cannot reach a command line",
}


def validate(schemas: dict, name: str, data) -> None:
    """Raises Invalid naming the failing field."""
    error = jsonschema.exceptions.best_match(schemas[name][1].iter_errors(data))
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        where = where.lstrip(".") or "body"
        message = error.message
        if error.schema.get("writeOnly"):  # a secret: never echoed back
            message = f"does not satisfy {error.validator} {json.dumps(error.validator_value)}"
        elif error.validator == "pattern":
            what = PATTERNS.get(error.validator_value, f"does not match {error.validator_value}")
            message = f"{json.dumps(error.instance)[:80]} {what}"
        elif error.validator == "additionalProperties" and not error.absolute_path:
            message += f"; {name} allows {', '.join(schemas[name][0]['properties'])}"
        raise Invalid(f"{where}: {message}")
