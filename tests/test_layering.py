"""The package's layering (docs/architecture.md): each module imports only the layers below it,
and only `p2pcold.swarm` imports hivemind."""

import ast
from pathlib import Path

import p2pcold

PACKAGE = Path(p2pcold.__file__).parent
LAYER = {
    "utils": 0, "testing": 0,
    "config": 1, "files": 1,
    "data": 2, "model": 2, "fusion": 2, "quantization": 2, "results": 2, "run_folder": 2, "scalars": 2,
    "finetune": 3, "swarm": 3, "merging": 3,
    "run_state": 4, "evaluate": 4, "publish": 4,
    "local_run": 5, "peer": 5, "repository": 5, "monitor": 5,
    "simulate": 6,
    "cli": 7,
}  # fmt: skip


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def component(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py" or path.parent != PACKAGE:
            assert component(path) in LAYER, path


def test_imports_go_down_the_layers():
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        mine = component(path)
        for name in imports(path):
            if name.startswith("p2pcold."):
                theirs = name.split(".")[1]
                assert theirs == mine or LAYER[theirs] < LAYER[mine], f"{path.relative_to(PACKAGE)} imports {name}"


def test_only_the_swarm_layer_imports_hivemind():
    for path in PACKAGE.rglob("*.py"):
        if any(name.split(".")[0] == "hivemind" for name in imports(path)):
            assert component(path) == "swarm", path
