"""What the ratings say: win/tie/loss per model pair, Bradley-Terry ratings with bootstrap confidence
intervals, the same per prompt category, a PNG chart; and the ratings as TRL preference pairs.

A tie and a "both bad" count as half a win for each side, in the pair tables' win rates and in the
ratings (as the LMSYS arena counts ties). Ratings are on the Elo scale: 1000 + 400 * log10 of a
model's Bradley-Terry strength, centred so the models average 1000; a 400-point gap means the
stronger model wins 10 times out of 11. The fit is choix's iterative Luce spectral ranking (the
maximum-likelihood estimate, fast enough for a thousand bootstrap refits), with a tiny prior (ALPHA)
that keeps a model that won or lost every comparison finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from qwenkit.arena.store import ArenaStore, Rating
from qwenkit.errors import QwenkitError

ALPHA = 1e-4  # choix's regularization: a pseudo-count of comparisons between every two models
ELO_SCALE = 400 / math.log(10)
ELO_BASE = 1000.0


@dataclass
class PairResult:
    """Model `a` against model `b` (a < b by name): a's wins, b's wins, ties and both-bad verdicts."""

    a: str
    b: str
    a_wins: int = 0
    b_wins: int = 0
    ties: int = 0
    both_bad: int = 0

    @property
    def n(self) -> int:
        return self.a_wins + self.b_wins + self.ties + self.both_bad

    @property
    def a_win_rate(self) -> float:
        """a's score per comparison: wins count 1, ties and both-bad 1/2."""
        return (self.a_wins + 0.5 * (self.ties + self.both_bad)) / self.n if self.n else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "n": self.n, "a_win_rate": self.a_win_rate}


@dataclass
class ModelRating:
    model: str
    rating: float
    low: float  # the bootstrap interval
    high: float
    comparisons: int


@dataclass
class Breakdown:
    """The pair tables and ratings of one set of ratings (all of them, or one category's)."""

    ratings: list[ModelRating]
    pairs: list[PairResult]


@dataclass
class Report:
    models: list[str]
    raters: list[str]
    n_ratings: int
    rounds: int  # bootstrap resamples
    left_wins: int  # decisive ratings won by the answer shown on the left (position bias)
    decisive: int  # ratings with a winner
    agreeing: int  # pairs of ratings by two raters of the same comparison that give the same verdict
    rater_pairs: int  # pairs of ratings by two raters of the same comparison
    overall: Breakdown
    categories: dict[str, Breakdown] = field(default_factory=dict)

    def to_dict(self) -> dict:
        def part(b: Breakdown) -> dict:
            return {"ratings": [asdict(r) for r in b.ratings], "pairs": [p.to_dict() for p in b.pairs]}

        return {"models": self.models, "raters": self.raters, "n_ratings": self.n_ratings,
                "bootstrap_rounds": self.rounds, "left_wins": self.left_wins, "decisive": self.decisive,
                "agreeing": self.agreeing, "rater_pairs": self.rater_pairs,
                "overall": part(self.overall),
                "categories": {c: part(b) for c, b in self.categories.items()}}  # fmt: skip

    def markdown(self) -> str:
        lines = [f"# Arena report\n\n{self.n_ratings} ratings by {len(self.raters)} rater(s) of "
                 f"{len(self.models)} models; 95% intervals from {self.rounds} bootstrap resamples. "
                 f"The answer shown on the left won {self.left_wins} of {self.decisive} decisive ratings"
                 f"{f' ({self.left_wins / self.decisive:.0%}; 50% is no position bias)' if self.decisive else ''}."
                 + (f" Two raters of the same comparison gave the same verdict in {self.agreeing} of "
                    f"{self.rater_pairs} cases ({self.agreeing / self.rater_pairs:.0%})." if self.rater_pairs else "") + "\n"]  # fmt: skip
        for title, b in [
            ("All prompts", self.overall),
            *((f"Category: {c}", b) for c, b in self.categories.items()),
        ]:
            lines += [
                f"## {title}\n",
                "| model | rating | 95% interval | comparisons |",
                "|---|---:|---:|---:|",
            ]
            lines += [f"| {r.model} | {r.rating:.0f} | {r.low:.0f} - {r.high:.0f} | {r.comparisons} |"
                      for r in b.ratings]  # fmt: skip
            lines += [
                "",
                "| pair | wins | ties | both bad | losses | win rate |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            lines += [f"| {p.a} vs {p.b} | {p.a_wins} | {p.ties} | {p.both_bad} | {p.b_wins} | {p.a_win_rate:.1%} |"
                      for p in b.pairs if p.n]  # fmt: skip
            lines.append("")
        return "\n".join(lines)


def outcomes(ratings: Sequence[Rating]) -> list[tuple[str, str, float]]:
    """(model a, model b, a's score) per rating, a < b by name; score 1 win, 0 loss, 1/2 tie or both bad."""
    out = []
    for r in ratings:
        a, b = sorted((r.left_model, r.right_model))
        out.append((a, b, 0.5 if r.winner is None else float(r.winner == a)))
    return out


def pair_results(ratings: Sequence[Rating], models: Sequence[str]) -> list[PairResult]:
    """Win/tie/loss counts of every pair of `models` (pairs never compared have n = 0)."""
    pairs = {pair: PairResult(*pair) for pair in combinations(sorted(models), 2)}
    for r in ratings:
        pair = tuple(sorted((r.left_model, r.right_model)))
        if pair not in pairs:
            continue
        result = pairs[pair]
        if r.verdict == "tie":
            result.ties += 1
        elif r.verdict == "both_bad":
            result.both_bad += 1
        elif r.winner == result.a:
            result.a_wins += 1
        else:
            result.b_wins += 1
    return list(pairs.values())


def bradley_terry(scores: Sequence[tuple[str, str, float]], models: Sequence[str]) -> np.ndarray:
    """Elo-scale ratings of `models` (in that order) from (a, b, a's score) outcomes: the maximum
    likelihood Bradley-Terry fit (choix.ilsr_pairwise), a win counted as two wins of the pair and a tie as one
    each way, which is the same likelihood as half a win each."""
    import choix

    index = {m: i for i, m in enumerate(models)}
    data: list[tuple[int, int]] = []
    for a, b, score in scores:
        i, j = index[a], index[b]
        data += [(i, j)] * round(2 * score) + [(j, i)] * round(2 * (1 - score))
    if not data:
        return np.full(len(models), ELO_BASE)
    theta = choix.ilsr_pairwise(len(models), data, alpha=ALPHA, tol=1e-10, max_iter=1000)
    return ELO_BASE + ELO_SCALE * (theta - theta.mean())


def breakdown(ratings: Sequence[Rating], models: Sequence[str], rounds: int, seed: int) -> Breakdown:
    scores = outcomes(ratings)
    point = bradley_terry(scores, models)
    rng = np.random.default_rng(seed)
    samples = np.array([bradley_terry([scores[i] for i in rng.integers(0, len(scores), len(scores))], models)
                        for _ in range(rounds)]) if rounds and scores else np.array([point])  # fmt: skip
    low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    counts = {m: sum(m in (a, b) for a, b, _ in scores) for m in models}
    table = [
        ModelRating(m, float(point[i]), float(low[i]), float(high[i]), counts[m])
        for i, m in enumerate(models)
    ]
    table.sort(key=lambda r: -r.rating)
    return Breakdown(table, pair_results(ratings, models))


def rater_agreement(ratings: Sequence[Rating]) -> dict[str, int]:
    """Among every two ratings by different raters of the same comparison (prompt and model pair),
    how many agree: the same winner, or both tie, or both "both bad"."""
    verdicts: dict[tuple, list[tuple[str, str]]] = {}
    for r in ratings:
        item = (r.prompt.id, *sorted((r.left_model, r.right_model)))
        verdicts.setdefault(item, []).append((r.rater, r.winner or r.verdict))
    agreeing = pairs = 0
    for given in verdicts.values():
        for (rater_a, a), (rater_b, b) in combinations(given, 2):
            if rater_a != rater_b:
                pairs += 1
                agreeing += a == b
    return {"agreeing": agreeing, "rater_pairs": pairs}


def build_report(ratings: Sequence[Rating], rounds: int = 1000, seed: int = 0) -> Report:
    """The report of `ratings`: overall and per prompt category (when the prompts have categories)."""
    if not ratings:
        raise QwenkitError("there are no ratings yet; rate some comparisons first (qwenkit arena)")
    if rounds < 0:
        raise QwenkitError(f"bootstrap rounds must be >= 0, got {rounds}")
    models = sorted({m for r in ratings for m in (r.left_model, r.right_model)})
    categories = sorted({r.prompt.category for r in ratings if r.prompt.category})
    return Report(
        models=models,
        raters=sorted({r.rater for r in ratings}),
        n_ratings=len(ratings),
        rounds=rounds,
        left_wins=sum(r.verdict == "left" for r in ratings),
        decisive=sum(r.winner is not None for r in ratings),
        **rater_agreement(ratings),
        overall=breakdown(ratings, models, rounds, seed),
        categories={
            c: breakdown([r for r in ratings if r.prompt.category == c], models, rounds, seed)
            for c in categories
        },  # fmt: skip
    )


def plot_report(report: Report, path: str | Path) -> Path:
    """A PNG: each model's rating with its interval, and each pair's win/tie/loss shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in report.overall.pairs if p.n]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * max(len(report.models), len(pairs)) + 2.2))
    rows = report.overall.ratings[::-1]
    y = np.arange(len(rows))
    values = np.array([r.rating for r in rows])
    errors = np.array([[r.rating - r.low for r in rows], [r.high - r.rating for r in rows]])
    left.errorbar(values, y, xerr=np.clip(errors, 0, None), fmt="o", capsize=4)
    left.set_yticks(y, [r.model for r in rows])
    left.axvline(ELO_BASE, color="grey", lw=0.5)
    left.set_xlabel("Bradley-Terry rating (Elo scale), 95% bootstrap interval")
    y = np.arange(len(pairs))[::-1]  # the first pair on top
    shares = np.array([[p.a_wins, p.ties + p.both_bad, p.b_wins] for p in pairs], dtype=float).reshape(-1, 3)
    shares /= np.maximum(shares.sum(axis=1, keepdims=True), 1)
    start = np.zeros(len(pairs))
    for k, (label, color) in enumerate([("first wins", "tab:green"), ("tie / both bad", "tab:grey"),
                                        ("second wins", "tab:red")]):  # fmt: skip
        right.barh(y, shares[:, k], left=start, color=color, label=label)
        start += shares[:, k]
    right.set_yticks(y, [f"{p.a} vs {p.b}" for p in pairs])
    right.set_xlim(0, 1)
    right.set_xlabel("share of comparisons")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize="small")
    fig.suptitle(f"{report.n_ratings} ratings, {len(report.raters)} rater(s)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: Report, out: str | Path) -> dict[str, Path]:
    """report.json, report.md and ratings.png in the folder `out` (created)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QwenkitError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "report.json", "markdown": out / "report.md", "chart": out / "ratings.png"}
    files["json"].write_text(
        json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    files["markdown"].write_text(report.markdown(), encoding="utf-8")
    plot_report(report, files["chart"])
    return files


def preference_rows(store: ArenaStore) -> tuple[list[dict], int]:
    """Every decisive rating as a TRL conversational preference pair {"prompt": messages, "chosen":
    [assistant message], "rejected": [assistant message]}, oldest first, and how many ratings were
    left out: ties and both-bad say nothing about which answer is better, nor does a choice between
    two identical answers (the reward model's reader refuses those)."""
    rows, skipped = [], 0
    for r in store.ratings():
        answers = store.answers(r.prompt.id)
        if r.winner is None or answers[r.winner] == answers[r.loser]:
            skipped += 1
            continue
        rows.append({
            "prompt": r.prompt.messages,
            "chosen": [{"role": "assistant", "content": answers[r.winner]}],
            "rejected": [{"role": "assistant", "content": answers[r.loser]}],
        })  # fmt: skip
    return rows, skipped


def export_pairs(store: ArenaStore, path: str | Path) -> tuple[int, int]:
    """Write preference_rows as JSON lines to `path`; (pairs written, ratings left out)."""
    rows, skipped = preference_rows(store)
    path = Path(path)
    if path.is_dir():
        raise QwenkitError(f"{path} is a folder; give the output file's name")
    if not path.parent.is_dir():
        raise QwenkitError(f"the output's folder {path.parent} does not exist")
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows), skipped
