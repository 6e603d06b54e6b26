"""Network faults between a run and its Redis: the whole `rcgrpo train` (bench/chaos.py's small run) with
its Redis in a network namespace, behind nftables rules that drop or reset its traffic. Needs root,
iproute2 and nftables (`apt-get install nftables`).

Every component (the driver, the reward server, the rollout and learner actors) reaches Redis over a
veth pair into the namespace; the rules sit on the namespace's side, so they hit all of them. In this
design the workers hand groups to the reward server through Redis too, so these are also the faults
between the workers and the reward server.

Faults:
  partition  every packet to and from Redis dropped for --partition-s seconds (30), from --fault-at
  loss       1% of the packets to and from Redis dropped, the whole run
  reset      every packet to Redis answered with a TCP reset for 2 s, from --fault-at: the connections
             open then, requests in flight included, are reset, and reconnecting fails until it ends

(Added latency needs the kernel's netem queueing discipline; where `tc qdisc add ... netem` answers
"Specified qdisc kind is unknown", as on the development machine's kernel, it cannot be tested here.)

Checks, per case, as bench/chaos.py's: the run exits 0 at total_steps, every step once, no group
trained twice, none acknowledged and lost (read back from the namespace Redis's append-only file),
nothing left running. Recovery: from the end of the fault to the first step line after it. Reported
too: the packets the fault dropped or reset (nftables counters), and the driver's `rcgrpo:` lines.

    sudo .venv/bin/python bench/netfault_chaos.py [--faults partition loss reset] [--steps 6 --fault-at 2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import chaos
import redis
import run_checks

FAULTS = ("partition", "loss", "reset")
REDIS_PORT = 6379


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


class RedisInNamespace:
    """A redis-server in its own network namespace, reached over a veth pair; nftables rules on the
    namespace's side drop or reset its traffic."""

    def __init__(self, data_dir: Path, index: int):
        self.data_dir = data_dir
        self.netns = f"rcgrpo-nf-{os.getpid()}-{index}"
        self.host_if, self.ns_if = f"rcnf{os.getpid() % 10000}h{index}", f"rcnf{os.getpid() % 10000}n{index}"
        subnet = 10 + (os.getpid() + index) % 200
        self.host_ip, self.ns_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
        self.url = f"redis://{self.ns_ip}:{REDIS_PORT}/0"
        self.process: subprocess.Popen | None = None
        self.hit = 0  # packets the removed rules dropped or reset

    def _ns(self, *command: str) -> None:
        sh("ip", "netns", "exec", self.netns, *command)

    def __enter__(self) -> RedisInNamespace:
        from services.redis_server import redis_server_executable

        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.netns)
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        self._ns("ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
        self._ns("ip", "link", "set", self.ns_if, "up")
        self._ns("ip", "link", "set", "lo", "up")
        self._ns("nft", "add", "table", "inet", "chaos")
        for chain in ("input", "output"):
            self._ns("nft", f"add chain inet chaos {chain} {{ type filter hook {chain} priority 0 ; }}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [redis_server_executable(), "--bind", self.ns_ip, "--port", str(REDIS_PORT)]
        command += ["--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec"]
        command += ["--appendfilename", "appendonly.aof", "--save", "", "--logfile", "redis.log"]
        self.process = subprocess.Popen(["ip", "netns", "exec", self.netns, *command])
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server in {self.netns} did not start") from None
                time.sleep(0.05)
        client.close()
        return self

    def drop(self, percent: int = 100) -> None:
        """Drop `percent`% of the packets to and from Redis."""
        sample = f"numgen random mod 100 < {percent} " if percent < 100 else ""
        self._ns("nft", f"add rule inet chaos input tcp dport {REDIS_PORT} {sample}counter drop")
        self._ns("nft", f"add rule inet chaos output tcp sport {REDIS_PORT} {sample}counter drop")

    def reset(self) -> None:
        """Answer every packet to Redis with a TCP reset."""
        self._ns("nft", f"add rule inet chaos input tcp dport {REDIS_PORT} counter reject with tcp reset")

    def packets_hit(self) -> int:
        """Packets the rules dropped or reset since they were added."""
        listing = subprocess.run(
            ["ip", "netns", "exec", self.netns, "nft", "list", "table", "inet", "chaos"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", listing))

    def heal(self) -> None:
        """Remove the rules, adding the packets they hit to self.hit."""
        self.hit += self.packets_hit()
        for chain in ("input", "output"):
            self._ns("nft", "flush", "chain", "inet", "chaos", chain)

    def stop_redis(self) -> None:
        """SIGTERM: Redis fsyncs its append-only file before it exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def __exit__(self, *exc_info) -> None:
        self.stop_redis()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


@dataclass
class Result:
    fault: str
    problems: list[str] = field(default_factory=list)
    fault_s: float = 0.0  # how long the fault lasted
    packets: int = 0  # packets to or from Redis the fault dropped or reset
    recovery_s: float | None = None
    wall_s: float = 0.0
    said: list[str] = field(default_factory=list)  # the driver's lines about the fault


def run_case(fault: str, index: int, workdir: Path, args) -> Result:
    runs_dir = workdir / fault
    runs_dir.mkdir(parents=True)
    result = Result(fault)
    with RedisInNamespace(runs_dir / "redis", index) as server:
        overrides = [
            f"name={chaos.RUN_NAME}",
            f"learner.total_steps={args.steps}",
            f"learner.checkpoint_every={max(1, args.fault_at - 1)}",
            "eval.num_samples=0",
            f"learner.stall_warn_s={args.stall_warn_s}",
            f"redis_url={server.url}",
            *chaos.SMALL_RUN,
        ]
        run_dir = runs_dir / chaos.RUN_NAME
        watch = run_checks.StepWatch(run_dir / "metrics.jsonl")
        if fault == "loss":
            server.drop(percent=1)
        started = time.monotonic()
        train = chaos.TrainProcess(runs_dir, overrides)
        try:
            while watch.steps() < args.fault_at and train.process.poll() is None:
                train.descendants()
                time.sleep(0.25)
            watch.new_lines()
            healed = faulted = time.monotonic()
            if fault in ("partition", "reset"):
                print(f"  {fault}: from step {watch.steps()}", flush=True)
                server.drop() if fault == "partition" else server.reset()
                time.sleep(args.partition_s if fault == "partition" else 2.0)
                server.heal()
                healed = time.monotonic()
                result.fault_s = round(healed - faulted, 1)
                while watch.new_lines() == 0 and train.process.poll() is None:
                    train.descendants()
                    time.sleep(0.25)
                if train.process.poll() in (None, 0):
                    result.recovery_s = round(time.monotonic() - healed, 1)
            rc = train.wait(timeout_s=args.timeout_s)
            result.wall_s = round(time.monotonic() - started, 1)
            if fault == "loss":
                result.fault_s = result.wall_s
            if rc != 0:
                result.problems.append(f"rcgrpo train exited {rc} (see {train.log})")
            result.problems += [f"left behind: {p}" for p in train.left_behind()]
        finally:
            train.kill_all()
        server.heal()
        result.packets = server.hit
        server.stop_redis()
        if not result.problems:
            result.problems += run_checks.check_run(run_dir, args.steps, redis_dir=runs_dir / "redis")
        result.said = [
            line.strip()
            for line in train.log.read_text(errors="replace").splitlines()
            if re.match(r"\s*rcgrpo(:| train: error)", line)
        ]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--fault-at", type=int, default=2)
    parser.add_argument("--partition-s", type=float, default=30.0)
    parser.add_argument("--stall-warn-s", type=float, default=10.0, help="learner.stall_warn_s of the runs")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temp dir, kept)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rcgrpo-netfault-"))
    print(f"network faults: {args.steps} steps, fault at step {args.fault_at}, runs under {workdir}")
    results = []
    for index, fault in enumerate(args.faults):
        result = run_case(fault, index, workdir, args)
        results.append(result)
        print(f"  {fault}: {'PASS' if not result.problems else 'FAIL'} {result}", flush=True)
    print(
        "\n| fault | result | fault lasted (s) | packets hit | recovery (s) | run wall time (s) | problems |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.fault} | {'pass' if not r.problems else 'FAIL'} | {r.fault_s} | {r.packets} | {r.recovery_s} "
            f"| {r.wall_s} | {'; '.join(r.problems) or '-'} |"
        )
    for r in results:
        print(f"\n{r.fault}: the driver said")
        print("\n".join(f"    {line}" for line in r.said) or "    nothing")
    return 0 if all(not r.problems for r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(chaos.ROOT))
    sys.exit(main())
