"""Ray beyond one process: a two-node cluster on loopback, and two runs at once on one machine.

Both are end-to-end checks (marked slow): they start real Ray clusters in subprocesses, because the
test session's own in-process Ray (the `ray_session` fixture) cannot be shared with them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from fedsim.cli import main
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = SMALL.replace("rounds = 4", "rounds = 3")
TIMEOUT = 240  # seconds for one subprocess; each test takes well under a minute on 2 cores
CHILD_TIMEOUT = 90  # seconds for `fedsim run --address` inside the cluster script (about 10 s normally)


def metrics_without_wall_time(run_dir: Path) -> list[list[str]]:
    """metrics.csv as written (strings, so the comparison is bit for bit), wall_time dropped."""
    rows = list(csv.reader(io.StringIO((run_dir / "metrics.csv").read_text())))
    drop = rows[0].index("wall_time")
    return [[cell for i, cell in enumerate(row) if i != drop] for row in rows]


def inline_run(scenario: Path, out: Path) -> list[list[str]]:
    code = main(["run", str(scenario), "--out", str(out), "--executor", "inline", "--no-progress"])
    assert code == 0
    return metrics_without_wall_time(out / "small")


def child_env(marker: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["FEDSIM_TEST_MARKER"] = marker  # inherited by every process the child starts, Ray's included
    return env


def marked_pids(marker: str) -> list[int]:
    """Processes (readable to us) whose environment carries `marker`: what a test started."""
    needle = f"FEDSIM_TEST_MARKER={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def kill_marked(marker: str) -> list[int]:
    """Kill, by pid, the processes that carry this test's marker; returns their pids."""
    pids = marked_pids(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return pids


def wait_or_kill(procs: list[subprocess.Popen], marker: str, timeout: float) -> list[tuple[int, str, str]]:
    """Wait for every process; past the timeout kill them (and what they started) by pid."""
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            leftovers = kill_marked(marker)
            pytest.fail(f"pid {proc.pid} hung past {timeout:.0f}s (killed it and {leftovers});\nstdout:\n{out}\nstderr:\n{err}")
        results.append((proc.returncode, out, err))
    return results


def no_leftovers(marker: str, grace: float = 20.0) -> list[int]:
    """Pids still carrying the marker after `grace` seconds (Ray's daemons exit asynchronously)."""
    deadline = time.monotonic() + grace
    while True:
        left = marked_pids(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def listening(pids: list[int]) -> set[str]:
    """The TCP addresses ("ip:port") that these processes listen on, from /proc (no ss, no psutil)."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(_decode(fields[1]))
    return found


def _decode(hexaddr: str) -> str:
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ".".join(str(b) for b in raw[::-1])
    else:
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        if raw[:12] == b"\0" * 10 + b"\xff\xff":  # an IPv4-mapped IPv6 address
            ip = ".".join(str(b) for b in raw[12:])
        elif raw == b"\0" * 15 + b"\x01":
            ip = "::1"
        elif raw == b"\0" * 16:
            ip = "::"  # every interface
        else:
            ip = ":".join(raw[i:i + 2].hex() for i in range(0, 16, 2))
    return f"{ip}:{int(port, 16)}"


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def on_loopback(address: str) -> bool:
    return address.startswith(("127.", "::1:", "localhost"))


# The cluster lives in its own process: it starts a head and a second node on loopback, runs
# `fedsim run --address` as a child while recording which sockets the cluster's processes (and
# the child's) listen on, then shuts the cluster down. It prints one JSON line.
CLUSTER_SCRIPT = textwrap.dedent(
    r"""
    import json, os, subprocess, sys, threading, time
    from pathlib import Path

    from ray.cluster_utils import Cluster

    from tests.test_cluster import descendants, listening

    scenario, out = sys.argv[1], sys.argv[2]
    report = {}

    start = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"},
    )
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        report["address"] = cluster.address
        report["node_ips"] = [node.node_ip_address for node in cluster.list_all_nodes()]
        report["cluster_start_s"] = round(time.monotonic() - start, 1)
        sockets = set(listening(descendants(os.getpid())))
        child = subprocess.Popen(
            [sys.executable, "-m", "fedsim", "run", scenario, "--address", cluster.address,
             "--executor", "ray", "--workers", "2", "--out", out, "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                sockets.update(listening([os.getpid(), *descendants(os.getpid())]))
                stop.wait(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            child_out, child_err = child.communicate(timeout=float(sys.argv[3]))
        except subprocess.TimeoutExpired:
            child.kill()
            child_out, child_err = child.communicate()
            report["timed_out"] = True
        stop.set()
        watcher.join()
        report.update(returncode=child.returncode, stdout=child_out[-4000:], stderr=child_err[-4000:])
        report["listening"] = sorted(sockets)
        report["run_s"] = round(time.monotonic() - start, 1)
    finally:
        cluster.shutdown()
    print("REPORT " + json.dumps(report), flush=True)
    """
)


@pytest.mark.slow
def test_two_node_cluster_on_loopback_matches_inline(tmp_path):
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, str(script), str(scenario), str(tmp_path / "cluster"), str(CHILD_TIMEOUT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(marker), cwd=tmp_path,
    )
    expected = inline_run(scenario, tmp_path / "inline")  # meanwhile, the same scenario inline here
    ((code, out, err),) = wait_or_kill([proc], marker, TIMEOUT)
    reports = [line[len("REPORT "):] for line in out.splitlines() if line.startswith("REPORT ")]
    assert code == 0 and reports, f"cluster script failed ({code}):\n{out}\n{err}"
    report = json.loads(reports[-1])
    assert report["returncode"] == 0 and not report.get("timed_out"), (
        f"fedsim run --address {report['address']} exited {report['returncode']}"
        f"{' after hanging ' + str(CHILD_TIMEOUT) + ' s' if report.get('timed_out') else ''}:\n{report['stderr'][-2000:]}"
    )
    # the cluster and everything it runs stay on loopback
    assert report["address"].startswith(("127.", "localhost")), report["address"]
    assert len(report["node_ips"]) == 2 and all(ip.startswith("127.") for ip in report["node_ips"]), report
    outside = [address for address in report["listening"] if not on_loopback(address)]
    assert not outside, f"listening beyond loopback: {outside} (all: {report['listening']})"
    assert metrics_without_wall_time(tmp_path / "cluster" / "small") == expected
    assert not no_leftovers(marker), "processes left behind by the cluster"


@pytest.mark.slow
def test_two_runs_at_once_do_not_interfere(tmp_path):
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    marker = uuid.uuid4().hex
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fedsim", "run", str(scenario), "--executor", "ray", "--workers", "2",
             "--out", str(tmp_path / f"out{i}"), "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(marker), cwd=tmp_path,
        )
        for i in range(2)
    ]
    expected = inline_run(scenario, tmp_path / "inline")  # meanwhile, the reference in this process
    results = wait_or_kill(procs, marker, TIMEOUT)
    for i, (code, out, err) in enumerate(results):
        assert code == 0, f"run {i} exited {code}:\n{out}\n{err}"
        assert "Traceback" not in err, err
    first, second = (metrics_without_wall_time(tmp_path / f"out{i}" / "small") for i in range(2))
    assert first == second == expected
    assert len(first) == 1 + 4  # header, rounds 0..3
    left = no_leftovers(marker)
    if left:
        kill_marked(marker)
    assert not left, f"processes left behind after both runs exited: {left}"


@pytest.mark.slow
def test_default_in_process_ray_listens_only_on_loopback(tmp_path):
    """`fedsim run` with the Ray executor and no --address: nothing it starts listens beyond loopback."""
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim", "run", str(scenario), "--executor", "ray", "--workers", "2",
         "--out", str(tmp_path / "out"), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(marker), cwd=tmp_path,
    )
    seen: set[str] = set()
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= listening([proc.pid, *descendants(proc.pid), *marked_pids(marker)])
        time.sleep(0.3)
    ((code, out, err),) = wait_or_kill([proc], marker, max(1.0, deadline - time.monotonic()))
    assert code == 0, err
    assert seen, "no listening socket seen: Ray did not start?"
    outside = sorted(address for address in seen if not on_loopback(address))
    assert not outside, f"listening beyond loopback: {outside} (all: {sorted(seen)})"
    assert not no_leftovers(marker)
