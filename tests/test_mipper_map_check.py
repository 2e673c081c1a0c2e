"""mipper run by hand checks the map as the server's door does: a file GDAL cannot read fails
at once, in one line with GDAL's reason, before any module meets it."""

import os
import subprocess
import sys

from conftest import add_map
from conftest import mipper


def truncated_copy(source: str, dest_dir, keep: int = 3000) -> str:
    path = os.path.join(dest_dir, "cut.tif")
    with open(source, "rb") as f, open(path, "wb") as out:
        out.write(f.read(keep))
    return path


def test_a_truncated_map_fails_at_once_with_gdals_reason(mip_env, sample_tif, tmp_path):
    add_map(mip_env, "cut", truncated_copy(sample_tif, tmp_path))
    done = mipper(mip_env, "--job", "cut", "--map", "cut", "--module", "map_crop")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mipper: error: map 'cut': GDAL cannot read "
                               "$TA1_INPUTS_DIR/maps/cut/cut.tif: ")
    assert "TIFF" in lines[0] and "Traceback" not in done.stderr
    # nothing ran, and nothing of the server's folders shows in the reason
    assert not os.path.exists(os.path.join(mip_env["TA1_OUTPUTS_DIR"], "cut"))
    assert mip_env["TA1_INPUTS_DIR"] not in lines[0]


def test_mipper_never_loads_gdal_itself(mip_env):
    code = ("import sys, mipper; from mip.settings import Settings; import os;"
            "from mip import maps;"
            "maps.check_readable(Settings.from_env(os.environ), 'WY_CO_Peach', in_child=True);"
            "assert 'rasterio' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], env=mip_env, capture_output=True,
                          text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
