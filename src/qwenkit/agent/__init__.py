"""Tool use: the official ReAct prompt and parser (react), the Hermes tool-call reader of chat-template
checkpoints (hermes), the agent loop and tool registry (loop), and the sandboxed code interpreter
(interpreter).

    from qwenkit.agent import ToolRegistry, local_complete, run_agent
    with ToolRegistry.from_names(["calculator", "python"]) as tools:
        for event in run_agent("What is 2**20?", local_complete(model, tokenizer), tools):
            ...

Names are imported on first use, so importing the ReAct parser alone does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "react_instruction": "qwenkit.agent.react",
    "parse_reply": "qwenkit.agent.react",
    "Tool": "qwenkit.agent.react",
    "ToolCall": "qwenkit.agent.react",
    "FinalAnswer": "qwenkit.agent.react",
    "tool": "qwenkit.agent.react",
    "calculator": "qwenkit.agent.react",
    "run_agent": "qwenkit.agent.loop",
    "local_complete": "qwenkit.agent.loop",
    "chatml_complete": "qwenkit.agent.loop",
    "template_complete": "qwenkit.agent.loop",
    "parse_tool_calls": "qwenkit.agent.hermes",
    "HermesOutput": "qwenkit.agent.hermes",
    "resolve_tool_format": "qwenkit.agent.hermes",
    "react_messages": "qwenkit.agent.loop",
    "split_messages": "qwenkit.agent.loop",
    "tool_from_spec": "qwenkit.agent.loop",
    "event_dict": "qwenkit.agent.loop",
    "ToolRegistry": "qwenkit.agent.loop",
    "TextDelta": "qwenkit.agent.loop",
    "ToolCalled": "qwenkit.agent.loop",
    "ToolResult": "qwenkit.agent.loop",
    "Final": "qwenkit.agent.loop",
    "CodeInterpreter": "qwenkit.agent.interpreter",
    "Execution": "qwenkit.agent.interpreter",
    "PythonTool": "qwenkit.agent.interpreter",
    "ToolOutput": "qwenkit.agent.interpreter",
    "extract_code": "qwenkit.agent.interpreter",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwenkit.agent' has no attribute {name!r}")
