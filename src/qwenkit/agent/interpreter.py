"""A code interpreter for agents: model-written Python runs in a persistent Jupyter kernel, one per
session, inside a bubblewrap sandbox.

State (variables, imports) carries from cell to cell, as in a notebook. Each cell returns its
stdout, stderr, results, traceback (ANSI colours stripped) and matplotlib figures as PNG bytes.

The sandbox (see docs/agents.md for the threat model):
- bubblewrap (`bwrap`): new user, pid, network, ipc, uts and cgroup namespaces; the filesystem is
  read-only system directories and the Python install, a private /tmp, and the session's own
  working directory (read-write). No network at all: the client talks to the kernel over Unix
  sockets (Jupyter's `ipc` transport) in a directory bound into the sandbox.
- rlimits on the kernel: address space (memory), CPU seconds, file size, process count.
- a cgroup `pids.max` where a writable pids cgroup exists (RLIMIT_NPROC does not bind processes
  that map to root, which is what bwrap runs them as when qwenkit runs as root).
- a wall-clock timeout per cell: the whole sandbox is killed and a fresh kernel started.
- processes a cell leaves behind (background jobs, fork-bomb children) are killed after the cell.
Without bubblewrap only the rlimits, the timeout and the working directory remain (a warning says so).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from qwenkit.agent.react import Tool
from qwenkit.errors import QwenkitError

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FENCED_CODE = re.compile(r"```[ \t]*(?:py|python|python3|ipython)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
MAX_OUTPUT_CHARS = 200_000  # per stream and cell, kept on the host
MAX_DISPLAYS = 20  # images, and results, per cell
PIDS_CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


def strip_ansi(text: str) -> str:
    """Text without terminal colour codes (IPython colours its tracebacks)."""
    return ANSI_ESCAPE.sub("", text)


def extract_code(action_input: str) -> str:
    """The code in a model's Action Input: a JSON object's "code", the inside of a ```py fence, or the
    text itself, as the official Qwen code interpreter accepts it."""
    text = action_input.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("code"), str):
            return value["code"]
    fenced = FENCED_CODE.search(text)
    return fenced.group(1) if fenced else text


@dataclass
class Execution:
    """What one cell produced."""

    stdout: str = ""
    stderr: str = ""
    results: list[str] = field(default_factory=list)  # text/plain of execute_result / display_data
    images: list[bytes] = field(default_factory=list)  # PNG bytes, in display order
    error: str | None = None  # the traceback (ANSI stripped) when the cell raised
    notice: str | None = None  # what the sandbox did: timeout, restart, killed processes

    @property
    def ok(self) -> bool:
        return self.error is None and self.notice is None

    def text(self, limit: int = 4000) -> str:
        """The Observation for the model: everything the cell printed, in one string; longer than
        `limit` characters, its middle is cut (a model's context is short, and the ends say most)."""
        parts = [self.stdout.rstrip("\n"), self.stderr.rstrip("\n"), *self.results]
        parts += [f"[image {i + 1}: PNG, {len(png)} bytes]" for i, png in enumerate(self.images)]
        parts += [self.error or "", self.notice or ""]
        text = "\n".join(p for p in parts if p) or "(the code ran and printed nothing)"
        if len(text) > limit:
            text = (
                f"{text[: limit // 2]}\n... ({len(text) - limit} characters cut) ...\n{text[-limit // 2 :]}"
            )
        return text


def bwrap_path() -> str | None:
    """The bubblewrap binary, or None when it is not installed."""
    return shutil.which("bwrap") or (str(Path("/usr/bin/bwrap")) if Path("/usr/bin/bwrap").exists() else None)


def _python_roots() -> list[Path]:
    """Directories that hold the running Python and its packages (bound read-only into the sandbox)."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    candidates.add(str(Path(sys.executable).resolve().parent.parent))
    roots = sorted({Path(p).resolve() for p in candidates})
    # keep the outermost directories only; /usr is bound as a whole anyway
    return [r for r in roots if not any(o != r and o in r.parents for o in roots) and r != Path("/usr")
            and Path("/usr") not in r.parents]  # fmt: skip


class CodeInterpreter:
    """One sandboxed Python session. `execute(code)` runs a cell; `close()` ends the session and
    removes its directory. The kernel starts on the first cell.

    sandbox: True requires bubblewrap, False never uses it, None uses it when installed."""

    def __init__(
        self,
        timeout: float = 30.0,
        memory_mb: int = 2048,
        cpu_seconds: int = 600,
        max_processes: int = 64,
        max_file_mb: int = 256,
        sandbox: bool | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if timeout <= 0 or memory_mb <= 0 or cpu_seconds <= 0 or max_processes <= 1 or max_file_mb <= 0:
            raise QwenkitError("interpreter limits must be positive (and max_processes > 1)")
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.cpu_seconds = cpu_seconds
        self.max_processes = max_processes
        self.max_file_mb = max_file_mb
        self.startup_timeout = startup_timeout
        self.bwrap = bwrap_path() if sandbox is not False else None
        if sandbox and self.bwrap is None:
            raise QwenkitError(
                "the sandboxed interpreter needs bubblewrap (bwrap); install it (apt install bubblewrap)"
            )
        if self.bwrap is None:
            warnings.warn(
                "bubblewrap (bwrap) is not installed: the code interpreter runs WITHOUT a filesystem, network "
                "or process sandbox; only resource limits, the cell timeout and its own working directory remain",
                RuntimeWarning,
                stacklevel=2,
            )
        self.root = Path(tempfile.mkdtemp(prefix="qwenkit-interpreter-"))
        self.work_dir = self.root / "work"
        self.run_dir = self.root / "run"
        self.work_dir.mkdir()
        self.run_dir.mkdir(mode=0o700)
        self.cgroup = self._make_cgroup()
        self.process: subprocess.Popen | None = None
        self.client = None
        self.baseline: set[int] = set()
        self.closed = False

    # --- protections -------------------------------------------------------------------------------

    @property
    def protections(self) -> dict[str, bool]:
        """Which layers are active: filesystem/network/pid isolation (bwrap), and a process limit that
        binds even root (a pids cgroup) or binds non-root only (RLIMIT_NPROC)."""
        return {
            "bubblewrap": self.bwrap is not None,
            "process_limit": self.cgroup is not None or os.geteuid() != 0,
            "rlimits": True,
        }

    def _make_cgroup(self) -> Path | None:
        """A pids cgroup capped at max_processes, where this process may create one; else None."""
        for base in PIDS_CGROUP_ROOTS:
            if not (base / "cgroup.procs").is_file() or not os.access(base, os.W_OK):
                continue
            if base == Path("/sys/fs/cgroup") and "pids" not in _read(base / "cgroup.subtree_control"):
                continue
            group = base / f"qwenkit-{uuid.uuid4().hex[:12]}"
            try:
                group.mkdir()
                (group / "pids.max").write_text(str(self.max_processes))
                return group
            except OSError:
                _remove_cgroup(group)
        return None

    def _limit_child(self) -> None:
        """Runs in the child between fork and exec: rlimits, then the pids cgroup."""
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_mb * mb, self.memory_mb * mb))
        # SIGXCPU at the soft limit names the cause; SIGKILL at the hard one if it is ignored
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_file_mb * mb, self.max_file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NPROC, (self.max_processes, self.max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def _command(self, connection_file: Path) -> list[str]:
        kernel = [sys.executable, "-m", "ipykernel_launcher", "-f", str(connection_file),
                  "--HistoryManager.enabled=False", "--IPKernelApp.quiet=True"]  # fmt: skip
        if self.bwrap is None:
            return kernel
        command = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        command += ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64"):
            path = Path("/") / name
            if path.is_symlink():
                command += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                command += ["--ro-bind", str(path), str(path)]
        for name in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "fonts", "localtime", "alternatives"):
            if (Path("/etc") / name).exists():
                command += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
        if Path("/var/cache/fontconfig").is_dir():  # else every session's first figure rebuilds it (~10 s)
            command += ["--ro-bind", "/var/cache/fontconfig", "/var/cache/fontconfig"]
        command += ["--proc", "/proc", "--dev", "/dev", "--size", str(256 * 1024 * 1024), "--tmpfs", "/tmp"]
        for root in _python_roots():  # after the private /tmp, which would hide a venv under /tmp
            command += ["--ro-bind", str(root), str(root)]
        command += [
            "--bind",
            str(self.work_dir),
            str(self.work_dir),
            "--bind",
            str(self.run_dir),
            str(self.run_dir),
        ]
        command += ["--remount-ro", "/", "--chdir", str(self.work_dir), "--hostname", "sandbox", "--"]
        return command + kernel

    # --- kernel lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the kernel (done by the first `execute`)."""
        from jupyter_client import BlockingKernelClient
        from jupyter_client.connect import write_connection_file

        if self.closed:
            raise QwenkitError("this interpreter session is closed")
        for leftover in self.run_dir.iterdir():
            leftover.unlink()
        connection_file = self.run_dir / "kernel.json"
        write_connection_file(str(connection_file), transport="ipc", ip=str(self.run_dir / "kernel"),
                              key=secrets.token_hex(16).encode())  # fmt: skip
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(self.work_dir),
            "TMPDIR": "/tmp" if self.bwrap else str(self.root),
            "LANG": "C.UTF-8",
            "PYTHONNOUSERSITE": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "MPLCONFIGDIR": str(self.root / "matplotlib") if self.bwrap is None else "/tmp/matplotlib",
            "IPYTHONDIR": str(self.root / "ipython") if self.bwrap is None else "/tmp/ipython",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        log = self.root / "kernel.log"  # a file, not a pipe: a pipe nobody reads would block the kernel
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                self._command(connection_file),
                cwd=self.work_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=self._limit_child,  # noqa: PLW1509 - only setrlimit and one write; nothing that locks
                start_new_session=True,
            )
        client = BlockingKernelClient()
        client.load_connection_file(str(connection_file))
        client.start_channels()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                client.stop_channels()
                reason = _last_error(log)
                if "MemoryError" in _read(log):
                    reason = f"out of memory (memory_mb={self.memory_mb} is too small)"
                raise QwenkitError(f"the code interpreter's kernel failed to start: {reason}")
            try:
                client.wait_for_ready(timeout=1)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    client.stop_channels()
                    self._kill()
                    raise QwenkitError(
                        f"the code interpreter's kernel did not start within {self.startup_timeout:g} s"
                    ) from None
        self.client = client
        self.baseline = set(self._sandbox_pids())

    def restart(self) -> None:
        """Kill the kernel and everything it started; the next cell gets a fresh one."""
        self._kill()

    def close(self) -> None:
        """End the session: kill the kernel and remove the working directory."""
        if self.closed:
            return
        self._kill()
        self.closed = True
        _remove_cgroup(self.cgroup)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close()

    def _kill(self) -> None:
        """Kill every process of the sandbox and wait until they are gone."""
        import psutil

        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        if self.process is None:
            return
        pids = {*self._sandbox_pids(), self.process.pid}
        if self.cgroup is not None:  # nothing may outlive the kernel, even what left the process tree
            pids.update(int(pid) for pid in _read(self.cgroup / "cgroup.procs").split())
        processes, user = [], []  # user: the kernel and what it started (not bwrap's own processes)
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                processes.append(process)
                if process.name() != "bwrap":
                    user.append(process)
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill()
        self.process.wait()
        # wait for the kernel and its children to be dead (zombies at most); bwrap's own init may take
        # a moment longer while the kernel tears its namespaces down, and runs no user code
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_running(p) for p in user):
            time.sleep(0.01)
        self.process = None

    def _sandbox_pids(self) -> list[int]:
        """Every process below the launcher (the sandbox's init, the kernel, what the cells started)."""
        import psutil

        if self.process is None:
            return []
        try:
            return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    # --- running code -------------------------------------------------------------------------------

    def execute(self, code: str, timeout: float | None = None) -> Execution:
        """Run one cell; never raises for what the code does (errors, timeouts, crashes are reported)."""
        if self.process is not None and self.process.poll() is not None:  # died between cells
            self._kill()
        if self.client is None:
            self.start()
        timeout = self.timeout if timeout is None else timeout
        result = Execution()
        msg_id = self.client.execute(code, store_history=False, allow_stdin=False, stop_on_error=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                result.notice = self._died_notice()
                self._kill()
                return result
            try:
                message = self.client.get_iopub_msg(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                if time.monotonic() > deadline:
                    self._kill()
                    result.notice = (f"Timeout: the code ran longer than {timeout:g} s and was stopped; the kernel "
                                     "was restarted, so variables and imports from earlier cells are gone.")  # fmt: skip
                    return result
                continue
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            _collect(result, kind, content)
        leftovers = [pid for pid in self._sandbox_pids() if pid not in self.baseline and _running_pid(pid)]
        if leftovers:  # background jobs or a fork bomb's children: only a fresh sandbox clears them all
            self._kill()
            result.notice = (f"The code left {len(leftovers)} process(es) running; they were stopped and the "
                             "kernel restarted, so variables and imports from earlier cells are gone.")  # fmt: skip
        return result

    def _died_notice(self) -> str:
        code = self.process.returncode  # bwrap passes on a signal death as 128 + signal
        if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            reason = f"it used up the session's CPU-time limit of {self.cpu_seconds} s"
        elif code in (-signal.SIGKILL, 128 + signal.SIGKILL):
            reason = "it was killed, most likely for lack of memory"
        else:
            reason = f"exit status {code}"
        return f"The kernel died ({reason}); it was restarted, so variables and imports from earlier cells are gone."


def _collect(result: Execution, kind: str, content: dict) -> None:
    """Add one iopub message to the result; output past MAX_OUTPUT_CHARS / MAX_DISPLAYS is dropped, so
    a cell printing in a loop cannot fill the host's memory before its timeout."""
    if kind == "stream":
        name = "stdout" if content["name"] == "stdout" else "stderr"
        text = getattr(result, name)
        if len(text) < MAX_OUTPUT_CHARS:
            text += strip_ansi(content["text"])[: MAX_OUTPUT_CHARS - len(text)]
            if len(text) >= MAX_OUTPUT_CHARS:
                text += f"\n[output beyond {MAX_OUTPUT_CHARS} characters dropped]"
            setattr(result, name, text)
    elif kind in ("execute_result", "display_data"):
        data = content.get("data", {})
        if "image/png" in data and len(result.images) < MAX_DISPLAYS:
            result.images.append(base64.b64decode(data["image/png"]))
        elif "text/plain" in data and "image/png" not in data and len(result.results) < MAX_DISPLAYS:
            result.results.append(strip_ansi(data["text/plain"])[:MAX_OUTPUT_CHARS])
    elif kind == "error":
        result.error = strip_ansi(
            "\n".join(content.get("traceback") or [f"{content['ename']}: {content['evalue']}"])
        )


def _last_error(log: Path) -> str:
    """The exception line of a failed start's log (or its last line)."""
    lines = [line.strip() for line in _read(log).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
    return (errors or lines or ["no output"])[-1]


def _running(process) -> bool:
    """Alive and not a zombie (an exited child that only waits to be reaped)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _running_pid(pid: int) -> bool:
    import psutil

    try:
        return _running(psutil.Process(pid))
    except psutil.Error:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _remove_cgroup(group: Path | None) -> None:
    if group is None:
        return
    for _ in range(50):  # the kernel frees a cgroup once its last process is reaped
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


# --- the `python` tool -------------------------------------------------------------------------------

PYTHON_DESCRIPTION = (
    "Run Python code in a Jupyter notebook kernel that keeps variables between calls and shows "
    "matplotlib figures. Put the code in a ```py block."
)


@dataclass
class ToolOutput:
    """A tool's result: the Observation text for the model, and images for the user."""

    text: str
    images: list[bytes] = field(default_factory=list)


class PythonTool(Tool):
    """The code interpreter as a ReAct tool; its kernel starts on the first call."""

    def __init__(self, interpreter: CodeInterpreter | None = None, **options) -> None:
        self._interpreter = interpreter
        self._options = options
        super().__init__("python", PYTHON_DESCRIPTION,
                         {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
                         self.run_code)  # fmt: skip

    @property
    def interpreter(self) -> CodeInterpreter:
        if self._interpreter is None:
            self._interpreter = CodeInterpreter(**self._options)
        return self._interpreter

    def run_code(self, code: str) -> str:
        return self.interpreter.execute(code).text()

    def run(self, arguments: str) -> ToolOutput:
        """Run the code in the model's Action Input; the Observation text plus any figures."""
        code = extract_code(arguments)
        if not code.strip():
            return ToolOutput("Error: the Action Input holds no code")
        try:
            execution = self.interpreter.execute(code)
        except QwenkitError as e:  # the kernel would not start: information for the model and the user
            return ToolOutput(f"Error: {e}")
        return ToolOutput(execution.text(), execution.images)

    def call(self, arguments: str) -> str:
        return self.run(arguments).text

    def close(self) -> None:
        if self._interpreter is not None:
            self._interpreter.close()
