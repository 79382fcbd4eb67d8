"""A code interpreter for agents: model-written Python runs in a persistent Jupyter kernel, one per
session, inside a bubblewrap sandbox.

State (variables, imports, files) carries from cell to cell, as in a notebook. Each cell returns its
stdout, stderr, results, traceback (ANSI colours stripped) and matplotlib figures as PNG bytes.

The sandbox (docs/security.md has the threat model and what each layer stops):
- bubblewrap (`bwrap`): new pid, network, ipc, uts and cgroup namespaces; the filesystem is read-only
  system directories and the Python install, a private size-capped tmpfs at /tmp that holds the
  session's working directory, a size-capped /dev/shm and a read-only /dev. No network at all: the
  client talks to the kernel over Unix sockets (Jupyter's `ipc` transport) in a directory bound into
  the sandbox, which the kernel can no longer write once it has started.
- never root: run by root, qwenkit starts bubblewrap without a user namespace and the kernel as a
  uid of its own (setpriv), so the kernel is an ordinary unprivileged user of the host (no writes to
  /proc/sys, no ptrace of root's processes); run by another user, bubblewrap maps that user and
  forbids nested user namespaces. No capabilities in either case.
- a seccomp filter: ptrace, mount, keyctl, bpf, perf_event_open, io_uring, new namespaces and their
  kin fail with EPERM.
- limits: address space, CPU seconds, file size and process count (rlimits), and where a cgroup
  can be made, a pids cgroup and a memory cgroup that also counts the files in /tmp and /dev/shm.
- a wall-clock timeout per cell: the whole sandbox is killed and a fresh kernel started.
- processes a cell leaves behind (background jobs, fork-bomb children) are killed after the cell.
Without bubblewrap only the rlimits, the timeout and the working directory remain (a warning says
so), and qwenkit refuses to run that way as root unless asked to with sandbox=False.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import pwd
import queue
import random
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from qwenkit.agent.react import Tool
from qwenkit.errors import QwenkitError

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FENCED_CODE = re.compile(r"```[ \t]*(?:py|python|python3|ipython)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
MAX_OUTPUT_CHARS = 200_000  # per stream and cell, kept on the host
MAX_DISPLAYS = 20  # images, and results, per cell
MAX_IMAGE_BYTES = 4 * 2**20  # one PNG kept on the host
MAX_IMAGES_BYTES = 16 * 2**20  # all PNGs of one cell
SANDBOX_UIDS = range(61184, 65520)  # the range systemd gives to dynamic users: no login user has one
BLOCKED_SYSCALLS = (  # fail with EPERM in the sandbox: debugging, mounting, kernel keys and modules, ...
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "mount", "umount2", "pivot_root", "chroot",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl", "open_by_handle_at",
    "name_to_handle_at", "lookup_dcookie", "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "vhangup", "uselib",
)  # fmt: skip
CLONE_NEWUSER = 0x10000000
TIOCSTI, TIOCLINUX = 0x5412, 0x541C  # ioctls that type into the terminal


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


def bwrap_command(
    bwrap: str,
    uid: int | None,
    seccomp_fd: int | None,
    work_dir: Path,
    disk_mb: int,
    shm_mb: int,
    binds: Sequence[Path] = (),
) -> list[str]:
    """The bubblewrap command line of qwenkit's sandbox, up to (not including) the program it runs:
    read-only system and Python, a private `disk_mb` tmpfs at /tmp holding `work_dir` (the working
    directory), no network; `binds` are host directories bound writable. Run by root, `uid` is the
    unprivileged uid setpriv switches to (no user namespace); else None (a user namespace)."""
    command = [bwrap, "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if uid is None:  # not root: bubblewrap's own user namespace, with no nested ones
        command += ["--unshare-all", "--unshare-user", "--disable-userns"]
    else:  # root: no user namespace (one would map the kernel to the host's root); setpriv drops root
        command += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                    "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]  # fmt: skip
    if seccomp_fd is not None:
        command += ["--seccomp", str(seccomp_fd)]
    command += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64"):
        path = Path("/") / name
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    command += _parent_dirs(Path("/etc/ld.so.cache"))
    for name in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "fonts", "localtime", "alternatives"):
        if (Path("/etc") / name).exists():
            command += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    if Path("/var/cache/fontconfig").is_dir():  # else every session's first figure rebuilds it (~10 s)
        command += _parent_dirs(Path("/var/cache/fontconfig"))
        command += ["--ro-bind", "/var/cache/fontconfig", "/var/cache/fontconfig"]
    mb = 2**20
    command += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev",
                "--perms", "1777", "--size", str(shm_mb * mb), "--tmpfs", "/dev/shm",
                "--remount-ro", "/dev",
                "--perms", "1777", "--size", str(disk_mb * mb), "--tmpfs", "/tmp",
                "--perms", "0777", "--dir", str(work_dir)]  # fmt: skip
    for root in _python_roots():  # after the private /tmp, which would hide a venv under /tmp
        command += _parent_dirs(root) + ["--ro-bind", str(root), str(root)]
    for path in binds:
        command += _parent_dirs(path) + ["--bind", str(path), str(path)]
    command += ["--remount-ro", "/", "--chdir", str(work_dir), "--hostname", "sandbox", "--"]
    if uid is not None:
        command += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--"]  # fmt: skip
    return command


class CodeInterpreter:
    """One sandboxed Python session. `execute(code)` runs a cell; `close()` ends the session and
    removes its directory. The kernel starts on the first cell.

    sandbox: True requires bubblewrap, False never uses it, None uses it when installed (and, run by
    root, refuses to go on without it)."""

    def __init__(
        self,
        timeout: float = 30.0,
        memory_mb: int = 2048,
        cpu_seconds: int = 600,
        max_processes: int = 64,
        max_file_mb: int = 256,
        disk_mb: int = 256,
        shm_mb: int = 64,
        sandbox: bool | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        limits = (timeout, memory_mb, cpu_seconds, max_file_mb, disk_mb, shm_mb)
        if min(limits) <= 0 or max_processes <= 1:
            raise QwenkitError("interpreter limits must be positive (and max_processes > 1)")
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.cpu_seconds = cpu_seconds
        self.max_processes = max_processes
        self.max_file_mb = max_file_mb
        self.disk_mb = disk_mb
        self.shm_mb = shm_mb
        self.startup_timeout = startup_timeout
        self.bwrap = bwrap_path() if sandbox is not False else None
        if sandbox and self.bwrap is None:
            raise QwenkitError(
                "the sandboxed interpreter needs bubblewrap (bwrap); install it (apt install bubblewrap)"
            )
        if self.bwrap is None and sandbox is None and os.geteuid() == 0:
            raise QwenkitError(
                "refusing to run model-written code as root without a sandbox: install bubblewrap (apt install "
                "bubblewrap), run qwenkit as an ordinary user, or pass sandbox=False to accept the risk"
            )
        if self.bwrap is None:
            warnings.warn(
                "bubblewrap (bwrap) is not installed: the code interpreter runs WITHOUT a filesystem, network "
                "or process sandbox; only resource limits, the cell timeout and its own working directory remain",
                RuntimeWarning,
                stacklevel=2,
            )
        self.seccomp = _seccomp_filter() if self.bwrap else None
        # run by root, the kernel gets a uid of its own (never root); else it runs as this user
        self.uid = _free_uid() if self.bwrap and os.geteuid() == 0 else None
        if self.uid is not None and shutil.which("setpriv") is None:
            raise QwenkitError("the sandbox run by root needs setpriv to drop root (apt install util-linux)")
        self.root = Path(tempfile.mkdtemp(prefix="qwenkit-interpreter-"))
        # with bubblewrap the working directory lives in the sandbox's /tmp tmpfs (disk_mb at most);
        # without it, on the host's disk
        self.work_dir = Path("/tmp/work") if self.bwrap else self.root / "work"
        if self.bwrap is None:
            self.work_dir.mkdir()
        self.run_dir = self.root / "run"  # the kernel's sockets; a fresh one for every kernel start
        self.cgroups = self._make_cgroups()
        self.process: subprocess.Popen | None = None
        self.client = None
        self.baseline: set[int] = set()
        self.closed = False

    # --- protections -------------------------------------------------------------------------------

    @property
    def protections(self) -> dict[str, bool]:
        """Which layers are active: filesystem/network/pid isolation (bwrap), a kernel that is not root,
        a process limit that binds (a pids cgroup, or RLIMIT_NPROC for a non-root kernel), and a memory
        cgroup that counts the session's tmpfs files as well as its processes."""
        return {
            "bubblewrap": self.bwrap is not None,
            "unprivileged": self.uid is not None or os.geteuid() != 0,
            "process_limit": any((g / "pids.max").exists() for g in self.cgroups)
            or self.uid is not None
            or os.geteuid() != 0,
            "memory_cgroup": any(
                (g / "memory.max").exists() or (g / "memory.limit_in_bytes").exists() for g in self.cgroups
            ),  # fmt: skip
            "seccomp": self.seccomp is not None,
            "rlimits": True,
        }

    def _make_cgroups(self) -> list[Path]:
        """A pids cgroup capped at max_processes and a memory cgroup capped at memory_mb, each below
        this process's own cgroup where it may create one (cgroup v1 hierarchies, or v2 with the
        controllers delegated); those it may not are left out."""
        mb = 2**20
        v1 = {"pids": {"pids.max": str(self.max_processes)},
              "memory": {"memory.limit_in_bytes": str(self.memory_mb * mb),
                         "memory.memsw.limit_in_bytes": str(self.memory_mb * mb)}}  # fmt: skip
        v2 = {"pids": {"pids.max": str(self.max_processes)},
              "memory": {"memory.max": str(self.memory_mb * mb), "memory.swap.max": "0"}}  # fmt: skip
        groups, own = [], _own_cgroups()
        for controller, files in v1.items():
            if controller in own and (group := _make_cgroup(own[controller], files)) is not None:
                groups.append(group)
        if "" in own:  # cgroup v2: one group for every controller the parent delegates and v1 lacks
            delegated = _read(own[""] / "cgroup.subtree_control").split()
            files = {k: v for c, f in v2.items() if c in delegated and c not in own for k, v in f.items()}
            if files and (group := _make_cgroup(own[""], files)) is not None:
                groups.append(group)
        return groups

    def _limit_child(self) -> None:
        """Runs in the child between fork and exec: rlimits, then the cgroups."""
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_mb * mb, self.memory_mb * mb))
        # SIGXCPU at the soft limit names the cause; SIGKILL at the hard one if it is ignored
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_file_mb * mb, self.max_file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NPROC, (self.max_processes, self.max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        for group in self.cgroups:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    def _command(self, connection_file: Path, seccomp_fd: int | None) -> list[str]:
        kernel = [sys.executable, "-m", "ipykernel_launcher", "-f", str(connection_file),
                  "--HistoryManager.enabled=False", "--IPKernelApp.quiet=True"]  # fmt: skip
        if self.bwrap is None:
            return kernel
        return bwrap_command(self.bwrap, self.uid, seccomp_fd, self.work_dir, self.disk_mb, self.shm_mb,
                             binds=[self.run_dir]) + kernel  # fmt: skip

    # --- kernel lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the kernel (done by the first `execute`)."""
        from jupyter_client import BlockingKernelClient
        from jupyter_client.connect import write_connection_file

        if self.closed:
            raise QwenkitError("this interpreter session is closed")
        # a fresh socket directory: whatever an earlier kernel left there cannot break this one
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(mode=0o700)
        connection_file = self.run_dir / "kernel.json"
        write_connection_file(str(connection_file), transport="ipc", ip=str(self.run_dir / "kernel"),
                              key=secrets.token_hex(16).encode())  # fmt: skip
        if self.uid is not None:  # the kernel reads and rewrites its connection file and makes its sockets
            os.chown(connection_file, self.uid, self.uid)
            self.run_dir.chmod(0o733)
            self.root.chmod(0o711)
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
        with log.open("wb") as stderr, _seccomp_file(self.seccomp) as seccomp_fd:
            self.process = subprocess.Popen(
                self._command(connection_file, seccomp_fd),
                cwd=self.work_dir if self.bwrap is None else "/",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=() if seccomp_fd is None else (seccomp_fd,),
                preexec_fn=self._limit_child,  # noqa: PLW1509 - only setrlimit and writes; nothing that locks
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
                # a MemoryError in the log (or CPython's "error return without exception set", which
                # an allocation failing inside C code under RLIMIT_AS gives at start), ENOMEM, or SIGKILL
                # (the memory cgroup's OOM killer; bwrap passes it on as 128 + 9) before any of these
                text = _read(log)
                if any(sign in text for sign in OUT_OF_MEMORY_SIGNS) or self.process.returncode in (-9, 137):
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
        if self.uid is not None:  # its sockets exist: from now on the kernel may not write here at all
            os.chown(connection_file, 0, 0)
            self.run_dir.chmod(0o711)
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
        for group in self.cgroups:
            _remove_cgroup(group)
        shutil.rmtree(self.root, ignore_errors=True)
        _UIDS_IN_USE.discard(self.uid)

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close()

    def _kill(self) -> None:
        """Kill every process of the sandbox and wait until they are gone."""
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        if self.process is None:
            return
        pids = {*self._sandbox_pids(), self.process.pid}
        for group in self.cgroups:  # nothing may outlive the kernel, even what left the process tree
            pids.update(int(pid) for pid in _read(group / "cgroup.procs").split())
        if self.uid is not None:  # nor anything else running as the session's own uid
            pids.update(
                p.pid
                for p in psutil.process_iter(["uids"])
                if p.info["uids"] and p.info["uids"].real == self.uid
            )
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
        png = data.get("image/png")
        if isinstance(png, str) and len(result.images) < MAX_DISPLAYS:
            size = len(png) * 3 // 4  # decoded size, known before decoding
            if size > MAX_IMAGE_BYTES or size + sum(map(len, result.images)) > MAX_IMAGES_BYTES:
                result.results.append(f"[image of {size} bytes dropped: images are limited to {MAX_IMAGE_BYTES} "
                                      f"bytes each and {MAX_IMAGES_BYTES} bytes per cell]")  # fmt: skip
            else:
                result.images.append(base64.b64decode(png))
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
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _running_pid(pid: int) -> bool:
    try:
        return _running(psutil.Process(pid))
    except psutil.Error:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# What a kernel that ran out of memory while starting leaves in its log.
OUT_OF_MEMORY_SIGNS = ("MemoryError", "Cannot allocate memory", "error return without exception set")


def _own_cgroups() -> dict[str, Path]:
    """This process's cgroup directories: v1 hierarchies by controller (pids, memory), v2 as ''."""
    mounts: dict[str, str] = {}
    for line in _read(Path("/proc/self/mounts")).splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[2] == "cgroup2":
            mounts.setdefault("", fields[1])
        elif len(fields) > 3 and fields[2] == "cgroup":
            mounts.update({c: fields[1] for c in fields[3].split(",") if c in ("pids", "memory")})
    own = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            if controller in mounts:
                own[controller] = Path(mounts[controller]) / path.lstrip("/")
    return own


def _make_cgroup(parent: Path, limits: dict[str, str]) -> Path | None:
    """A new cgroup below `parent` with the limit files written (those that exist); None if not allowed."""
    if not (parent / "cgroup.procs").is_file() or not os.access(parent, os.W_OK):
        return None
    group = parent / f"qwenkit-{uuid.uuid4().hex[:12]}"
    try:
        group.mkdir()
        for name, value in limits.items():
            if (group / name).exists():
                (group / name).write_text(value)
        return group
    except OSError:
        _remove_cgroup(group)
        return None


def _parent_dirs(path: Path) -> list[str]:
    """bwrap arguments that make the sandbox's copies of `path`'s parents traversable (bwrap run by root
    makes missing parents 0700, which the kernel's own uid could not pass)."""
    parents = [p for p in reversed(path.parents) if p not in (Path("/"), Path("/tmp"))]
    return [arg for p in parents for arg in ("--perms", "0755", "--dir", str(p))]


_UIDS_IN_USE: set[int | None] = set()


def _free_uid() -> int:
    """A uid of the dynamic range that no account and no running process has."""
    busy = {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"]}
    for uid in random.sample(SANDBOX_UIDS, 256):
        if uid in busy or uid in _UIDS_IN_USE:
            continue
        try:
            pwd.getpwuid(uid)
        except KeyError:
            _UIDS_IN_USE.add(uid)
            return uid
    raise QwenkitError("no free uid for the code interpreter's sandbox")


def _seccomp_filter() -> bytes:
    """The seccomp program bubblewrap loads (libseccomp writes it): BLOCKED_SYSCALLS, clone with a new
    user namespace and the terminal-injecting ioctls fail with EPERM; clone3 with ENOSYS, so the C
    library falls back to clone, whose flags a filter can read."""
    try:
        import pyseccomp as seccomp

        program = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    except (ImportError, OSError, RuntimeError) as e:
        raise QwenkitError(
            f"the sandbox needs libseccomp (apt install libseccomp2) and pyseccomp: {e}"
        ) from None
    deny = seccomp.ERRNO(errno.EPERM)
    for name in BLOCKED_SYSCALLS:
        with contextlib.suppress(OSError):  # a call this architecture does not have
            program.add_rule(deny, name)
    program.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    program.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for request in (TIOCSTI, TIOCLINUX):
        program.add_rule(deny, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
    with tempfile.TemporaryFile() as file:
        program.export_bpf(file)
        file.seek(0)
        return file.read()


@contextlib.contextmanager
def _seccomp_file(program: bytes | None) -> Iterator[int | None]:
    """An open file holding the seccomp program, for bwrap's --seccomp FD."""
    if program is None:
        yield None
        return
    with tempfile.TemporaryFile() as file:
        file.write(program)
        file.flush()
        file.seek(0)
        yield file.fileno()


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
