"""requestlog: the server's log lines, written by one thread, and one line per request.

main() starts the writer (setup_logging); mip_server's every_request middleware hands it
each request's fields (LineWriter.request). Every value a client controls is escaped
before it is written, so it cannot forge a line.
"""

import logging
import logging.handlers
import sys
import threading
import time
from collections import deque
from queue import Empty
from queue import SimpleQueue

from mip import sanitize

# seconds between two writes of the request lines: a writer woken for every line took the
# GIL from the request threads once per request, which cost a status read a third of its
# rate (bench/plugins.py, figure 1 of bench/run.py)
PAUSE = 0.05


class LineWriter:
    """One thread that writes the log lines request threads queue, as many as are waiting
    in one write: under load, request threads that each wrote and flushed their own line
    fought over the stream and the GIL, and halved the request rate. logging's records
    (through its QueueHandler, into `lines`) wake the writer at once; the request lines
    (`request()`) only gather, and go out with the next record or within PAUSE seconds.
    A request line is queued as its fields and made into text here, in the batch: a request
    thread then pays a tuple, not the formatting."""

    def __init__(self, stream):
        self.stream = stream
        self.lines = SimpleQueue()
        self.requests = deque()  # appending wakes nobody, unlike a queue's put
        self.second = (0, "")  # the last second's time stamp, made once a second
        self.thread = threading.Thread(target=self.run, daemon=True, name="log-writer")
        self.thread.start()

    def run(self) -> None:
        while True:
            try:
                records = [self.lines.get(timeout=PAUSE)]
            except Empty:
                records = []
            while not self.lines.empty():
                records.append(self.lines.get())
            # the request lines gathered so far were mostly queued before these records
            batch = [self.format(self.requests.popleft()) for _ in range(len(self.requests))]
            batch += [r.msg for r in records if r is not None]
            if batch:
                self.stream.write("".join(line + "\n" for line in batch))
                self.stream.flush()
            if None in records:
                return

    def request(self, address: str, method: str, path: str, status: str,
                seconds: float) -> None:
        """Queue a request's line: stamped now, written by the writer thread."""
        self.requests.append((time.time(), address, method, path, status, seconds))

    def format(self, item: tuple) -> str:
        """A request's INFO line, stamped like logging's lines (ISO 8601 UTC with a Z). The
        address, method and path may all come from a client (the address through
        X-Forwarded-For): escaped, so they cannot forge a line. Text that isprintable()
        holds none of the characters escape() replaces, and is by far the most common: one
        check then stands for three regular expressions."""
        now, address, method, path, status, seconds = item
        if int(now) != self.second[0]:
            self.second = (int(now), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)))
        said = f"{address} {method} {path}"
        if not said.isprintable():
            said = sanitize.escape(said)
        return (f"{self.second[1]}.{int(now % 1 * 1000):03d}Z INFO {said} {status} "
                f"{seconds * 1000:.1f} ms")

    def stop(self, timeout: float = 5) -> None:
        """Write what is queued, then end the thread."""
        self.lines.put(None)
        self.thread.join(timeout)


def setup_logging() -> LineWriter:
    """The server's log lines to stdout through a LineWriter; returns it, to stop at exit."""
    writer = LineWriter(sys.stdout)
    handler = logging.handlers.QueueHandler(writer.lines)
    handler.setFormatter(sanitize.OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("mip").addHandler(handler)
    logging.getLogger("mip").setLevel(logging.INFO)
    # waitress warns on every queued request under load, which costs time and says nothing
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return writer
