"""Evaluation: the report's benchmarks, scored as the official Qwen scripts score them (`qwenkit eval`).

- `base`: EvalSettings, Prediction, TaskResult, the `@task` registry (TASKS) and the backends' interface,
  with LocalBackend (a model in this process);
- `remote`: ApiBackend (a running `qwenkit serve`);
- `report`: write_outputs (results.json, predictions.jsonl, report.md and its chart);
- one module per task family, each registering its tasks when imported here: `choice` (mmlu, ceval,
  cmmlu), `gsm8k`, `code` (humaneval, mbpp), `tools` (tool-use, code-interpreter), `long_ppl`
  (long-ppl), `demo` (the demo model's own measures), `demo_generalization` (demo-generalization: the
  demo model on hand-written and independently generated prompts).
"""

from qwenkit.eval import choice, code, demo, demo_generalization, gsm8k, long_ppl, tools  # noqa: F401  (each registers its tasks)
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

__all__ = ["TASKS", "Backend", "EvalSettings", "LocalBackend", "Prediction", "TaskResult", "get_task", "task"]
