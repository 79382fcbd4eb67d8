"""The arena's SQLite database: prompts, models, their answers (generated once), the comparison each
rater is shown (an assignment: a prompt and two models in the order shown) and the ratings.

SQLite in WAL mode, so the page's requests read while another one writes, and several raters and
servers can share one file; every statement is parameterized. A write that picks a rater's next
comparison runs under BEGIN IMMEDIATE, so two raters never race for the same pending row. Nothing
is ever deleted: stopping and starting again (even with more prompts or models) resumes where it was.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError

VERDICTS = ("left", "right", "tie", "both_bad")
MAX_RATER = 64  # characters of a rater's name
MAX_REASON = 2000  # characters of a rating's optional reason
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,            -- sha256 of the messages: the same prompt is stored once
    messages TEXT NOT NULL,              -- JSON, OpenAI-style, ending with the user's instruction
    category TEXT
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    settings TEXT NOT NULL               -- JSON: how its answers were generated
);
CREATE TABLE IF NOT EXISTS answers (
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    model TEXT NOT NULL REFERENCES models(name),
    text TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (prompt_id, model)
);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY,
    rater TEXT NOT NULL,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    left_model TEXT NOT NULL,
    right_model TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY,
    assignment_id INTEGER NOT NULL UNIQUE REFERENCES assignments(id),
    rater TEXT NOT NULL,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    left_model TEXT NOT NULL,
    right_model TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('left', 'right', 'tie', 'both_bad')),
    reason TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS assignments_by_rater ON assignments(rater);
"""


@dataclass(frozen=True)
class Prompt:
    """An instruction to answer: its messages (the last one the user's) and an optional category."""

    messages: list[dict[str, str]]
    category: str | None = None
    id: int | None = None  # set once stored

    @property
    def instruction(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Assignment:
    """One comparison shown to a rater: a prompt and two models, in the order they appear."""

    id: int
    rater: str
    prompt: Prompt
    left_model: str
    right_model: str
    left: str  # the answers' text
    right: str


@dataclass(frozen=True)
class Rating:
    """A rater's verdict on one comparison, as shown (left/right) and when."""

    id: int
    rater: str
    prompt: Prompt
    left_model: str
    right_model: str
    verdict: str
    reason: str
    created: str

    @property
    def winner(self) -> str | None:
        return {"left": self.left_model, "right": self.right_model}.get(self.verdict)

    @property
    def loser(self) -> str | None:
        return {"left": self.right_model, "right": self.left_model}.get(self.verdict)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def prompt_key(messages: Sequence[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(list(messages), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_rater(name: Any) -> str:
    """The rater's name, trimmed: 1 to MAX_RATER printable characters, else QwenkitError."""
    if not isinstance(name, str) or not name.strip():
        raise QwenkitError("the rater's name is empty; type your name first")
    name = name.strip()
    if len(name) > MAX_RATER:
        raise QwenkitError(f"the rater's name is longer than {MAX_RATER} characters")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise QwenkitError("the rater's name holds control characters")
    return name


def check_reason(reason: Any) -> str:
    if not isinstance(reason, str):
        raise QwenkitError("the reason must be text")
    if len(reason) > MAX_REASON:
        raise QwenkitError(f"the reason is longer than {MAX_REASON} characters")
    return reason.strip()


class ArenaStore:
    """The database at `path` (created with its tables if missing; its folder must exist)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise QwenkitError(f"the database {self.path} is a directory; give a file name")
        if not self.path.parent.is_dir():
            raise QwenkitError(f"the database's folder {self.path.parent} does not exist")
        try:
            with self.connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
                if version not in (0, SCHEMA_VERSION) or (version == 0 and tables):
                    raise QwenkitError(f"{self.path} is not an arena database (or one of another version)")
                db.executescript(SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise QwenkitError(f"cannot open the arena database {self.path}: {e}") from None

    @contextmanager
    def connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection for one operation; `write` holds the write lock from its start (BEGIN IMMEDIATE)
        and commits at the end, or rolls back on error."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            if write:
                db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if write:
                    db.execute("ROLLBACK")
                raise
            if write:
                db.execute("COMMIT")
        finally:
            db.close()

    # --- prompts, models, answers ----------------------------------------------------------------------

    def add_prompts(self, prompts: Sequence[Prompt]) -> list[Prompt]:
        """Store the prompts not stored yet (the same messages are one prompt); all of them, with ids."""
        out = []
        with self.connect(write=True) as db:
            for p in prompts:
                key = prompt_key(p.messages)
                db.execute(
                    "INSERT OR IGNORE INTO prompts (key, messages, category) VALUES (?, ?, ?)",
                    (key, json.dumps(p.messages, ensure_ascii=False), p.category),
                )
                (pid,) = db.execute("SELECT id FROM prompts WHERE key = ?", (key,)).fetchone()
                out.append(Prompt(p.messages, p.category, pid))
        return out

    def prompts(self) -> list[Prompt]:
        with self.connect() as db:
            rows = db.execute("SELECT id, messages, category FROM prompts ORDER BY id").fetchall()
        return [Prompt(json.loads(m), c, i) for i, m, c in rows]

    def register_model(self, name: str, path: str, settings: dict[str, Any]) -> None:
        """Record a model under `name`; a name already stored for another checkpoint is an error (its
        answers would be mixed with the other model's)."""
        with self.connect(write=True) as db:
            row = db.execute("SELECT path FROM models WHERE name = ?", (name,)).fetchone()
            if row is None:
                db.execute("INSERT INTO models VALUES (?, ?, ?)", (name, path, json.dumps(settings)))
            elif row[0] != path:
                raise QwenkitError(
                    f"model {name!r} is {row[0]} in {self.path}, not {path}; give this checkpoint another name"
                )

    def models(self) -> dict[str, dict[str, Any]]:
        """name -> {"path", "settings"} of every stored model."""
        with self.connect() as db:
            rows = db.execute("SELECT name, path, settings FROM models ORDER BY name").fetchall()
        return {n: {"path": p, "settings": json.loads(s)} for n, p, s in rows}

    def missing_answers(self, model: str) -> list[Prompt]:
        """The stored prompts `model` has not answered yet."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT id, messages, category FROM prompts WHERE id NOT IN "
                "(SELECT prompt_id FROM answers WHERE model = ?) ORDER BY id",
                (model,),
            ).fetchall()
        return [Prompt(json.loads(m), c, i) for i, m, c in rows]

    def add_answers(self, model: str, answers: Sequence[tuple[int, str, str]]) -> None:
        """Store (prompt id, text, finish reason) answers of `model`; an answer is never replaced."""
        with self.connect(write=True) as db:
            db.executemany(
                "INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?)",
                [(pid, model, text, finish, now()) for pid, text, finish in answers],
            )

    def answers(self, prompt_id: int) -> dict[str, str]:
        with self.connect() as db:
            rows = db.execute("SELECT model, text FROM answers WHERE prompt_id = ?", (prompt_id,)).fetchall()
        return dict(rows)

    # --- raters --------------------------------------------------------------------------------------

    def comparisons(self, models: Sequence[str]) -> list[tuple[int, tuple[str, str]]]:
        """Every (prompt id, model pair) that can be shown: both models answered the prompt."""
        with self.connect() as db:
            rows = db.execute("SELECT prompt_id, model FROM answers").fetchall()
        answered: dict[int, set[str]] = {}
        for pid, model in rows:
            answered.setdefault(pid, set()).add(model)
        pairs = list(combinations(sorted(set(models)), 2))
        return [(pid, pair) for pid in sorted(answered) for pair in pairs if set(pair) <= answered[pid]]

    def progress(self, rater: str, models: Sequence[str]) -> tuple[int, int]:
        """(comparisons `rater` has rated, comparisons there are) among `models`."""
        total = self.comparisons(models)
        with self.connect() as db:
            rated = {(pid, tuple(sorted(p))) for pid, *p in db.execute(
                "SELECT prompt_id, left_model, right_model FROM ratings WHERE rater = ?", (rater,))}  # fmt: skip
        return sum(item in rated for item in total), len(total)

    def next_assignment(self, rater: str, models: Sequence[str], rng: random.Random) -> Assignment | None:
        """The comparison `rater` should rate now: the one shown before and not rated yet (a reload
        shows the same), else one this rater has not rated, among those with the fewest ratings and
        pending assignments (raters spread over the prompts), the two answers in random order. None
        when the rater has rated every comparison."""
        rater = check_rater(rater)
        active = set(models)
        candidates = self.comparisons(models)
        with self.connect(write=True) as db:
            pending = db.execute(
                "SELECT a.id, a.left_model, a.right_model FROM assignments a LEFT JOIN ratings r "
                "ON r.assignment_id = a.id WHERE a.rater = ? AND r.id IS NULL ORDER BY a.id DESC",
                (rater,),
            ).fetchall()
            for aid, left, right in pending:
                if {left, right} <= active:
                    return self._assignment(db, aid)
            mine, load = set(), Counter()
            for pid, left, right, who in db.execute(
                "SELECT prompt_id, left_model, right_model, rater FROM ratings "
                "UNION ALL SELECT a.prompt_id, a.left_model, a.right_model, a.rater FROM assignments a "
                "LEFT JOIN ratings r ON r.assignment_id = a.id WHERE r.id IS NULL"
            ):
                item = (pid, tuple(sorted((left, right))))
                load[item] += 1
                if who == rater:
                    mine.add(item)
            open_items = [item for item in candidates if item not in mine]
            if not open_items:
                return None
            fewest = min(load[item] for item in open_items)
            pid, pair = rng.choice([item for item in open_items if load[item] == fewest])
            left, right = rng.sample(pair, 2)
            cursor = db.execute(
                "INSERT INTO assignments (rater, prompt_id, left_model, right_model, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (rater, pid, left, right, now()),
            )
            return self._assignment(db, cursor.lastrowid)

    def _assignment(self, db: sqlite3.Connection, aid: int) -> Assignment:
        rater, pid, left, right, messages, category = db.execute(
            "SELECT a.rater, a.prompt_id, a.left_model, a.right_model, p.messages, p.category "
            "FROM assignments a JOIN prompts p ON p.id = a.prompt_id WHERE a.id = ?",
            (aid,),
        ).fetchone()
        texts = dict(db.execute("SELECT model, text FROM answers WHERE prompt_id = ?", (pid,)).fetchall())
        prompt = Prompt(json.loads(messages), category, pid)
        return Assignment(aid, rater, prompt, left, right, texts[left], texts[right])

    def rate(self, rater: str, assignment_id: int, verdict: str, reason: str = "") -> Rating:
        """Record `rater`'s verdict on an assignment shown to them. QwenkitError for an unknown verdict,
        an assignment that is not theirs, or one already rated (LookupError / ValueError subclasses
        tell the page 404 from 409: see app.py)."""
        rater, reason = check_rater(rater), check_reason(reason)
        if verdict not in VERDICTS:
            raise QwenkitError(f"unknown verdict {verdict!r}; use one of {', '.join(VERDICTS)}")
        with self.connect(write=True) as db:
            row = db.execute(
                "SELECT prompt_id, left_model, right_model FROM assignments WHERE id = ? AND rater = ?",
                (assignment_id, rater),
            ).fetchone()
            if row is None:
                raise UnknownAssignment(f"no comparison {assignment_id} was shown to {rater!r}")
            if db.execute("SELECT 1 FROM ratings WHERE assignment_id = ?", (assignment_id,)).fetchone():
                raise AlreadyRated(f"comparison {assignment_id} is already rated")
            created = now()
            cursor = db.execute(
                "INSERT INTO ratings (assignment_id, rater, prompt_id, left_model, right_model, verdict, "
                "reason, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (assignment_id, rater, *row, verdict, reason, created),
            )
            messages, category = db.execute(
                "SELECT messages, category FROM prompts WHERE id = ?", (row[0],)
            ).fetchone()
        prompt = Prompt(json.loads(messages), category, row[0])
        return Rating(cursor.lastrowid, rater, prompt, row[1], row[2], verdict, reason, created)

    def ratings(self) -> list[Rating]:
        """Every rating, oldest first."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT r.id, r.rater, r.prompt_id, p.messages, p.category, r.left_model, r.right_model, "
                "r.verdict, r.reason, r.created FROM ratings r JOIN prompts p ON p.id = r.prompt_id "
                "ORDER BY r.id"
            ).fetchall()
        return [
            Rating(rid, rater, Prompt(json.loads(m), c, pid), left, right, verdict, reason, created)
            for rid, rater, pid, m, c, left, right, verdict, reason, created in rows
        ]


class UnknownAssignment(QwenkitError, LookupError):
    """The comparison was never shown to this rater."""


class AlreadyRated(QwenkitError, ValueError):
    """The comparison has a rating already."""
