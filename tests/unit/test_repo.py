"""Repository hygiene: file sizes, the README's commands, a side-effect-free import."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 800
MAX_LIBRARY_LINES = 600
MAX_FUNCTION_LINES = 80
PACKAGE = ROOT / "src" / "vramferry"


def _sources():
    for folder in ("src", "tests", "benchmarks"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_source_file_exceeds_800_lines():
    too_long = {
        str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"split these files (>{MAX_LINES} lines): {too_long}"


def test_no_library_file_exceeds_600_lines():
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LIBRARY_LINES
    }
    assert not too_long, f"split these library files (>{MAX_LIBRARY_LINES} lines): {too_long}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, counting imports inside functions and under
    ``TYPE_CHECKING`` (every ``import`` statement anywhere in the file)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            deps.update(c for c in candidates if c in files and c != name)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_import_in_the_package_resolves():
    """Imports inside functions run only on some paths (CUDA's, say): each one must name a module and names
    that exist, checked here without running those paths."""
    import importlib

    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (
                node.level or (node.module or "").startswith("vramferry")
            ):
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            try:
                module = importlib.import_module(target)
            except ImportError as exc:
                broken.append(f"{path.relative_to(ROOT)}:{node.lineno} {target} ({exc})")
                continue
            for alias in node.names:
                if (
                    not hasattr(module, alias.name)
                    and importlib.util.find_spec(f"{target}.{alias.name}") is None
                ):
                    broken.append(f"{path.relative_to(ROOT)}:{node.lineno} {target}.{alias.name}")
    assert not broken, "imports that fail: " + "; ".join(broken)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_function_exceeds_80_lines():
    too_long = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks[:2] for line in block.strip().splitlines() if line.strip()]


def test_readme_opens_with_the_demo_and_the_test_command():
    commands = _readme_commands()
    assert len(commands) >= 2
    demo, tests = commands[0], commands[1]
    assert demo.startswith("pip install torch==2.13.0") and "vramferry generate" in demo
    assert tests.startswith("pip install torch==2.13.0") and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci.splitlines()


def test_import_initialises_no_cuda_and_changes_no_torch_global():
    code = (
        "import torch; before = (torch.get_default_dtype(), torch.backends.cudnn.benchmark, "
        "torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads());"
        "import vramferry, vramferry.api, vramferry.planning, vramferry.discovery, vramferry.runtime.install;"
        "after = (torch.get_default_dtype(), torch.backends.cudnn.benchmark, "
        "torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads());"
        "assert before == after, (before, after);"
        "assert not torch.cuda.is_initialized();"
        "import sys; assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
