"""Evaluation: the report's benchmarks, scored as the official Qwen scripts score them (`qwenkit eval`)."""

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
