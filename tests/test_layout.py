"""House rules, checked: what sits where, what may import what, and sizes that read in one sitting.

The model is the three Hub files at the top level; the trainer and its tools are the `qwen_siglip` package; the
commands users run sit at the top level; `bench/` is a package of its own. Tests are not held to the size rules.
"""

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

HUB_FILES = ["configuration_qwen_siglip.py", "modeling_qwen_siglip.py", "processing_qwen_siglip.py"]
COMMANDS = {"train_pretrain.py", "train_sft.py", "train_dpo.py", "train_grpo.py", "evaluate_vlm.py", "app.py",
            "export_llava.py", "export_gguf.py", "quickstart.py"}  # fmt: skip
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_HUB_LINES = 400, 50, 520


def code_files() -> list:
    """Every Python file of the product: the top level, the package and the benchmark (tests and lmms-eval hooks
    excluded)."""
    return sorted([*ROOT.glob("*.py"), *(ROOT / "qwen_siglip").glob("*.py"), *(ROOT / "bench").glob("*.py")])


def imported_modules(path) -> set[str]:
    """Top-level names of the absolute imports in a file (relative imports give '')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("" if node.level else node.module)
    return names


def test_the_top_level_holds_the_hub_files_and_the_commands_only():
    top = {p.name for p in ROOT.glob("*.py")}
    assert top == set(HUB_FILES) | COMMANDS, f"move library code into qwen_siglip/: {sorted(top - COMMANDS)}"


def test_hub_files_import_only_torch_transformers_and_each_other():
    allowed_roots = {"torch", "transformers", "re", "math", "", "configuration_qwen_siglip"}
    for name in HUB_FILES:
        roots = {m.split(".")[0] for m in imported_modules(ROOT / name)}
        assert roots <= allowed_roots, f"{name} imports {sorted(roots - allowed_roots)}"


def test_the_package_never_imports_a_command_and_nothing_edits_sys_path():
    for path in code_files():
        imported = {m.split(".")[0] for m in imported_modules(path)}
        if path.parent.name == "qwen_siglip" or path.name in HUB_FILES:
            commands = {c.removesuffix(".py") for c in COMMANDS}
            assert not imported & commands, f"{path.name} imports the command(s) {imported & commands}"
        assert "sys.path" not in path.read_text(), f"{path.relative_to(ROOT)} edits sys.path"


@pytest.mark.parametrize("path", code_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_read_in_one_sitting(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{len(lines)} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{node.name} (line {node.lineno}) is {length} lines"


def test_the_hub_files_together_stay_small():
    total = sum(len((ROOT / name).read_text().splitlines()) for name in HUB_FILES)
    assert total <= MAX_HUB_LINES, f"the Hub files hold {total} lines"


@pytest.mark.parametrize(
    "module, never",
    [
        ("qwen_siglip.images", ["datasets", "torch", "trl"]),  # the app opens uploads with it alone
        ("qwen_siglip.chat", ["datasets", "trl", "qwen_siglip.training", "qwen_siglip.data"]),
        ("qwen_siglip.inference", ["datasets", "trl", "qwen_siglip.training"]),
    ],
)
def test_inference_side_modules_stand_below_the_trainer(module, never):
    code = f"import sys, {module}; print(sorted(m for m in {never!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{module} pulls in {out.stdout.strip()}"
