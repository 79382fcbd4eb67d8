"""The arena's SQLite store: prompts stored once, answers never replaced, each rater's comparisons
handed out once (the pending one again after a reload), both orders shown, raters spread over the
items, ratings checked, and everything still there when the database is opened again."""

import random
import sqlite3
import threading

import pytest

from qwenkit.arena.store import AlreadyRated, ArenaStore, Prompt, UnknownAssignment
from qwenkit.errors import QwenkitError

MODELS = ["alpha", "beta", "gamma"]


def filled_store(path, prompts=3) -> ArenaStore:
    store = ArenaStore(path)
    stored = store.add_prompts(
        [Prompt([{"role": "user", "content": f"question {i}"}], "c") for i in range(prompts)]
    )
    for name in MODELS:
        store.register_model(name, f"/ckpt/{name}", {"temperature": 0})
        store.add_answers(name, [(p.id, f"{name} answers {p.id}", "stop") for p in stored])
    return store


def test_prompts_models_and_answers_are_stored_once(tmp_path):
    store = filled_store(tmp_path / "a.db")
    again = store.add_prompts([Prompt([{"role": "user", "content": "question 1"}], "c"),
                               Prompt([{"role": "user", "content": "new"}])])  # fmt: skip
    assert again[0].id == 2 and again[1].id == 4 and len(store.prompts()) == 4
    assert [p.instruction for p in store.missing_answers("alpha")] == ["new"]
    store.add_answers("alpha", [(1, "a different answer", "stop")])  # never replaces the stored one
    assert store.answers(1)["alpha"] == "alpha answers 1"
    store.register_model("alpha", "/ckpt/alpha", {})  # the same checkpoint again: fine
    with pytest.raises(QwenkitError, match="'alpha' is /ckpt/alpha"):
        store.register_model("alpha", "/elsewhere", {})
    assert store.models()["beta"] == {"path": "/ckpt/beta", "settings": {"temperature": 0}}
    assert sqlite3.connect(tmp_path / "a.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_each_comparison_is_shown_once_per_rater_in_both_orders(tmp_path):
    store = filled_store(tmp_path / "a.db")
    rng = random.Random(0)
    seen, orders = set(), set()
    while (shown := store.next_assignment("ann", MODELS, rng)) is not None:
        assert store.next_assignment("ann", MODELS, rng) == shown  # until rated, the same one (a reload)
        item = (shown.prompt.id, frozenset((shown.left_model, shown.right_model)))
        assert item not in seen
        seen.add(item)
        orders.add((shown.left_model, shown.right_model))
        assert shown.left == f"{shown.left_model} answers {shown.prompt.id}"
        assert shown.right == f"{shown.right_model} answers {shown.prompt.id}"
        store.rate("ann", shown.id, "left")
    assert len(seen) == 3 * 3  # 3 prompts x 3 pairs
    assert len(orders) == 6, "the position shown should be random"
    assert store.progress("ann", MODELS) == (9, 9)
    assert store.progress("bob", MODELS) == (0, 9)
    # a comparison only among the models asked for
    assert store.next_assignment("bob", ["alpha", "beta"], rng).right_model in ("alpha", "beta")


def test_raters_are_spread_over_the_comparisons(tmp_path):
    store = filled_store(tmp_path / "a.db", prompts=2)
    rng = random.Random(1)
    first = [store.next_assignment(name, MODELS, rng) for name in ("r1", "r2", "r3", "r4", "r5", "r6")]
    items = [(a.prompt.id, frozenset((a.left_model, a.right_model))) for a in first]
    assert len(set(items)) == 6, "six raters at once should get six different comparisons"


def test_ratings_are_checked_and_survive_reopening(tmp_path):
    path = tmp_path / "a.db"
    store = filled_store(path)
    rng = random.Random(2)
    shown = store.next_assignment("  ann ", MODELS, rng)
    assert shown.rater == "ann"
    with pytest.raises(UnknownAssignment):
        store.rate("bob", shown.id, "left")  # not shown to bob
    with pytest.raises(UnknownAssignment):
        store.rate("ann", 999, "left")
    with pytest.raises(QwenkitError, match="unknown verdict"):
        store.rate("ann", shown.id, "better")
    with pytest.raises(QwenkitError, match="longer than 2000"):
        store.rate("ann", shown.id, "tie", "x" * 2001)
    for bad in ("", "   ", "a\x00b", "n" * 65, None):
        with pytest.raises(QwenkitError):
            store.next_assignment(bad, MODELS, rng)
    rating = store.rate("ann", shown.id, "right", "  B is correct; A'); DROP TABLE ratings;-- ")
    assert rating.winner == shown.right_model and rating.loser == shown.left_model
    with pytest.raises(AlreadyRated):
        store.rate("ann", shown.id, "left")
    second = store.next_assignment("ann", MODELS, rng)
    store.rate("ann", second.id, "both_bad")

    reopened = ArenaStore(path)  # a restart: a new process opens the same file
    ratings = reopened.ratings()
    assert [(r.rater, r.verdict, r.left_model, r.right_model) for r in ratings] == [
        ("ann", "right", shown.left_model, shown.right_model),
        ("ann", "both_bad", second.left_model, second.right_model),
    ]
    assert ratings[0].reason == "B is correct; A'); DROP TABLE ratings;--"
    assert ratings[0].prompt == shown.prompt and ratings[1].winner is None
    assert ratings[0].created.endswith("+00:00")
    assert reopened.progress("ann", MODELS) == (2, 9)
    third = reopened.next_assignment("ann", MODELS, rng)
    assert third.id not in (shown.id, second.id)


def test_two_raters_rating_at_once_from_threads(tmp_path):
    store = filled_store(tmp_path / "a.db", prompts=4)
    errors = []

    def rate_all(name: str, seed: int) -> None:
        try:
            rng = random.Random(seed)
            while (shown := store.next_assignment(name, MODELS, rng)) is not None:
                store.rate(name, shown.id, "tie")
        except Exception as e:  # reported below: the test fails on any
            errors.append(e)

    threads = [threading.Thread(target=rate_all, args=(name, i)) for i, name in enumerate(("ann", "bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.progress("ann", MODELS) == store.progress("bob", MODELS) == (12, 12)
    assert len(store.ratings()) == 24


def test_bad_database_paths(tmp_path):
    with pytest.raises(QwenkitError, match="does not exist"):
        ArenaStore(tmp_path / "missing" / "a.db")
    with pytest.raises(QwenkitError, match="is a directory"):
        ArenaStore(tmp_path)
    (tmp_path / "text.db").write_text("not a database at all, just some text " * 50)
    with pytest.raises(QwenkitError, match="cannot open"):
        ArenaStore(tmp_path / "text.db")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    with pytest.raises(QwenkitError, match="not an arena database"):
        ArenaStore(tmp_path / "other.db")
