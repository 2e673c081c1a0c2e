"""The original TA1 tool's own payloads are accepted as they are, byte for byte."""

import json

from conftest import MAP

# mip/mip_client/run_input.json of the original repository, as it is there
RUN_INPUT_JSON = b"""{
  "job": "job03",
  "modules": [
    "map_crop"
  ],
  "map": "WY_CO_Peach",
  "force_rerun": false,
  "openai_key": ""
}
"""


def test_the_original_run_input_json_is_accepted_and_runs(server):
    assert json.loads(RUN_INPUT_JSON)["map"] == MAP
    # the original client sends no Content-Type; the body is these bytes exactly
    resp = server.post("/runs", data=RUN_INPUT_JSON)
    assert resp.status_code == 200, resp.text
    status = server.wait_run(resp.json()["run_id"])
    assert status["status"] == "passed", status
    assert "openai_key" not in status["payload"]
    assert status["module_status"]["map_crop"] == "passed"


def test_an_empty_openai_key_means_no_key_on_rerun_too(server):
    first = server.post("/runs", data=RUN_INPUT_JSON.replace(b"job03", b"job04")).json()
    server.wait_run(first["run_id"])
    again = server.post(f"/runs/{first['run_id']}/rerun", json={"openai_key": ""})
    assert again.status_code == 200, again.text


def test_a_key_with_a_space_is_still_refused(server):
    body = json.loads(RUN_INPUT_JSON)
    body["openai_key"] = "sk- x"
    resp = server.post("/runs", json=body)
    assert resp.status_code == 422
    assert resp.json()["error"] == "invalid_payload"
    assert "sk- x" not in resp.text
