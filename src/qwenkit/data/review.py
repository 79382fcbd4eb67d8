"""Manual review of a `qwenkit data process` output (report §2.1: "manual review of samples"):
random kept documents (OUT/output/) and random removed ones per stage (OUT/removed/<stage>/), each
with its scores and removal reason, printed for the terminal and written as one HTML page.

Samples are drawn by reservoir sampling while the files stream by, so any output size works, and
the same seed draws the same documents. Both JSONL layouts datatrove writes are read: metadata in a
`metadata` object, or expanded into the record.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from qwenkit.errors import QwenkitError

KEPT = "kept"
OUTPUT_DIR, REMOVED_DIR = "output", "removed"
REVIEW_FILE = "review.html"
REASON_KEY = "filter_reason"  # where datatrove's exclusion writers put a filter's reason
TERMINAL_CHARS = 300


@dataclass
class Sample:
    """One document drawn for review."""

    id: str
    text: str
    reason: str | None
    metadata: dict
    file: str


@dataclass
class Group:
    """The documents drawn from kept output or from one removal stage, out of `total`."""

    name: str
    total: int = 0
    unreadable_lines: int = 0
    samples: list[Sample] = field(default_factory=list)


def jsonl_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))


def _records(path: Path, group: Group) -> Iterator[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    group.unreadable_lines += 1
                    continue
                if isinstance(record, dict) and isinstance(record.get("text"), str):
                    yield record
                else:
                    group.unreadable_lines += 1
    except (OSError, EOFError) as e:  # not gzip, truncated
        raise QwenkitError(f"cannot read {path}: {e}") from None


def _sample(record: dict, path: Path, root: Path) -> Sample:
    metadata = record.get("metadata")
    if not isinstance(metadata, dict):  # written with expand_metadata: the keys sit beside text and id
        metadata = {k: v for k, v in record.items() if k not in ("text", "id", "media")}
    metadata = dict(metadata)
    reason = metadata.pop(REASON_KEY, None)
    return Sample(str(record.get("id", "")), record["text"], reason, metadata, str(path.relative_to(root)))


def draw_group(name: str, directory: Path, root: Path, n: int, rng: random.Random) -> Group:
    """n documents drawn uniformly from the JSONL files under `directory` (reservoir sampling)."""
    group = Group(name)
    for path in jsonl_files(directory):
        for record in _records(path, group):
            group.total += 1
            if len(group.samples) < n:
                group.samples.append(_sample(record, path, root))
            else:
                k = rng.randrange(group.total)
                if k < n:
                    group.samples[k] = _sample(record, path, root)
    return group


def removal_stages(out: Path) -> list[str]:
    removed = out / REMOVED_DIR
    return sorted(p.name for p in removed.iterdir() if p.is_dir()) if removed.is_dir() else []


def collect_review(out: str | Path, stage: str | None = None, n: int = 20, seed: int = 0) -> list[Group]:
    """Kept documents and each removal stage's (or only `stage`: a stage name, or "kept"), n each."""
    out = Path(out)
    if n < 1:
        raise QwenkitError(f"--n must be >= 1, got {n}")
    stages = removal_stages(out)
    if not (out / OUTPUT_DIR).is_dir() and not stages:
        raise QwenkitError(
            f"{out} is not a `qwenkit data process` output: it has no {OUTPUT_DIR}/ or {REMOVED_DIR}/<stage>/"
        )
    names = [KEPT, *stages]
    if stage is not None and stage not in names:
        raise QwenkitError(f"no stage {stage!r} in {out}; choose from {', '.join(names)}")
    rng = random.Random(seed)
    groups = []
    for name in names if stage is None else [stage]:
        directory = out / OUTPUT_DIR if name == KEPT else out / REMOVED_DIR / name
        groups.append(draw_group(name, directory, out, n, rng) if directory.is_dir() else Group(name))
    return groups


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls but \t and \n: ESC moves terminals


def _printable(text: str) -> str:
    """`text` safe to print: control characters (a document's ANSI escapes) shown as U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


def format_review(groups: list[Group], chars: int = TERMINAL_CHARS) -> str:
    """The samples as terminal text: a header per group, then id, reason, scores and the text's start
    (control characters of the documents replaced, so their escape sequences stay text)."""
    lines = []
    for group in groups:
        drawn = f"{len(group.samples)} of {group.total:,}"
        bad = f", {group.unreadable_lines:,} unreadable lines skipped" if group.unreadable_lines else ""
        lines.append(f"=== {group.name}: {drawn} documents{bad}")
        for s in group.samples:
            scores = "  ".join(f"{k}={_value(v)}" for k, v in s.metadata.items())
            reason = f"  reason={s.reason}" if s.reason else ""
            lines.append(_printable(f"--- id={s.id}{reason}  {scores}").replace("\n", " ⏎ "))
            text = _printable(s.text).replace("\n", " ⏎ ")
            lines.append(text[:chars] + (" …" if len(text) > chars else ""))
        lines.append("")
    return "\n".join(lines)


_PAGE = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html>
<html><head><meta charset="utf-8"><title>Data review: {{ out }}</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
.doc { border: 1px solid #ccc; border-radius: 4px; margin: 0.8em 0; padding: 0.5em 0.8em; }
.reason { color: #a00; font-weight: bold; }
table { border-collapse: collapse; font-size: 0.9em; } td { padding: 0 0.8em 0 0; vertical-align: top; }
pre { white-space: pre-wrap; word-break: break-word; background: #f7f7f7; padding: 0.5em; }
</style></head><body>
<h1>Data review: {{ out }}</h1>
<p>Random samples (seed {{ seed }}) of the kept documents and of those each stage removed.</p>
<ul>{% for g in groups %}<li><a href="#{{ g.name }}">{{ g.name }}</a>: {{ g.samples|length }} of {{ g.total }}</li>{% endfor %}</ul>
{% for g in groups %}
<h2 id="{{ g.name }}">{{ g.name }} ({{ g.samples|length }} of {{ g.total }} documents)</h2>
{% if g.unreadable_lines %}<p>{{ g.unreadable_lines }} unreadable lines skipped.</p>{% endif %}
{% for s in g.samples %}
<div class="doc">
<div>id <code>{{ s.id }}</code> · {{ s.file }}{% if s.reason %} · <span class="reason">{{ s.reason }}</span>{% endif %}</div>
<table>{% for k, v in s.metadata.items() %}<tr><td>{{ k }}</td><td>{{ value(v) }}</td></tr>{% endfor %}</table>
<pre>{{ s.text }}</pre>
</div>
{% endfor %}
{% endfor %}
</body></html>
"""
)


def write_review_html(groups: list[Group], path: str | Path, out: str | Path = "", seed: int = 0) -> Path:
    """The samples as one HTML page; every text and value is escaped (jinja2 autoescape)."""
    path = Path(path)
    path.write_text(_PAGE.render(groups=groups, out=str(out), seed=seed, value=_value), encoding="utf-8")
    return path
