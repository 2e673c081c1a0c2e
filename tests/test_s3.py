"""Results copied to a real S3-compatible server (moto's, started on loopback)."""

import io
import os
import shutil
import zipfile

from conftest import Server
from conftest import kill_leftover_runs
from conftest import mipper
from conftest import payload
from conftest import s3_client

from mip.files import module_files
from mip.s3 import S3_PART
from mip.settings import Settings

ALL = 9


def objects(client, bucket, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", ())}


def local_files(env, job, module):
    """{kind: [(name, bytes)]} of what the walk would copy to S3."""
    settings = Settings.from_env(env)
    return {kind: [(name, f.read()) for name, f in files]
            for kind, files in module_files(settings, job, module).items()}


def start(env):
    return Server(env).start()


def test_whole_graph_lands_in_s3_with_the_right_keys_and_bytes(s3_env):
    client = s3_client(s3_env)
    bucket = s3_env["MIP_S3_BUCKET"]
    client.create_bucket(Bucket=bucket)
    srv = start(s3_env)
    try:
        run_id = srv.post("/runs", json=payload("s3all", "ALL")).json()["run_id"]
        final = srv.wait_run(run_id)
        assert final["status"] == "passed", final["log"]
        for module in final["module_status"]:
            status = srv.get(f"/modules/s3all/{module}").json()
            assert status["upload_status"] == "uploaded"
            assert status["s3_uri"] == f"s3://{bucket}/results/s3all/{module}/"
            for kind, files in local_files(s3_env, "s3all", module).items():
                prefix = f"results/s3all/{module}/{kind}/"
                there = objects(client, bucket, prefix)
                assert sorted(there) == sorted(prefix + name for name, _ in files), module
                assert files or kind == "logs"
                for name, data in files[:5]:
                    body = client.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
                    assert body == data
        assert objects(client, bucket, "results/s3all/map_crop/logs/")
    finally:
        srv.stop()
        kill_leftover_runs(s3_env)


def test_failed_upload_keeps_local_data_and_a_rerun_completes_it(s3_env):
    bucket = s3_env["MIP_S3_BUCKET"]  # not created yet: every upload fails
    srv = start(s3_env)
    try:
        run_id = srv.post("/runs", json=payload("s3fail", "map_crop")).json()["run_id"]
        final = srv.wait_run(run_id)
        assert final["status"] == "failed"
        assert final["module_status"] == {"legend_segment": "passed", "map_crop": "passed"}
        assert "upload" in final["log"]
        status = srv.get("/modules/s3fail/map_crop").json()
        assert status["status"] == "passed"
        assert status["upload_status"] == "failed" and status["s3_uri"] is None
        assert "NoSuchBucket" in status["upload_message"]
        assert os.listdir(os.path.join(s3_env["TA1_OUTPUTS_DIR"], "s3fail", "map_crop"))
        assert srv.get("/modules/s3fail/map_crop/outputs").status_code == 200

        client = s3_client(s3_env)
        client.create_bucket(Bucket=bucket)
        again = srv.post(f"/runs/{run_id}/rerun").json()
        done = srv.wait_run(again["run_id"])
        assert done["status"] == "passed", done["log"]
        assert done["module_status"] == {}  # nothing executed again, only uploaded
        for module in ("legend_segment", "map_crop"):
            assert srv.get(f"/modules/s3fail/{module}").json()["upload_status"] == "uploaded"
        assert objects(client, bucket, "results/s3fail/map_crop/outputs/")
    finally:
        srv.stop()
        kill_leftover_runs(s3_env)


def test_store_that_is_down_is_reported_with_the_cause(s3_env):
    from conftest import free_port

    env = dict(s3_env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    result = mipper(env, "--job", "down", "--map", "WY_CO_Peach", "--module", "georeference")
    assert result.returncode == 1
    assert "upload to s3://" in result.stderr and "connect" in result.stderr.lower()
    assert os.path.exists(os.path.join(env["TA1_OUTPUTS_DIR"], "down", "georeference"))


def test_zips_come_from_s3_once_the_local_folder_is_gone(s3_env):
    client = s3_client(s3_env)
    client.create_bucket(Bucket=s3_env["MIP_S3_BUCKET"])
    srv = start(s3_env)
    try:
        run_id = srv.post("/runs", json=payload("gone", "map_crop")).json()["run_id"]
        assert srv.wait_run(run_id)["status"] == "passed"
        local = srv.get("/modules/gone/map_crop/outputs").content
        job_dir = os.path.join(s3_env["TA1_OUTPUTS_DIR"], "gone")
        shutil.rmtree(os.path.join(job_dir, "map_crop"))
        os.remove(os.path.join(job_dir, "map_crop.log"))
        remote = srv.get("/modules/gone/map_crop/outputs")
        assert remote.status_code == 200
        a, b = zipfile.ZipFile(io.BytesIO(local)), zipfile.ZipFile(io.BytesIO(remote.content))
        assert sorted(a.namelist()) == sorted(b.namelist()) and len(a.namelist()) > 5
        for name in a.namelist():
            assert a.read(name) == b.read(name)
        logs = zipfile.ZipFile(io.BytesIO(srv.get("/jobs/gone/map_crop/logs").content))
        assert "gone_map_crop_logs/map_crop.log" in logs.namelist()
        # temps are not copied unless MIP_S3_TEMPS=1: once gone locally, they are gone
        shutil.rmtree(os.path.join(s3_env["TA1_TEMPS_DIR"], "gone", "map_crop"))
        assert srv.get("/modules/gone/map_crop/temps").status_code == 404
    finally:
        srv.stop()
        kill_leftover_runs(s3_env)


def test_upload_again_is_idempotent(s3_env):
    client = s3_client(s3_env)
    bucket = s3_env["MIP_S3_BUCKET"]
    client.create_bucket(Bucket=bucket)
    assert mipper(s3_env, "--job", "idem", "--map", "WY_CO_Peach", "--module",
                  "map_crop").returncode == 0
    before = objects(client, bucket, "results/idem/")
    stale = "results/idem/map_crop/outputs/stale.png"
    client.put_object(Bucket=bucket, Key=stale, Body=b"old")
    # a file above the multipart threshold, so its ETag is a multipart one
    big = os.path.join(s3_env["TA1_OUTPUTS_DIR"], "idem", "map_crop", "big.bin")
    with open(big, "wb") as f:
        f.write(os.urandom(S3_PART + 12345))
    first = mipper(s3_env, "--job", "idem", "--upload")
    assert first.returncode == 0, first.stderr
    assert "map_crop: 1 files sent" in first.stderr
    after = objects(client, bucket, "results/idem/")
    assert stale not in after
    assert sorted(after) == sorted([*before, "results/idem/map_crop/outputs/big.bin"])
    assert after["results/idem/map_crop/outputs/big.bin"]["ETag"].endswith('-2"')
    again = mipper(s3_env, "--job", "idem", "--upload")
    assert again.returncode == 0
    assert "map_crop: 0 files sent" in again.stderr
    assert "legend_segment: 0 files sent" in again.stderr
    assert mipper(s3_env, "--job", "nojob", "--upload").returncode == 2
