"""The ecs runner against moto's ECS and CloudWatch Logs (moto's server on loopback).

moto keeps the tasks' state but runs nothing, so a small "cluster" thread plays the
containers: for each task it runs the stand-in module with the task's overrides (on the
same paths, as with EFS), writes its output to the task's awslogs stream, and stops it.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import boto3
import pytest
import requests
from conftest import MAP
from conftest import ROOT
from conftest import latest
from conftest import mipper
from conftest import read

CLUSTER = "mip-test"
LOG_GROUP = "/ecs/ta1-test"
MODULES = ["legend_segment", "georeference", "legend_item_segment", "map_crop",
           "legend_item_description", "polygon_extract", "line_extract", "point_extract",
           "geopackage"]


def aws(env, service):
    return boto3.client(service, endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def ecs_env(mip_env, moto_endpoint, tmp_path):
    env = dict(mip_env, AWS_ENDPOINT_URL=moto_endpoint, AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               MIP_RUNNER="ecs", MIP_ECS_CLUSTER=CLUSTER, MIP_ECS_LOG_GROUP=LOG_GROUP,
               MIP_ECS_POLL_SECONDS="0.2", MIP_OPENAI_KEY="sk-ecs-key-for-tests")
    # tasks stay RUNNING until stopped, as real ones do until their container exits
    requests.post(f"{moto_endpoint}/moto-api/state-manager/set-transition", timeout=10,
                  json={"model_name": "ecs::task",
                        "transition": {"progression": "manual", "times": 10**9}})
    ec2 = aws(env, "ec2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    # moto names a task's network interface only in a VPC with DNS host names
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName=f"mip-{vpc}", Description="mip",
                                      VpcId=vpc)["GroupId"]
    env.update(MIP_ECS_SUBNETS=subnet, MIP_ECS_SECURITY_GROUPS=group)
    ecs = aws(env, "ecs")
    ecs.create_cluster(clusterName=CLUSTER)
    for module in MODULES:
        ecs.register_task_definition(
            family=f"ta1_{module}", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
            cpu="1024", memory="2048",
            containerDefinitions=[{"name": module, "image": f"inferlink/ta1_{module}",
                                   "cpu": 256, "memory": 512,
                                   "essential": True, "logConfiguration": {
                                       "logDriver": "awslogs", "options": {
                                           "awslogs-group": LOG_GROUP,
                                           "awslogs-stream-prefix": "ta1"}}}])
    logs = aws(env, "logs")
    if not logs.describe_log_groups(logGroupNamePrefix=LOG_GROUP)["logGroups"]:
        logs.create_log_group(logGroupName=LOG_GROUP)
    yield env
    for arn in ecs.list_tasks(cluster=CLUSTER)["taskArns"]:
        ecs.stop_task(cluster=CLUSTER, task=arn, reason="test over")


class Cluster:
    """Plays the containers of the tasks mipper starts (those not in `hang` run forever)."""

    def __init__(self, env, hang=()):
        self.env = env
        self.hang = set(hang)
        self.ecs = aws(env, "ecs")
        self.logs = aws(env, "logs")
        self.seen = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)

    def loop(self):
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            arns = self.ecs.list_tasks(cluster=CLUSTER, desiredStatus="RUNNING")["taskArns"]
            for arn in arns:
                if arn not in self.seen:
                    task = self.ecs.describe_tasks(cluster=CLUSTER, tasks=[arn])["tasks"][0]
                    self.seen[arn] = task
                    threading.Thread(target=self.play, args=(task,), daemon=True).start()
            time.sleep(0.05)

    def play(self, task):
        override = task["overrides"]["containerOverrides"][0]
        module = override["name"]
        if module in self.hang:
            return
        env = {**os.environ, **{e["name"]: e["value"] for e in override.get("environment", [])}}
        done = subprocess.run([sys.executable, os.path.join(ROOT, "modules", f"{module}.py"),
                               *override["command"]], env=env, capture_output=True, text=True,
                              timeout=60)
        stream = f"ta1/{module}/{task['taskArn'].rsplit('/', 1)[1]}"
        self.logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
        lines = (done.stdout + done.stderr).splitlines() or ["(no output)"]
        now = int(time.time() * 1000)
        self.logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream, logEvents=[
            {"timestamp": now, "message": line} for line in lines])
        self.ecs.stop_task(cluster=CLUSTER, task=task["taskArn"],
                           reason="Essential container in task exited")


def test_whole_graph_as_ecs_tasks(ecs_env):
    with Cluster(ecs_env) as cluster:
        result = mipper(ecs_env, "--job", "ecs1", "--map", MAP, "--module", "ALL")
    assert result.returncode == 0, result.stderr
    runs = latest(ecs_env, "ecs1")
    assert sorted(runs) == sorted(MODULES)
    assert all(r["status"] == "passed" and r["exit_code"] == 0 for r in runs.values())
    tasks = list(cluster.seen.values())
    assert len(tasks) == len(MODULES)
    for task in tasks:
        module = task["overrides"]["containerOverrides"][0]["name"]
        # any revision: other tests register the same families on the shared moto server
        assert re.search(f"task-definition/ta1_{module}:[0-9]+$", task["taskDefinitionArn"])
        assert task["launchType"] == "FARGATE"
        command = task["overrides"]["containerOverrides"][0]["command"]
        # a shared file system at the same paths: the switches name the host's folders
        assert any(a.startswith(os.path.join(ecs_env["TA1_OUTPUTS_DIR"], "ecs1")) for a in command)
        environment = task["overrides"]["containerOverrides"][0]["environment"]
        assert environment == [{"name": "OPENAI_API_KEY", "value": "sk-ecs-key-for-tests"}]
        details = {d["name"]: d["value"] for d in task["attachments"][0]["details"]}
        assert details["subnetId"] == ecs_env["MIP_ECS_SUBNETS"]
    # the task's CloudWatch stream is copied into the module's log
    log = read(runs["map_crop"]["log_path"])
    assert "map_crop" in log and "wrote" in log.lower()


def test_cancel_stops_the_task(ecs_env):
    with Cluster(ecs_env, hang={"georeference"}) as cluster:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "mipper.py"), "--job",
                                 "ecs2", "--map", MAP, "--module", "georeference"],
                                env=ecs_env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not cluster.seen and time.monotonic() < deadline:
                time.sleep(0.05)
            arn = next(iter(cluster.seen))
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    task = aws(ecs_env, "ecs").describe_tasks(cluster=CLUSTER, tasks=[arn])["tasks"][0]
    assert task["lastStatus"] == "STOPPED"
    assert task["stoppedReason"] == "cancelled through mip"


def test_aws_errors_fail_the_module_with_the_aws_message(ecs_env):
    env = dict(ecs_env, MIP_ECS_CLUSTER="no-such-cluster")
    result = mipper(env, "--job", "ecs3", "--map", MAP, "--module", "georeference")
    assert result.returncode == 1
    row = latest(env, "ecs3")["georeference"]
    assert row["status"] == "failed" and row["exit_code"] is None
    assert row["message"].startswith("ECS did not start the task:")
    assert "ClusterNotFoundException" in row["message"]


def test_an_ecs_run_supervises_its_modules_in_mippers_own_process(ecs_env, tmp_path):
    """No process per module in flight (issue 22 point 5): each module's task is started
    and watched by a thread of the process that runs luigi."""
    result = tmp_path / "seen.jsonl"
    with Cluster(ecs_env):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "import_probe.py"),
                               str(result), "--job", "ecs4", "--map", MAP, "--module", "ALL"],
                              env=ecs_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *modules, main = [json.loads(line) for line in result.read_text().splitlines()]
    assert sorted(m["module"] for m in modules) == sorted(MODULES)
    assert {m["pid"] for m in modules} == {main["pid"]}
    assert all(r["status"] == "passed" for r in latest(ecs_env, "ecs4").values())
