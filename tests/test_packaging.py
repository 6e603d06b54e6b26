"""The package as a user installs it: a wheel built from the checkout, installed (not editable) into a
virtual environment outside the checkout, runs `rcgrpo --version`, `rcgrpo eval`, `rcgrpo reward-server`
and `rcgrpo train` from an empty directory, finding its default config, the shipped editor and its
schemas in the installed package.

The environment's dependencies (torch and the pinned requirements, ~1.7 GB, two minutes to install) are
installed once per dependency list and kept under RCGRPO_TEST_CACHE (default ~/.cache/rcgrpo-tests);
every run reinstalls the freshly built wheel into it. The environment never sees the checkout: no
editable install, no PYTHONPATH, and every command runs in an empty directory.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import httpx
import pytest

from services.config import CONFIGS_DIR, load_run_config, shipped_config
from study.harness import load_study

REPO = Path(__file__).resolve().parents[1]
# the checkout's own (editable) install: pyproject's version and requirements
VERSION = metadata.version("rcgrpo")
DEPENDENCIES = [r for r in metadata.requires("rcgrpo") if "extra ==" not in r]
INSTALL_TIMEOUT_S = 1200


def _run(command, timeout, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command[:3]} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def _dependencies_venv() -> Path:
    """A virtual environment holding the project's dependencies (and not the project), one per
    dependency list and Python version; older ones are removed."""
    dependencies = "\n".join([sys.version, *DEPENDENCIES])
    key = hashlib.sha256(dependencies.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("RCGRPO_TEST_CACHE", Path.home() / ".cache" / "rcgrpo-tests"))
    venv = cache / f"wheel-venv-{key}"
    if (venv / ".complete").exists():
        return venv
    for stale in cache.glob("wheel-venv-*"):  # another dependency list's, or one left half-built
        shutil.rmtree(stale)
    _run([sys.executable, "-m", "venv", venv], timeout=120)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    index = os.environ.get("TORCH_INDEX_URL")
    _run([*pip, *(["--index-url", index] if index else []), "torch==2.13.0"], timeout=INSTALL_TIMEOUT_S)
    _run([*pip, *DEPENDENCIES], timeout=INSTALL_TIMEOUT_S)
    (venv / ".complete").touch()
    return venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin directory, an environment for its commands) with the checkout's wheel installed."""
    wheels = tmp_path_factory.mktemp("wheels")
    # the build backend (setuptools) of this environment: no download, the same pin as pyproject's
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, REPO],
        timeout=300,
    )
    [wheel] = wheels.glob("rcgrpo-*.whl")
    venv = _dependencies_venv()
    _run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel],
        timeout=300,
    )
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS", "REDIS_URL", "RCGRPO_REWARD_URL")
    }
    env |= {"HF_HUB_OFFLINE": "1", "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"}
    return venv / "bin", env


@pytest.fixture
def empty_dir(tmp_path):
    directory = tmp_path / "empty"
    directory.mkdir()
    return directory


def test_shipped_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_config("configs/tiny_shapes.yaml") == CONFIGS_DIR / "tiny_shapes.yaml"
    assert load_run_config("tiny_shapes.yaml").name == "tiny-shapes"
    assert load_study("configs/study_tiny.yaml", out=tmp_path / "study").base_path.parent == CONFIGS_DIR
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_shapes.yaml").write_text("name: mine\n")
    assert load_run_config("configs/tiny_shapes.yaml").name == "mine"  # a file that exists comes first
    with pytest.raises(FileNotFoundError, match="elsewhere/tiny_shapes.yaml"):
        load_run_config("elsewhere/tiny_shapes.yaml")


@pytest.mark.slow
def test_the_installed_package_has_its_version_configs_editor_and_code_outside_the_checkout(
    installed, empty_dir
):
    bin_dir, env = installed
    version = _run([bin_dir / "rcgrpo", "--version"], timeout=120, cwd=empty_dir, env=env).stdout
    assert version.strip() == f"rcgrpo {VERSION}"
    probe = (
        "import json, deploy.cli, services.schemas, rcgrpo.tiny_editor as t, services.config as c, study.harness as s;"
        "print(json.dumps([deploy.cli.__file__, services.schemas.__file__, str(t.SHIPPED_EDITOR_DIR), "
        "str(c.DEFAULT_RUN_CONFIG), str(s.DEFAULT_STUDY_CONFIG), c.load_run_config(c.DEFAULT_RUN_CONFIG).name]))"
    )
    paths = json.loads(_run([bin_dir / "python", "-c", probe], timeout=120, cwd=empty_dir, env=env).stdout)
    site_packages = bin_dir.parent / "lib"
    for path in paths[:-1]:
        assert Path(path).is_relative_to(site_packages) and not Path(path).is_relative_to(REPO), path
        assert Path(path).exists(), path
    assert paths[-1] == "tiny-shapes"
    assert list(empty_dir.iterdir()) == []


@pytest.mark.slow
def test_eval_and_the_reward_server_run_from_an_empty_directory(installed, empty_dir):
    bin_dir, env = installed
    command = [
        bin_dir / "rcgrpo",
        "eval",
        "--data",
        "shapes",
        "--limit",
        "2",
        "--num-steps",
        "2",
        "--out",
        "ev",
    ]
    _run(command, timeout=300, cwd=empty_dir, env=env)
    metrics = json.loads((empty_dir / "ev" / "metrics.json").read_text())
    assert 0 <= metrics["overall"]["region_adherence"] <= 1, metrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            *(bin_dir / "rcgrpo", "reward-server", "--config", "configs/reward_server.yaml"),
            *("--insecure-no-auth", "--port", str(port), "--log-level", "warning"),
        ],
        cwd=empty_dir,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"rcgrpo reward-server exited: {server.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "rcgrpo reward-server not ready after 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        rewards = httpx.get(f"http://127.0.0.1:{port}/v1/rewards").json()["rewards"]
        # the shipped config's rewards, found in the package though the directory has no configs/
        served = [reward["name"] for reward in rewards]
        assert served == ["region_adherence", "background_psnr", "background_ssim", "acd"]
    finally:
        server.terminate()
        server.communicate(timeout=30)


@pytest.mark.slow
def test_train_runs_its_default_config_from_an_empty_directory(installed, empty_dir):
    bin_dir, env = installed
    fast = [
        "learner.total_steps=2",
        "eval.num_samples=4",
        "eval.grid_samples=2",
        "method.group_size=4",
        "method.num_steps=4",
        "method.anchors=2",
        "method.steps_per_anchor=2",
        "method.update_epochs=1",
        "data.num_samples=8",
        "rollout.num_workers=1",
    ]
    command = [bin_dir / "rcgrpo", "train", *(a for item in fast for a in ("--set", item))]
    _run(command, timeout=600, cwd=empty_dir, env=env)
    run_dir = empty_dir / "runs" / "tiny-shapes"  # the default config's name, under the working directory
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["eval"]["base"]) >= {"region_adherence"}
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (run_dir / "lora" / "README.md").exists()
