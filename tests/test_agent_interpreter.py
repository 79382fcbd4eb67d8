"""The sandboxed code interpreter: notebook behaviour, then the threat model of docs/agents.md.

Every attack runs model-style code in the sandbox and checks both sides: the code is refused or
stopped, and the host (this process, its files, its network) is unharmed. One kernel is shared by
the tests where that is safe; attacks that restart it say so.
"""

import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from qwenkit import QwenkitError
from qwenkit.agent.interpreter import CodeInterpreter, PythonTool, bwrap_path, extract_code, strip_ansi

REPO = Path(__file__).resolve().parents[1]
needs_bwrap = pytest.mark.skipif(
    bwrap_path() is None, reason="bubblewrap (bwrap) is not installed; no sandbox"
)


@pytest.fixture(scope="module")
def interpreter():
    if bwrap_path() is None:
        pytest.skip("bubblewrap (bwrap) is not installed; the sandbox tests need it")
    os.environ["QWENKIT_TEST_SECRET"] = "hunter2"  # the kernel must not inherit the host's environment
    with CodeInterpreter(timeout=60, memory_mb=1024) as sandbox:
        yield sandbox
    os.environ.pop("QWENKIT_TEST_SECRET")


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A directory outside the sandbox with a secret in it (an /etc/shadow of our own)."""
    directory = tmp_path_factory.mktemp("host-secrets")
    (directory / "shadow").write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    return directory


def run(interpreter: CodeInterpreter, code: str, **kwargs):
    result = interpreter.execute(code, **kwargs)
    assert result.error is None or "\x1b[" not in result.error  # colours are stripped
    return result


# --- notebook behaviour ---------------------------------------------------------------------------


def test_state_persists_and_outputs_are_collected(interpreter):
    assert run(interpreter, "import math\nvalues = [1, 2, 3]\nprint('set')").stdout == "set\n"
    result = run(interpreter, "import sys\nprint(sum(values), file=sys.stderr)\nmath.sqrt(values[-1] + 13)")
    assert result.stderr == "6\n" and result.results == ["4.0"] and result.ok
    assert result.text() == "6\n4.0"
    failed = run(interpreter, "values[10]")
    assert "IndexError: list index out of range" in failed.error and not failed.ok
    assert failed.text().endswith("IndexError: list index out of range")
    assert run(interpreter, "pass").text() == "(the code ran and printed nothing)"


def test_long_output_is_capped(interpreter):
    result = run(interpreter, "print('x' * 300_000)\nfor i in range(30): display(i)")
    assert result.stdout.startswith("x" * 1000) and result.stdout.endswith(
        "[output beyond 200000 characters dropped]"
    )
    assert result.results == [str(i) for i in range(20)]
    text = result.text()
    assert (
        len(text) < 4100 and "characters cut) ..." in text and text.endswith("\n".join(map(str, range(20))))
    )


def test_matplotlib_figures_come_back_as_png(interpreter):
    result = run(
        interpreter, "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.title('x')\nplt.show()"
    )
    assert len(result.images) == 1 and result.images[0].startswith(b"\x89PNG\r\n\x1a\n")
    assert result.text() == f"[image 1: PNG, {len(result.images[0])} bytes]"


def test_cells_run_in_the_session_directory(interpreter):
    result = run(interpreter, "import os\nopen('notes.txt', 'w').write('kept')\nprint(os.getcwd())")
    assert result.stdout.strip() == str(interpreter.work_dir)
    assert run(interpreter, "print(open('notes.txt').read())").stdout == "kept\n"  # files carry over
    assert run(interpreter, "import os; print(os.environ.get('QWENKIT_TEST_SECRET'))").stdout == "None\n"


def test_extract_code_accepts_fences_json_and_plain_text():
    assert extract_code("```py\nprint(1)\n```") == "print(1)\n"
    assert extract_code("Here:\n```python\nx = 1\n```\nthanks") == "x = 1\n"
    assert extract_code('{"code": "print(2)"}') == "print(2)"
    assert extract_code("  print(3)  ") == "print(3)"
    assert extract_code("{1, 2} | {3}") == "{1, 2} | {3}"  # not JSON: it is code
    assert strip_ansi("\x1b[0;31mValueError\x1b[0m: x") == "ValueError: x"


def test_python_tool_reads_action_input(interpreter):
    tool = PythonTool(interpreter)
    assert tool.spec()["function"]["name"] == "python"
    assert tool.call("```py\nprint(6 * 7)\n```") == "42"
    assert tool.run("```py\n```").text == "Error: the Action Input holds no code"


# --- the threat model -----------------------------------------------------------------------------


@needs_bwrap
def test_files_outside_cannot_be_read(interpreter, outside):
    targets = [
        outside / "shadow",
        Path("/etc/shadow"),
        Path.home() / ".ssh",
        REPO / "pyproject.toml",
        REPO / "src",
    ]
    for target in targets:
        code = f"import os\np = {str(target)!r}\nprint(os.listdir(p) if os.path.isdir(p) else open(p).read())"
        result = run(interpreter, code)
        assert result.error is not None and "FileNotFoundError" in result.error, (target, result.text())
    listing = run(interpreter, "import os; print(sorted(os.listdir('/')))").stdout
    assert "home" not in listing and "etc" in listing  # only a few system files are bound from /etc
    assert "passwd" not in run(interpreter, "import os; print(os.listdir('/etc'))").stdout


@needs_bwrap
def test_files_outside_cannot_be_written(interpreter, outside):
    escape = f"/tmp/qwenkit-escape-{uuid.uuid4().hex}"
    # a checkout under /tmp: the write lands in the sandbox's own /tmp (checked below: not on the host)
    repo_error = None if Path("/tmp") in REPO.parents else "Read-only file system"
    for target, error in [(outside / "planted", "FileNotFoundError"), (REPO / "planted.py", repo_error),
                          (Path("/usr/planted"), "Read-only file system")]:  # fmt: skip
        result = run(interpreter, f"open({str(target)!r}, 'w').write('x')")
        if error is not None:
            assert result.error is not None and error in result.error, (target, result.text())
        assert not target.exists()
    # the sandbox's /tmp is private: a write there never reaches the host's /tmp
    assert run(interpreter, f"open({escape!r}, 'w').write('x')").ok
    assert not Path(escape).exists()
    assert (outside / "shadow").read_text().startswith("root:")


@needs_bwrap
def test_no_network_even_to_a_local_server(interpreter):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'leak')"
        result = run(interpreter, code)
        assert "ConnectionRefusedError" in result.error
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever arrived
    dns = run(interpreter, "import socket; socket.getaddrinfo('pypi.org', 443)")
    assert "gaierror" in dns.error


@needs_bwrap
def test_memory_bomb_is_refused_and_the_session_survives(interpreter):
    assert run(interpreter, "survivor = 'still here'").ok
    result = run(interpreter, "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 2**20))")
    assert "MemoryError" in result.error
    assert run(interpreter, "del blocks\nprint(survivor)").stdout == "still here\n"


@needs_bwrap
def test_infinite_loop_times_out_and_the_kernel_restarts(interpreter):
    assert run(interpreter, "before = 1").ok
    result = run(interpreter, "while True:\n    pass", timeout=2)
    assert result.notice.startswith("Timeout: the code ran longer than 2 s") and "restarted" in result.notice
    assert "restarted" in result.text()
    after = run(interpreter, "print('alive')\nbefore")
    assert after.stdout == "alive\n" and "NameError" in after.error  # a fresh kernel: old state is gone


@needs_bwrap
def test_fork_bomb_is_contained(interpreter):
    if not interpreter.protections["process_limit"]:
        pytest.skip("no process limit binds here (running as root without a writable pids cgroup)")
    result = run(interpreter, "import os\nwhile True:\n    os.fork()", timeout=20)
    assert "BlockingIOError" in (result.error or "") or "Timeout" in (result.notice or ""), result.text()
    assert "restarted" in result.notice
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes
    assert run(interpreter, "print('alive')").stdout == "alive\n"
    assert len(interpreter._sandbox_pids()) <= 3  # bwrap's init and the kernel, nothing left over


@needs_bwrap
def test_background_processes_do_not_outlive_their_cell(interpreter):
    # a child that has exited (a zombie not yet reaped) is not left running: no restart
    zombie = "import os, time\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
    zombie += "while open(f'/proc/{pid}/stat').read().split()[2] != 'Z':\n    time.sleep(0.01)"
    assert run(interpreter, zombie).ok
    result = run(interpreter, "os.waitpid(pid, 0)\nimport subprocess\nsubprocess.Popen(['sleep', '6171'])")
    assert result.notice.startswith("The code left 1 process(es) running")
    assert (  # an unusual duration: another "sleep 600" on the host must not fail this
        "sleep 6171"
        not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    )


@needs_bwrap
def test_cpu_time_limit_kills_and_restarts_the_kernel():
    with CodeInterpreter(timeout=300, cpu_seconds=2) as sandbox:  # CPU seconds, however slow the host
        result = sandbox.execute("x = 0\nwhile True:\n    x += 1")
        assert result.notice.startswith("The kernel died (it used up the session's CPU-time limit of 2 s)")
        assert sandbox.execute("print('again')").stdout == "again\n"


def test_session_cleanup_and_argument_checks(tmp_path):
    with pytest.warns(RuntimeWarning, match="WITHOUT a filesystem, network or process sandbox"):
        plain = CodeInterpreter(sandbox=False, timeout=20)
    assert not plain.protections["bubblewrap"]
    assert plain.execute("y = 2").ok and plain.execute("print(y * 21)").stdout == "42\n"
    root, cgroups = plain.root, plain.cgroups
    plain.close()
    assert not root.exists() and not any(group.exists() for group in cgroups)
    with pytest.raises(QwenkitError, match="closed"):
        plain.execute("1")
    with pytest.raises(QwenkitError, match="must be positive"):
        CodeInterpreter(timeout=0)
    # a kernel that cannot start is one clear error; the python tool hands it to the model as text
    tool = PythonTool(memory_mb=20)
    assert tool.call("print(1)") == (
        "Error: the code interpreter's kernel failed to start: out of memory (memory_mb=20 is too small)"
    )
    tool.close()


# --- privilege: the sandbox as root (these machines run everything as root) ------------------------

LIBC_CALLS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    result = getattr(libc, name)(*args)
    return 'ok' if result == 0 else os.strerror(ctypes.get_errno())
"""


@needs_bwrap
def test_no_kernel_setting_can_be_written(interpreter):
    """Every file under /proc/sys refuses to open for writing (a cell once changed the host's
    kernel.printk_ratelimit, and kernel.core_pattern would run a script as root on the next crash)."""
    before = Path("/proc/sys/kernel/printk_ratelimit").read_text()
    code = (
        "import os\nopened, refused = [], 0\n"
        "for top in ('/proc/sys', '/proc/sysrq-trigger', '/proc/sys/kernel/core_pattern'):\n"
        "    paths = [top] if not os.path.isdir(top) else [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]\n"
        "    for path in paths:\n"
        "        try:\n"
        "            os.close(os.open(path, os.O_WRONLY))\n"
        "            opened.append(path)\n"
        "        except OSError:\n"
        "            refused += 1\n"
        "print(refused > 100, opened)\n"
        "open('/proc/sys/kernel/printk_ratelimit', 'w').write('1')"
    )
    result = run(interpreter, code)
    assert result.stdout == "True []\n", result.text()
    assert "Error" in result.error  # read-only /proc, and the kernel is not root
    assert Path("/proc/sys/kernel/printk_ratelimit").read_text() == before


@needs_bwrap
def test_the_kernel_is_an_unprivileged_user_with_no_capabilities(interpreter):
    status = run(interpreter, "import os\nprint(os.getuid(), os.geteuid(), os.getgroups())\n"
                              "print(open('/proc/self/status').read())").stdout  # fmt: skip
    first, fields = status.split("\n", 1)
    uid, euid, _groups = first.split(" ", 2)
    assert uid == euid and int(uid) != 0 and interpreter.protections["unprivileged"]
    values = dict(line.split(":\t", 1) for line in fields.splitlines() if ":\t" in line)
    for capability in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(values[capability], 16) == 0, (capability, values[capability])
    assert values["NoNewPrivs"].strip() == "1" and values["Seccomp"].strip() == "2"


@needs_bwrap
def test_ptrace_mount_namespaces_and_kernel_keys_are_refused(interpreter):
    code = LIBC_CALLS + (
        "PTRACE_ATTACH, CLONE_NEWUSER, CLONE_NEWNS = 16, 0x10000000, 0x20000\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    import time; time.sleep(30); os._exit(0)\n"
        "print('ptrace init', call('ptrace', PTRACE_ATTACH, 1, 0, 0))\n"
        "print('ptrace own child', call('ptrace', PTRACE_ATTACH, child, 0, 0))\n"
        "os.kill(child, 9); os.waitpid(child, 0)\n"
        "print('unshare user', call('unshare', CLONE_NEWUSER))\n"
        "print('unshare mount', call('unshare', CLONE_NEWNS))\n"
        "print('mount', call('mount', b'none', b'/tmp', b'tmpfs', 0, None))\n"
        "print('keyctl', call('syscall', 250, 0, 0, 0, 0, 0))\n"  # x86_64 keyctl
        "print('bpf', call('syscall', 321, 0, 0, 0))\n"  # x86_64 bpf
    )
    lines = run(interpreter, code).stdout.splitlines()
    assert lines == [
        "ptrace init Operation not permitted",
        "ptrace own child Operation not permitted",
        "unshare user Operation not permitted",
        "unshare mount Operation not permitted",
        "mount Operation not permitted",
        *(["keyctl Operation not permitted", "bpf Operation not permitted"] if os.uname().machine == "x86_64"
          else lines[5:]),
    ], lines  # fmt: skip


@needs_bwrap
def test_dev_shm_files_and_dev_are_capped():
    with CodeInterpreter(timeout=60, disk_mb=32, shm_mb=8) as sandbox:
        fill = "try:\n    with open({path!r}, 'wb') as f:\n        for _ in range(64):\n"
        fill += "            f.write(bytes(2**20))\nexcept OSError as e:\n    print(e.strerror)"
        assert sandbox.execute(fill.format(path="/dev/shm/fill")).stdout == "No space left on device\n"
        assert sandbox.execute(fill.format(path="data.bin")).stdout == "No space left on device\n"
        assert sandbox.execute(fill.format(path="/tmp/more.bin")).stdout == "No space left on device\n"
        planted = sandbox.execute("open('/dev/planted', 'w')")
        assert "Read-only file system" in planted.error
        # the session's files are in its own memory, not on the host: the host directory holds no data
        assert sum(f.stat().st_size for f in sandbox.root.rglob("*") if f.is_file()) < 2**20


@needs_bwrap
def test_memory_cgroup_counts_tmpfs_files():
    with CodeInterpreter(timeout=60, memory_mb=400, disk_mb=2048) as sandbox:
        if not sandbox.protections["memory_cgroup"]:
            pytest.skip("no memory cgroup can be made here")
        fill = "for i in range(5):\n    with open(f'/tmp/big{i}', 'wb') as f:\n        for _ in range(200):\n"
        fill += "            f.write(bytes(2**20))"  # 1000 MiB in files of 200 MiB (each below max_file_mb)
        result = sandbox.execute(fill)
        assert not result.ok and "died" in (result.notice or "") + (result.error or ""), result.text()
        assert sandbox.execute("print('fresh')").stdout == "fresh\n"


@needs_bwrap
def test_images_a_cell_returns_are_capped(interpreter):
    code = (
        "from IPython.display import Image, display\nimport os\n"
        "display(Image(data=b'\\x89PNG\\r\\n\\x1a\\n' + os.urandom(6 * 2**20), format='png'))\n"
        "for _ in range(6):\n    display(Image(data=b'\\x89PNG\\r\\n\\x1a\\n' + os.urandom(3 * 2**20), format='png'))"
    )
    result = run(interpreter, code)
    assert len(result.images) == 5 and sum(map(len, result.images)) <= 16 * 2**20
    assert len([r for r in result.results if "dropped" in r]) == 1 + 1  # the 6 MB one, the one past 16 MB


@needs_bwrap
def test_a_cell_cannot_break_its_session(interpreter):
    """The kernel's socket directory is not writable once it runs, so a cell can neither fill it nor
    plant a directory where the next kernel's connection file goes; a crash still leaves a working session."""
    code = (
        "import glob, os\nrun = os.path.dirname(glob.glob('/tmp/qwenkit-interpreter-*/run/kernel.json')[0])\n"
        "for attempt in (lambda: os.mkdir(run + '/planted'), lambda: open(run + '/fill', 'wb'),\n"
        "                lambda: os.unlink(run + '/kernel.json')):\n"
        "    try:\n        attempt()\n        print('done')\n    except OSError as e:\n        print(e.strerror)"
    )
    assert run(interpreter, code).stdout == "Permission denied\n" * 3
    crashed = run(interpreter, "import os\nos.kill(os.getpid(), 9)")
    assert crashed.notice.startswith("The kernel died")
    assert run(interpreter, "print('recovered')").stdout == "recovered\n"


def test_refuses_to_run_unsandboxed_as_root(monkeypatch):
    import qwenkit.agent.interpreter as module

    monkeypatch.setattr(module, "bwrap_path", lambda: None)
    monkeypatch.setattr(module.os, "geteuid", lambda: 0)
    with pytest.raises(QwenkitError, match="refusing to run model-written code as root without a sandbox"):
        CodeInterpreter()
