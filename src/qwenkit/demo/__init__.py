"""The embedded demo chat model: its generated data, its build, and the measurement of what it can do.

- `data`: the tables (identity, small talk, capitals, facts, arithmetic) and the generators of the SFT
  conversations, the pretraining corpus and the held-out prompts;
- `evaluate`: greedy replies on held-out prompts and the model card's scores;
- `pipeline`: the build (`qwenkit demo build`, `make demo-model`) with its recipes in `configs/`,
  and the record of a build in `demo_model/eval.json` and `docs/demo-model.md`.

The weights it builds ship in `qwenkit/demo_model/`, the default model of every command.
"""

from qwenkit.demo.data import (
    DEMO_NAME,
    SFT_EXAMPLES,
    Example,
    calculator,
    generate_examples,
    held_out_examples,
    is_chinese,
    pretraining_documents,
    prompt_key,
    prompt_messages,
    react_thought,
    sft_record,
)
from qwenkit.demo.evaluate import (
    TARGETS,
    Reply,
    evaluate_examples,
    evaluate_held_out,
    generate_replies,
    in_language,
    prompt_ids,
    score_table,
)
from qwenkit.demo.pipeline import (
    CONFIG_DIR,
    DEMO_MODEL_DIR,
    BuildSettings,
    build,
    record_build,
    split_overrides,
    write_model_card,
)

__all__ = [
    "CONFIG_DIR", "DEMO_MODEL_DIR", "DEMO_NAME", "SFT_EXAMPLES", "TARGETS", "BuildSettings", "Example",
    "Reply", "build", "calculator", "evaluate_examples", "evaluate_held_out", "generate_examples",
    "generate_replies", "held_out_examples", "in_language", "is_chinese", "pretraining_documents",
    "prompt_ids", "prompt_key", "prompt_messages", "react_thought", "record_build", "score_table",
    "sft_record", "split_overrides", "write_model_card",
]  # fmt: skip
