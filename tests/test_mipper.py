"""mipper on the sample map with the stand-in modules: real luigi, subprocesses, SQLite."""

import os
import pathlib
import sqlite3
import time

import yaml
from conftest import MAP
from conftest import ROOT
from conftest import mipper
from conftest import read

from mip import journal

ALL_MODULES = ["legend_segment", "georeference", "legend_item_segment", "map_crop",
               "legend_item_description", "polygon_extract", "line_extract", "point_extract",
               "geopackage"]


def executions(env, job):
    db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
    try:
        return db.connect().execute(
            "SELECT * FROM executions WHERE job = ? ORDER BY id", (job,)).fetchall()
    finally:
        db.close()


def latest(env, job):
    return {row["module"]: dict(row) for row in executions(env, job)}


def expected_outputs(env, job):
    with open(os.path.join(ROOT, "config.yml")) as f:
        catalogue = yaml.safe_load(f)
    out = os.path.join(env["TA1_OUTPUTS_DIR"], job)
    for module in catalogue["modules"]:
        for path in module["outputs"]:
            yield module["name"], path.replace("$OUTPUT_DIR", out).replace("$MAP_NAME", MAP)


def test_whole_graph_passes_and_writes_every_output(mip_env):
    result = mipper(mip_env, "--job", "j1", "--map", MAP, "--module", "ALL")
    assert result.returncode == 0, result.stderr
    runs = latest(mip_env, "j1")
    assert sorted(runs) == sorted(ALL_MODULES)
    assert {r["status"] for r in runs.values()} == {"passed"}
    for module, path in expected_outputs(mip_env, "j1"):
        assert os.path.exists(path), f"{module} did not write {path}"
    log = os.path.join(mip_env["TA1_OUTPUTS_DIR"], "j1", "map_crop.log")
    assert "map_crop passed" in read(log)
    # a second run of the same modules executes nothing
    again = mipper(mip_env, "--job", "j1", "--map", MAP, "--module", "ALL")
    assert again.returncode == 0
    assert len(executions(mip_env, "j1")) == len(ALL_MODULES)
    assert "to execute: nothing" in again.stderr


def test_failure_stops_dependents_only_and_rerun_executes_only_what_failed(mip_env):
    # an extra switch may only name paths in the job's own output or temp folder
    flag = pathlib.Path(mip_env["TA1_TEMPS_DIR"], "j2", "flag")
    args = ["--job", "j2", "--map", MAP, "--module", "ALL",
            "--extra-switch", "map_crop=--fail-unless-exists", "--extra-switch",
            f"map_crop={flag}"]
    first = mipper(mip_env, *args)
    assert first.returncode == 1
    runs = latest(mip_env, "j2")
    assert runs["map_crop"]["status"] == "failed"
    assert runs["map_crop"]["exit_code"] == 1
    for dependent in ("line_extract", "point_extract", "geopackage"):
        assert dependent not in runs
    for independent in ("legend_segment", "georeference", "legend_item_segment",
                        "legend_item_description", "polygon_extract"):
        assert runs[independent]["status"] == "passed"
    assert "map_crop failed" in first.stderr

    flag.write_text("now it exists")
    second = mipper(mip_env, *args)
    assert second.returncode == 0, second.stderr
    after = latest(mip_env, "j2")
    rerun = {m for m in after if after[m]["id"] != runs.get(m, {}).get("id")}
    assert rerun == {"map_crop", "line_extract", "point_extract", "geopackage"}
    for kept in ("legend_segment", "georeference", "polygon_extract"):
        assert after[kept]["start_time"] == runs[kept]["start_time"]


def test_fail_switch_fails_run(mip_env):
    result = mipper(mip_env, "--job", "j3", "--map", MAP, "--module", "georeference",
                    "--extra-switch", "georeference=--fail")
    assert result.returncode == 1
    assert latest(mip_env, "j3")["georeference"]["status"] == "failed"


def test_force_rerun_reruns_named_targets_and_their_dependents(mip_env):
    assert mipper(mip_env, "--job", "j4", "--map", MAP, "--module", "map_crop").returncode == 0
    before = latest(mip_env, "j4")
    assert set(before) == {"legend_segment", "map_crop"}
    again = mipper(mip_env, "--job", "j4", "--map", MAP, "--module", "map_crop", "--force-rerun")
    assert again.returncode == 0
    after = latest(mip_env, "j4")
    assert after["map_crop"]["id"] != before["map_crop"]["id"]
    assert after["legend_segment"]["id"] == before["legend_segment"]["id"]
    # forcing a predecessor reruns what depends on it within the run
    forced = mipper(mip_env, "--job", "j4", "--map", MAP, "--module", "legend_segment",
                    "--module", "map_crop", "--force-rerun")
    assert forced.returncode == 0
    last = latest(mip_env, "j4")
    assert last["legend_segment"]["id"] != after["legend_segment"]["id"]
    assert last["map_crop"]["id"] != after["map_crop"]["id"]


def test_extra_switches_reach_the_module_argv_as_separate_arguments(mip_env):
    odd = pathlib.Path(mip_env["TA1_OUTPUTS_DIR"], "j5", "a file; with $(spaces) & `quotes`")
    odd.parent.mkdir(parents=True)
    odd.write_text("x")
    result = mipper(mip_env, "--job", "j5", "--map", MAP, "--module", "legend_segment",
                    "--extra-switch", "legend_segment=--fail-unless-exists",
                    "--extra-switch", f"legend_segment={odd}")
    assert result.returncode == 0, result.stderr
    log = read(os.path.join(mip_env["TA1_OUTPUTS_DIR"], "j5", "legend_segment.log"))
    assert "--fail-unless-exists" in log.splitlines()[1]
    assert "with $(spaces)" in log


def test_module_that_exits_0_without_its_outputs_fails(mip_env, tmp_path):
    with open(os.path.join(ROOT, "config.yml")) as f:
        catalogue = yaml.safe_load(f)
    for module in catalogue["modules"]:
        if module["name"] == "georeference":
            module["outputs"].append("$OUTPUT_DIR/georeference/$MAP_NAME_never_written.json")
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(catalogue))
    env = dict(mip_env, MIP_CONFIG=str(path))
    os.symlink(os.path.join(ROOT, "modules"), tmp_path / "modules")
    result = mipper(env, "--job", "j6", "--map", MAP, "--module", "georeference")
    assert result.returncode == 1
    row = latest(env, "j6")["georeference"]
    assert row["status"] == "failed" and row["exit_code"] == 0
    assert f"georeference/{MAP}_never_written.json" in row["message"]


# a module that only honours --sleep: what is timed below is mipper's scheduling, not the
# stand-ins' own start-up (they load GDAL, which costs most of a second on a busy machine)
SLEEPER = 'while [ $# -gt 0 ]; do if [ "$1" = --sleep ]; then sleep "$2"; fi; shift; done'


def test_independent_modules_run_in_parallel(mip_env, tmp_path):
    with open(os.path.join(ROOT, "config.yml")) as f:
        catalogue = yaml.safe_load(f)
    for module in catalogue["modules"]:
        module["command"] = ["sh", "-c", SLEEPER, "sleeper"]
        module["outputs"] = []
        module.pop("checks", None)
    path = tmp_path / "sleepers.yml"
    path.write_text(yaml.safe_dump(catalogue))
    args = ["--job", "j7", "--map", MAP, "--module", "ALL"]
    for module in ALL_MODULES:
        args += ["--extra-switch", f"{module}=--sleep", "--extra-switch", f"{module}=1"]
    started = time.monotonic()
    result = mipper(dict(mip_env, MIP_CONFIG=str(path)), *args)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    # nine modules of 1 s each, run one after another, would take 9 s; the critical path is
    # five deep, so 5 s and mipper's own start-up
    assert took < 8, f"whole graph took {took:.1f} s"


def test_bad_catalogue_gives_one_line_naming_module_and_field(mip_env, tmp_path):
    with open(os.path.join(ROOT, "config.yml")) as f:
        catalogue = yaml.safe_load(f)
    del catalogue["modules"][3]["version"]
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(catalogue))
    result = mipper(dict(mip_env, MIP_CONFIG=str(path)), "--list-modules")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "map_crop" in lines[0] and "version" in lines[0]

    catalogue["modules"][3]["version"] = "1"
    catalogue["modules"][0]["requires"] = ["geopackage"]
    path.write_text(yaml.safe_dump(catalogue))
    cycle = mipper(dict(mip_env, MIP_CONFIG=str(path)), "--list-modules")
    assert cycle.returncode == 2 and "cycle" in cycle.stderr

    path.write_text("modules: [unclosed")
    broken = mipper(dict(mip_env, MIP_CONFIG=str(path)), "--list-modules")
    assert broken.returncode == 2 and "not valid YAML" in broken.stderr


def test_bad_names_give_one_clear_line(mip_env):
    for args, words in [
        (["--job", "j8", "--map", "Nowhere", "--module", "ALL"], "no map 'Nowhere'"),
        (["--job", "../up", "--map", MAP, "--module", "ALL"], "bad job name"),
        (["--job", "j8", "--map", MAP, "--module", "nope"], "unknown module 'nope'"),
        (["--job", "j8", "--map", "../x", "--module", "ALL"], "bad map name"),
    ]:
        result = mipper(mip_env, *args)
        assert result.returncode == 2, args
        assert words in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_job_stays_bound_to_its_first_map(mip_env, sample_tif):
    from conftest import add_map

    add_map(mip_env, "Other_Map", sample_tif)
    assert mipper(mip_env, "--job", "j9", "--map", MAP, "--module", "georeference").returncode == 0
    result = mipper(mip_env, "--job", "j9", "--map", "Other_Map", "--module", "georeference")
    assert result.returncode == 2 and "bound to map" in result.stderr


def test_list_modules_and_deps(mip_env):
    listing = mipper(mip_env, "--list-modules")
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ALL_MODULES
    deps = mipper(mip_env, "--list-deps", "line_extract")
    assert deps.stdout.split() == ["legend_segment", "legend_item_segment", "map_crop",
                                   "legend_item_description"]


def test_journal_settings_and_idempotent_migration(tmp_path):
    db = journal.Journal(str(tmp_path / "j.db"))
    db.migrate()
    db.migrate()
    conn = db.connect()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    r1 = db.create_run("job", "map", ["ALL"], False, {}, str(tmp_path))
    assert db.set_run_status(r1, journal.Status.RUNNING, pid=1)
    assert db.set_run_status(r1, journal.Status.CANCELLED)
    # a finished run never changes again
    assert not db.set_run_status(r1, journal.Status.FAILED)
    assert db.run(r1)["status"] == "cancelled"
    try:
        db.create_run("job", "other", ["ALL"], False, {}, str(tmp_path))
    except journal.JournalError as e:
        assert "bound to map" in str(e)
    else:
        raise AssertionError("a job bound to one map took another")
    with sqlite3.connect(str(tmp_path / "j.db")) as raw:
        try:
            raw.execute("UPDATE runs SET status = 'bogus'")
        except sqlite3.IntegrityError:
            pass
        else:
            raise AssertionError("status CHECK missing")
    db.close()


def test_run_ids_are_unique_and_sorted():
    ids = [journal.new_run_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_modules_do_not_get_the_hosts_secrets(mip_env, tmp_path):
    env = dict(mip_env, MIP_CDR_SECRET="cdr-secret-value", AWS_SECRET_ACCESS_KEY="aws-secret",
               MIP_PASSWORD="server-password", MIP_OPENAI_KEY="sk-openai-value")
    probe = tmp_path / "probe.py"
    probe.write_text("import os, sys\n"
                     "names = sorted(k for k in os.environ if 'SECRET' in k or 'PASSWORD' in k"
                     " or k == 'OPENAI_API_KEY')\n"
                     "open(sys.argv[sys.argv.index('--out') + 1], 'w').write(' '.join(names))\n")
    catalogue = tmp_path / "config.yml"
    catalogue.write_text(f"""modules:
  - name: probe
    version: "1"
    requires: []
    command: [python, {probe}]
    options: {{out: $OUTPUT_DIR/probe/names.txt}}
    outputs: [$OUTPUT_DIR/probe/names.txt]
""")
    result = mipper(dict(env, MIP_CONFIG=str(catalogue)), "--job", "env", "--map", MAP,
                    "--module", "probe")
    assert result.returncode == 0, result.stderr
    names = read(os.path.join(env["TA1_OUTPUTS_DIR"], "env", "probe", "names.txt")).split()
    assert names == ["OPENAI_API_KEY"]


def test_a_mipper_the_server_started_never_migrates_and_refuses_another_version(mip_env):
    """With --run-id the server has migrated: mipper only reads the journal's version, and
    one of another version is refused in one line, the file left as it was."""
    path = os.path.join(mip_env["TA1_RUNS_DIR"], "journal.db")
    db = journal.Journal(path)
    db.migrate()
    run_id = db.create_run("v1", MAP, ["map_crop"], False, {}, mip_env["TA1_RUNS_DIR"])
    db.connect().execute(f"PRAGMA user_version = {db.version() + 1}")
    db.close()
    result = mipper(mip_env, "--run-id", run_id, "--job", "v1", "--map", MAP,
                    "--module", "map_crop")
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "mipper: error:" in result.stderr and "version" in result.stderr, result.stderr
    db = journal.Journal(path)
    assert db.run(run_id)["status"] == "not_started"
    db.close()
