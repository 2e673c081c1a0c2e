"""Many runs at once lose nothing: 64 runs of the zero-work catalogue through the real
server, each mipper writing to the journal at the same time as the others and the server."""

import os
import time

from conftest import MAP
from conftest import ROOT
from conftest import Server
from conftest import kill_leftover_runs
from conftest import read

from mip import journal

RUNS = 64


# about 9 s on this 2-core host (64 mippers, 128 modules) since a run the server starts
# costs a third less, so it is in the default suite again
def test_64_runs_at_once_record_what_really_happened(server_env):
    env = dict(server_env, MIP_CONFIG=os.path.join(ROOT, "tests", "zero_work.yml"),
               MIP_MAX_RUNS=str(RUNS), MIP_MAX_QUEUED="1000", MIP_MIN_FREE_MB="0",
               MIP_THREADS="16")
    srv = Server(env).start()
    try:
        ids = {}
        for n in range(RUNS):
            answer = srv.post("/runs", json={"job": f"many{n}", "map": MAP,
                                             "modules": ["second"]})
            assert answer.status_code == 200, answer.text
            ids[f"many{n}"] = answer.json()["run_id"]
        deadline = time.monotonic() + 240
        ended = {}
        while len(ended) < RUNS and time.monotonic() < deadline:
            for job, run_id in ids.items():
                if job not in ended:
                    status = srv.get(f"/runs/{run_id}").json()
                    if status["status"] in ("passed", "failed", "cancelled"):
                        ended[job] = status
            time.sleep(0.5)
        assert len(ended) == RUNS, f"{RUNS - len(ended)} runs never ended"
    finally:
        srv.stop()
        kill_leftover_runs(env)
    db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
    executions = db.connect().execute(
        "SELECT job, module, status, message FROM executions ORDER BY id").fetchall()
    db.close()
    recorded = {(e["job"], e["module"]): e for e in executions}
    # none lost: each run executed both modules, once
    assert len(executions) == len(recorded) == 2 * RUNS
    for (job, module), execution in recorded.items():
        own_log = read(os.path.join(env["TA1_OUTPUTS_DIR"], job, f"{module}.log"))
        # what the journal says is what the module's own log says
        assert f"# {module} {execution['status']}" in own_log, (job, module, dict(execution))
    failed = {job: s for job, s in ended.items() if s["status"] != "passed"}
    assert not failed, failed
    assert "database is locked" not in srv.output()
