"""Every log a run leaves (the run log, each module's log) stamps its lines one way: ISO 8601
UTC with a Z, as the journal's times are."""

import re

from conftest import payload

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
OTHER_TIMES = (re.compile(r"\d\d:\d\d:\d\d,\d{3}"),  # logging's default, comma milliseconds
               re.compile(r"=\d{10}\.\d+"),  # epoch seconds
               re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d"))  # local time with a space


def check_times(text: str) -> None:
    lines = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert lines
    for line in lines:
        body = line.removeprefix("# ")
        if not line.startswith("# "):
            assert STAMP.match(body), line
        for other in OTHER_TIMES:
            assert not other.search(line), line


def test_run_and_module_logs_use_one_time_format(server):
    run = server.post("/runs", json=payload("times", "georeference")).json()
    assert server.wait_run(run["run_id"])["status"] == "passed"
    check_times(server.get(f"/runs/{run['run_id']}/log").text)
    module_log = server.get("/modules/times/georeference/log").text
    assert "gpu: CUDA_VISIBLE_DEVICES" in module_log
    check_times(module_log)
