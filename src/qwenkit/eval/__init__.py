"""Evaluation: the report's benchmarks, scored as the official Qwen scripts score them (`qwenkit eval`).

- `base`: EvalSettings, Prediction, TaskResult, the `@task` registry (TASKS) and the backends' interface,
  with LocalBackend (a model in this process);
- `remote`: ApiBackend (a running `qwenkit serve`);
- `report`: write_outputs (results.json, predictions.jsonl, report.md and its chart);
- one module per task family, each registering its tasks when imported here: `choice` (mmlu, ceval,
  cmmlu), `gsm8k`, `code` (humaneval, mbpp), `tools` (tool-use, code-interpreter), `long_ppl`
  (long-ppl), `demo` (the demo model's own measures).
"""

import importlib

from qwenkit.eval.base import (
    TASKS,
    Backend,
    EvalSettings,
    LocalBackend,
    Prediction,
    TaskResult,
    get_task,
    task,
)

TASK_MODULES = ("choice", "gsm8k", "code", "tools", "long_ppl", "demo")
for _module in TASK_MODULES:  # registers every task (modules still being written are skipped)
    try:
        importlib.import_module(f"qwenkit.eval.{_module}")
    except ModuleNotFoundError as _error:
        if _error.name != f"qwenkit.eval.{_module}":
            raise

__all__ = ["TASKS", "Backend", "EvalSettings", "LocalBackend", "Prediction", "TaskResult", "get_task", "task"]
