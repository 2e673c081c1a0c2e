"""plugins: what each plugin of mip_server.install costs one status read, in process.

    source env.sh && .venv/bin/python bench/plugins.py            # GET /runs/{id}, auth on
    .venv/bin/python bench/plugins.py --profile                   # and cProfile's top 20

Builds the app with mip_server's own make_context and build_app on a scratch journal with
one finished run, and calls it as a WSGI app (no socket, no waitress): the whole chain,
then the chain without one plugin at a time, and bench/bare.py's app (figure 1's
baseline) the same way. Each figure is CPU microseconds per request (the best of a few
rounds, since the machine is shared); a plugin's cost is the difference. A GET meets no
CSRF check and no browser home (the hook skips both unless the method or the path asks
for them), so they are not listed. What this cannot show is what a plugin costs across
threads: the request log's writer thread, woken for each line, cost far more under load
than its microseconds here (figure 1 of bench/run.py measures that, against a bare Bottle
app on waitress).
"""

import argparse
import base64
import functools
import io
import os
import shutil
import sys
import tempfile
import time

import bottle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bare  # noqa: E402  (bench/, this script's folder)

import mip_server  # noqa: E402
from mip import journal  # noqa: E402
from mip.settings import Settings  # noqa: E402
from mip.web.requestlog import LineWriter  # noqa: E402

ROUNDS = 5


def scratch_app(folder: str, writer):
    """(the app as main() builds it, its Context, the path of a finished run's status)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIP_", "TA1_"))}
    for name in ("inputs", "outputs", "temps", "runs", "repos"):
        os.makedirs(os.path.join(folder, name))
        env[f"TA1_{name.upper()}_DIR"] = os.path.join(folder, name)
    settings = Settings.from_env(env)
    cfg = mip_server.Config(settings=settings, users={"u": mip_server.hash_password("p")})
    db = journal.Journal(settings.journal_path)
    db.migrate()
    payload = {"job": "j", "map": "m", "modules": ["georeference"]}
    run_id = db.create_run("j", "m", ["georeference"], False, payload, settings.runs_dir)
    db.set_run_status(run_id, journal.Status.RUNNING, pid=1)
    db.set_run_status(run_id, journal.Status.PASSED)
    ctx = mip_server.make_context(cfg, db, mip_server.RunQueue(cfg, db))
    return mip_server.build_app(ctx, writer), ctx, f"/runs/{run_id}"


def caller(wsgi, path: str):
    """A function that sends one authenticated GET `path` to `wsgi` and checks the 200."""
    auth = "Basic " + base64.b64encode(b"u:p").decode()

    def call():
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SCRIPT_NAME": "",
                   "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080",
                   "HTTP_HOST": "127.0.0.1:8080", "REMOTE_ADDR": "127.0.0.1",
                   "HTTP_AUTHORIZATION": auth, "wsgi.url_scheme": "http",
                   "wsgi.input": io.BytesIO(b""), "SERVER_PROTOCOL": "HTTP/1.1",
                   "wsgi.errors": sys.stderr}
        status = []
        for _ in wsgi(environ, lambda s, h, e=None: status.append(s)):
            pass
        if not status[0].startswith("200"):
            raise SystemExit(f"GET {path}: {status[0]}")
    return call


def cost(call, count: int) -> float:
    """CPU microseconds per call, the best of ROUNDS."""
    for _ in range(count // 10):
        call()
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(count):
            call()
        best = min(best, time.process_time() - started)
    return best / count * 1e6


def without(app, ctx, name: str):
    """The app's WSGI callable with one plugin taken out (the app itself is changed)."""
    handle = functools.partial(bottle.Bottle.wsgi, app)  # the app inside the middleware
    if name == "middleware":  # nosniff, metrics, the request log
        return handle
    if name == "request log":
        return mip_server.every_request(handle, ctx.metrics.requests.observe, None)
    if name == "auth":
        ctx.credentials.check = lambda header, address: True
    elif name == "journal guard":
        ctx.db.identity = None  # check_file() then returns before its stat
    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/plugins.py", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="requests per round")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top 20")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="mip-plugins-")
    writer = LineWriter(open(os.devnull, "w"))
    try:
        app, _, path = scratch_app(os.path.join(folder, "a"), writer)
        whole = cost(caller(app, path), args.count)
        print(f"GET /runs/{{id}} through every plugin: {whole:.1f} us CPU per request")
        print(f"{'without':<14} {'us/request':>10} {'the plugin costs':>17}")
        names = ("middleware", "request log", "auth", "journal guard", "limits")
        for i, name in enumerate(names):
            other, ctx, its_path = scratch_app(os.path.join(folder, f"b{i}"), writer)
            limits = mip_server.limits  # the hook calls it by its global name
            if name == "limits":
                mip_server.limits = lambda env: None
            try:
                rest = cost(caller(without(other, ctx, name), its_path), args.count)
            finally:
                mip_server.limits = limits
            print(f"{name:<14} {rest:>10.1f} {whole - rest:>15.1f} us")
        alone = cost(caller(bare.make_app(), "/bare"), args.count)
        print(f"bench/bare.py's GET /bare, in process: {alone:.1f} us CPU per request")
        if args.profile:
            import cProfile
            import pstats
            call = caller(app, path)
            profile = cProfile.Profile()
            profile.runcall(lambda: [call() for _ in range(args.count)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    finally:
        writer.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
