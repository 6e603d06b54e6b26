"""The driver's reaper: a small process that outlives the driver only to kill what the driver started.

A SIGKILLed driver (the OOM killer, `kill -9` of a stuck job) runs no cleanup, and its children are
reparented to init: the private redis-server and the reward server would run on, and a local Ray's
dashboard and runtime-env agents linger for a minute after their raylet dies (Ray binds only its own
direct children to the driver). So the driver starts a reaper first. The reaper holds the read end of
a pipe whose write end only the driver holds, and meanwhile remembers, every POLL_S, every process
below the driver (whatever thread started it). When the driver is gone, however it ended, the read
returns end-of-file, and the reaper SIGKILLs every remembered process still alive (the same pid and
start time: not a reused pid) and every process below those. A driver that exits through its own
cleanup (an error or a signal it handled included) says so on the pipe first: the reaper then kills
what lingers (Ray's workers take a moment to follow ray.shutdown) without a word, and speaks only for a
driver that died without cleaning up. The driver is made a child subreaper, so
that a process whose parent exits stays below the driver, where the reaper sees it, instead of going
to init.

Neither an environment mark (processes that set their title, as redis-server and Ray's agents do,
overwrite their environment in /proc) nor PR_SET_PDEATHSIG (it is the forking thread's death that
fires it, and Ray's raylet starts the agents) covers all of them.

Only the standard library: it starts in a fraction of a second and holds a few MB.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

POLL_S = 0.5  # how often the reaper looks at the processes below the driver
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
KILL_PASSES = 5  # a process killed while it was starting another leaves that one to the next pass
GOODBYE = b"exit"  # what a driver that ran its own cleanup writes before it ends

_lock = threading.Lock()
_started: tuple[subprocess.Popen, int] | None = None  # the reaper and the pipe's write end, never closed


def process_table() -> dict[int, tuple[int, int]]:
    """Every process's (parent pid, start time in clock ticks since boot), read from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ... starttime ...": comm may hold spaces and parentheses, so the
            # fields are counted after the last ")"; ppid is field 4, starttime field 22
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return table


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """Every process below `pid`, parents before children (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in (process_table() if table is None else table).items():
        children.setdefault(parent, []).append(child)
    found, frontier = [], [pid]
    while frontier:
        below = children.get(frontier.pop(0), [])
        found += below
        frontier += below
    return found


def kill(pids: list[int]) -> dict[int, str]:
    """SIGKILL each of `pids`; the ones killed, with their names."""
    killed = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            os.kill(pid, signal.SIGKILL)
            killed[pid] = name
        except (OSError, ValueError):  # gone meanwhile
            continue
    return killed


def reap(known: dict[int, int]) -> dict[int, str]:
    """Kill the remembered processes (pid -> start time) that are still the same processes, and every
    process below them; what was killed."""
    killed: dict[int, str] = {}
    for _ in range(KILL_PASSES):
        table = process_table()
        alive = [pid for pid, started in known.items() if table.get(pid, (0, None))[1] == started]
        below = [child for pid in alive for child in descendants(pid, table)]
        targets = [pid for pid in dict.fromkeys(alive + below) if pid not in killed and pid != os.getpid()]
        if not targets:
            break
        killed |= kill(targets)
        known |= {pid: table[pid][1] for pid in targets if pid in table}
    return killed


def start_reaper() -> None:
    """Start this process's reaper, once per process, and make this process a child subreaper."""
    global _started
    with _lock:
        if _started is not None:
            return
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
        read_end, write_end = os.pipe()  # not inheritable: no other child keeps the pipe open
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy.reaper", str(os.getpid())],
            stdin=read_end,
            start_new_session=True,  # Ctrl-C and a process-group kill are for the driver, not its reaper
        )
        os.close(read_end)
        _started = (process, write_end)
        # registered before the run's own exit hooks (ray.shutdown among them), so it runs after them
        atexit.register(_say_goodbye, write_end)


def _say_goodbye(write_end: int) -> None:
    try:
        os.write(write_end, GOODBYE)
    except OSError:  # the reaper is gone: nobody to tell
        pass


def main() -> int:
    driver = int(sys.argv[1])
    known: dict[int, int] = {}  # pid -> start time of every live process seen below the driver
    cleaned_up = False  # the driver said goodbye: it ran its own cleanup
    while True:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_S)
        if ready:
            said = os.read(sys.stdin.fileno(), 4096)
            if not said:  # end-of-file: the driver is gone
                break
            cleaned_up = cleaned_up or GOODBYE in said
        table = process_table()
        # the ones that ended are forgotten (a pid may be reused); the ones alive are kept even when no
        # longer below the driver (the driver dying, its children already reparented)
        known = {pid: started for pid, started in known.items() if table.get(pid, (0, None))[1] == started}
        known |= {pid: table[pid][1] for pid in descendants(driver, table) if pid in table}
    if (killed := reap(known)) and not cleaned_up:
        print(
            f"rcgrpo: the driver {driver} is gone; killed {len(killed)} processes it started: "
            + ", ".join(f"{pid} {name}" for pid, name in killed.items()),
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
