"""Import layering (DESIGN, Layering): the library never imports the CLI; the core (config, tokenizer,
model, checkpoint, generation, chatml, data) knows nothing of serving or training; serving never
imports training; the command's parser needs no torch.

Each rule is checked twice: by importing the modules in a fresh interpreter (what really gets
loaded), and by reading every import statement in their source, including imports inside functions,
which run only when called (that is how the server once reached into the CLI).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import qwenkit

PACKAGE = Path(qwenkit.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


CLI = ("qwenkit.cli", "qwenkit.__main__")
CORE = ("qwenkit.config", "qwenkit.tokenizer", "qwenkit.model", "qwenkit.checkpoint", "qwenkit.generation",
        "qwenkit.chatml", "qwenkit.data", "qwenkit.errors", "qwenkit.devices")  # fmt: skip
LIBRARY = sorted(m for m in MODULES if not under(m, *CLI))

# rule -> (the modules it holds for, what they must never import); lower layers first
RULES = {
    "core-never-imports-serve-train-or-cli": (
        sorted(m for m in MODULES if under(m, *CORE)),
        ("qwenkit.serve", "qwenkit.train", "qwenkit.cli"),
    ),
    "serve-never-imports-train": (
        sorted(m for m in MODULES if under(m, "qwenkit.serve")),
        ("qwenkit.train",),
    ),
    "library-never-imports-cli": (LIBRARY, ("qwenkit.cli",)),
}


def test_the_rules_cover_the_modules_they_name():
    library, _ = RULES["library-never-imports-cli"]
    for name in ("qwenkit.model", "qwenkit.config", "qwenkit.tokenizer", "qwenkit.checkpoint",
                 "qwenkit.generation", "qwenkit.chat", "qwenkit.data.pack", "qwenkit.tokenizer_train",
                 "qwenkit.serve.api", "qwenkit.train.sft", "qwenkit.agent.loop"):  # fmt: skip
        assert name in library
    assert not any(under(m, *CLI) for m in library)
    assert "qwenkit.data.pack" in RULES["core-never-imports-serve-train-or-cli"][0]
    assert "qwenkit.serve.engine" in RULES["serve-never-imports-train"][0]


@pytest.fixture(scope="module")
def loaded_after_each_layer() -> dict[str, list[str]]:
    """One fresh interpreter imports the layers in RULES' order (core, serving, all the library) and
    lists the qwenkit modules loaded after each. Each layer's forbidden modules are forbidden to the
    layers before it too, so any that appear were loaded by that layer's own modules."""
    code = (
        "import importlib, json, sys\n"
        "loaded = {}\n"
        f"for rule, (modules, _) in {RULES!r}.items():\n"
        "    for name in modules:\n"
        "        importlib.import_module(name)\n"
        "    loaded[rule] = sorted(m for m in sys.modules if m.startswith('qwenkit'))\n"
        "print(json.dumps(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("rule", RULES)
def test_importing_a_layer_loads_nothing_above_it(rule, loaded_after_each_layer):
    modules, forbidden = RULES[rule]
    loaded = [m for m in loaded_after_each_layer[rule] if under(m, *forbidden)]
    assert loaded == [], f"{rule}: importing {modules} loaded {loaded}"


def imported_names(path: Path, module: str) -> set[str]:
    """Every module an import statement anywhere in `path` names (function bodies included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("rule", RULES)
def test_no_import_statement_crosses_a_layer(rule):
    modules, forbidden = RULES[rule]
    crossings = {
        module: sorted(name for name in imported_names(MODULES[module], module) if under(name, *forbidden))
        for module in modules
    }
    assert {module: names for module, names in crossings.items() if names} == {}


def test_imported_names_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "api.py"
    source.write_text("def serve(args):\n    from qwenkit.cli import load_model\n    from . import engine\n")
    assert imported_names(source, "qwenkit.serve.api") >= {"qwenkit.cli.load_model", "qwenkit.serve.engine"}


def test_the_command_parser_loads_no_torch():
    """`qwenkit --help` stays quick: the verbs import torch and the model only when they run."""
    code = "import sys\nfrom qwenkit.cli import build_parser\nbuild_parser()\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
