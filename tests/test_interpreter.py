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
    assert (interpreter.work_dir / "notes.txt").read_text() == "kept"
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
    result = run(interpreter, "os.waitpid(pid, 0)\nimport subprocess\nsubprocess.Popen(['sleep', '600'])")
    assert result.notice.startswith("The code left 1 process(es) running")
    assert (
        "sleep 600"
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
    root, cgroup = plain.root, plain.cgroup
    plain.close()
    assert not root.exists() and (cgroup is None or not cgroup.exists())
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
