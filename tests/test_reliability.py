"""A run survives its components' crashes and never waits silently.

Fast: bad config refused in seconds before anything starts; a second run gets its own directory; the
metrics log keeps each step once; the stall deadline names what is missing, then stops the run; a
killed private Redis is restarted on its append-only file and the bus waits for it through the outage.
nothing a SIGKILLed driver started outlives it (its reaper). Slow (the whole `rcgrpo train`,
bench/chaos.py): the reward server SIGKILLed, the learner SIGKILLed, the driver SIGKILLed and resumed.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from deploy.driver import MetricsLog, check_before_start, choose_run
from deploy.reaper import descendants
from deploy.supervision import ProcessWatch, SignalStop, StallWatch
from services.bus import RunBus
from services.config import load_run_config
from services.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]


def recoveries(component: str) -> float:
    return REGISTRY.get_sample_value("rcgrpo_recoveries_total", {"component": component}) or 0.0


def test_a_missing_editor_is_refused_in_seconds_with_one_line_before_anything_starts(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "train",
            "--set",
            "editor=/nonexistent",
            "--set",
            f"runs_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("rcgrpo train: error: editor: editor directory '/nonexistent' does not exist")
    assert time.monotonic() - started < 60  # the import of torch, not a Ray or Redis start
    assert not any(tmp_path.iterdir())  # no run directory, no Redis, no reward server


def test_bad_data_source_is_refused_naming_the_field(tmp_path):
    cfg = load_run_config(None, [f"runs_dir={tmp_path}", "data.source=jsonl:/no/such/manifest.jsonl"])
    with pytest.raises(
        FileNotFoundError, match=r"^data.source: jsonl path '/no/such/manifest.jsonl' does not exist"
    ):
        check_before_start(cfg)


def test_a_second_run_gets_its_own_directory_and_resume_continues_the_newest(tmp_path):
    cfg = load_run_config(None, [f"runs_dir={tmp_path}", "name=quick"])
    assert choose_run(cfg, resume=False).name == "quick"
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint under"):
        choose_run(cfg, resume=True)
    checkpoint(tmp_path / "quick", 10)
    assert choose_run(cfg, resume=False).name == "quick-2"
    assert choose_run(cfg, resume=True).name == "quick"
    checkpoint(tmp_path / "quick-2", 4)
    assert choose_run(cfg, resume=False).name == "quick-3"
    assert choose_run(cfg, resume=True).name == "quick-2"
    checkpoint(tmp_path / "quick-2", cfg.learner.total_steps)  # finished: resuming it would train nothing
    with pytest.raises(
        ValueError, match=r"--resume: .*step_000030 is at step 30, already at learner.total_steps=30"
    ):
        choose_run(cfg, resume=True)


def checkpoint(run_dir: Path, step: int) -> None:
    """What choose_run reads of a checkpoint: its directory and its step."""
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": step}))


def test_the_metrics_log_drops_the_steps_a_restarted_learner_redoes(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.keep_through(0)  # no file yet: nothing to do
    for step in (1, 2, 3, 4):
        log.write({"step": step})
    log.keep_through(2)  # its checkpoint was at step 2
    log.write({"step": 3, "again": True})
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert rows == [{"step": 1}, {"step": 2}, {"step": 3, "again": True}]


def test_a_new_learner_that_dies_with_the_node_of_the_old_one_is_started_again(tmp_path, monkeypatch, capsys):
    """A Ray node lost (the compose cluster's worker container killed): Ray reports the learner
    unavailable before it marks the node dead, so the first replacement can be placed on that node and
    die with it before it runs. The driver starts another; one recovery, counted once."""
    import ray

    from deploy import driver

    class Replacement:
        def __init__(self, dies: bool):
            self.dies = dies

        def resume_point(self):
            if self.dies:
                raise ray.exceptions.ActorDiedError()  # "its node has died ... never ran"
            return 4, 10

        def publish_lora(self):
            return 7

    actors = driver.RunActors.__new__(driver.RunActors)  # no Ray: the actors are stand-ins
    actors.cfg = load_run_config(None, [f"runs_dir={tmp_path}"])
    actors.restarts, actors._learner_actor = driver.Counter(), "the dead learner"
    replacements, killed = iter([Replacement(dies=True), Replacement(dies=False)]), []

    def start_learner(resume):
        actors._learner_actor = next(replacements)
        return actors._learner_actor

    monkeypatch.setattr(actors, "start_learner", start_learner)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: killed.append(actor))
    monkeypatch.setattr(driver, "LEARNER_START_RETRY_S", 0.0)
    learner, step = actors.restart_learner(ray.exceptions.ActorUnavailableError("Socket closed", None))
    assert (step, actors.restarts["learner"]) == (4, 1)
    assert killed[0] == "the dead learner" and killed[1].dies  # the one that died is killed too
    out = capsys.readouterr().out
    assert "died before it ran (ActorDiedError); starting another" in out
    assert (
        "recovered learner: the learner actor died (ActorUnavailableError); restarted from step 4 as v7"
        in out
    )


def test_a_new_rollout_actor_that_dies_before_it_ran_is_started_again_uncounted(
    tmp_path, monkeypatch, capsys
):
    """The same for the rollout workers: a Ray node lost takes its workers (one counted restart each);
    their replacements, placed on the dying node, die before they run and are started again without
    counting, so a node with several workers does not use up learner.max_restarts. A worker whose
    creation fails is a crash of its own: counted."""
    import ray

    from deploy import driver

    class Ref:
        def __init__(self, done=True, error=None):
            self.done, self.error = done, error

    unavailable = ray.exceptions.ActorUnavailableError("Socket closed", None)
    # worker id -> what each of its actors does, in order: (its run() call, its ready call)
    lives = {
        "worker-0": iter(
            [(Ref(error=ray.exceptions.ActorDiedError()), Ref(done=False)), (Ref(done=False), Ref())]
        ),
        "worker-1": iter([(Ref(done=False), Ref())]),
    }
    actors = driver.RunActors.__new__(driver.RunActors)  # no Ray: the actors are stand-ins
    actors.cfg = load_run_config(None, [f"runs_dir={tmp_path}"])
    actors.restarts, actors._never_ran = driver.Counter(), driver.Counter()
    actors.workers = {
        "worker-0": (0, "actor-0", Ref(error=unavailable), Ref()),  # ran, then its node died
        "worker-1": (
            1,
            "actor-1",
            Ref(error=ray.exceptions.ActorDiedError()),
            Ref(error=ray.exceptions.RayActorError(actor_init_failed=True)),
        ),
    }

    def start_worker(i):
        run, ready = next(lives[f"worker-{i}"])
        actors.workers[f"worker-{i}"] = (i, f"actor-{i}", run, ready)

    def get(ref):
        if ref.error:
            raise ref.error

    monkeypatch.setattr(actors, "_start_worker", start_worker)
    monkeypatch.setattr(
        ray, "wait", lambda refs, timeout: ([r for r in refs if r.done], [r for r in refs if not r.done])
    )
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: None)
    actors.restart_dead_workers()  # both restarted: counted
    actors.restart_dead_workers()  # worker-0's replacement died before it ran: started again, uncounted
    actors.restart_dead_workers()  # all alive
    assert actors.restarts["rollout_worker"] == 2
    out = capsys.readouterr().out
    assert "recovered rollout_worker: worker-0 died (ActorUnavailableError)" in out
    assert "recovered rollout_worker: worker-1 died (ActorDiedError)" in out  # its creation failed
    assert out.count("rcgrpo: the new actor of worker-0 died before it ran: starting another") == 1


def test_a_stall_is_named_after_its_deadline_then_stops_the_run(capsys):
    stall = StallWatch(warn_s=0.05, abort_s=0.3, describe=lambda: "reward server http://x:1 not answering")
    stall.check()
    assert capsys.readouterr().out == ""  # before the deadline: silent
    time.sleep(0.06)
    stall.check()
    out = capsys.readouterr().out
    assert out.startswith("rcgrpo: no learner step for 0 s: reward server http://x:1 not answering")
    stall.progress()  # a step: the deadline starts again
    time.sleep(0.06)
    stall.check()
    assert "no learner step" in capsys.readouterr().out
    time.sleep(0.3)
    with pytest.raises(RuntimeError, match=r"no learner step for 0 s: reward server .* giving up after 0 s"):
        stall.check()


def test_the_first_signal_stops_the_loop_after_its_step_and_interrupts_outside_it():
    import signal

    stop = SignalStop()
    with pytest.raises(KeyboardInterrupt):  # outside the loop (starting services): at once
        stop._handle(signal.SIGTERM, None)
    stop = SignalStop()
    stop.deferred = True
    stop._handle(signal.SIGTERM, None)  # inside the loop: remembered, the step goes on
    assert stop.requested and stop.received == signal.SIGTERM


def test_descendants_lists_children_and_grandchildren_parents_first():
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(shell.stdout.readline())
        below = descendants(os.getpid())
        assert shell.pid in below and grandchild in below  # what a second signal kills
        assert below.index(shell.pid) < below.index(grandchild)
        assert descendants(shell.pid) == [grandchild]
    finally:
        shell.kill()
        os.kill(grandchild, 9)
        shell.wait()


# a driver's stand-in: its reaper, a private Redis started by a thread that has ended (as the process
# watch restarts it), and a grandchild left to init when its parent exits (as Ray's agents are)
SIGKILLED_DRIVER = """
import subprocess, sys, threading
from deploy.reaper import start_reaper
from services.redis_server import EmbeddedRedis
start_reaper()
servers = []
thread = threading.Thread(target=lambda: servers.append(EmbeddedRedis().start()))
thread.start()
thread.join()
orphan = subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
print(servers[0]._process.pid, orphan.stdout.strip(), flush=True)
threading.Event().wait()
"""


def test_nothing_a_sigkilled_driver_started_outlives_it_whatever_started_it():
    driver = subprocess.Popen(
        [sys.executable, "-c", SIGKILLED_DRIVER], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        redis_pid, orphan_pid = map(int, driver.stdout.readline().split())
        reaper_pid = next(pid for pid in descendants(driver.pid) if b"deploy.reaper" in cmdline(pid))
        time.sleep(1.0)  # the reaper has seen them (it looks every 0.5 s)
        assert alive(redis_pid) and alive(orphan_pid)  # the thread that started Redis ended: it runs on
    finally:
        driver.kill()  # also when an assertion failed: its reaper then cleans up after it
        driver.wait()
    killed = time.monotonic()
    while any(map(alive, (redis_pid, orphan_pid, reaper_pid))) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    assert not any(map(alive, (redis_pid, orphan_pid, reaper_pid)))
    assert time.monotonic() - killed < 3


# a driver's stand-in that ends through its own cleanup, leaving a child that lingers (as Ray's workers
# do for a moment after ray.shutdown)
EXITING_DRIVER = """
import subprocess
from deploy.reaper import start_reaper
start_reaper()
child = subprocess.Popen(["sleep", "300"])
print(child.pid, flush=True)
input()
"""


def test_the_reaper_cleans_up_after_a_driver_that_exits_and_speaks_only_for_one_that_died():
    for ending in ("exits", "is killed"):
        driver = subprocess.Popen(
            [sys.executable, "-c", EXITING_DRIVER],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        child = int(driver.stdout.readline())
        time.sleep(1.0)  # the reaper has seen it
        if ending == "exits":
            driver.stdin.write("\n")
            driver.stdin.flush()
        else:
            driver.kill()
        driver.wait(timeout=30)
        ended = time.monotonic()
        while alive(child) and time.monotonic() - ended < 10:
            time.sleep(0.05)
        assert not alive(child), ending
        said = driver.stderr.read()  # the reaper shares the driver's stderr
        assert ("is gone; killed 1 processes it started" in said) == (ending == "is killed"), (ending, said)


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its new parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_killed_private_redis_is_restarted_on_its_aof_and_the_bus_waits_through_the_outage(tmp_path):
    cfg = load_run_config(None, [f"runs_dir={tmp_path}", "name=outage"])
    before = recoveries("redis")
    with EmbeddedRedis(data_dir=tmp_path / "redis") as server:
        bus = RunBus(cfg, server.url)
        bus.set_task_cursor(41)
        time.sleep(1.2)  # appendfsync everysec
        with ProcessWatch(redis=server) as watch:
            server._process.kill()
            started = time.monotonic()
            bus.set_task_cursor(42)  # blocks through the outage (retries), then lands on the restarted server
            waited = time.monotonic() - started
            assert bus.task_cursor() == 42
            assert watch.restarts["redis"] == 1 and watch.failure is None
        assert waited < 10
        assert recoveries("redis") == before + 1
        bus.client.close()
    # the AOF kept what was written before and after the crash
    with EmbeddedRedis(data_dir=tmp_path / "redis") as server:
        assert int(server.client().get(cfg.keys.tasks_cursor)) == 42


def test_an_external_redis_that_hangs_is_named_while_the_bus_waits_for_it_and_counted(tmp_path, capsys):
    import signal

    cfg = load_run_config(None, [f"runs_dir={tmp_path}", "name=hang"])
    before = recoveries("redis")
    with EmbeddedRedis(data_dir=tmp_path / "redis") as server:
        url = server.url
        bus = RunBus(cfg, url)
        with ProcessWatch(redis_url=url) as watch:
            server._process.send_signal(signal.SIGSTOP)  # alive, not answering: as behind a partition
            time.sleep(5)
            out = capsys.readouterr().out
            assert f"rcgrpo: Redis {url} not answering; waiting" in out
            server._process.send_signal(signal.SIGCONT)
            bus.set_task_cursor(7)  # the components' connections were waiting, not failing
            deadline = time.monotonic() + 20
            while not watch.restarts["redis"] and time.monotonic() < deadline:
                time.sleep(0.1)
        assert bus.task_cursor() == 7
        bus.client.close()
    assert watch.restarts["redis"] == 1 and recoveries("redis") == before + 1
    assert f"rcgrpo: recovered redis: {url} answers again after" in capsys.readouterr().out


def test_a_partition_between_the_bus_and_redis_is_waited_through_and_named(tmp_path, capsys):
    import shutil
    import threading

    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None:
        pytest.skip("needs root, iproute2 and nftables (a network namespace and its rules)")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import netfault_chaos
    finally:
        sys.path.remove(str(ROOT / "bench"))
    cfg = load_run_config(None, [f"runs_dir={tmp_path}", "name=partition"])
    with netfault_chaos.RedisInNamespace(tmp_path / "redis", index=0) as server:
        bus = RunBus(cfg, server.url)
        bus.set_task_cursor(4)
        with ProcessWatch(redis_url=server.url) as watch:
            server.drop()  # every packet to and from Redis
            healing = threading.Timer(4.0, server.heal)
            healing.start()
            started = time.monotonic()
            bus.set_task_cursor(5)  # its connection waits through the partition, then carries on
            waited = time.monotonic() - started
            assert bus.task_cursor() == 5
            deadline = time.monotonic() + 20
            while not watch.restarts["redis"] and time.monotonic() < deadline:
                time.sleep(0.1)
        healing.join()
        bus.client.close()
    assert 4.0 <= waited < 30
    out = capsys.readouterr().out
    assert f"rcgrpo: Redis {server.url} not answering; waiting" in out
    assert f"rcgrpo: recovered redis: {server.url} answers again after" in out


def test_an_external_reward_server_that_stops_answering_is_waited_for_and_counted(capsys):
    from services.reward_client import RewardClient

    class Flaky(RewardClient):
        answers = iter([False, False, True])

        def ready(self):
            return next(self.answers, True)

    before = recoveries("reward_server")
    with Flaky("http://127.0.0.1:9") as client, ProcessWatch(reward_client=client) as watch:
        deadline = time.monotonic() + 20
        while not watch.restarts["reward_server"] and time.monotonic() < deadline:
            time.sleep(0.1)
    assert watch.restarts["reward_server"] == 1 and recoveries("reward_server") == before + 1
    out = capsys.readouterr().out
    assert "reward server http://127.0.0.1:9 not answering; waiting" in out
    assert "recovered reward_server: http://127.0.0.1:9 answers again after" in out


# ---------------------------------------------------------------------------------------------------
# the whole run under a fault (bench/chaos.py): small enough for a 2-core CI machine


def chaos_case(fault: str, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import chaos
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return chaos.run_case(fault, tmp_path, steps=4, fault_at=2, overrides=chaos.SMALL_RUN, timeout_s=300)


@pytest.mark.slow
def test_a_run_whose_reward_server_is_killed_restarts_it_and_completes(tmp_path):
    result = chaos_case("reward_server", tmp_path)
    assert result.passed, result.problems
    assert result.recoveries == {"reward_server": 1}


@pytest.mark.slow
def test_a_run_whose_learner_is_killed_restarts_it_from_its_checkpoint_and_completes(tmp_path):
    result = chaos_case("learner", tmp_path)
    assert result.passed, result.problems
    assert result.recoveries == {"learner": 1}


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_nothing_running_and_its_resume_completes_every_step_once(tmp_path):
    result = chaos_case("driver_sigkill", tmp_path)
    assert result.passed, result.problems  # incl. nothing left 5 s after the kill, every step once
    started = " ".join(result.started)
    for process in ("redis-server", "deploy.cli reward-server", "raylet", "gcs_server"):
        assert process in started  # the check above covered them
    assert result.cleanup_s < 5
