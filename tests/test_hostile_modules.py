"""A module (a container) writes into its outputs and temps folders, so what it leaves
there is hostile: links in place of its folders or files, links swapped in while a zip
streams, folders in place of files. The downloads, the S3 copy and delete serve, copy and
remove only regular files that really lie inside the module's folder (issue 21, point 1),
and the journal stays healthy. The app is called in process; S3 is moto's real server."""

import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from wsgiref.util import setup_testing_defaults

import pytest
from conftest import MAP
from conftest import payload
from conftest import s3_client

import mip_server
from mip import errors
from mip import files
from mip import journal
from mip.errors import UploadFailed
from mip.journal import Status
from mip.links.retention import remove
from mip.s3 import list_objects
from mip.s3 import upload_module
from mip.settings import Settings
from mip.status import AnswerCache
from mip.web import auth
from mip.web import follow


class Answer:
    def __init__(self, status: int, headers: dict, parts):
        self.status = status
        self.headers = headers
        self.parts = parts

    def body(self) -> bytes:
        try:
            return b"".join(self.parts)
        finally:
            getattr(self.parts, "close", lambda: None)()

    def json(self):
        return json.loads(self.body())


def call(app, path: str, method: str = "GET") -> Answer:
    """One request to the WSGI app; the body is left to iterate (a zip streams)."""
    environ = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, REMOTE_ADDR="127.0.0.1")
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = int(status.split()[0]), dict(headers)

    parts = app(environ, start_response)
    return Answer(seen["status"], seen["headers"], parts)


class Site:
    """The app made by the factory over private data folders, and a passed run of
    map_crop in job s1 whose outputs and temps hold a few files."""

    def __init__(self, env: dict, **extra):
        self.settings = Settings.from_env(env)
        self.settings.make_dirs()
        self.cfg = mip_server.Config(settings=self.settings, auth=False, **extra)
        self.db = journal.Journal(self.settings.journal_path)
        self.db.migrate()
        self.queue = mip_server.RunQueue(self.cfg, self.db)
        self.ctx = mip_server.make_context(self.cfg, self.db, self.queue)
        self.app = mip_server.build_app(self.ctx)
        self.runs = {}

    def passed(self, job: str, module: str = "map_crop", payload: dict | None = None) -> str:
        body = payload or {"job": job, "modules": [module], "map": MAP}
        run_id = self.db.create_run(job, MAP, [module], False, body,
                                    os.path.join(self.settings.runs_dir, "logs"))
        self.db.set_run_status(run_id, Status.RUNNING, pid=None)
        exec_id = self.db.start_execution(run_id, job, module, self.path("outputs", job,
                                                                         f"{module}.log"))
        self.db.finish_execution(exec_id, Status.PASSED, 0, None)
        self.db.set_run_status(run_id, Status.PASSED)
        for kind in ("outputs", "temps"):
            os.makedirs(self.path(kind, job, module))
            with open(self.path(kind, job, module, "result.json"), "w") as f:
                f.write('{"ok": true}')
        with open(self.path("outputs", job, f"{module}.log"), "w") as f:
            f.write("mipper's log of the module\n")
        with open(self.path("outputs", job, module, "own.log"), "w") as f:
            f.write("the module's own log\n")
        self.runs[job] = run_id
        return run_id

    def path(self, kind: str, *parts: str) -> str:
        root = self.settings.outputs_dir if kind == "outputs" else self.settings.temps_dir
        return os.path.join(root, *parts)

    def get(self, path: str) -> Answer:
        return call(self.app, path)

    def close(self) -> None:
        self.db.close()


@pytest.fixture
def site(mip_env):
    s = Site(mip_env)
    yield s
    s.close()


def names(data: bytes) -> list:
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    return [n.split("/", 1)[1] for n in archive.namelist()]


def server_secrets(settings: Settings) -> list:
    """Bytes of the server's own files that must never leave it."""
    with open(settings.key_file, "rb") as f:
        key = f.read()
    assert key
    return [key, b"SQLite format 3"]


def assert_refused(answer: Answer, where: str) -> None:
    assert answer.status == 404
    body = answer.json()
    assert body["error"] == "not_a_folder"
    assert where in body["message"] and "never followed" in body["message"]


def assert_journal_healthy(site: Site, job: str) -> None:
    answer = site.get(f"/runs/{site.runs[job]}")
    assert answer.status == 200, answer.body()
    assert answer.json()["status"] == "passed"
    # and it can be written: a new run is recorded and read back
    run_id = site.db.create_run(job, MAP, ["map_crop"], False, {}, site.settings.runs_dir)
    assert site.get(f"/runs/{run_id}").status == 200


# ---------------------------------------------------------------------------- folders

def test_a_module_folder_linked_to_the_runs_folder_is_refused(site, caplog):
    site.passed("s1")
    folder = site.path("outputs", "s1", "map_crop")
    os.rename(folder, folder + ".orig")
    os.symlink(site.settings.runs_dir, folder)
    with open(os.path.join(site.settings.runs_dir, "runners.log"), "w") as f:
        f.write("runners' log\n")
    with caplog.at_level(logging.WARNING, "mip.files"):
        for route in ("/jobs/s1/map_crop/outputs", "/modules/s1/map_crop/outputs",
                      "/jobs/s1/map_crop/logs"):
            assert_refused(site.get(route), "outputs/s1/map_crop")
    assert "refused outputs/s1/map_crop: it is a symbolic link" in caplog.text
    # the temps of the module are a real folder: still served
    assert names(site.get("/jobs/s1/map_crop/temps").body()) == ["result.json"]
    assert_journal_healthy(site, "s1")


def test_a_temps_folder_linked_to_etc_is_refused(site):
    site.passed("s1")
    shutil.rmtree(site.path("temps", "s1", "map_crop"))
    os.symlink("/etc", site.path("temps", "s1", "map_crop"))
    assert_refused(site.get("/jobs/s1/map_crop/temps"), "temps/s1/map_crop")
    assert names(site.get("/jobs/s1/map_crop/outputs").body()) == ["own.log", "result.json"]


def test_a_job_folder_that_is_a_link_is_refused(site, tmp_path):
    site.passed("s2")
    elsewhere = tmp_path / "elsewhere"
    os.rename(site.path("outputs", "s2"), elsewhere)
    os.symlink(elsewhere, site.path("outputs", "s2"))
    for kind in ("outputs", "logs"):
        assert_refused(site.get(f"/jobs/s2/map_crop/{kind}"), "outputs/s2")
    # a file in place of the folder is no folder either
    shutil.rmtree(site.path("temps", "s2"))
    with open(site.path("temps", "s2"), "w") as f:
        f.write("x")
    answer = site.get("/jobs/s2/map_crop/temps")
    assert answer.status == 404 and "temps/s2 is not a folder" in answer.json()["message"]
    assert_journal_healthy(site, "s2")


def test_links_and_special_files_inside_the_folder_are_left_out(site, tmp_path):
    site.passed("s1")
    folder = site.path("outputs", "s1", "map_crop")
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    os.symlink(outside, os.path.join(folder, "escape.txt"))
    # a link to a file of the same folder goes too: the file itself is in the zip
    os.symlink(os.path.join(folder, "result.json"), os.path.join(folder, "inside.json"))
    os.symlink("result.json", os.path.join(folder, "relative.json"))
    os.symlink(site.settings.runs_dir, os.path.join(folder, "runs"))
    os.mkfifo(os.path.join(folder, "pipe.log"))
    os.makedirs(os.path.join(folder, "sub"))
    with open(os.path.join(folder, "sub", "deep.txt"), "w") as f:
        f.write("deep")
    data = site.get("/jobs/s1/map_crop/outputs").body()
    assert names(data) == ["own.log", "result.json", "sub/deep.txt"]
    assert b"private" not in data
    assert names(site.get("/jobs/s1/map_crop/logs").body()) == ["map_crop.log", "own.log"]


def test_folders_past_the_depth_bound_are_left_out(site, caplog):
    site.passed("s1")
    folder = site.path("outputs", "s1", "map_crop")
    deep = os.path.join(folder, *["d"] * (files.MAX_DEPTH + 5))
    os.makedirs(deep)
    for depth in (3, files.MAX_DEPTH, files.MAX_DEPTH + 1):
        with open(os.path.join(folder, *["d"] * depth, "x.txt"), "w") as f:
            f.write("x")
    with caplog.at_level(logging.WARNING, "mip.files"):
        got = names(site.get("/jobs/s1/map_crop/outputs").body())
    assert "/".join(["d"] * 3 + ["x.txt"]) in got
    assert "/".join(["d"] * files.MAX_DEPTH + ["x.txt"]) in got
    assert not [n for n in got if n.count("/") > files.MAX_DEPTH]
    assert f"deeper than {files.MAX_DEPTH} folders" in caplog.text


def test_mippers_log_in_the_job_folder_is_not_followed(site, tmp_path):
    site.passed("s1")
    own_log = site.path("outputs", "s1", "map_crop.log")
    os.remove(own_log)
    os.symlink(site.settings.key_file, own_log)
    data = site.get("/jobs/s1/map_crop/logs").body()
    assert names(data) == ["own.log"]
    for secret in server_secrets(site.settings):
        assert secret not in data


# ---------------------------------------------------------------------------- hard links

def link_the_servers_files(site: Site, folder: str) -> dict:
    """Hard links in the module's folder to the journal, its -wal and -shm and the key
    file (a module can ln them: a regular file inside the folder), by the name each has."""
    journal_path = site.settings.journal_path
    targets = {"j.db": journal_path, "j.db-wal": journal_path + "-wal",
               "j.db-shm": journal_path + "-shm", "key.log": site.settings.key_file}
    for name, target in targets.items():
        assert os.path.exists(target), target  # the open journal in WAL mode has all three
        os.link(target, os.path.join(folder, name))
    return targets


def test_hard_links_to_the_journal_and_key_file_are_never_served(site, tmp_path, caplog):
    site.passed("s1")
    folder = site.path("outputs", "s1", "map_crop")
    linked = link_the_servers_files(site, folder)
    # any second name is refused, wherever the first lies: outside, or in the folder itself
    (tmp_path / "outside.txt").write_text("private")
    os.link(tmp_path / "outside.txt", os.path.join(folder, "outside.log"))
    os.link(os.path.join(folder, "own.log"), os.path.join(folder, "twin.log"))
    with open(os.path.join(folder, "plain.log"), "w") as f:
        f.write("a log of one name\n")
    # mipper's log of the module, in the job folder, too
    own_log = site.path("outputs", "s1", "map_crop.log")
    os.remove(own_log)
    os.link(site.settings.key_file, own_log)
    with caplog.at_level(logging.WARNING, "mip.files"):
        outputs = site.get("/jobs/s1/map_crop/outputs").body()
        logs = site.get("/jobs/s1/map_crop/logs").body()
    assert names(outputs) == ["plain.log", "result.json"]
    assert names(logs) == ["plain.log"]
    for data in (outputs, logs):
        for secret in server_secrets(site.settings) + [b"private"]:
            assert secret not in data
    for name, what in (("j.db", "the journal"), ("j.db-wal", "the journal's -wal"),
                       ("j.db-shm", "the journal's -shm"), ("key.log", "the key file")):
        assert f"outputs/s1/map_crop/{name}: it is {what}, linked here" in caplog.text
    assert "outputs/s1/map_crop/outside.log: a hard link (2 names)" in caplog.text
    assert "outputs/s1/map_crop/own.log: a hard link (2 names)" in caplog.text
    assert "outputs/s1/map_crop.log: it is the key file" in caplog.text
    # the log follow reads mipper's log as empty rather than the key file
    follow = site.get("/modules/s1/map_crop/log")
    assert follow.status == 200 and follow.body() == b""
    assert follow.headers["X-Log-Offset"] == "0"
    assert len(linked) == 4
    assert_journal_healthy(site, "s1")


def test_judging_a_link_to_the_journal_keeps_the_journals_locks(tmp_path):
    """Closing any descriptor of a file drops every POSIX lock the process holds on it, so a
    link to the journal's files must be refused before it is opened for reading: else each
    zip or log poll would hand the server's SQLite locks to whoever asks next."""
    db = str(tmp_path / "j.db")
    held = sqlite3.connect(db, isolation_level=None)
    held.execute("PRAGMA journal_mode=WAL")
    held.execute("CREATE TABLE t (x)")
    held.execute("BEGIN IMMEDIATE")
    held.execute("INSERT INTO t VALUES (1)")
    folder = tmp_path / "out"
    folder.mkdir()
    private = {}
    for suffix in ("", "-wal", "-shm"):
        os.link(db + suffix, folder / f"j.db{suffix}")
        info = os.stat(db + suffix)
        private[(info.st_dev, info.st_ino)] = f"the journal{suffix}"
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for suffix in ("", "-wal", "-shm"):
            assert files.open_file(dir_fd, f"j.db{suffix}", f"j.db{suffix}", private) is None
            assert follow.read_from(str(folder / f"j.db{suffix}"), str(folder), 0,
                                    private) == (b"", 0)
    finally:
        os.close(dir_fd)
    writer = ("import sqlite3, sys\n"
              "c = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)\n"
              "c.execute('BEGIN IMMEDIATE')\n")
    child = subprocess.run([sys.executable, "-c", writer, db], capture_output=True,
                           text=True, timeout=60)
    held.execute("ROLLBACK")
    held.close()
    assert child.returncode != 0 and "database is locked" in child.stderr, child.stderr


def test_s3_upload_leaves_hard_links_out(mip_env, bucket):
    client, name = bucket
    s = s3_site(mip_env, name)
    try:
        s.passed("s1")
        link_the_servers_files(s, s.path("temps", "s1", "map_crop"))
        os.link(s.path("outputs", "s1", "map_crop", "own.log"),
                s.path("outputs", "s1", "map_crop", "twin.log"))
        upload_module(s.settings, "s1", "map_crop", client)
        assert keys(client, name) == [
            "r/s1/map_crop/logs/map_crop.log", "r/s1/map_crop/outputs/result.json",
            "r/s1/map_crop/temps/result.json"]
        assert_journal_healthy(s, "s1")
    finally:
        s.close()


# ---------------------------------------------------------------------------- mid-zip

def big_first_file(site: Site, job: str) -> str:
    """The module's outputs: a.bin (8 MB, incompressible, so stored and streamed in
    many pieces) before b.txt and sub/c.txt."""
    folder = site.path("outputs", job, "map_crop")
    os.remove(os.path.join(folder, "result.json"))
    os.remove(os.path.join(folder, "own.log"))
    with open(os.path.join(folder, "a.bin"), "wb") as f:
        f.write(os.urandom(8 * 2**20))
    with open(os.path.join(folder, "b.txt"), "w") as f:
        f.write("b")
    os.makedirs(os.path.join(folder, "sub"))
    with open(os.path.join(folder, "sub", "c.txt"), "w") as f:
        f.write("c")
    return folder


def swap_link(site, folder):
    os.remove(os.path.join(folder, "b.txt"))
    os.symlink(site.settings.key_file, os.path.join(folder, "b.txt"))
    shutil.rmtree(os.path.join(folder, "sub"))
    os.symlink(site.settings.runs_dir, os.path.join(folder, "sub"))
    return "b.txt: a symbolic link, never followed"


def swap_folder(site, folder):
    os.remove(os.path.join(folder, "b.txt"))
    os.makedirs(os.path.join(folder, "b.txt"))
    return "b.txt: no longer a regular file but a folder"


@pytest.mark.parametrize("swap", [swap_link, swap_folder])
def test_a_file_swapped_while_an_earlier_one_streams_is_skipped(site, caplog, swap):
    site.passed("s1")
    folder = big_first_file(site, "s1")
    answer = site.get("/jobs/s1/map_crop/outputs")
    assert answer.status == 200
    parts = iter(answer.parts)
    first = next(parts)
    with caplog.at_level(logging.WARNING, "mip.files"):
        logged = swap(site, folder)
        data = first + b"".join(parts)
    answer.parts.close()
    got = names(data)
    assert got[0] == "a.bin" and "b.txt" not in got
    for secret in server_secrets(site.settings):
        assert secret not in data
    skipped = [r.getMessage() for r in caplog.records if "b.txt" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].endswith(logged), skipped
    assert_journal_healthy(site, "s1")


# ---------------------------------------------------------------------------- real server

def test_the_journal_stays_healthy_after_the_reproductions(server):
    """As it was found: a real run, its folders swapped for links to the runs folder and
    /etc, the zips asked for, then the next run must still be recorded and read (serving
    journal.db from the server's process dropped its SQLite locks)."""
    first = server.post("/runs", json=payload("s1", "map_crop")).json()["run_id"]
    assert server.wait_run(first)["status"] == "passed"
    env = server.env
    folder = os.path.join(env["TA1_OUTPUTS_DIR"], "s1", "map_crop")
    os.rename(folder, folder + ".orig")
    os.symlink(env["TA1_RUNS_DIR"], folder)
    temps = os.path.join(env["TA1_TEMPS_DIR"], "s1", "map_crop")
    shutil.rmtree(temps)
    os.symlink("/etc", temps)
    for kind in ("outputs", "logs", "temps"):
        answer = server.get(f"/jobs/s1/map_crop/{kind}")
        assert answer.status_code == 404 and answer.json()["error"] == "not_a_folder", kind
    assert server.get(f"/runs/{first}").status_code == 200
    second = server.post("/runs", json=payload("s3", "map_crop")).json()["run_id"]
    assert server.wait_run(second)["status"] == "passed"
    assert server.get(f"/runs/{first}").json()["status"] == "passed"
    assert "disk I/O error" not in server.output()
    assert "refused outputs/s1/map_crop: it is a symbolic link" in server.output()


# ---------------------------------------------------------------------------- S3

@pytest.fixture
def bucket(moto_endpoint, monkeypatch):
    env = {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = s3_client(env)
    name = f"hostile-{os.getpid()}-{id(client):x}"
    client.create_bucket(Bucket=name)
    return client, name


def s3_site(mip_env, bucket_name):
    return Site(dict(mip_env, MIP_S3_BUCKET=bucket_name, MIP_S3_PREFIX="r", MIP_S3_TEMPS="1"))


def keys(client, name, prefix="r/"):
    return sorted(o["Key"] for o in list_objects(client, name, prefix))


def test_s3_upload_of_a_linked_module_or_job_folder_sends_nothing(mip_env, bucket, tmp_path):
    client, name = bucket
    s = s3_site(mip_env, name)
    try:
        s.passed("s1")
        s.passed("s2")
        folder = s.path("outputs", "s1", "map_crop")
        os.rename(folder, folder + ".orig")
        os.symlink(s.settings.runs_dir, folder)
        with pytest.raises(UploadFailed, match="outputs/s1/map_crop is a symbolic link"):
            upload_module(s.settings, "s1", "map_crop", client)
        os.rename(s.path("temps", "s2"), tmp_path / "moved")
        os.symlink(tmp_path / "moved", s.path("temps", "s2"))
        with pytest.raises(UploadFailed, match="temps/s2 is a symbolic link"):
            upload_module(s.settings, "s2", "map_crop", client)
        assert keys(client, name) == []
    finally:
        s.close()


def test_s3_upload_sends_only_regular_files_inside(mip_env, bucket, tmp_path):
    client, name = bucket
    s = s3_site(mip_env, name)
    try:
        s.passed("s1")
        folder = s.path("outputs", "s1", "map_crop")
        os.symlink(s.settings.key_file, os.path.join(folder, "key.log"))
        os.symlink("/etc", os.path.join(folder, "etc"))
        os.symlink("result.json", os.path.join(folder, "inside.json"))
        os.symlink("/etc/passwd", s.path("temps", "s1", "map_crop", "passwd"))
        upload_module(s.settings, "s1", "map_crop", client)
        assert keys(client, name) == [
            "r/s1/map_crop/logs/map_crop.log", "r/s1/map_crop/logs/own.log",
            "r/s1/map_crop/outputs/own.log", "r/s1/map_crop/outputs/result.json",
            "r/s1/map_crop/temps/result.json"]
        body = client.get_object(Bucket=name, Key="r/s1/map_crop/outputs/result.json")["Body"]
        assert body.read() == b'{"ok": true}'
    finally:
        s.close()


# ---------------------------------------------------------------------------- delete

def test_remove_never_goes_through_a_linked_folder(mip_env, tmp_path, caplog):
    s = Site(mip_env)
    try:
        s.passed("s1")
        outside = tmp_path / "outside"
        (outside / "map_crop").mkdir(parents=True)
        (outside / "map_crop" / "precious").write_text("keep me")
        shutil.rmtree(s.path("temps", "s1"))
        os.symlink(outside, s.path("temps", "s1"))
        assert remove(s.settings.temps_dir, "s1", "map_crop") is None
        assert "a folder on its way is a symlink" in caplog.text
        assert (outside / "map_crop" / "precious").read_text() == "keep me"
        # inside a real folder, a link is removed itself, never what it leads to
        os.symlink(outside, s.path("outputs", "s1", "map_crop", "escape"))
        assert remove(s.settings.outputs_dir, "s1", "map_crop") == "outputs/s1/map_crop"
        assert not os.path.lexists(s.path("outputs", "s1", "map_crop"))
        assert (outside / "map_crop" / "precious").read_text() == "keep me"
        assert remove(s.settings.temps_dir, "s1") == "temps/s1"
        assert not os.path.lexists(s.path("temps", "s1")) and outside.is_dir()
    finally:
        s.close()


# ---------------------------------------------------------------------------- answer cache

def test_the_answer_cache_is_bounded_by_bytes():
    cache = AnswerCache(None, max_bytes=2**20)
    assert cache.item_max == 2**20 // 16
    for i in range(200):
        cache.put(("run", str(i)), "x" * (50_000 + i))
        assert cache.bytes <= 2**20
    assert cache.bytes == sum(len(body) for _, body in cache.items.values())
    assert cache.get(("run", "199")) is not None and cache.get(("run", "0")) is None
    # past the per-item bound: not kept, and an older answer of the key is dropped
    cache.put(("run", "199"), "x" * (2**20 // 16 + 1))
    assert cache.get(("run", "199")) is None
    cache.drop_job("nobody")
    cache.drop(("run", "198"))
    assert cache.bytes == sum(len(body) for _, body in cache.items.values())


def test_huge_finished_answers_are_served_but_not_kept(mip_env):
    s = Site(mip_env, answer_cache_mb=1)
    try:
        cache = s.ctx.done_runs
        huge = {"job": "j0", "modules": ["map_crop"], "map": MAP, "notes": "x" * 2**20}
        big = dict(huge, notes="y" * 40_000)
        for i in range(4):
            run_id = s.passed(f"h{i}", payload=dict(huge, job=f"h{i}"))
            assert len(s.get(f"/runs/{run_id}").body()) > 2**20
        assert cache.items == {} and cache.bytes == 0
        for i in range(60):
            run_id = s.passed(f"b{i}", payload=dict(big, job=f"b{i}"))
            answer = s.get(f"/runs/{run_id}")
            assert answer.status == 200 and answer.json()["payload"]["notes"] == big["notes"]
            assert cache.bytes <= 2**20
        assert 20 <= len(cache.items) < 60
    finally:
        s.close()


def test_the_answer_cache_setting_is_read_and_checked(mip_env):
    env = dict(mip_env, MIP_USER="u", MIP_PASSWORD="p")
    def read(**more):
        return mip_server.Config.from_env(dict(env, **more), auth.hash_password)

    assert read().answer_cache_mb == 64
    assert read(MIP_ANSWER_CACHE_MB="8").answer_cache_mb == 8
    with pytest.raises(errors.MipError, match="MIP_ANSWER_CACHE_MB"):
        read(MIP_ANSWER_CACHE_MB="-1")
