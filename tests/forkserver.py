"""Real `dbbatch` processes without paying for the imports every time.

A `dbbatch run` on the tiny models spends about 7 of its 12 seconds importing torch, diffusers, transformers
and Lightning. The suite runs some 250 of them, so the tests start one *fork server* per pytest worker: a
Python process that imports dbbatch's CLI and those libraries once, then forks a child for each command.
Each child is an ordinary process of its own (its own pid, environment, working directory, stdout and stderr
files): it runs `python -m dbbatch ARGS` as the interpreter would (`runpy`, `sys.argv`, atexit handlers at
exit), so SIGKILL, SIGTERM, exit codes and leases between processes are as real as before. What it does not
exercise is the import of the package itself; `DBBATCH_TEST_SPAWN=1` makes every command a fresh
interpreter instead (`spawn_cli` below), and tests/test_cli_e2e.py holds the two ways bitwise equal.

The server is single-threaded (no lock can be held by another thread at fork): it reads requests from stdin
and reaps children on SIGCHLD through a wakeup pipe, answering on stdout, one JSON object per line:
  request  {"id": N, "argv": [...], "env": {...}, "cwd": "...", "stdout": PATH, "stderr": PATH}
  answers  {"id": N, "pid": PID}   then, when it ends,   {"pid": PID, "returncode": RC}  (-SIG when killed)
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent

# What a `dbbatch run` imports (dbbatch.cli imports the rest lazily); importing them here is the saving.
PRELOAD = ["numpy", "torch", "transformers", "diffusers", "pytorch_lightning", "torchdata.stateful_dataloader", "peft",
           "safetensors.torch", "s3fs", "PIL.Image", "matplotlib.pyplot", "yaml", "pydantic", "rich.table",
           "dbbatch.cli", "dbbatch.batch.batch", "dbbatch.batch.cohorts", "dbbatch.train.module", "dbbatch.train.fit",
           "dbbatch.models.loading", "dbbatch.quality.report"]
PRELOAD_ATTRS = [("diffusers", ["StableDiffusionPipeline", "StableDiffusionXLPipeline", "UNet2DConditionModel",
                                "AutoencoderKL", "DDIMScheduler", "DDPMScheduler"]),
                 ("transformers", ["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer"])]


# -- the server ------------------------------------------------------------------------------------------------


def _preload() -> int:
    """Import what every command needs; returns torch's default intra-op thread count (before any op)."""
    import importlib
    import warnings

    warnings.filterwarnings("ignore")
    for name in PRELOAD:
        importlib.import_module(name)
    for module, names in PRELOAD_ATTRS:
        mod = sys.modules[module]
        for name in names:
            getattr(mod, name)  # diffusers and transformers import lazily, on first attribute access
    warnings.resetwarnings()
    import torch

    return torch.get_num_threads()


def drop_capabilities(caps: list[int]) -> None:
    """Drop these capabilities (e.g. root's CAP_DAC_OVERRIDE, so that file permissions apply to it) from this
    process's effective and permitted sets and from the bounding set (for what it may exec)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in caps:
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for cap in caps:
        word, bit = divmod(cap, 32)
        data[word].effective &= ~(1 << bit)
        data[word].permitted &= ~(1 << bit)
        data[word].inheritable &= ~(1 << bit)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _child(req: dict, default_threads: int) -> None:
    """In the forked child: become `python -m dbbatch ARGV` (never returns)."""
    signal.set_wakeup_fd(-1)
    if req.get("drop_capabilities"):
        drop_capabilities(req["drop_capabilities"])
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    # sys.path as `python -m` builds it: the working directory, then $PYTHONPATH, then the installation's
    sys.path[:] = [os.getcwd(), *filter(None, req["env"].get("PYTHONPATH", "").split(os.pathsep)), *BASE_PATH]
    import importlib

    importlib.invalidate_caches()
    import io
    import random

    # PYTHONUNBUFFERED, as the tests set it: every write reaches the file at once (a killed child loses nothing)
    sys.stdin = open(0, closefd=False)
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True, errors="backslashreplace")
    random.seed()  # a fresh interpreter seeds from the OS; a fork would repeat the server's state
    import numpy as np
    import torch

    np.random.seed()
    threads = req["env"].get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads and threads.isdigit() else default_threads)
    sys.argv = ["dbbatch", *req["argv"]]
    import runpy

    code = 0
    try:
        runpy.run_module("dbbatch", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter: the traceback on stderr, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    # The interpreter's own exit: non-daemon threads joined, atexit handlers (logging, wandb, mlflow,
    # multiprocessing), then flushed streams.
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


BASE_PATH: list[str] = []  # the server's sys.path without its script folder and $PYTHONPATH: the installation's


def serve() -> None:
    extra = {str(REPO), str(Path(__file__).parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    BASE_PATH[:] = [p for p in sys.path if p not in extra]
    default_threads = _preload()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    requests = os.fdopen(0, "rb", buffering=0)
    answers = os.fdopen(1, "w", buffering=1)
    buffer = b""
    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    while True:
        try:
            ready, _, _ = select.select([0, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                children.discard(pid)
                answers.write(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        if 0 in ready:
            chunk = requests.read(65536)
            if not chunk:  # the tests are over: no child outlives them
                for pid in children:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                requests.close()
                answers.close()
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    os.close(wake_r)
                    os.close(wake_w)
                    _child(req, default_threads)
                children.add(pid)
                answers.write(json.dumps({"id": req["id"], "pid": pid}) + "\n")


# -- the client ------------------------------------------------------------------------------------------------


class _Stream:
    """A child's stdout or stderr file read as Popen's text pipe: iterating yields lines as they are written, until
    the process has ended and every line is read; `rest()` is what is left unread (communicate)."""

    def __init__(self, path: Path, proc: "ForkedProcess"):
        self.path, self.proc, self.pos = path, proc, 0

    def _read(self) -> str:
        if not self.path.exists():
            return ""
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        return data.decode(errors="backslashreplace")

    def rest(self) -> str:
        return self._read()

    def __iter__(self):
        pending = ""
        while True:
            ended = self.proc.poll() is not None  # before reading: what it wrote before ending is read next
            pending += self._read()
            while "\n" in pending:
                line, pending = pending.split("\n", 1)
                yield line + "\n"
            if ended:
                if pending:
                    yield pending
                return
            time.sleep(0.05)


class ForkedProcess:
    """The parts of subprocess.Popen the tests use, for a child of the fork server (stdout and stderr: text
    streams of the files the child writes)."""

    def __init__(self, args: list[str], pid: int, out: Path, err: Path):
        self.args, self.pid = args, pid
        self.returncode: Optional[int] = None
        self._ended = threading.Event()
        self.stdout, self.stderr = _Stream(out, self), _Stream(err, self)

    def _set_returncode(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode  # type: ignore[return-value]

    def communicate(self, timeout: Optional[float] = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout.rest(), self.stderr.rest()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # as Popen: nothing is sent to a process known to have ended
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The client side: starts the server and forks `dbbatch` children through it (thread-safe)."""

    def __init__(self, logs: Path):
        self.logs = logs
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # each child sets its own count
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     cwd=REPO, text=True, bufsize=1)
        first = self.proc.stdout.readline()
        if not first.startswith('{"ready"'):
            raise RuntimeError(f"the fork server did not start: {first!r}")
        self._lock = threading.Lock()
        self._next = 0
        self._pids: dict[int, threading.Event] = {}
        self._pid_of: dict[int, int] = {}
        self._procs: dict[int, ForkedProcess] = {}
        self._early: dict[int, int] = {}
        self.started = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._lock:
                if "id" in msg:
                    self._pid_of[msg["id"]] = msg["pid"]
                    self._pids[msg["id"]].set()
                elif msg["pid"] in self._procs:
                    self._procs.pop(msg["pid"])._set_returncode(msg["returncode"])
                else:  # ended before its ForkedProcess was registered
                    self._early[msg["pid"]] = msg["returncode"]

    def spawn(self, argv: list[str], env: dict[str, str], cwd: Path, drop_capabilities: tuple[int, ...] = ()) -> ForkedProcess:
        folder = Path(tempfile.mkdtemp(prefix="cli-", dir=self.logs))
        out, err = folder / "stdout", folder / "stderr"
        with self._lock:
            self._next += 1
            rid = self._next
            self._pids[rid] = threading.Event()
            self.started += 1
        req = {"id": rid, "argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
               "drop_capabilities": list(drop_capabilities)}
        with self._lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        if not self._pids[rid].wait(60):
            raise RuntimeError("the fork server did not answer")
        with self._lock:
            pid = self._pid_of.pop(rid)
            del self._pids[rid]
            proc = ForkedProcess(["dbbatch", *argv], pid, out, err)
            if pid in self._early:
                proc._set_returncode(self._early.pop(pid))
            else:
                self._procs[pid] = proc
        return proc

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    serve()
