"""The code's shape: imports flow one way (rcgrpo <- services <- the deployables <- deploy) and no module
imports itself back through others, counting imports inside functions."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rcgrpo", "services", "rollout_worker", "reward_server", "learner", "deploy", "study")
# what each package may import besides itself
ALLOWED = {
    "rcgrpo": set(),
    "services": {"rcgrpo"},
    "rollout_worker": {"rcgrpo", "services"},
    "reward_server": {"rcgrpo", "services"},
    "learner": {"rcgrpo", "services"},
    "deploy": {"rcgrpo", "services", "rollout_worker", "reward_server", "learner", "study"},
    # the research harness runs the driver and reads its checkpoints; the CLI in deploy is its entry point
    "study": {"rcgrpo", "services", "learner", "deploy"},
}


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            names = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
                    names |= {f"{node.module}.{alias.name}" for alias in node.names}
            found[module] = {name for name in names if name.split(".")[0] in PACKAGES}
    return found


def test_imports_flow_one_way():
    wrong = [
        f"{module} imports {name}"
        for module, names in project_imports().items()
        for name in names
        if name.split(".")[0] not in ALLOWED[module.split(".")[0]] | {module.split(".")[0]}
    ]
    assert wrong == []


def test_no_module_imports_itself_back():
    imports = project_imports()
    modules = set(imports)
    graph = {m: {n for n in names if n in modules and n != m} for m, names in imports.items()}
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append(" -> ".join([*path[path.index(other) :], other]))
            elif other not in state:
                visit(other, [*path, other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
