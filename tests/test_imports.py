"""The project's import structure: no cycles, a pure ``kdpo`` library, no private names across packages."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kdpo", "tasks", "flows", "data_checks", "bench")


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


MODULES = project_modules()


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every absolute import in the file, module-level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def project_targets(importer: str, module: str, name: str | None) -> set[str]:
    """The project modules an import runs: the deepest one named and the packages above it (less the importer's
    own packages, which are imported before it)."""
    dotted = f"{module}.{name}" if name and f"{module}.{name}" in MODULES else module
    targets = set()
    while dotted:
        if dotted in MODULES and dotted != importer and not importer.startswith(dotted + "."):
            targets.add(dotted)
        dotted = dotted.rpartition(".")[0]
    return targets


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a path that ends where it starts), or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [module, target]
            if target not in state and (cycle := visit(target, path + [module])):
                return cycle
        state[module] = "done"
        return None

    return next((cycle for module in sorted(graph) if module not in state and (cycle := visit(module, []))), None)


def test_no_import_cycles_even_through_deferred_imports():
    graph = {name: set().union(*(project_targets(name, m, n) for m, n in imports(path)))
             for name, path in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_first():
    """Each module imported first, with no project module loaded before it (the project's modules are dropped
    from ``sys.modules`` between imports; one process keeps torch, MLflow and Prefect loaded, which cannot take
    part in a cycle of the project's own), so an ImportError of a cycle shows whichever module starts it."""
    script = (
        "import importlib, sys, traceback\n"
        f"packages = {PACKAGES!r}\n"
        "failed = []\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in packages]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=-3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_kdpo_imports_neither_prefect_nor_mlflow():
    offending = [f"{name}: {module}" for name, path in MODULES.items() if name.split(".")[0] == "kdpo"
                 for module, _ in imports(path) if module.split(".")[0] in ("prefect", "mlflow")]
    assert not offending, offending


def test_no_private_names_across_packages():
    offending = [f"{name}: from {module} import {imported}" for name, path in MODULES.items()
                 for module, imported in imports(path)
                 if imported and imported.startswith("_") and module.split(".")[0] in PACKAGES
                 and module.split(".")[0] != name.split(".")[0]]
    assert not offending, offending


ORCHESTRATION = ("prefect", "prefect_dask", "mlflow", "great_expectations", "dask", "distributed")


def test_the_library_needs_no_orchestration_stack():
    """The base install leaves Prefect, MLflow and Great Expectations to the ``pipeline`` extra."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {re.split(r"[<>=!~ \[]", spec)[0].lower().replace("-", "_") for spec in project["dependencies"]}
    assert not required & set(ORCHESTRATION)
    assert {"prefect", "mlflow", "great-expectations"} <= {re.split(r"[<>=!~ ]", spec)[0]
                                                         for spec in project["optional-dependencies"]["pipeline"]}


def test_kdpo_edits_and_reports_with_the_orchestration_stack_absent(tiny_world, tmp_path):
    """``kdpo edit`` and ``kdpo report FILE`` run where Prefect, MLflow and Great Expectations cannot be
    imported; ``kdpo report RUN_ID``, which reads MLflow, says in one line what it needs."""
    script = (
        "import importlib.abc, sys\n"
        "class Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {ORCHESTRATION!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        "from kdpo.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "KDPO_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}

    def kdpo(*argv):
        return subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    edited = kdpo("edit", "--model", tiny_world.path, "--n", 2, "--save", tmp_path / "edited",
                  "--output", tmp_path / "result.json")
    assert edited.returncode == 0, edited.stderr[-3000:]
    assert (tmp_path / "edited" / "edit_memory.safetensors").exists()
    reported = kdpo("report", tmp_path / "result.json", "--out", tmp_path / "report")
    assert reported.returncode == 0 and (tmp_path / "report" / "report.html").exists(), reported.stderr[-3000:]
    run_id = kdpo("report", "0" * 32, "--out", tmp_path / "report2")
    assert run_id.returncode == 2 and "pipeline" in run_id.stderr and len(run_id.stderr.splitlines()) == 1, \
        run_id.stderr[-3000:]
