"""The map check at the door: GDAL's verdict on a map, cached per file state, and the 422
`unreadable_map` that POST /runs answers for a map GDAL cannot read."""

import os

import pytest
import rasterio
from conftest import MAP
from conftest import add_map
from conftest import payload

from mip import maps


@pytest.fixture(autouse=True)
def fresh_cache():
    maps.forget()
    yield
    maps.forget()


def write_variant(sample_tif: str, dest: str, **options) -> str:
    """The sample map written again by GDAL with other creation options (driver="COG",
    compress=..., BIGTIFF=...), keeping its georeferencing."""
    with rasterio.open(sample_tif) as src:
        data = src.read()
        profile = {k: src.profile[k] for k in ("width", "height", "count", "dtype", "crs",
                                               "transform")}
    options.setdefault("driver", "GTiff")
    with rasterio.open(dest, "w", **profile, **options) as out:
        out.write(data)
    return dest


def truncated(source: str, dest: str, keep: float = 0.5) -> str:
    """A copy of source cut short, as an interrupted copy leaves it."""
    with open(source, "rb") as f:
        data = f.read()
    with open(dest, "wb") as f:
        f.write(data[:int(len(data) * keep)])
    return dest


# ---------------------------------------------------------------------------- the verdict

@pytest.mark.parametrize("options", [
    {"driver": "COG", "compress": "lzw"},
    {"compress": "deflate", "tiled": True, "blockxsize": 256, "blockysize": 256},
    {"compress": "packbits", "BIGTIFF": "YES"},
    {"compress": "jpeg", "photometric": "ycbcr"},
])
def test_maps_gdal_reads_pass(sample_tif, tmp_path, options):
    path = write_variant(sample_tif, str(tmp_path / "m.tif"), **options)
    assert maps.unreadable(path) is None


def test_the_sample_map_and_a_map_without_georeferencing_pass(sample_tif, tmp_path):
    assert maps.unreadable(sample_tif) is None
    plain = str(tmp_path / "plain.tif")
    with rasterio.open(sample_tif) as src:
        data = src.read()
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        with rasterio.open(plain, "w", driver="GTiff", width=data.shape[2],
                           height=data.shape[1], count=3, dtype="uint8") as out:
            out.write(data)
    assert maps.unreadable(plain) is None


def test_a_text_file_named_tif_is_refused_with_gdals_reason(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("these are my notes, not a map\n")
    reason = maps.unreadable(str(path), shown="maps/notes/notes.tif")
    assert "not recognized as being in a supported file format" in reason
    assert "maps/notes/notes.tif" in reason and str(tmp_path) not in reason


@pytest.mark.parametrize("options", [{}, {"driver": "COG", "compress": "lzw"}])
def test_a_truncated_tiff_is_refused_with_gdals_reason(sample_tif, tmp_path, options):
    whole = write_variant(sample_tif, str(tmp_path / "whole.tif"), **options)
    cut = truncated(whole, str(tmp_path / "cut.tif"))
    reason = maps.unreadable(cut)
    # GDAL opens the header; reading the last block finds the data missing
    assert "IReadBlock failed" in reason and "Read error" in reason, reason


def test_an_empty_or_vanished_file_is_refused(tmp_path):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    assert "not recognized" in maps.unreadable(str(empty))
    assert "No such file" in maps.unreadable(str(tmp_path / "gone.tif"))


def test_the_verdict_is_cached_until_the_file_changes(sample_tif, tmp_path):
    path = str(tmp_path / "m.tif")
    write_variant(sample_tif, path, compress="lzw")
    assert maps.unreadable(path) is None
    stat = os.stat(path)
    # same size and modification time: the cached verdict stands, GDAL is not asked again
    with open(path, "r+b") as f:
        f.write(b"\0" * 8)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert maps.unreadable(path) is None
    # a new modification time (same size): checked again, and now refused
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert "not recognized" in maps.unreadable(path)
    # a new size: checked again, and readable once more
    write_variant(sample_tif, path, compress="deflate")
    assert maps.unreadable(path) is None


# ---------------------------------------------------------------------------- at the door

def test_post_runs_refuses_an_unreadable_map_with_422(inproc, sample_tif, tmp_path):
    text = tmp_path / "text.tif"
    text.write_text("not a map at all\n")
    add_map(inproc.env, "notes", str(text))
    whole = write_variant(sample_tif, str(tmp_path / "whole.tif"), compress="lzw")
    add_map(inproc.env, "cut", truncated(whole, str(tmp_path / "cut.tif")))
    for name, gdal_says in (("notes", "not recognized as being in a supported file format"),
                            ("cut", "Read error")):
        resp = inproc.post("/runs", json=dict(payload("j-" + name, "ALL"), map=name))
        assert resp.status_code == 422, resp.text
        body = resp.json()
        assert body["error"] == "unreadable_map"
        assert f"map {name!r}" in body["message"] and gdal_says in body["message"]
        assert f"$TA1_INPUTS_DIR/maps/{name}/{name}.tif" in body["message"]
        assert inproc.env["TA1_INPUTS_DIR"] not in body["message"]
    assert inproc.get("/runs").json() == [] and inproc.get("/jobs").json() == []
    # listed all the same: the map is there, only unreadable
    assert set(inproc.get("/maps").json()) == {MAP, "notes", "cut"}


def test_maps_of_every_tiff_format_are_listed_and_accepted(inproc, sample_tif, tmp_path):
    variants = {
        "cog": {"driver": "COG", "compress": "lzw"},
        "big": {"BIGTIFF": "YES", "compress": "deflate"},
        "tiled": {"tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "packbits"},
    }
    for name, options in variants.items():
        add_map(inproc.env, name, write_variant(sample_tif, str(tmp_path / f"{name}.tif"),
                                                **options))
    assert inproc.get("/maps").json() == sorted([MAP, *variants])
    for name in variants:
        resp = inproc.post("/runs", json=dict(payload("j-" + name, "georeference"), map=name))
        assert resp.status_code == 200, resp.text
        inproc.post(f"/runs/{resp.json()['run_id']}/cancel")
