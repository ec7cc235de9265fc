"""Test-only: Python command lines run in processes forked from one that imported TensorFlow,
Keras, MLflow and tfharness already.

Each ``python -m tfharness ...`` a test starts spends seconds of CPU importing TensorFlow and
MLflow before it does what the test is about (a crash, a resume, an exit status, a sweep). On the
suite's 2 cores those imports were a large share of its time (benchmarks/results.md, "Test
suite"). Here one server process imports them once (one for all the pytest-xdist workers of a
session, see :class:`_Server`); each command line then runs in a process forked from it, with its
own pid, working folder, environment, standard streams, session, exit status and signals, so
killing it, reading its stderr or waiting for it is what it is for a process started by
``subprocess``.

The worker processes of joblib's loky backend (Hydra's joblib launcher, in a sweep that runs
here) start the same way: in a prewarmed process, loky's ``fork_exec`` asks the server for them
(:func:`_loky_fork_exec`), with the pipes loky passes them at the same descriptor numbers, and
loky learns of each one's end from the server (:func:`_loky_poll`). So does a command's tracking
process (``tracking.process=true``: a ``python -c`` that imports MLflow, then serves the socket
it is given): the server starts it with MLflow imported already, the socket at the same number.

What such a process does not exercise is the start of a fresh interpreter: the imports, and the
harness's importing TensorFlow on a thread while it loads the data. Tests of those (tests/
test_cli.py, test_heap.py, test_private_apis.py, the bad-data tests) start real interpreters
with ``subprocess``.

Use it as ``subprocess``: ``prewarmed.run([sys.executable, "-m", "tfharness", ...],
capture_output=True, text=True, cwd=..., env=...)`` or ``prewarmed.Popen(...)``. It runs
``python -m MODULE``, ``python -c CODE``, ``python SCRIPT`` and the environment's console scripts
(``bin/tfharness``); anything else is refused.

How: the server (``python tests/prewarmed.py SOCKET PID``) listens on a Unix socket until process
PID ends. A request is the command line, folder, environment and whether to start a new session,
with the three standard streams passed as file descriptors. The server forks a watcher, which
forks the command's process and reports its pid and then its wait status and CPU time; the
server itself never waits, and the command's process is the one a test signals. :class:`Popen`
is ``subprocess.Popen`` with the three methods that start and wait for a child replaced
(``_execute_child``, ``_try_wait``, ``_internal_poll``: private methods of this Python's
``subprocess``, so ``communicate``, timeouts, pipes and text mode are the standard library's own).
"""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve()
BIN = Path(sys.executable).parent
_HEADER = 8  # bytes of the request's length, in hex
_MAX_FDS = 16  # descriptors one request may pass


# ----------------------------------------------------------------------------------- server
def _import_everything() -> None:
    """What a tfharness process imports, the way it imports it (its own import machinery)."""
    from tfharness import heap
    from tfharness.pipeline.prepare import KerasWithoutScikitLearn

    with KerasWithoutScikitLearn():
        heap.import_frozen("keras")
    heap.import_frozen("mlflow", "mlflow.models", "mlflow.pyfunc")
    heap.import_frozen("hydra", "tfharness.cli", "tfharness.pipeline.runner", "tfharness.sweeps",
                       "tfharness.sync", "tfharness.rerun")
    # What Hydra's joblib launcher starts its workers with (see _loky_fork_exec).
    heap.import_frozen("joblib.externals.loky.backend.fork_exec")


def _receive(conn: socket.socket) -> tuple:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, _MAX_FDS)
    while len(data) < _HEADER or len(data) < _HEADER + int(data[:_HEADER], 16):
        more = conn.recv(1 << 16)
        if not more:
            raise EOFError("request cut short")
        data += more
    return json.loads(data[_HEADER:_HEADER + int(data[:_HEADER], 16)]), fds


def _serve(path: str, watched: int) -> dict:
    """Answers requests until stopped; returns only in a command's process, with its request."""
    from tfharness.artifacts.checkpoint import pid_alive

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the watchers are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    listener.settimeout(1.0)
    print("ready", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    while True:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            if not pid_alive(watched):  # the process it serves has ended: so does the server
                os.unlink(path)
                os._exit(0)
            continue
        conn.settimeout(None)
        try:
            request, fds = _receive(conn)
        except (OSError, EOFError, ValueError):
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:  # the watcher
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            pid = os.fork()
            if pid == 0:  # the command's process
                conn.close()
                _Server.path = path  # what it starts here is started by this server too
                _become(request, fds)
                return request
            for fd in fds:
                os.close(fd)
            try:
                conn.sendall(f"{pid}\n".encode())
                _, status, usage = os.wait4(pid, 0)
                conn.sendall(f"{status} {usage.ru_utime + usage.ru_stime}\n".encode())
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)
        conn.close()


def _become(request: dict, fds: list) -> None:
    """Turns this forked process into the one ``subprocess`` would have started."""
    if request["new_session"]:
        os.setsid()
    # Each passed descriptor to the number it had for the requester: first out of the way of
    # every target, then into place.
    low = max([*request["fds"], *fds]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, low) for fd in fds]
    for fd in fds:
        os.close(fd)
    for target, fd in zip(request["fds"], moved):
        os.dup2(fd, target)
        os.close(fd)
    from joblib.externals.loky.backend import fork_exec, popen_loky_posix

    global _ORIGINAL_LOKY_POLL
    fork_exec.fork_exec = _loky_fork_exec
    _ORIGINAL_LOKY_POLL = popen_loky_posix.Popen.poll
    popen_loky_posix.Popen.poll = _loky_poll
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in _SET_BY_IMPORTS.items():  # as the imports would have, in a fresh process
        os.environ.setdefault(key, value)
    if not os.environ.get(FRESH_TRACKING_PROCESS):
        from tfharness.tracking import process as tracking_process

        tracking_process.subprocess = _ViaServer()


# Set (to anything) in a command's environment: its tracking process starts as a fresh
# interpreter, the command's own child, as it does outside the suite (for the tests of that
# relationship: a SIGKILL or a Ctrl-C to the command's process group).
FRESH_TRACKING_PROCESS = "TFHARNESS_TEST_FRESH_TRACKING_PROCESS"


def _run_command(args: list) -> None:
    """Runs ``args`` (what follows ``python``) as the interpreter would, as ``__main__``."""
    import runpy
    import types

    if args[0] == "-m":
        sys.argv = ["-m", *args[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(args[1], "<string>", "exec"), main.__dict__)
    else:
        sys.argv = list(args)
        sys.path[0] = str(Path(args[0]).resolve().parent)
        runpy.run_path(args[0], run_name="__main__")


# ----------------------------------------------------------------------------------- client
class _Server:
    """The server this process uses, started on first use.

    The pytest-xdist workers of one session share one (a folder named by the session's
    ``PYTEST_XDIST_TESTRUNUID``; the first worker to need it starts it, under a file lock), which
    ends when the session's main process does. Otherwise each process has its own, which ends
    with it.
    """

    lock = threading.Lock()
    path = ""

    @classmethod
    def address(cls) -> str:
        with cls.lock:
            if cls.path and _answers(cls.path):
                return cls.path
            session = os.environ.get("PYTEST_XDIST_TESTRUNUID")
            if session is None:  # this process only
                cls.path = os.path.join(tempfile.mkdtemp(prefix="tfharness-prewarmed-"), "socket")
                cls._start(os.getpid())
                return cls.path
            folder = Path(tempfile.gettempdir()) / f"tfharness-prewarmed-{session}"
            folder.mkdir(exist_ok=True)
            cls.path = str(folder / "socket")
            with open(folder / "lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not _answers(cls.path):
                    cls._start(os.getppid())  # the session's main process (xdist's controller)
            return cls.path

    @classmethod
    def _start(cls, watched: int) -> None:
        if os.path.exists(cls.path):
            os.unlink(cls.path)  # a server that ended without removing it
        process = subprocess.Popen(
            [sys.executable, str(HERE), cls.path, str(watched)], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        line = process.stdout.readline()
        process.stdout.close()
        if line.strip() != "ready":
            process.kill()
            raise RuntimeError(f"the prewarmed server did not start: {line!r}")


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def command_of(args) -> list:
    """What follows ``python`` in ``args``; ValueError for what this module cannot run."""
    args = [os.fspath(a) for a in args]
    first = Path(args[0])
    if args[0] == sys.executable or first.parent == BIN and first.name.startswith("python"):
        rest = args[1:]
        if rest and (rest[0] in ("-m", "-c") and len(rest) >= 2 or not rest[0].startswith("-")):
            return rest
    elif first.parent == BIN and first.is_file():
        with open(first, "rb") as handle:
            shebang = handle.readline()
        if shebang.startswith(b"#!") and b"python" in shebang:
            return args
    raise ValueError(f"prewarmed runs python -m/-c/SCRIPT and {BIN}'s console scripts, not "
                     f"{args!r}")


_EXECUTE_CHILD = inspect.signature(subprocess.Popen._execute_child)
# CPU seconds (user + system) of the processes this process ran here and waited for, and of
# theirs: what ``resource.getrusage(RUSAGE_CHILDREN)`` counts for a child it started itself.
children_cpu = 0.0


def _start(command: list, cwd, env, fds: dict, new_session: bool) -> socket.socket:
    """Asks the server for a process running ``command`` (what follows ``python``) with the
    descriptors ``fds`` (its number there: the descriptor here); returns the channel on which
    the server reports its pid and then its end."""
    if len(fds) > _MAX_FDS:
        raise ValueError(f"prewarmed passes at most {_MAX_FDS} descriptors, not {len(fds)}")
    request = json.dumps({
        "command": command, "cwd": os.fspath(cwd), "fds": list(fds),
        "env": {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()},
        "new_session": new_session}).encode()
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        channel.connect(_Server.address())
        socket.send_fds(channel, [b"%08x" % len(request) + request], list(fds.values()))
    except BaseException:
        channel.close()
        raise
    return channel


class _Reports:
    """The lines the server sends about one process it started: its pid, then its wait status
    and CPU seconds when it ends."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel, self.buffer = channel, b""

    def line(self, block: bool):
        """The next line, or None when ``block`` is false and none has come."""
        while b"\n" not in self.buffer:
            if not block and not select.select([self.channel], [], [], 0)[0]:
                return None
            chunk = self.channel.recv(256)
            if not chunk:
                raise ChildProcessError("the prewarmed server lost a process it started")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


# The loky workers this process had the server start, by pid: how each one's end is learnt.
_LOKY_WORKERS: dict = {}


def _loky_fork_exec(cmd, keep_fds, env=None) -> int:
    """In a prewarmed process, in place of ``joblib.externals.loky.backend.fork_exec.fork_exec``
    (same arguments; it starts ``python -m ...popen_loky_posix`` with the descriptors
    ``keep_fds`` and the standard streams of this process): the server starts the worker, and
    reports its end to :func:`_loky_poll`."""
    fds = {0: 0, 1: 1, 2: 2, **{int(fd): int(fd) for fd in keep_fds}}
    channel = _start(command_of(cmd), os.getcwd(), {**os.environ, **(env or {})}, fds, False)
    reports = _Reports(channel)
    try:
        pid = int(reports.line(block=True))
    except BaseException:
        channel.close()
        raise
    _LOKY_WORKERS[pid] = reports
    return pid


_ORIGINAL_LOKY_POLL = None  # loky's own, for the processes it started itself


def _loky_poll(self, flag=os.WNOHANG):
    """loky's ``Popen.poll`` (``joblib.externals.loky.backend.popen_loky_posix``) for a worker
    the server started. ``os.waitpid`` cannot see it, as it is not this process's child; loky's
    own poll then answers "running" at once, so its ``join`` would not wait for the worker, and
    the sweep's process would end while its workers are still shutting down. Here the server's
    report of the worker's end is waited for, as ``waitpid`` would."""
    reports = _LOKY_WORKERS.get(self.pid)
    if reports is None:
        return _ORIGINAL_LOKY_POLL(self, flag)
    if self.returncode is None:
        line = reports.line(block=not flag & os.WNOHANG)
        if line is None:
            return None
        reports.channel.close()
        del _LOKY_WORKERS[self.pid]
        status = int(line.split()[0])
        self.returncode = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                           else os.WEXITSTATUS(status))
    return self.returncode


class Popen(subprocess.Popen):
    """``subprocess.Popen`` for a command line run by the prewarmed server."""

    def _execute_child(self, *args) -> None:
        call = _EXECUTE_CHILD.bind(self, *args).arguments
        if call["preexec_fn"] is not None or call["executable"] is not None or call["shell"]:
            raise ValueError("prewarmed.Popen takes no preexec_fn, executable or shell")
        try:
            fds = {target: fd if fd != -1 else target for target, fd in
                   ((0, call["p2cread"]), (1, call["c2pwrite"]), (2, call["errwrite"]))}
            fds.update({int(fd): int(fd) for fd in call["pass_fds"]})  # at the same numbers
            self._reports = _Reports(_start(
                command_of(call["args"]), call["cwd"] or os.getcwd(),
                call["env"] if call["env"] is not None else os.environ, fds,
                bool(call["start_new_session"])))
            self.pid = int(self._reports.line(block=True))
        finally:
            self._close_pipe_fds(call["p2cread"], call["p2cwrite"], call["c2pread"],
                                 call["c2pwrite"], call["errread"], call["errwrite"])

    def _try_wait(self, wait_flags):
        line = self._reports.line(block=not wait_flags & os.WNOHANG)
        if line is None:
            return 0, 0
        self._reports.channel.close()
        status, cpu = line.split()
        global children_cpu
        children_cpu += float(cpu)
        return self.pid, int(status)

    def _internal_poll(self, _deadstate=None, **_):
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            finally:
                self._waitpid_lock.release()
        return self.returncode


class _ViaServer:
    """``subprocess`` as :mod:`tfharness.tracking.process` sees it in a prewarmed command (unless
    :data:`FRESH_TRACKING_PROCESS`): its ``Popen`` is this module's."""

    Popen = Popen

    def __getattr__(self, name):
        return getattr(subprocess, name)


def run(*popenargs, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """``subprocess.run`` with :class:`Popen`."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with Popen(*popenargs, stdin=subprocess.PIPE if input is not None else
               kwargs.pop("stdin", None), **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        except BaseException:
            process.kill()
            raise
        retcode = process.poll()
        if check and retcode:
            raise subprocess.CalledProcessError(retcode, process.args, output=stdout,
                                                stderr=stderr)
    return subprocess.CompletedProcess(process.args, retcode, stdout, stderr)


# What the server's imports added to the environment (tfharness.cli's defaults, for one).
_SET_BY_IMPORTS: dict = {}

if __name__ == "__main__":
    _before = dict(os.environ)
    _import_everything()
    _SET_BY_IMPORTS.update({k: v for k, v in os.environ.items() if k not in _before})
    _run_command(_serve(sys.argv[1], int(sys.argv[2]))["command"])
