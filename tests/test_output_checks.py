"""A module's catalogue `checks` say what its outputs must hold; a module that exits 0 with
outputs that fail them has failed, and says which check and what was found."""

import json
import os
import sys
import textwrap

import pyogrio
import pytest
import shapely
from conftest import MAP
from conftest import latest
from conftest import mipper

from mip import checks
from mip.catalogue import load_catalogue


def test_folders_and_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "tiles" / "row1").mkdir(parents=True)
    (tmp_path / "tiles" / "row1" / "a.png").write_bytes(b"x")
    (tmp_path / "zero.json").write_bytes(b"")
    assert "expected at least 1 files, found 0" in checks.failure(
        {"path": str(tmp_path / "empty"), "min_files": 1})
    assert checks.failure({"path": str(tmp_path / "tiles"), "min_files": 1}) is None
    assert "expected at least 2 bytes, found 0" in checks.failure(
        {"path": str(tmp_path / "zero.json"), "min_bytes": 2})
    assert "does not exist" in checks.failure({"path": str(tmp_path / "no"), "min_bytes": 1})
    os.symlink("/etc/passwd", tmp_path / "link.json")
    assert "is a link" in checks.failure({"path": str(tmp_path / "link.json"), "min_bytes": 1})


def test_geojson_features(tmp_path):
    path = tmp_path / "p.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    assert checks.failure({"path": str(path), "min_features": 0}) is None
    assert "expected at least 1 features, found 0" in checks.failure(
        {"path": str(path), "min_features": 1})
    path.write_text("{not json")
    assert "cannot read its features" in checks.failure({"path": str(path), "min_features": 0})


def test_geopackage_layers_as_gdal_writes_them(tmp_path):
    path = str(tmp_path / "m.gpkg")
    points = shapely.points([[0, 0], [1, 1]])
    pyogrio.raw.write(path, geometry=shapely.to_wkb(points), field_data=[], fields=[],
                      layer="points", driver="GPKG", geometry_type="Point", crs="EPSG:4326")
    lines = shapely.to_wkb(shapely.linestrings([[[0, 0], [1, 1]]]))
    pyogrio.raw.write(path, geometry=lines, field_data=[], fields=[], layer="lines",
                      driver="GPKG", geometry_type="LineString", crs="EPSG:4326", append=True)
    missing = checks.failure({"path": path, "layers": ["points", "lines", "polygons"]})
    assert missing.endswith("missing polygons"), missing
    assert checks.failure({"path": path, "layers": ["points", "lines"], "min_features": 3}) \
        is None
    assert "expected at least 4 features, found 3" in checks.failure(
        {"path": path, "min_features": 4})


def test_the_catalogue_checks_its_checks(tmp_path):
    bad = tmp_path / "c.yml"
    bad.write_text(textwrap.dedent("""
        modules:
          - {name: a, version: "1", requires: [], command: [python, -c, pass], options: {},
             outputs: [], checks: [{path: $OUTPUT_DIR/a/x}]}
    """))
    with pytest.raises(Exception, match="checks"):
        load_catalogue(str(bad))
    bad.write_text(bad.read_text().replace("$OUTPUT_DIR/a/x}", "$NOPE/x, min_bytes: 1}"))
    with pytest.raises(Exception, match=r"\$NOPE"):
        load_catalogue(str(bad))


def test_a_module_whose_output_fails_its_check_fails(mip_env, tmp_path):
    """A module that exits 0 with an empty output: the run fails, and its message names the
    check and what was found."""
    writer = tmp_path / "writer.py"
    writer.write_text("import os, sys\nos.makedirs(sys.argv[2], exist_ok=True)\n"
                      "open(os.path.join(sys.argv[2], 'out.json'), 'w').close()\n")
    config = tmp_path / "config.yml"
    config.write_text(textwrap.dedent(f"""
        modules:
          - name: empty_writer
            version: "1"
            requires: []
            command: [{sys.executable}, {writer}]
            options:
              out: $OUTPUT_DIR/empty_writer
            outputs: [$OUTPUT_DIR/empty_writer/out.json]
            checks:
              - {{path: $OUTPUT_DIR/empty_writer/out.json, min_bytes: 2}}
    """))
    env = dict(mip_env, MIP_CONFIG=str(config))
    done = mipper(env, "--job", "chk", "--map", MAP, "--module", "empty_writer")
    assert done.returncode == 1, done.stdout + done.stderr
    message = latest(env, "chk")["empty_writer"]["message"]
    assert message == "check of out.json: expected at least 2 bytes, found 0"
    assert "check of out.json" in done.stderr
