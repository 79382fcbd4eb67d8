"""A checkpoint's own Jinja chat template, rendered as transformers' `apply_chat_template` does and
encoded into injection-safe token ids.

The environment is the one transformers builds (utils/chat_template_utils.py): jinja2's
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loop controls, a `tojson` that
does not escape HTML, `raise_exception`, `strftime_now`, a `namespace` that refuses "_" names; the
template sees `messages`, `tools` (JSON schemas as given), `documents`, `add_generation_prompt`, the
tokenizer's bos/eos/pad/unk tokens and any keyword the caller adds. Messages are copied to plain
JSON values first, keys whose value is None are dropped, and a tool call's `function.arguments`
given as a JSON string is parsed to an object (templates `tojson` it; vLLM does the same).

The template is untrusted input (it ships with a downloaded checkpoint): besides the sandbox, a
render stops with QwenkitError past MAX_RENDER_STEPS template lines, past MAX_RENDER_CHARS of output,
and before an operation whose integer argument or result size passes MAX_RENDER_CHARS ("x" * 10**9,
"{:>999999999}", ...), so a hostile template can neither hang a server nor fill its memory.

`encode_chat` keeps caller text plain: added-token text that the template writes becomes its token
id, added-token text inside any caller string (message content, tool schemas, keywords) stays
plain BPE. It renders twice: once as given, once with a private-use marker inside every added-token
occurrence of every caller string; the marked render, markers removed, must equal the plain one
(else the template transforms caller text in a way that cannot be tracked, and encoding refuses).
Intact added tokens in the marked render are control ids, the rest is encoded as plain text.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.sandbox
import jinja2.utils

from qwenkit.errors import QwenkitError

MAX_RENDER_CHARS = 4_000_000  # about a million tokens: past any context window
MAX_RENDER_STEPS = 2_000_000  # template lines executed; a long conversation takes a few thousand

_TEMPLATE_FILENAME = "<template>"  # what jinja names the code of a template compiled from a string
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Private-use characters, never in a vocabulary's added tokens: one marks caller text (module docstring).
_MARKERS = range(0xE000, 0xF900)
_LONG_NUMBER = re.compile(r"\d{" + str(len(str(MAX_RENDER_CHARS))) + ",}")  # a width past the bound


class _RenderLimit(jinja2.exceptions.TemplateError):
    """A render went past one of the bounds above."""


def _check_size(size: int, what: str) -> None:
    if size > MAX_RENDER_CHARS:
        raise _RenderLimit(f"{what} would be {size:,} long (at most {MAX_RENDER_CHARS:,})")


def _check_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Integers passed to filters and methods (widths, counts) stay under the output bound."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDER_CHARS:
            raise _RenderLimit(f"argument {value} is larger than {MAX_RENDER_CHARS:,}")


_SIZED = (str, list, tuple, dict, range)


def _length(value: Any) -> int:
    return len(value) if isinstance(value, _SIZED) else 0


def _bounded_filter(name: str, function):
    """A jinja filter that refuses huge integer arguments and results that would pass the bound."""

    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        _check_arguments(args, kwargs)
        values = [a for a in args if isinstance(a, _SIZED)]
        if name in ("join", "replace", "indent", "wordwrap") and len(values) >= 2:
            # these repeat one string argument up to once per item of another
            _check_size(max(map(_length, values)) * (1 + min(map(_length, values))), f"the {name} result")
        return function(*args, **kwargs)

    return bounded


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' tojson: json.dumps without jinja's HTML escaping
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without the type object's attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing attribute names that start with "_" (as transformers does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


class _Environment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, with bounds on operations that multiply sizes."""

    intercepted_binops = frozenset(["*", "**", "%"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(times, int) and isinstance(seq, (str, list, tuple)):
                    _check_size(len(seq) * max(times, 0), "a repeated value")
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 1024:
                raise _RenderLimit(f"exponent {right} is larger than 1024")
        elif isinstance(left, str):  # printf-style formatting
            _check_arguments(right if isinstance(right, tuple) else (right,), {})
            if _LONG_NUMBER.search(left):
                raise _RenderLimit("a format width is larger than the output bound")
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value):
        receiver = getattr(value, "__self__", None)
        if isinstance(receiver, str) and _LONG_NUMBER.search(receiver):  # "{:>999999999}".format
            raise _RenderLimit("a format width is larger than the output bound")
        return super().wrap_str_format(value)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        _check_arguments(args, kwargs)
        receiver = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(receiver, str) and name in ("join", "replace"):
            sizes = [_length(a) for a in args] or [0]
            _check_size((len(receiver) + 1) * (1 + max(sizes)), f"the {name} result")
        return super().call(__context, __obj, *args, **kwargs)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters["tojson"] = _bounded_filter("tojson", _tojson)
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_Namespace,
    )
    try:
        source = env.parse(template)
        compiled = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise QwenkitError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None
    compiled.qwenkit_reads_tools = "tools" in jinja2.meta.find_undeclared_variables(source)
    return compiled


def supports_tools(template: str | None) -> bool:
    """True when the template reads `tools` (so tool schemas offered to it reach the model)."""
    return bool(template) and _compile(template).qwenkit_reads_tools


def _run(compiled: jinja2.Template, variables: dict[str, Any]) -> str:
    """Render with the step and output bounds (module docstring).

    The step bound is a line tracer on the template's own frames only (jinja compiles the template
    to Python code named _TEMPLATE_FILENAME); other frames are not traced.
    """
    steps = 0

    def trace_lines(frame, event, arg):
        nonlocal steps
        steps += 1
        if steps > MAX_RENDER_STEPS:
            raise _RenderLimit(f"rendering took more than {MAX_RENDER_STEPS:,} template steps")
        return trace_lines

    def trace_calls(frame, event, arg):
        return trace_lines if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        pieces, size = [], 0
        for piece in compiled.generate(**variables):
            size += len(piece)
            _check_size(size, "the rendered prompt")
            pieces.append(piece)
        return "".join(pieces)
    except _RenderLimit as e:
        raise QwenkitError(f"chat template: stopped, {e}") from None
    except jinja2.exceptions.SecurityError as e:
        raise QwenkitError(f"chat template: refused by the sandbox: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise QwenkitError(f"chat template: {e}") from None
    except RecursionError:
        raise QwenkitError("chat template: recursion too deep") from None
    except (
        TypeError,
        ValueError,
        KeyError,
        IndexError,
        AttributeError,
        ZeroDivisionError,
        OverflowError,
    ) as e:
        raise QwenkitError(f"chat template: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)


def _plain(value: Any, where: str) -> Any:
    """A fresh copy made of JSON values only, so the template can reach no caller object."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) carry methods: strip them
        if isinstance(value, kind):
            return kind(value) if kind is not str else str.__str__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if callable(getattr(value, "model_dump", None)):  # pydantic models (the openai client's messages)
        return _plain(value.model_dump(), where)
    raise QwenkitError(f"{where}: {type(value).__name__} is not a JSON value")


def _normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Plain copies of the messages, as the template sees them (module docstring)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise QwenkitError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, message in enumerate(messages):
        message = _plain(message, f"messages[{i}]")
        if not isinstance(message, dict):
            raise QwenkitError(f"messages[{i}] must be an object with 'role' and 'content'")
        message = {k: v for k, v in message.items() if v is not None}
        for j, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                try:
                    function["arguments"] = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError:
                    raise QwenkitError(
                        f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {arguments[:60]!r}"
                    ) from None
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:  # transformers passes reasoning under the names templates read
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _template_of(tokenizer, template: str | None) -> str:
    template = template if template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        raise QwenkitError("this tokenizer has no chat template (tokenizer_config.json 'chat_template')")
    if not isinstance(template, str):
        raise QwenkitError("a chat template must be a string")
    return template


def _variables(tokenizer, messages, tools, add_generation_prompt, kwargs) -> tuple[dict, dict]:
    """(the template's variables, the part of them the caller gave)."""
    if tools is not None and (
        not isinstance(tools, Sequence) or not all(isinstance(t, Mapping) for t in tools)
    ):
        raise QwenkitError('tools must be a list of JSON schemas {"type": "function", "function": {...}}')
    variables = {
        name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    variables = {k: v for k, v in variables.items() if v is not None}
    caller = _plain(kwargs, "keyword")  # keywords override the special tokens, as in transformers
    caller.update(
        messages=_normalize_messages(messages),
        tools=_plain(tools, "tools"),
        documents=caller.get("documents"),
    )
    return {**variables, **caller, "add_generation_prompt": bool(add_generation_prompt)}, caller


def render_chat(
    tokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    template: str | None = None,
    **kwargs,
) -> str:
    """The prompt text transformers' `apply_chat_template(..., tokenize=False)` gives for the same
    arguments, from `template` or the tokenizer's own `chat_template` (sandboxed and bounded)."""
    compiled = _compile(_template_of(tokenizer, template))
    return _run(compiled, _variables(tokenizer, messages, tools, add_generation_prompt, kwargs)[0])


def _added_tokens(tokenizer) -> dict[str, int]:
    """Every added token (special or not) by its text: the pieces transformers matches before BPE."""
    tokens = getattr(tokenizer, "special_tokens", None) or {}
    return {name: token_id for name, token_id in tokens.items() if name}


def _caller_strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _caller_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _caller_strings(v)


def _mark(value: Any, pattern: re.Pattern, edges: tuple[re.Pattern, re.Pattern], marker: str) -> Any:
    """`value` with `marker` after the first character of every added-token occurrence in its
    strings, and at a string's edge where it could complete an added token with template text."""
    if isinstance(value, str):
        value = pattern.sub(lambda m: m.group(0)[0] + marker + m.group(0)[1:], value)
        if edges[0].match(value):
            value = marker + value
        if edges[1].search(value):
            value = value + marker
        return value
    if isinstance(value, dict):
        return {_mark(k, pattern, edges, marker): _mark(v, pattern, edges, marker) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v, pattern, edges, marker) for v in value]
    return value


def encode_chat(
    tokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    template: str | None = None,
    **kwargs,
) -> list[int]:
    """Token ids of `render_chat`: equal to transformers' `apply_chat_template(..., tokenize=True)`
    when no caller string holds added-token text; added-token text from the caller stays plain
    BPE, only the template's own becomes control ids (module docstring)."""
    compiled = _compile(_template_of(tokenizer, template))
    variables, caller = _variables(tokenizer, messages, tools, add_generation_prompt, kwargs)
    plain = _run(compiled, variables)
    added = _added_tokens(tokenizer)
    if not added:
        return tokenizer.encode(plain)
    names = sorted(added, key=len, reverse=True)  # leftmost-longest, as transformers' added-token trie
    pattern = re.compile("|".join(map(re.escape, names)))
    used = set(plain).union(*map(set, _caller_strings(caller)))
    marker = next((chr(c) for c in _MARKERS if chr(c) not in used), None)
    if marker is None:
        raise QwenkitError("the conversation uses every private-use character; cannot mark caller text")
    prefixes = {name[:i] for name in names for i in range(1, len(name))}
    suffixes = {name[i:] for name in names for i in range(1, len(name))}
    starts = re.compile("|".join(map(re.escape, sorted(suffixes, key=len, reverse=True))))
    ends = re.compile("(?:" + "|".join(map(re.escape, sorted(prefixes, key=len, reverse=True))) + r")\Z")
    marked_variables = {**variables, **_mark(caller, pattern, (starts, ends), marker)}
    marked = _run(compiled, marked_variables)
    if marked.replace(marker, "") != plain:
        raise QwenkitError(
            "chat template: it transforms message text in a way that cannot be tracked, so added-token "
            "text inside messages cannot be kept plain; remove that text from the messages"
        )
    ids: list[int] = []
    position = 0
    for match in pattern.finditer(marked):
        ids += tokenizer.encode(marked[position : match.start()].replace(marker, ""))
        ids.append(added[match.group(0)])
        position = match.end()
    ids += tokenizer.encode(marked[position:].replace(marker, ""))
    return ids
