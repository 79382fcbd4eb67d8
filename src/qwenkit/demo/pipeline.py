"""The demo model's build: `qwenkit demo build` (or `make demo-model`) runs qwenkit's own pipeline
end to end from a seed: generated corpus -> own BPE vocabulary -> pretraining -> ChatML SFT ->
evaluation on held-out prompts -> `qwenkit/demo_model/` (bf16 weights), then records the build in
`demo_model/eval.json` and the model card.

The two recipes ship in `configs/` next to this file, so an installed wheel can rebuild the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qwenkit.demo.compose import DATASETS
from qwenkit.demo.data import SFT_EXAMPLES, held_out_examples, prompt_key, sft_record
from qwenkit.demo.evaluate import evaluate_examples, score_table
from qwenkit.errors import QwenkitError

DEMO_MODEL_DIR = Path(__file__).parent.parent / "demo_model"
CONFIG_DIR = Path(__file__).parent / "configs"
REPO_ROOT = Path(__file__).resolve().parents[3]  # the source checkout, when running from one (docs/)
CARD_BEGIN, CARD_END = "<!-- measured:begin -->", "<!-- measured:end -->"  # the model card's measured block
GENERAL_BEGIN, GENERAL_END = (
    "<!-- generalization:begin -->",
    "<!-- generalization:end -->",
)  # its issue-17 table


@dataclass
class BuildSettings:
    seed: int = 0
    data: str = "composed"  # DATASETS: "composed" (issue 17), or "tables" (the shipped model's)
    documents: int = 30_000
    sft_examples: int = SFT_EXAMPLES
    held_out: int = 400
    vocab_size: int = 3000
    pretrain_config: str = str(CONFIG_DIR / "pretrain.yaml")
    sft_config: str = str(CONFIG_DIR / "sft.yaml")


def split_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """`--pretrain.train.max_steps 50 --sft.train.lr 1e-3` -> per-stage recipe overrides."""
    stages: dict[str, list[str]] = {"pretrain": [], "sft": []}
    if len(overrides) % 2:
        raise QwenkitError(f"override {overrides[-1]!r} has no value (use --pretrain.train.max_steps 50)")
    for flag, value in zip(overrides[::2], overrides[1::2], strict=True):
        stage, _, rest = flag.removeprefix("--").partition(".")
        if stage not in stages or not rest:
            raise QwenkitError(f"unknown option {flag!r}; overrides look like --pretrain.train.max_steps 50")
        stages[stage] += [f"--{rest}", value]
    return stages


def build(work: Path, out: Path, settings: BuildSettings, overrides: Sequence[str] = ()) -> dict:
    """Run the whole pipeline; returns the evaluation report (also written as work/eval.json)."""
    from qwenkit.checkpoint import load, save
    from qwenkit.data.pack import Source, pack_documents
    from qwenkit.tokenizer_train import train_tokenizer
    from qwenkit.train import pretrain, sft
    from qwenkit.train.settings import load_recipe

    if settings.data not in DATASETS:
        raise QwenkitError(f"unknown demo data {settings.data!r}; use one of {', '.join(DATASETS)}")
    generate, documents = DATASETS[settings.data]
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    stage_overrides = split_overrides(overrides)

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"demo: {name} done in {timings[name]:.0f}s", flush=True)

    t0 = time.perf_counter()
    corpus = work / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for text in documents(settings.documents, settings.seed):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    train = generate(settings.sft_examples, settings.seed + 1, False)
    sft_path = work / "sft.jsonl"
    with open(sft_path, "w", encoding="utf-8") as f:
        for example in train:
            f.write(json.dumps(sft_record(example), ensure_ascii=False) + "\n")
    vocab_text = work / "vocab_corpus.txt"  # the vocabulary sees the chat data's words too
    vocab_text.write_text(corpus.read_text(encoding="utf-8") + sft_path.read_text(encoding="utf-8"))
    stage("data", t0)

    t0 = time.perf_counter()
    tokenizer = train_tokenizer([vocab_text], settings.vocab_size, work / "tokenizer", progress=False)
    stage("vocabulary", t0)

    t0 = time.perf_counter()
    pack_dir = work / "packed"
    seq_len = load_recipe(
        pretrain.PretrainRecipe, settings.pretrain_config, stage_overrides["pretrain"]
    ).data.seq_len
    pack_documents([Source([corpus], 1.0)], tokenizer, seq_len, pack_dir, seed=settings.seed,
                   val_fraction=0.01, progress=False)  # fmt: skip
    stage("packing", t0)

    t0 = time.perf_counter()
    pre = ["--data.path", str(pack_dir), "--model.overrides.vocab_size", str(_round_up(tokenizer.vocab_size))]
    recipe = load_recipe(pretrain.PretrainRecipe, settings.pretrain_config, pre + stage_overrides["pretrain"])
    base = pretrain.run(recipe, work / "pretrain")
    stage("pretraining", t0)

    t0 = time.perf_counter()
    given = ["--model.path", str(base), "--data.path", str(sft_path)]
    recipe = load_recipe(sft.SFTRecipe, settings.sft_config, given + stage_overrides["sft"])
    final = sft.run(recipe, work / "sft")
    stage("sft", t0)

    t0 = time.perf_counter()
    model, tokenizer = load(final, dtype="float32")
    model.generation_config.chat_format = "chatml"
    save(model, tokenizer, out, dtype="bfloat16")
    model, tokenizer = load(out, dtype="float32")  # measure what ships
    train_prompts = {prompt_key(e) for e in train}
    held = held_out_examples(settings.held_out, settings.seed + 1000, train_prompts, generate)
    report = evaluate_examples(model, tokenizer, held)
    report["generalization"] = measure_generalization(model, tokenizer)
    stage("evaluation", t0)
    report.update(
        settings=settings.__dict__,
        timings=timings,
        minutes=round((time.perf_counter() - started) / 60, 1),
        losses={name: _loss_summary(work / name) for name in ("pretrain", "sft")},
        parameters=sum(p.numel() for p in model.parameters()),
        config=model.config.__dict__,
    )
    (work / "eval.json").write_text(json.dumps(report, ensure_ascii=False, indent=1))
    return report


def measure_generalization(model, tokenizer) -> dict:
    """`qwenkit eval demo-generalization` on the built model: the hand-written and independently
    generated prompts (set -> measure -> {"rate", "n"})."""
    from qwenkit.eval.base import EvalSettings, LocalBackend
    from qwenkit.eval.demo_generalization import run_demo_generalization, scores_by_set

    return scores_by_set(
        run_demo_generalization(LocalBackend(model, tokenizer), EvalSettings(progress=False))
    )


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _loss_summary(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    first, last = lines[0], lines[-1]
    return {"steps": last["step"], "first_loss": first["loss"], "final_loss": last["loss"],
            "val_loss": last.get("val_loss")}  # fmt: skip


def write_model_card(report: dict, card: Path) -> None:
    """Replace the measured block of `card` (between the markers) with the numbers of `report`."""
    c, losses, t = report["config"], report["losses"], report["timings"]
    lines = [
        CARD_BEGIN,
        f"Measured by `make demo-model` (seed {report['settings']['seed']}) on "
        f"{report['settings']['held_out']} held-out conversations, greedy decoding:",
        "",
        score_table(report["scores"]),
        "",
        f"- Shapes: {report['parameters'] / 1e6:.2f}M parameters; vocabulary {c['vocab_size']} "
        f"(own BPE), hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} "
        f"query / {c['num_key_value_heads']} key-value heads, MLP {c['intermediate_size']}, context "
        f"{c['max_position_embeddings']}; bf16 weights.",
        f"- Pretraining: {losses['pretrain']['steps']} steps, loss {losses['pretrain']['first_loss']:.2f} -> "
        f"{losses['pretrain']['final_loss']:.3f} (held-out {losses['pretrain']['val_loss']:.3f}).",
        f"- SFT: {losses['sft']['steps']} steps, loss {losses['sft']['first_loss']:.2f} -> "
        f"{losses['sft']['final_loss']:.3f} (held-out {losses['sft']['val_loss']:.3f}).",
        f"- Build time: {report['minutes']} minutes in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
        + ").",
        CARD_END,
    ]
    text = card.read_text(encoding="utf-8")
    start, end = text.index(CARD_BEGIN), text.index(CARD_END) + len(CARD_END)
    text = text[:start] + "\n".join(lines) + text[end:]
    if report.get("generalization") and GENERAL_BEGIN in text:
        from qwenkit.eval.demo_generalization import score_table as generalization_table

        block = [GENERAL_BEGIN, generalization_table(report["generalization"]), "",
                 f"(`make demo-model`, seed {report['settings']['seed']}, `{report['settings'].get('data')}` data: "
                 "`qwenkit eval demo-generalization` on the built model; in brackets the turns or items counted.)",
                 GENERAL_END]  # fmt: skip
        start, end = text.index(GENERAL_BEGIN), text.index(GENERAL_END) + len(GENERAL_END)
        text = text[:start] + "\n".join(block) + text[end:]
    card.write_text(text, encoding="utf-8")


def record_build(report: dict, work: Path, out: Path, card: bool = True) -> None:
    """Write a build's measurements next to the model (out/eval.json) and, with `card` and a source
    checkout, into docs/demo-model.md with the loss plots of `work`'s runs."""
    import shutil

    kept = ("scores", "generalization", "settings", "timings", "minutes", "losses")
    (out / "eval.json").write_text(json.dumps({k: report[k] for k in kept if k in report}, indent=1) + "\n")
    docs = REPO_ROOT / "docs"
    if card and (docs / "demo-model.md").is_file():
        write_model_card(report, docs / "demo-model.md")
        for name in ("pretrain", "sft"):
            shutil.copy(work / name / "loss.png", docs / f"demo-model-{name}-loss.png")
