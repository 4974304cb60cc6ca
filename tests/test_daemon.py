"""The daemon (section 12, SPEC §1.5.1, §1.5.3, §10): schedules against a clock the test
drives, triggers that arrive while a job is busy, reset and SIGTERM mid-transfer on real
ZFS, the control socket, and `status`/`signal` against a running daemon."""
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, ZREPL_PY, assert_no_traceback, make_tree, run_cli, snap, state
from conftest import write_data, zfs
from test_replication import KEEP_ALL, assert_only_known_holds, q

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402

MiB = 1 << 20


# --- pure: schedules, signal answers --------------------------------------------------------

def test_a_grid_run_that_overran_runs_again_once_standing_for_the_latest_point():
    s = zrepl.Schedule(interval=600)
    assert s.following(1000, 1200) == (1600, 1600, 0)      # in time: the next grid point
    assert s.following(1000, 1700) == (1700, 1600, 0)      # one point passed: now, once
    assert s.following(1000, 3500) == (3500, 3400, 3)      # four passed: once, three merged
    assert zrepl.Schedule().following(1000, 5000) == (None, None, 0)      # manual


def test_cron_ticks_and_the_ones_a_long_run_missed():
    spec = zrepl.parse_cron("*/15 * * * *")
    s = zrepl.Schedule(cron=spec, zone=zrepl.load_timezone("UTC"))
    t0 = 1767225600                                         # 2026-01-01T00:00:00Z
    assert s.after(t0) == t0 + 900
    assert s.following(t0 + 900, t0 + 901) == (t0 + 1800, t0 + 1800, 0)
    assert s.following(t0 + 900, t0 + 3700) == (t0 + 3700, t0 + 3600, 2)   # 3 passed


def _config(tmp_path, text):
    p = tmp_path / "zrepl.yml"
    p.write_text(text)
    return zrepl.load_config(str(p))


PASSIVE = """global: {rundir: %s}
jobs:
  - name: sink
    type: sink
    root_fs: pool/sink
    serve: {type: stdinserver, client_identities: [a]}
  - name: snap
    type: snap
    filesystems: {"pool/a<": true}
    snapshotting: {type: periodic, prefix: zrepl_, interval: 10m}
    pruning: {keep: [{type: last_n, count: 3}]}
"""


def test_signal_answers_for_unknown_idle_passive_and_bad_ops(tmp_path):
    d = zrepl.Daemon(_config(tmp_path, PASSIVE % q(tmp_path / "run")), None,
                     zrepl.Logger(io.StringIO()))
    assert d.signal("nosuch", "wakeup")[0] == 404
    assert d.signal("snap", "reset") == (409, {"error": "job snap is not running"})
    assert d.signal("sink", "wakeup")[0] == 409
    assert d.signal("snap", "explode")[0] == 400
    assert d.signal("snap", "wakeup") == (200, {"ok": True, "queued": False})
    assert d.jobs["snap"].triggers.take(0) == {"wakeup": []}


def test_a_manual_push_may_carry_a_replication_interval_but_a_snap_job_may_not(tmp_path):
    text = """jobs:
  - name: p
    type: %s
    connect: {type: local, listener_name: x, client_identity: me}
    filesystems: {"pool/a<": true}
    snapshotting: {type: manual, interval: 10m}
    pruning: {keep_sender: [{type: last_n, count: 3}], keep_receiver: [{type: last_n, count: 3}]}
  - name: s
    type: sink
    serve: {type: local, listener_name: x}
    root_fs: pool/b
"""
    cp = run_cli("configcheck", "--skip-host-checks", config=text % "push")
    assert cp.returncode == 0, cp.stderr
    assert zrepl.Schedule.of(_config(tmp_path, text % "push").job("p")).interval == 600
    snapjob = (text % "snap").replace("    connect: {type: local, listener_name: x, "
                                      "client_identity: me}\n", "").replace(
        "{keep_sender: [{type: last_n, count: 3}], keep_receiver: [{type: last_n, count: 3}]}",
        "{keep: [{type: last_n, count: 3}]}")
    cp = run_cli("configcheck", "--skip-host-checks", config=snapjob)
    assert cp.returncode == 2 and "interval and cron schedule a push job's replication" \
        in cp.stderr, cp.stderr


# --- in-process daemons on real ZFS, with a clock the test drives ----------------------------

class ManualClock:
    """Wall time that moves only when the test says; waits poll it (20 ms of real time)."""

    def __init__(self, now=None):
        self.t = time.time() if now is None else now

    def now(self):
        return self.t

    def wait(self, cond, until):
        cond.wait(0.02)

    def advance(self, seconds):
        self.t += seconds


def wait_for(cond, timeout=60, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s" % what)


class Setup:
    """A push (or pull, snap) job and its sink on this test's subtrees of the pools,
    configured by YAML lines; `daemon()` starts an in-process Daemon on a ManualClock."""

    count = 0

    def __init__(self, pools, tmp_path):
        Setup.count += 1
        self.src = "%s/dm%d" % (pools.src, Setup.count)
        self.sink = "%s/dm%d" % (pools.dst, Setup.count)
        make_tree(self.src, ["a"])
        make_tree(self.sink, [])
        self.fs = self.src + "/a"
        self.target = self.sink + "/host1/" + self.fs
        self.rundir = tmp_path / "run"
        self.cfg = tmp_path / "zrepl.yml"
        self.log = io.StringIO()
        self.d = None

    def push(self, snapshotting, *extra, sink_extra=()):
        lines = ["global:", "  rundir: %s" % q(self.rundir),
                 "  control: {sockpath: %s}" % q(self.rundir / "control"),
                 "jobs:",
                 "  - name: sink", "    type: sink", "    root_fs: %s" % q(self.sink),
                 "    serve: {type: local, listener_name: disk}"]
        lines += ["    " + x for x in sink_extra]
        lines += ["  - name: push", "    type: push",
                  "    connect: {type: local, listener_name: disk, client_identity: host1}",
                  "    filesystems: {%s: true}" % q(self.fs),
                  "    snapshotting: %s" % snapshotting,
                  "    pruning: {keep_sender: %s, keep_receiver: %s}" % (KEEP_ALL, KEEP_ALL)]
        lines += ["    " + x for x in extra]
        self.cfg.write_text("\n".join(lines) + "\n")
        return self

    def daemon(self, clock=None):
        self.clock = clock or ManualClock()
        config = zrepl.load_config(str(self.cfg))
        self.d = zrepl.Daemon(config, zrepl.ZFS(), zrepl.Logger(self.log, "info"),
                              clock=self.clock).start()
        return self.d

    def job(self, name="push"):
        return self.d.jobs[name]

    def stop(self):
        if self.d is not None:
            self.d.stop()
            assert self.d.shutdown(20) == [], self.log.getvalue()
            self.d = None

    def runs(self, name="push"):
        """Invocations so far, from the daemon's own count of reports."""
        return self.job(name).count

    def wait_runs(self, n, name="push", timeout=120):
        return wait_for(lambda: self.runs(name) >= n, timeout,
                        "%d invocations of %s (log: %s)" % (n, name, self.log.getvalue()))


@pytest.fixture
def setup(pools, tmp_path):
    s = Setup(pools, tmp_path)
    yield s
    s.stop()


def snapshots(fs):
    return sorted(n.split("@")[1] for n in state(fs) if "@" in n)


pytestmark = pytest.mark.zfs


def test_a_periodic_push_syncs_up_with_the_newest_snapshot_then_keeps_to_the_grid(setup):
    snap(setup.fs, "zrepl_20260101_000000_000")
    made = int(zfs("get", "-H", "-p", "-o", "value", "creation",
                   setup.fs + "@zrepl_20260101_000000_000").stdout)
    setup.push("{type: periodic, prefix: zrepl_, interval: 10m}")
    d = setup.daemon(ManualClock(made + 60))
    t = setup.job()
    wait_for(lambda: t.next_run_at is not None, what="the sync point")
    assert t.next_run_at == made + 600             # the newest snapshot's creation + interval
    time.sleep(0.3)
    assert setup.runs() == 0                        # not before the sync point
    setup.clock.advance(540)
    setup.wait_runs(1)
    report = t.last
    assert report.state == "done", report
    assert report.snapshotting.mode == "schedule"
    taken = report.snapshotting.name
    assert snapshots(setup.fs) == ["zrepl_20260101_000000_000", taken]
    assert snapshots(setup.target) == [taken]       # initial replication: the newest
    assert t.next_run_at == made + 1200            # on the grid, not "run end + interval"
    assert d.status()["jobs"]["push"]["state"] == "waiting"


def test_a_pull_runs_at_start_then_every_interval(pools, tmp_path):
    s = Setup(pools, tmp_path)
    snap(s.fs, "s1")
    s.cfg.write_text("\n".join([
        "global: {rundir: %s}" % q(s.rundir), "jobs:",
        "  - name: source", "    type: source",
        "    serve: {type: local, listener_name: src}",
        "    filesystems: {%s: true}" % q(s.fs),
        "    snapshotting: {type: manual}",
        "  - name: pull", "    type: pull",
        "    connect: {type: local, listener_name: src, client_identity: me}",
        "    root_fs: %s" % q(s.sink), "    interval: 5m",
        "    pruning: {keep_sender: %s, keep_receiver: %s}" % (KEEP_ALL, KEEP_ALL)]) + "\n")
    try:
        s.daemon()
        s.wait_runs(1, "pull")                      # at start
        assert s.job("pull").last.state == "done", (s.job("pull").last, s.log.getvalue())
        assert snapshots(s.sink + "/" + s.fs) == ["s1"]
        snap(s.fs, "s2")
        time.sleep(0.3)
        assert s.runs("pull") == 1
        s.clock.advance(300)
        s.wait_runs(2, "pull")
        assert snapshots(s.sink + "/" + s.fs) == ["s1", "s2"], s.log.getvalue()
        assert s.job("source").state == "serving"
    finally:
        s.stop()


def test_a_cron_snap_job_snapshots_on_its_ticks_and_prunes_on_wakeup(pools, tmp_path):
    s = Setup(pools, tmp_path)
    s.cfg.write_text("\n".join([
        "global: {rundir: %s}" % q(s.rundir), "jobs:",
        "  - name: snap", "    type: snap",
        "    filesystems: {%s: true}" % q(s.fs),
        "    snapshotting: {type: cron, prefix: zrepl_, cron: \"*/15 * * * *\"}",
        "    pruning: {keep: [{type: last_n, count: 2, regex: \"^zrepl_\"}]}"]) + "\n")
    t0 = 1767225600 + 60                            # one minute past a quarter hour
    try:
        s.daemon(ManualClock(t0))
        t = s.job("snap")
        wait_for(lambda: t.next_run_at == t0 + 840, what="the next cron tick")
        for i in range(1, 4):
            time.sleep(1.1)     # snapshot names carry the real second: one round per second
            s.clock.advance(900)
            s.wait_runs(i, "snap")
        assert len([n for n in snapshots(s.fs) if n.startswith("zrepl_")]) == 2   # pruned
        snap(s.fs, "zrepl_extra_1")
        snap(s.fs, "zrepl_extra_2")
        assert s.d.signal("snap", "wakeup")[0] == 200
        s.wait_runs(4, "snap")
        assert t.last.snapshotting.mode == "never"     # a wakeup: prune only
        assert t.last.snapshotting.filesystems == []
        assert snapshots(s.fs) == ["zrepl_extra_1", "zrepl_extra_2"]
    finally:
        s.stop()


def _slow_push(setup, nbytes=6 * MiB):
    write_data(setup.fs, nbytes)
    snap(setup.fs, "s1")
    return setup.push("{type: manual}",
                      "send: {bandwidth_limit: {max: 1 MiB, bucket_capacity: 128 KiB}}")


def _moving(setup):
    cur = setup.d.status()["jobs"]["push"]["current"]       # the document, as served
    if cur and cur.get("replication"):
        return cur["replication"]["bytes_replicated"] > 256 << 10 and cur
    return None


def test_a_wakeup_while_busy_is_remembered_once_and_never_dropped(setup):
    _slow_push(setup, 3 * MiB).daemon()
    waiter = zrepl.Waiter()
    assert setup.d.signal("push", "wakeup", waiter) == (200, {"ok": True, "queued": False})
    live = wait_for(lambda: _moving(setup), what="bytes moving")
    assert live["replication"]["filesystems"][0]["state"] == "stepping"
    for _ in range(3):                              # three more while it runs: one run
        assert setup.d.signal("push", "wakeup") == (200, {"ok": True, "queued": True})
    waiter.event.wait(120)
    assert waiter.exit_code == 0, (waiter.report, setup.log.getvalue())
    setup.wait_runs(2)
    time.sleep(0.5)
    assert setup.runs() == 2
    assert setup.job().last.replication.filesystems[0].state == "uptodate"


def test_reset_mid_transfer_cancels_cleanly_and_the_next_run_completes(setup):
    _slow_push(setup).daemon()
    before = state(setup.fs)
    setup.d.signal("push", "wakeup")
    wait_for(lambda: _moving(setup), what="bytes moving")
    t0 = time.monotonic()
    assert setup.d.signal("push", "reset") == (200, {"ok": True, "queued": False})
    setup.wait_runs(1)
    took = time.monotonic() - t0
    report = setup.job().last
    assert report.state == "interrupted" and report.replication.state == "cancelled"
    assert took < 10, took
    assert setup.d.signal("push", "reset")[0] == 409          # idle again
    assert {n: v["guid"] for n, v in state(setup.fs).items()} == \
        {n: v["guid"] for n, v in before.items()}            # nothing lost on the sender
    assert_only_known_holds(setup.src)
    waiter = zrepl.Waiter()
    setup.d.signal("push", "wakeup", waiter)
    waiter.event.wait(120)
    assert waiter.exit_code == 0, waiter.report
    assert snapshots(setup.target) == ["s1"]


# --- the daemon as users run it: a process, its control socket, signals ----------------------

class DaemonProc:
    def __init__(self, cfg, rundir):
        self.cfg, self.rundir = cfg, rundir
        self.sock = os.path.join(str(rundir), "control")
        self.proc = subprocess.Popen([sys.executable, str(ZREPL_PY), "--config", str(cfg),
                                      "daemon"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, universal_newlines=True)
        wait_for(lambda: os.path.exists(self.sock) or self.proc.poll() is not None, 60,
                 "the control socket")
        assert self.proc.poll() is None, self.proc.communicate()

    def status(self):
        cp = run_cli("status", "--json", config=self.cfg)
        assert cp.returncode == 0, cp.stderr
        return json.loads(cp.stdout)

    def stop(self, sig=signal.SIGTERM):
        """-> (exit status, seconds to exit, everything it printed)."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=60)
        # with no logging configured the daemon logs as zrepl does: to stdout
        return self.proc.returncode, time.monotonic() - t0, out + err


def test_the_control_socket_status_and_signal_commands(setup):
    snap(setup.fs, "s1")
    setup.push("{type: manual}")
    dp = DaemonProc(setup.cfg, setup.rundir)
    try:
        doc = dp.status()
        assert doc["schema"] == "zrepl.py/status/1" and doc["source"] == "daemon"
        assert set(doc["daemon"]) == {"pid", "started_at", "version"}
        assert doc["daemon"]["pid"] == dp.proc.pid
        assert all(set(j) == {"type", "state", "next_run_at", "current", "last"}
                   for j in doc["jobs"].values()), doc
        assert doc["jobs"]["push"]["state"] == "waiting"
        assert doc["jobs"]["sink"]["state"] == "serving"
        text = run_cli("status", config=setup.cfg).stdout
        assert text.startswith("daemon: running pid=%d since=" % dp.proc.pid), text
        assert zrepl.control_request(dp.sock, "GET", "/version")[1]["pid"] == dp.proc.pid
        assert zrepl.control_request(dp.sock, "POST", "/signal", {"job": 1})[0] == 400
        cp = run_cli("signal", "reset", "push", config=setup.cfg)
        assert cp.returncode == 1 and "job push is not running" in cp.stderr, cp.stderr
        cp = run_cli("signal", "wakeup", "nosuch", config=setup.cfg)
        assert cp.returncode == 2, cp.stderr
        cp = run_cli("signal", "wakeup", "push", "--wait", config=setup.cfg)
        assert cp.returncode == 0 and cp.stdout == "", cp.stderr
        assert snapshots(setup.target) == ["s1"]
        assert dp.status()["jobs"]["push"]["last"]["state"] == "done"
        second = run_cli("daemon", config=setup.cfg, timeout=60)
        assert second.returncode == 3 and "locked by pid %d" % dp.proc.pid in second.stderr, \
            second.stderr
        cp = run_cli("once", config=setup.cfg)
        assert cp.returncode == 3, cp.stderr          # the daemon holds the job's lock
    finally:
        rc, took, err = dp.stop()
    assert rc == 0 and "Traceback" not in err, err
    assert not os.path.exists(dp.sock)
    cp = run_cli("status", config=setup.cfg)
    assert cp.stdout.startswith("daemon: not running"), cp.stdout
    cp = run_cli("signal", "wakeup", "push", config=setup.cfg)
    assert cp.returncode == 1 and "no daemon is running" in cp.stderr, cp.stderr


def test_sigterm_during_a_transfer_exits_within_ten_seconds_with_nothing_left(setup):
    _slow_push(setup)
    dp = DaemonProc(setup.cfg, setup.rundir)
    try:
        assert run_cli("signal", "wakeup", "push", config=setup.cfg).returncode == 0
        wait_for(lambda: (dp.status()["jobs"]["push"]["current"] or {}).get("replication")
                 and dp.status()["jobs"]["push"]["current"]["replication"]
                 ["bytes_replicated"] > 256 << 10, what="bytes moving")
    finally:
        rc, took, err = dp.stop()
    assert rc == 0 and "Traceback" not in err, err
    assert took < 10, took
    last = json.loads((setup.rundir / "last" / "push.json").read_text())
    assert last["state"] == "interrupted", last
    procs = subprocess.run(["pgrep", "-f", "zfs (send|recv|receive) .*%s" % setup.src],
                           stdout=subprocess.PIPE, universal_newlines=True).stdout
    assert procs == ""
    assert_only_known_holds(setup.src)


# --- soak: many invocations on compressed time -------------------------------------------------

SOAK_INVOCATIONS = int(os.environ.get("ZREPLPY_SOAK", "500"))


def _resources():
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, threading.active_count(), rss


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")
def test_soak_hundreds_of_invocations_leave_fds_threads_and_memory_flat(setup):
    """A push -> sink job scheduled every minute of a clock that jumps a minute as soon
    as the last invocation reported; a snapshot every 25th, so steps run too."""
    snap(setup.fs, "s0")
    setup.push("{type: manual, interval: 1m}")
    setup.daemon(ManualClock())
    setup.wait_runs(1)
    samples = []
    t0 = time.monotonic()
    for i in range(1, SOAK_INVOCATIONS):
        if i % 25 == 0:
            snap(setup.fs, "s%d" % i)
        if i in (50, SOAK_INVOCATIONS - 1):
            samples.append(_resources())
        setup.clock.advance(60)
        setup.wait_runs(i + 1, timeout=60)
    took = time.monotonic() - t0
    last = setup.job().last
    assert last.state == "done", last
    assert snapshots(setup.target)[-1] == snapshots(setup.fs)[-1]
    (fd0, th0, rss0), (fd1, th1, rss1) = samples
    print("soak: %d invocations in %.1f s; fds %d -> %d, threads %d -> %d, RSS %d -> %d KiB"
          % (SOAK_INVOCATIONS, took, fd0, fd1, th0, th1, rss0, rss1))
    assert fd1 <= fd0 + 2 and th1 <= th0 + 1, samples
    assert rss1 < rss0 + 20 * 1024, samples          # no growth per invocation


def test_sighup_reopens_file_outlets(setup, tmp_path):
    log = tmp_path / "zrepl.log"
    setup.push("{type: manual}")
    text = setup.cfg.read_text().replace(
        "global:\n", "global:\n  logging: [{type: file, path: %s, level: info, format: human}]\n" % q(log), 1)
    setup.cfg.write_text(text)
    dp = DaemonProc(setup.cfg, setup.rundir)
    try:
        wait_for(lambda: log.exists() and "daemon started" in log.read_text(), 30,
                 "the first log line")
        log.rename(tmp_path / "zrepl.log.1")            # what logrotate does
        dp.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.exists() and "log files reopened" in log.read_text(), 30,
                 "the reopened log file")
    finally:
        rc, took, out = dp.stop()
    assert rc == 0 and "Traceback" not in out, out
    assert "daemon stopped" in log.read_text()
