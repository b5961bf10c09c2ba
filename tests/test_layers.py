"""The package's imports point only downward through its layers, and no module imports itself round a cycle.

Read from the source with ``ast`` (nothing is imported), so the picture covers imports inside functions too: a lazy
import is a dependency all the same. An import under ``if TYPE_CHECKING:`` counts for the layers but not for cycles:
it names a type in an annotation and never runs (the decode engine names ``SamplingSettings`` of the generation
module that calls it).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "abel_lightning"

# Bottom to top: each level holds one or more groups, a group names module prefixes. A module may import its own group
# and every group of the levels below; the groups of one level are peers and import neither way (a callback drives any
# LightningModule through what it has, a policy and a tokenizer, never through a module class). The most specific
# prefix decides a module's group (``abel_lightning.data.toy`` sits below ``abel_lightning.data``).
LEVELS: list[dict[str, list[str]]] = [
    {
        # Plain Python over the data (formats, answers, scores, prompts) and the seams to the libraries. data.toy,
        # the toy task's problem generator, is plain Python too, and the toy model (models.tiny) is trained on it.
        "foundation": [
            "errors",
            "schemas",
            "registry",
            "hub_ids",
            "jsonl",
            "fingerprints",
            "answers",
            "arithmetic",
            "prompts",
            "regime_w",
            "rewards",
            "preferences",
            "compat",
            "distributed",
            "data.toy",
        ],
    },
    {"losses": ["losses"]},
    {"models": ["models"]},
    # The bandit allocates sampling settings (models.generation) to arms; the policy module and the rollout callback
    # use it.
    {"data": ["data"], "bandit": ["bandit"]},
    {"modules": ["modules"], "callbacks": ["callbacks"]},
    {"commands": ["compare", "report", "pipeline", "cli"]},
]

# Import edges that break the rules today, each with who removes it. The test fails once an edge here is gone, so
# that the exception is dropped with it.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(type_checking: bool = True) -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (``from x import y`` counts ``x.y`` when that
    is a module, else ``x``); ``type_checking=False`` leaves out the imports under ``if TYPE_CHECKING:``."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        type_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            for inner in ast.walk(node)
        }
        targets = set()
        for node in ast.walk(tree):
            if not type_checking and id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in paths else node.module)
        graph[name] = {t for t in targets if t in paths and t != name and t != "abel_lightning"}
    return graph


def group(module: str) -> tuple[int, str]:
    """The (level, group name) of ``module``."""
    best, depth = None, -1
    for level, groups in enumerate(LEVELS):
        for name, prefixes in groups.items():
            for prefix in prefixes:
                full = f"abel_lightning.{prefix}"
                if (module == full or module.startswith(full + ".")) and full.count(".") > depth:
                    best, depth = (level, name), full.count(".")
    if best is None:
        raise AssertionError(f"{module} is in no group: add it to LEVELS in {__file__}")
    return best


def allowed(source: str, target: str) -> bool:
    (source_level, source_group), (target_level, target_group) = group(source), group(target)
    return target_level < source_level or target_group == source_group


def test_every_import_points_down_or_within_its_group():
    wrong = [
        f"{source} ({group(source)[1]}) imports {target} ({group(target)[1]})"
        for source, targets in sorted(imports().items())
        for target in sorted(targets)
        if not allowed(source, target) and (source, target) not in KNOWN_EXCEPTIONS
    ]
    assert not wrong, "imports pointing up a level or across to a peer group:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = imports(type_checking=False)
    for edge in KNOWN_EXCEPTIONS:
        assert edge[1] in graph.get(edge[0], set()), f"{edge} no longer exists: remove it from KNOWN_EXCEPTIONS"
    graph = {source: {t for t in targets if (source, t) not in KNOWN_EXCEPTIONS} for source, targets in graph.items()}
    state: dict[str, str] = {}  # "open" while on the search path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target] if target in path else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The two checks can fail: an upward edge and a cycle planted in a copy of the package are reported."""
    fake = tmp_path / "abel_lightning"
    (fake / "data").mkdir(parents=True)
    (fake / "modules").mkdir()
    (fake / "callbacks").mkdir()
    (fake / "callbacks" / "regime_w.py").write_text("from abel_lightning.modules.policy import Answered\n")
    (fake / "pipeline.py").write_text("from abel_lightning.cli import main\n")
    (fake / "cli.py").write_text("def main():\n    from abel_lightning.pipeline import run\n")
    (fake / "data" / "gsm8k.py").write_text("from abel_lightning.modules.policy import PolicyModule\n")
    (fake / "modules" / "policy.py").write_text("from abel_lightning.compare import compare\n")
    (fake / "compare.py").write_text("from abel_lightning.data.gsm8k import load_questions\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    try:
        test_every_import_points_down_or_within_its_group()
    except AssertionError as error:
        assert "abel_lightning.data.gsm8k (data) imports abel_lightning.modules.policy (modules)" in str(error)
        assert "abel_lightning.callbacks.regime_w (callbacks) imports abel_lightning.modules.policy" in str(error)
    else:
        raise AssertionError("the upward import was not seen")
    try:
        test_no_import_cycles()
    except AssertionError as error:
        cycle = str(error).removeprefix("import cycle: ").split(" -> ")
        assert cycle[0] == cycle[-1] and set(cycle) == {
            "abel_lightning.compare",
            "abel_lightning.data.gsm8k",
            "abel_lightning.modules.policy",
        }
    else:
        raise AssertionError("the cycle was not seen")
