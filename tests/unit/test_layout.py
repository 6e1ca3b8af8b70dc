"""The tree shows the architecture, and stays that way (ARCHITECTURE.md).

Every module of ``modgate``, ``worker``, ``producers`` and ``console`` belongs to one layer; a
module imports only from layers below its own (or from its own package), there is no import
circle, and the light packages (``modgate``, ``producers``, ``console``) never load torch,
Pillow or numpy. Imports are read from the source, every one of them: module level, inside
functions (the lazy imports that keep processes light) and under ``TYPE_CHECKING``, since
a circle through a lazy import is still a circle. The public entry points the move must
not break are checked at the end.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("modgate", "worker", "producers", "console")

# Lowest first. A module may import from a strictly lower layer, or from its own package.
# A new package or top-level module must be placed here: the test fails until it is.
LAYERS: list[set[str]] = [
    {"modgate"},  # the light shared package: contract, keys, settings, policy, verdict, signing
    {"producers", "worker.runtime", "worker.observe", "worker.delivery"},
    {"console"},  # the review web app: only the shared package below it, nothing of the worker's
    {"worker.ingest"},  # bytes → frames
    {"worker.detectors"},  # the ensemble: prepare frames, score batches
    {"worker.device", "worker.judge"},  # the engine and the tensor path; scores → decision
    {"worker.pipeline"},  # the one place that wires the in-process stages
    {"worker.service", "worker.tools"},  # the queue service; scan, bench, samples
    {"worker.quality"},  # reads verdicts and policies, scans through tools.scan
    {"worker.cli", "worker"},  # parses, delegates; the package itself (nothing below imports it)
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# The CLI is shared by both deployables; nothing else in the worker reaches into producers.
MAY_IMPORT_PRODUCERS = {"worker.cli"}
# The console is a deployable of its own; only the CLI starts it (``modgate console``).
MAY_IMPORT_CONSOLE = {"worker.cli"}
HEAVY = ("torch", "torchvision", "transformers", "onnxruntime", "open_clip", "numpy", "PIL", "cv2")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours that ``name`` (a module, or an attribute of one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = _resolve(name)
            # `import a.b` also imports `a`; a package's own __init__ is not an edge.
            if target and target != module and not module.startswith(target + "."):
                targets.add(target)
    return targets


GRAPH = {module: _imports(module) for module in MODULES}


def _unit(module: str) -> str:
    """The layer unit of a module: its package under worker/, or the top-level package."""
    parts = module.split(".")
    if parts[0] != "worker" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2])


def test_every_module_has_a_layer():
    assert sorted({_unit(m) for m in MODULES} - RANK.keys()) == []


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, targets in GRAPH.items():
        for target in targets:
            here, there = _unit(module), _unit(target)
            if here == there:
                continue
            below = RANK[there] < RANK[here]
            producers_ok = there != "producers" or here in MAY_IMPORT_PRODUCERS
            console_ok = (here != "console" or there == "modgate") and (
                there != "console" or module in MAY_IMPORT_CONSOLE
            )
            if not (below and producers_ok and console_ok):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_circles():
    assert _circles(GRAPH) == []


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.strip().split(","))


@pytest.mark.parametrize("package", ["modgate", "producers", "console"])
def test_the_light_packages_import_nothing_heavy(package):
    names = sorted(m for m in MODULES if m.split(".")[0] == package)
    loaded = _loaded_after("import " + ", ".join(names))
    assert loaded & set(HEAVY) == set()
    assert "worker" not in loaded  # producers, the console and the shared package never import the worker


def test_the_console_app_loads_nothing_heavy_and_nothing_of_the_worker_or_producers():
    loaded = _loaded_after("import console.app; console.app.create_app")
    assert loaded & {*HEAVY, "worker", "producers"} == set()


def test_import_worker_stays_light():
    assert _loaded_after("import worker, worker.cli") & set(HEAVY) == set()


# The public entry points of the layout move: commands, task names, extras, images.
COMMANDS = {
    "scan", "worker", "serve-inference", "health", "enqueue", "serve-events", "bench", "eval", "replay",
    "calibrate", "schema", "models list", "models pull", "webhooks dead", "webhooks replay", "listen sqs",
    "banks add", "banks remove", "banks list", "banks import", "banks export", "banks add-from-verdict",
    "console",
}  # fmt: skip


def test_the_modgate_commands_are_all_there():
    import typer.main

    from worker import cli

    def walk(group, prefix=""):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from walk(command, f"{prefix}{name} ")
            else:
                yield prefix + name

    assert set(walk(typer.main.get_command(cli.app))) == COMMANDS
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"modgate": "worker.cli:main"}
    assert set(project["optional-dependencies"]) >= {"nudenet", "heif", "eval", "dev", "console"}


def test_task_names_and_queues_are_unchanged():
    from modgate import contract

    assert (contract.MODERATE_TASK, contract.MODERATE_QUEUE) == ("modgate.moderate", "modgate")
    assert (contract.WEBHOOK_TASK, contract.WEBHOOK_QUEUE) == ("modgate.deliver_webhook", "modgate.webhooks")


# The packages each image copies: the console image carries the shared package and itself only.
IMAGES = {
    "worker": ("modgate", "worker", "producers"),
    "producer": ("modgate", "worker", "producers"),
    "console": ("modgate", "console"),
}


def test_every_package_ships_in_the_wheel_and_its_images():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == [f"{p}*" for p in PACKAGES]
    assert setuptools["package-data"] == {"modgate": ["*.yaml"], "console": ["templates/*"]}
    assert (ROOT / "modgate" / "policy_default.yaml").is_file()
    assert (ROOT / "console" / "templates" / "base.html").is_file()
    assert {p for packages in IMAGES.values() for p in packages} == set(PACKAGES)
    for image, packages in IMAGES.items():
        dockerfile = (ROOT / "docker" / f"{image}.Dockerfile").read_text()
        for package in PACKAGES:
            copied = f"COPY {package} ./{package}\n" in dockerfile
            assert copied == (package in packages), (image, package)
