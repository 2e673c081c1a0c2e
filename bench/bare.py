"""bare: the baseline server of bench/run.py, a bare Bottle app on waitress.

    python bench/bare.py --port 0      # first output line: `bare: serving on http://HOST:PORT`

`GET /bare` answers a constant JSON body; `POST /bare` parses the JSON body and sends it
back. No auth, no journal, no per-request log: what Bottle and waitress cost by themselves,
with the same thread count and the same quiet `waitress.queue` logger as mip_server.py.
"""

import argparse
import json
import logging
import signal
import sys

import bottle
import waitress

BODY = json.dumps({"status": "passed", "run_id": "20250101-000000-000000-abcd",
                   "start_time": "2025-01-01T00:00:00.000Z",
                   "stop_time": "2025-01-01T00:00:01.000Z", "log": None})


def make_app() -> bottle.Bottle:
    app = bottle.Bottle()

    @app.get("/bare")
    def constant():
        bottle.response.content_type = "application/json"
        return BODY

    @app.post("/bare")
    def echo():
        bottle.response.content_type = "application/json"
        return json.dumps(json.loads(bottle.request.body.read()))

    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bare.py", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = waitress.create_server(make_app(), host="127.0.0.1", port=args.port,
                                    threads=args.threads, ident="bare")
    print(f"bare: serving on http://127.0.0.1:{server.effective_port}", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
