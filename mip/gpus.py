"""gpus: host-wide GPU slots, and what each module used of the host.

Not run directly. mipper takes a slot for every `gpu: true` module it runs locally (inline
or docker) and samples the device while the module runs; the server reads the settings to
refuse a run that needs a GPU on a host without one (MIP_REQUIRE_GPU=1).

A slot is one device, held with `flock` on `$TA1_RUNS_DIR/gpus/<id>.lock`, so every mipper
on the host sharing that runs folder sees it. The lock is held on an open file description,
which the kernel frees when the last descriptor of it closes: mipper's worker holds one, and
the module's own process (inline) or the docker client (docker) inherits another, so a
device stays taken for as long as the module runs, even when mipper dies before it (the
server's clean-up of a dead run then stops the module, and only that frees the device).
This file never starts modules and never imports mipper or the server.
"""

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import dataclass

from mip.settings import MAX_DEVICES
from mip.settings import GpuSettings  # noqa: F401 - read in settings.py; the name stays here

log = logging.getLogger("mip.gpus")

WAITING = "waiting for a GPU"  # the running module's message until it holds a device
DEVICE_SEEN = "0"  # $GPU_ID: a module sees only its own device, as index 0
POLL_MAX = 1.0  # seconds between two looks at the locks, at most
WAIT_HOURS = 24.0  # a module that gets no device in this long fails
SAMPLE_SECONDS = 1.0
RESOURCE_KEYS = ("cpu_seconds", "peak_rss_bytes", "gpu_device", "gpu_memory_peak_bytes",
                 "gpu_util_mean", "waited_for_gpu_seconds")


class NoGpu(Exception):
    """No device became free in time."""


DRIVER = "/dev/nvidiactl"  # made by NVIDIA's kernel driver (and given to GPU containers)


def detect() -> tuple:
    """The host's devices by NVML, else by `nvidia-smi -L`; () when neither finds one
    (no driver: NVML raises, and nvidia-smi is absent or fails)."""
    if not os.path.exists(DRIVER):
        # neither can find a device without the driver; loading NVML to hear that costs a
        # fifth of a second at every mipper start on a busy host
        return ()
    count = nvml_count()
    if count is None:
        count = smi_count()
    return tuple(str(i) for i in range(min(count or 0, MAX_DEVICES)))


def nvml_count() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no library, no driver, no device: no NVML
        return None
    try:
        return pynvml.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def smi_count() -> int | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        found = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20,
                               check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if found.returncode != 0:
        return None
    return sum(1 for line in found.stdout.splitlines() if line.startswith("GPU "))


def needing_gpu(catalogue: dict, names) -> list:
    """The modules among `names` whose catalogue entry says `gpu: true`."""
    return [n for n in names if catalogue[n].gpu]


# ---------------------------------------------------------------------------- slots

@dataclass(frozen=True)
class Slot:
    """A held device: `fd` keeps the lock; pass it on to the module's process."""

    device: str
    fd: int
    waited: float  # seconds spent waiting for it


def lock_path(runs_dir: str, device: str) -> str:
    return os.path.join(runs_dir, "gpus", f"{device}.lock")


def try_take(runs_dir: str, devices, holder: str) -> Slot | None:
    """One free device of `devices`, locked, or None when all are held."""
    # the folder is mipper's alone: whoever can write in it can hold every device, or
    # plant a lock file that is a link to a file of ours
    os.makedirs(os.path.join(runs_dir, "gpus"), mode=0o700, exist_ok=True)
    for device in devices:
        # never through a link: the holder's line below truncates the file it opens
        fd = os.open(lock_path(runs_dir, device), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                     0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{lock_path(runs_dir, device)} is not a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        # who holds it, for an operator reading the file; never read by mip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} pid {os.getpid()}\n".encode(), 0)
        return Slot(device, fd, 0.0)
    return None


def take(runs_dir: str, devices, holder: str, on_wait=None, hours: float = WAIT_HOURS,
         sleep=time.sleep) -> Slot:
    """Lock a free device, waiting (polling, at most POLL_MAX apart) while all are held;
    `on_wait()` is called once, when the first look finds none free. Raises NoGpu after
    `hours`."""
    started = time.monotonic()
    slot = try_take(runs_dir, devices, holder)
    if slot is not None:
        return slot
    if on_wait is not None:
        on_wait()
    delay = 0.05
    deadline = started + hours * 3600
    while time.monotonic() < deadline:
        sleep(delay)
        delay = min(delay * 1.5, POLL_MAX)
        slot = try_take(runs_dir, devices, holder)
        if slot is not None:
            return Slot(slot.device, slot.fd, round(time.monotonic() - started, 3))
    raise NoGpu(f"no GPU of {', '.join(devices)} became free in {hours:g} h")


def release(slot: Slot | None) -> None:
    """Close this process's descriptor of the lock; the device is free once the module's
    process (which inherited another) has ended too."""
    if slot is not None:
        with contextlib.suppress(OSError):
            os.close(slot.fd)


def held(runs_dir: str, device: str) -> bool:
    """True while some process holds the device's lock (for tests and operators)."""
    try:
        fd = os.open(lock_path(runs_dir, device), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# ---------------------------------------------------------------------------- sampling

class GpuSampler:
    """Samples one device through NVML about once a second while a module runs: the peak
    of its used memory and the mean of its utilisation. Without NVML (no driver, as on a
    host without a GPU) both stay None. The device is the module's alone (its slot), so
    the device's figures are the module's, give or take what other programs use."""

    def __init__(self, device: str | None):
        self.device = device
        self.memory_peak = None
        self.util = []
        self.stopping = threading.Event()
        self.thread = None

    def __enter__(self):
        if self.device is not None and os.path.exists(DRIVER):
            self.thread = threading.Thread(target=self.loop, daemon=True,
                                           name=f"gpu-{self.device}")
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(5)

    def loop(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no NVML here: the figures stay unknown
            return
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(self.device))
            while True:
                used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
                self.memory_peak = max(self.memory_peak or 0, int(used))
                self.util.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                if self.stopping.wait(SAMPLE_SECONDS):
                    break
        except Exception as e:  # noqa: BLE001 - a device gone or lost: keep what was seen
            log.warning("GPU %s: NVML sampling stopped: %s", self.device, e)
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()

    def figures(self) -> dict:
        mean = round(sum(self.util) / len(self.util), 1) if self.util else None
        return {"gpu_memory_peak_bytes": self.memory_peak, "gpu_util_mean": mean}


def resources(**known) -> dict:
    """A `resources` object: every key, None where unknown."""
    return {key: known.get(key) for key in RESOURCE_KEYS}
