"""The CDR inbox and the missed-event API, against the real server and the stand-in CDR,
on a catalogue of two trivial modules (each writes the one output publishing reads), so
that many runs stay cheap."""

import os
import threading

import pytest
import requests
import sample_map
import yaml
from cdr_standin import StandInCdr
from conftest import Server
from conftest import free_port
from conftest import kill_leftover_runs
from conftest import wait_for

from mip.links.cdr import PREFETCH

TOKEN = "cdr-token-for-tests"
SECRET = "webhook-secret-for-tests"
# writes its 4th argument (the --content option) to its 2nd (the --output option)
WRITE = 'mkdir -p "$(dirname "$2")" && printf "%s" "$4" > "$2"'
TRIVIAL = {"runner": "inline", "modules": [
    {"name": "legend_segment", "version": "0.1.0", "requires": [],
     "command": ["sh", "-c", WRITE, "write"],
     "options": {"output": "$OUTPUT_DIR/legend_segment/$MAP_NAME_map_segmentation.json",
                 "content": '{"shapes": []}'},
     "outputs": ["$OUTPUT_DIR/legend_segment/$MAP_NAME_map_segmentation.json"]},
    {"name": "georeference", "version": "0.1.0", "requires": ["legend_segment"],
     "command": ["sh", "-c", WRITE, "write"],
     "options": {"output": "$OUTPUT_DIR/georeference/$MAP_NAME.json",
                 "content": '{"gcps": [], "estimated": false, "crs": "EPSG:4267"}'},
     "outputs": ["$OUTPUT_DIR/georeference/$MAP_NAME.json"]},
]}
WAIT = 120


@pytest.fixture(scope="module")
def tiny_cog(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("cog") / "tiny.tif"
    sample_map.write_sample_map(str(path), 200, 160)
    return path.read_bytes()


def standin(shape: str = "event") -> StandInCdr:
    return StandInCdr(TOKEN, notification_ids=shape).start()


@pytest.fixture
def inbox_env(server_env, tmp_path):
    config = tmp_path / "trivial.yml"
    config.write_text(yaml.safe_dump(TRIVIAL, sort_keys=False))
    return dict(server_env, MIP_CONFIG=str(config), MIP_WORKERS="1", MIP_MAX_RUNS="4",
                MIP_CDR_TOKEN=TOKEN, MIP_CDR_SECRET=SECRET, MIP_CDR_SYSTEM="mip_test",
                MIP_CDR_VERSION="0.1.0", MIP_CDR_BACKOFF="0.05",  # broken downloads: 0.35 s
                MIP_CDR_CALLBACK_URL=f"http://127.0.0.1:{free_port()}/cdr")


def start(env: dict, cdr: StandInCdr, **extra) -> Server:
    """The server on the port its callback URL names, registered with `cdr`."""
    env = dict(env, MIP_CDR_URL=cdr.url, **extra)
    port = env["MIP_CDR_CALLBACK_URL"].rsplit(":", 1)[1].split("/")[0]
    srv = Server(env, "--port", port).start()
    wait_for(lambda: srv.get("/").json()["cdr"]["registered"], timeout=20)
    return srv


def event_body(cdr: StandInCdr, cog: str) -> dict:
    return {"cog_id": cog, "cog_url": f"{cdr.url}/cogs/{cog}.cog.tif"}


def events(srv: Server) -> dict:
    return {e["event_id"]: e for e in srv.get("/cdr/events?limit=10000").json()}


def passed(srv: Server, job: str) -> bool:
    resp = srv.get(f"/jobs/{job}")
    return resp.status_code == 200 and resp.json()["status"] == "passed"


def test_a_burst_larger_than_the_queue_runs_every_event(inbox_env, tiny_cog):
    """60 events against MIP_MAX_QUEUED=5: every one acknowledged at once, run, published;
    the maps are fetched as their runs are about to be queued, PREFETCH at most ahead."""
    cdr = standin()
    cogs = [f"burst{i:02d}" for i in range(60)]
    for cog in cogs:
        cdr.add_cog(cog, tiny_cog)
    srv = start(inbox_env, cdr, MIP_MAX_QUEUED="5")
    maps_dir = os.path.join(inbox_env["TA1_INPUTS_DIR"], "maps")
    try:
        statuses = []

        def send(part):
            for cog in part:
                statuses.append(cdr.deliver("map.process", event_body(cdr, cog),
                                            event_id=f"ev-{cog}").status_code)

        senders = [threading.Thread(target=send, args=(cogs[i::6],)) for i in range(6)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(60)
        assert statuses == [200] * 60
        ahead = []

        def all_submitted():
            # maps first: an event waiting now was waiting when they were listed
            present = set(os.listdir(maps_dir))
            seen = events(srv)
            waiting = {e["cog_id"] for e in seen.values()
                       if e["status"] in ("received", "downloading")}
            ahead.append(len(waiting & present))
            return all(e["status"] == "submitted" for e in seen.values())

        wait_for(all_submitted, timeout=WAIT, step=0.2)
        assert max(ahead) <= PREFETCH
        runs = wait_for(lambda: (lambda r: len(r) == 60 and r)(
            srv.get("/runs?status=passed").json()), timeout=WAIT, step=0.2)
        assert len(runs) == 60 and not srv.get("/runs?status=failed").json()
        wait_for(lambda: len({p["cog_id"] for k, p, _ in cdr.published
                              if k == "features"}) == 60, timeout=WAIT)
        downloads = [p for m, p in cdr.requests if p.startswith("/cogs/")]
        assert len(downloads) == 60  # each map once
        assert "events wait for the run queue" in srv.output()  # the queue was full
    finally:
        srv.stop()
        kill_leftover_runs(inbox_env)
        cdr.stop()


def test_past_the_inbox_bound_the_webhook_answers_503(inbox_env, tiny_cog):
    cdr = standin()
    for cog in ("full1", "full2", "full3", "full4"):
        cdr.add_cog(cog, tiny_cog)
    cdr.release.clear()  # the first downloads hang: their events stay in the inbox
    srv = start(inbox_env, cdr, MIP_CDR_INBOX_MAX="3")
    try:
        for cog in ("full1", "full2", "full3"):
            assert cdr.deliver("map.process", event_body(cdr, cog)).status_code == 200
        refused = cdr.deliver("map.process", event_body(cdr, "full4"), event_id="ev-full4")
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "60"
        assert refused.json()["error"] == "cdr_inbox_full"
        assert "MIP_CDR_INBOX_MAX" in refused.json()["message"]
        assert "ev-full4" not in events(srv)
        assert "refused (503): the inbox holds 3 events" in srv.output()
        cdr.release.set()
        for cog in ("full1", "full2", "full3"):
            wait_for(lambda c=cog: passed(srv, c), timeout=WAIT)
        # the CDR tries again later: now there is room
        assert cdr.deliver("map.process", event_body(cdr, "full4"),
                           event_id="ev-full4").status_code == 200
        wait_for(lambda: passed(srv, "full4"), timeout=WAIT)
    finally:
        cdr.release.set()
        srv.stop()
        kill_leftover_runs(inbox_env)
        cdr.stop()


def test_a_failed_event_delivered_again_is_tried_again(inbox_env, tiny_cog):
    cdr = standin()
    cdr.add_cog("again", tiny_cog)
    cdr.break_download("again")
    srv = start(inbox_env, cdr)
    try:
        cdr.deliver("map.process", event_body(cdr, "again"), event_id="ev-again")
        wait_for(lambda: events(srv)["ev-again"]["status"] == "failed")
        cdr.broken.discard("again")
        assert cdr.deliver("map.process", event_body(cdr, "again"),
                           event_id="ev-again").status_code == 200
        wait_for(lambda: passed(srv, "again"), timeout=WAIT)
        event = events(srv)["ev-again"]
        assert event["status"] == "submitted" and event["attempts"] == 2
        # delivered again once it has run: nothing more starts
        cdr.deliver("map.process", event_body(cdr, "again"), event_id="ev-again")
        assert len(srv.get("/runs?job=again").json()) == 1
    finally:
        srv.stop()
        kill_leftover_runs(inbox_env)
        cdr.stop()


@pytest.mark.parametrize("shape", StandInCdr.SHAPES)
def test_events_missed_while_down_run_after_start(inbox_env, tiny_cog, shape):
    """Events the CDR sent while the server was down, and one that failed for a reason that
    has passed (a broken download), run after the next start; the one that ran does not
    run again. With notification ids that are the events' own ids, each is asked for by
    id; with ids of their own, by created_date (the failed one is then tried again here)."""
    cdr = standin(shape)
    for cog in ("done", "broken", "down1", "down2"):
        cdr.add_cog(cog, tiny_cog)
    srv = start(inbox_env, cdr)
    try:
        cdr.deliver("map.process", event_body(cdr, "done"), event_id="ev-done")
        wait_for(lambda: passed(srv, "done"), timeout=WAIT)
        cdr.break_download("broken")
        cdr.deliver("map.process", event_body(cdr, "broken"), event_id="ev-broken")
        wait_for(lambda: events(srv)["ev-broken"]["status"] == "failed")
        srv.stop()
        cdr.broken.discard("broken")
        missed = [cdr.miss("map.process", event_body(cdr, cog), event_id=f"ev-{cog}")
                  for cog in ("down1", "down2")]
        with pytest.raises(requests.ConnectionError):
            requests.get(srv.url + "/health", timeout=2)

        srv = start(inbox_env, cdr)
        for cog in ("broken", "down1", "down2"):
            wait_for(lambda c=cog: passed(srv, c), timeout=WAIT)
        assert len(srv.get("/runs?job=done").json()) == 1
        asked = {n["id"] for n in missed}
        if shape == "event":
            asked.add("ev-broken")
        assert set(cdr.resent) == asked
        assert f"matched by {'event id' if shape == 'event' else 'created_date'}" \
            in srv.output()
    finally:
        srv.stop()
        kill_leftover_runs(inbox_env)
        cdr.stop()
