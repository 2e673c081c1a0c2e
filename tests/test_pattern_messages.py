"""Each pattern of the schemas has its own message: a value that breaks one is told what that
pattern asks, never another pattern's rule."""

import json
import os

import pytest

from mip import errors
from mip import schemas
from mip.settings import SCHEMA_DIR


def patterns(value) -> set:
    if isinstance(value, dict):
        found = {value["pattern"]} if isinstance(value.get("pattern"), str) else set()
        return found.union(*(patterns(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(patterns(v) for v in value))
    return set()


def test_every_pattern_of_the_payload_has_its_message():
    with open(os.path.join(SCHEMA_DIR, "RunPayload.json"), encoding="utf-8") as f:
        doc = json.load(f)
    # the key's pattern is never quoted back: it is a secret (writeOnly)
    assert patterns(doc) - {doc["properties"]["openai_key"]["pattern"]} <= set(schemas.PATTERNS)


@pytest.mark.parametrize("extra, expected", [
    ({"job": "a b"}, 'job: "a b" is not a valid name'),
    ({"notify_url": "ftp://x"}, 'notify_url: "ftp://x" is not a notice URL'),
    ({"extra_switches": {"map_crop": ["a\x00"]}}, "holds a NUL character"),
])
def test_a_broken_pattern_says_what_it_asks(extra, expected):
    body = {"job": "j", "modules": ["map_crop"], "map": "m", **extra}
    with pytest.raises(errors.Invalid) as refused:
        schemas.validate(schemas.load_schemas(), "RunPayload", body)
    assert expected in str(refused.value)
    if "notify_url" in extra:
        assert "valid name" not in str(refused.value)
