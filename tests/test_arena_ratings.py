"""The arena's report on a fixed rating set: win/tie/loss counts and win rates counted by hand,
Bradley-Terry ratings against an independent fit (scikit-learn's unpenalized logistic regression on
the same comparisons), bootstrap intervals, categories, the chart; and the export to TRL preference
pairs read back by the reward model's reader."""

import json
import math
import random

import numpy as np
import pytest

import qwenkit
from qwenkit.arena.ratings import (
    bradley_terry,
    build_report,
    export_pairs,
    outcomes,
    pair_results,
    write_report,
)
from qwenkit.arena.store import ArenaStore, Prompt
from qwenkit.chatml import render_messages
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import Tokenizer

MODELS = ["alpha", "beta", "gamma"]
RATERS = ["r1", "r2", "r3"]
# The fixed rating set: per pair (a, b), the verdict of rater r on prompt p at index (p - 1) * 3 + r:
# W a better, L b better, T tie, B both bad. Prompts 1-2 are "math", 3-4 "chat".
PLAN = {
    ("alpha", "beta"): "WWLTWWBWLWTW",
    ("alpha", "gamma"): "WWWLWTWWLWWB",
    ("beta", "gamma"): "WLTWWLLWTWBW",
}


def rated_store(path) -> ArenaStore:
    """Every rater rates every comparison through the store's own API, in the random order and
    positions it picks; the verdict follows PLAN whatever side each model was shown on."""
    store = ArenaStore(path)
    prompts = store.add_prompts([Prompt([{"role": "user", "content": f"Question {i}?"}], "math" if i < 2 else "chat")
                                 for i in range(4)])  # fmt: skip
    for name in MODELS:
        store.register_model(name, f"/ckpt/{name}", {})
        store.add_answers(name, [(p.id, f"{name}'s answer to {p.id}", "stop") for p in prompts])
    rng = random.Random(0)
    for r, rater in enumerate(RATERS):
        while (shown := store.next_assignment(rater, MODELS, rng)) is not None:
            a, b = sorted((shown.left_model, shown.right_model))
            code = PLAN[(a, b)][(shown.prompt.id - 1) * 3 + r]
            verdict = {"T": "tie", "B": "both_bad"}.get(code)
            if verdict is None:
                winner = a if code == "W" else b
                verdict = "left" if shown.left_model == winner else "right"
            store.rate(rater, shown.id, verdict, f"{rater} on {shown.prompt.id}")
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ArenaStore:
    return rated_store(tmp_path_factory.mktemp("arena") / "ratings.db")


def independent_fit(scores, models) -> np.ndarray:
    """Bradley-Terry as a logistic regression: P(a beats b) = sigmoid(theta_a - theta_b), a tie one
    half-weighted observation each way; on the Elo scale, centred at 1000."""
    from sklearn.linear_model import LogisticRegression

    X, y, w = [], [], []
    for a, b, score in scores:
        row = np.zeros(len(models))
        row[models.index(a)], row[models.index(b)] = 1.0, -1.0
        for label, weight in ((1, score), (0, 1 - score)):
            if weight:
                X.append(row)
                y.append(label)
                w.append(weight)
    fit = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-12, max_iter=10_000)
    theta = fit.fit(np.array(X), np.array(y), sample_weight=np.array(w)).coef_[0]
    return 1000 + 400 / math.log(10) * (theta - theta.mean())


def test_pair_counts_and_win_rates_match_the_hand_count(store):
    ratings = store.ratings()
    assert len(ratings) == 36
    table = {(p.a, p.b): (p.a_wins, p.ties, p.both_bad, p.b_wins, p.n) for p in pair_results(ratings, MODELS)}
    assert table == {
        ("alpha", "beta"): (7, 2, 1, 2, 12),
        ("alpha", "gamma"): (8, 1, 1, 2, 12),
        ("beta", "gamma"): (6, 2, 1, 3, 12),
    }
    rates = {(p.a, p.b): p.a_win_rate for p in pair_results(ratings, MODELS)}
    assert rates == pytest.approx({("alpha", "beta"): 8.5 / 12, ("alpha", "gamma"): 9 / 12,
                                   ("beta", "gamma"): 7.5 / 12})  # fmt: skip
    # both positions were shown, and the verdicts were stored as shown
    assert {r.verdict for r in ratings} == {"left", "right", "tie", "both_bad"}


def test_bradley_terry_matches_an_independent_logistic_regression(store):
    ratings = store.ratings()
    report = build_report(ratings, rounds=0)
    ours = {r.model: r.rating for r in report.overall.ratings}
    reference = independent_fit(outcomes(ratings), MODELS)
    assert [ours[m] for m in MODELS] == pytest.approx(list(reference), abs=0.05)
    assert [r.model for r in report.overall.ratings] == ["alpha", "beta", "gamma"]
    assert sum(ours.values()) == pytest.approx(3000)
    # a 400-point gap is 10:1 odds: the fitted gap reproduces the model's win probability
    for category in ("math", "chat"):
        part = [r for r in ratings if r.prompt.category == category]
        got = {r.model: r.rating for r in report.categories[category].ratings}
        assert [got[m] for m in MODELS] == pytest.approx(
            list(independent_fit(outcomes(part), MODELS)), abs=0.05
        )
        assert sum(p.n for p in report.categories[category].pairs) == 18


def test_bootstrap_intervals(store):
    ratings = store.ratings()
    report = build_report(ratings, rounds=100, seed=1)
    for r in report.overall.ratings:
        assert r.low < r.rating < r.high and r.comparisons == 24
    assert build_report(ratings, rounds=100, seed=1).to_dict() == report.to_dict()  # seeded
    # four times the data: narrower intervals (about half as wide)
    many = build_report(ratings * 4, rounds=100, seed=1)
    width = {r.model: r.high - r.low for r in report.overall.ratings}
    for r in many.overall.ratings:
        assert r.high - r.low < 0.75 * width[r.model]
    none = build_report(ratings, rounds=0)
    assert all(r.low == r.rating == r.high for r in none.overall.ratings)


def test_a_model_that_always_wins_stays_finite():
    scores = [("a", "b", 1.0)] * 5
    ratings = bradley_terry(scores, ["a", "b"])
    assert np.isfinite(ratings).all() and ratings[0] > ratings[1]
    assert list(bradley_terry([], ["a", "b"])) == [1000, 1000]


def test_report_files(store, tmp_path):
    report = build_report(store.ratings(), rounds=20)
    files = write_report(report, tmp_path / "report")
    data = json.loads(files["json"].read_text())
    assert (
        data["n_ratings"] == 36 and data["raters"] == RATERS and set(data["categories"]) == {"chat", "math"}
    )
    assert data["overall"]["pairs"][0] == {"a": "alpha", "b": "beta", "a_wins": 7, "b_wins": 2, "ties": 2,
                                           "both_bad": 1, "n": 12, "a_win_rate": 8.5 / 12}  # fmt: skip
    left = sum(r.verdict == "left" for r in store.ratings())
    assert (data["left_wins"], data["decisive"]) == (left, 28)
    # rater agreement, counted from PLAN: the three raters' codes for each (pair, prompt)
    codes = [plan[3 * p : 3 * p + 3] for plan in PLAN.values() for p in range(4)]
    agreeing = sum(c[i] == c[j] for c in codes for i, j in ((0, 1), (0, 2), (1, 2)))
    assert (data["agreeing"], data["rater_pairs"]) == (agreeing, 36)
    markdown = files["markdown"].read_text()
    assert f"Two raters of the same comparison gave the same verdict in {agreeing} of 36 cases" in markdown
    assert f"The answer shown on the left won {left} of 28 decisive ratings ({left / 28:.0%};" in markdown
    assert "| alpha vs beta | 7 | 2 | 1 | 2 | 70.8% |" in markdown and "## Category: math" in markdown
    import matplotlib.image

    image = matplotlib.image.imread(files["chart"])
    assert image.ndim == 3 and image.shape[1] > 600
    with pytest.raises(QwenkitError, match="no ratings"):
        build_report([])
    (tmp_path / "file").write_text("x")
    with pytest.raises(QwenkitError, match="not a folder"):
        write_report(report, tmp_path / "file")


def test_export_is_trl_conversational_pairs(store, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert export_pairs(store, out) == (28, 8)  # ties and both-bad left out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    decisive = [r for r in store.ratings() if r.winner is not None]
    for row, rating in zip(rows, decisive, strict=True):
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"] == rating.prompt.messages
        assert row["chosen"] == [
            {"role": "assistant", "content": f"{rating.winner}'s answer to {rating.prompt.id}"}
        ]
        assert row["rejected"] == [
            {"role": "assistant", "content": f"{rating.loser}'s answer to {rating.prompt.id}"}
        ]
    with pytest.raises(QwenkitError, match="does not exist"):
        export_pairs(store, tmp_path / "missing" / "pairs.jsonl")


def test_export_round_trips_into_the_reward_models_reader(store, tmp_path):
    from qwenkit.train.preference_data import load_preference_pairs

    out = tmp_path / "pairs.jsonl"
    export_pairs(store, out)
    tokenizer = Tokenizer.from_file(qwenkit.default_model_path())
    pairs, report = load_preference_pairs(out, tokenizer, max_len=256, strict=True)
    assert report.ok == len(pairs) == 28 and report.skipped == 0
    for pair, line in zip(pairs, out.read_text().splitlines(), strict=True):
        row = json.loads(line)
        whole = render_messages(tokenizer, row["prompt"] + row["chosen"]).input_ids
        assert pair.prompt + pair.chosen == whole
        assert pair.prompt == render_messages(tokenizer, row["prompt"], prompt=True).input_ids
        assert tokenizer.decode(pair.rejected).startswith(row["rejected"][0]["content"])
