"""Section 12 (JobLock, RunControl, JobRunner, prepare_rundir) and the CLI commands `once`
and `status` of section 14, against real ZFS.

SPEC §1.3 (exit codes and their precedence), §1.5.2 (`once`: locks, --max-runtime, output),
§1.5.4 (`status` text layout), §1.6.2-§1.6.3 (job report, `once` and `status` documents),
§2.4 (rundir), §10.3 (stopping), §13 item 16. Slow runs are held open by a pre-hook that
waits for a file the test creates, so nothing depends on sleeping for a fixed time.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import ZREPL_PY, assert_no_traceback, make_tree, run_cli, snap, state
from test_snapper import (assert_exit, config, hook_yaml, once_json, q, script, snap_job,
                          snapshots)


RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


# --- helpers --------------------------------------------------------------------------------

def write_config(tmp_path, text):
    path = tmp_path / "zrepl.yml"
    path.write_text(text)
    return path


def start_once(cfg_path, *args):
    """`once` in the background (run_cli waits; these tests need the process meanwhile)."""
    return subprocess.Popen([sys.executable, str(ZREPL_PY), "--config", str(cfg_path), "once",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)


def gate_hook(tmp_path, name="gate"):
    """A pre-hook that announces itself (file `started`) and waits (at most 10 s) until the
    test creates the file `go`. Returns (path, started, go)."""
    started, go = tmp_path / (name + ".started"), tmp_path / (name + ".go")
    path = script(tmp_path, name,
                  '[ "$ZREPL_HOOKTYPE" = pre_snapshot ] || exit 0\n'
                  'echo "$$" > %s\n'
                  'i=0\n'
                  'while [ ! -e %s ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n'
                  % (q(started), q(go)))
    return path, started, go


def wait_for(path, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError("once ended (exit %d) before %s appeared:\n%s\n%s"
                                 % (proc.returncode, path.name, out, err))
        assert time.monotonic() < deadline, "%s did not appear" % path
        time.sleep(0.02)


def finish(proc, timeout=30):
    out, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    return out, err


def go_duration(seconds):
    """Go's time.Duration.String() for whole seconds: 0s, 59s, 1m0s, 1h2m3s."""
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return "%dh%dm%ds" % (h, m, s)
    if m:
        return "%dm%ds" % (m, s)
    return "%ds" % s


def epoch(rfc):
    import calendar
    return calendar.timegm(time.strptime(rfc, "%Y-%m-%dT%H:%M:%SZ"))


# --- SPEC §13 item 16: two simultaneous `once` of one job -------------------------------------

def test_simultaneous_once_second_is_locked(pool, tmp_path):
    make_tree(pool + "/l", [])
    fs = pool + "/l"
    gate, started, go = gate_hook(tmp_path)
    rundir = tmp_path / "run"
    cfg = write_config(tmp_path, config(rundir, snap_job("lockjob", {fs: True},
                                                         hooks=[hook_yaml(gate)])))
    t0 = time.time()
    first = start_once(cfg, "--snapshot", "always")
    try:
        wait_for(started, first)
        # the lock file says who holds it: `pid start-time`
        content = (rundir / "lockjob.lock").read_text()
        m = re.fullmatch(r"(\d+) (\d+(?:\.\d+)?)\n?", content)
        assert m, repr(content)
        assert int(m.group(1)) == first.pid
        assert int(t0) - 1 <= float(m.group(2)) <= time.time() + 1
        before = state(fs)
        second = run_cli("once", "--snapshot", "always", "--json", config=cfg)
        assert_no_traceback(second)
        assert "locked by pid %d" % first.pid in second.stderr
        assert "job lockjob is locked by pid %d" % first.pid in second.stderr
        doc = json.loads(second.stdout)
        assert [(j["job"], j["state"], j["exit_code"]) for j in doc["jobs"]] == \
            [("lockjob", "locked", 3)]
        assert state(fs) == before                    # the locked run changed nothing
    finally:
        go.write_text("")
    out, err = finish(first)
    assert first.returncode == 0, err
    assert out == "" and err == ""
    got = snapshots(fs)[fs]
    assert len(got) == 1 and got[0].startswith("zrepl_")
    report = json.loads((rundir / "last" / "lockjob.json").read_text())
    assert report["state"] == "done" and report["snapshotting"]["name"] == got[0]
    # the lock is free again: the next run gets it
    cp = run_cli("once", "--snapshot", "never", config=cfg)
    assert cp.returncode == 0, cp.stderr
    assert_exit(second, 3, doc)


# --- rundir/last/<job>.json (SPEC §1.6.2, §10.1) -------------------------------------------------

def check_error(err):
    assert set(err) >= {"class", "temporary", "local_to_fs", "kind", "message", "fs", "hint"}
    assert err["class"] in ("temporary", "local_to_fs", "permanent")
    assert isinstance(err["temporary"], bool) and isinstance(err["local_to_fs"], bool)
    assert isinstance(err["kind"], str) and isinstance(err["message"], str)


def check_time(value, nullable=False):
    if nullable and value is None:
        return
    assert isinstance(value, str) and RFC3339.match(value), value


def check_job_report(r):
    """Every member of SPEC §1.6.2, type-checked (for a snap job)."""
    assert set(r) >= {"schema", "job", "type", "state", "exit_code", "dry_run", "started_at",
                      "finished_at", "version", "snapshotting", "replication", "pruning",
                      "errors"}, sorted(r)
    assert r["schema"] == "zrepl.py/job-report/1"
    assert isinstance(r["job"], str)
    assert r["type"] in ("push", "pull", "snap", "sink", "source")
    assert r["state"] in ("running", "done", "failed", "interrupted", "timed_out", "locked")
    assert isinstance(r["exit_code"], int) and not isinstance(r["exit_code"], bool)
    assert isinstance(r["dry_run"], bool)
    check_time(r["started_at"])
    check_time(r["finished_at"], nullable=True)
    assert isinstance(r["version"], str) and r["version"]
    s = r["snapshotting"]
    if s is not None:
        assert set(s) >= {"type", "mode", "name", "filesystems"}
        assert s["type"] in ("periodic", "cron", "manual")
        assert s["mode"] in ("due", "always", "never", "schedule")
        assert s["name"] is None or isinstance(s["name"], str)
        for f in s["filesystems"]:
            assert set(f) >= {"fs", "state", "snapshot", "error", "hooks"}
            assert f["state"] in ("taken", "not_due", "skipped", "failed")
            assert f["snapshot"] is None or f["snapshot"].startswith(f["fs"] + "@")
            if f["error"] is not None:
                check_error(f["error"])
            for h in f["hooks"]:
                assert set(h) >= {"path", "edge", "exit_status", "duration_s", "output_tail",
                                  "error"}
                assert isinstance(h["path"], str) and h["edge"] in ("pre", "post")
                assert h["exit_status"] is None or isinstance(h["exit_status"], int)
                assert isinstance(h["duration_s"], (int, float)) and h["duration_s"] >= 0
                assert isinstance(h["output_tail"], str)
                if h["error"] is not None:
                    check_error(h["error"])
    assert r["replication"] is None or isinstance(r["replication"], dict)
    assert set(r["pruning"]) == {"sender", "receiver", "local"}
    for side, part in r["pruning"].items():
        if part is None:
            continue
        assert part["side"] == side and part["state"] in ("done", "failed", "skipped")
        assert isinstance(part["dry_run"], bool)
        for f in part["filesystems"]:
            assert set(f) >= {"fs", "state", "skip_reason", "snapshots", "planned_destroy",
                              "destroyed", "kept_held", "errors", "error_count"}
            assert isinstance(f["snapshots"], int) and isinstance(f["error_count"], int)
            assert all(isinstance(x, list) for x in (f["planned_destroy"], f["destroyed"],
                                                       f["kept_held"], f["errors"]))
    assert isinstance(r["errors"], list)
    for e in r["errors"]:
        check_error(e)


def test_last_report_written_atomically_with_every_member(pool, tmp_path):
    make_tree(pool + "/r", ["s"])
    snap(pool + "/r", "other")
    hook = script(tmp_path, "hook", 'echo "hook says hi"\n')
    rundir = tmp_path / "run"
    cfg = config(rundir, snap_job("report", {pool + "/r<": True}, hooks=[hook_yaml(hook)]))
    cp, doc = once_json("--snapshot", "always", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    path = rundir / "last" / "report.json"
    report = json.loads(path.read_text())
    check_job_report(report)
    assert report == doc["jobs"][0]
    assert (report["job"], report["type"], report["state"], report["exit_code"]) == \
        ("report", "snap", "done", 0)
    assert report["dry_run"] is False and report["replication"] is None
    assert report["pruning"]["sender"] is None and report["pruning"]["receiver"] is None
    name = report["snapshotting"]["name"]
    assert [(f["fs"], f["state"], f["snapshot"]) for f in report["snapshotting"]["filesystems"]] \
        == [(pool + "/r", "taken", "%s/r@%s" % (pool, name)),
            (pool + "/r/s", "taken", "%s/r/s@%s" % (pool, name))]
    assert report["snapshotting"]["filesystems"][0]["hooks"][0]["output_tail"] == "hook says hi\n"
    local = {f["fs"]: f for f in report["pruning"]["local"]["filesystems"]}
    assert local[pool + "/r"]["destroyed"] == ["other"]
    assert snapshots(pool + "/r") == {pool + "/r": [name], pool + "/r/s": [name]}
    assert epoch(report["started_at"]) <= epoch(report["finished_at"])
    # atomically: a new file is renamed over the old one; no temporary file stays behind
    inode = path.stat().st_ino
    cp = run_cli("once", "--snapshot", "never", config=cfg)
    assert cp.returncode == 0, cp.stderr
    assert os.listdir(rundir / "last") == ["report.json"]
    assert path.stat().st_ino != inode
    report2 = json.loads(path.read_text())
    check_job_report(report2)
    assert report2["snapshotting"]["mode"] == "never"


def test_once_json_document(pool, tmp_path):
    make_tree(pool + "/o", ["p", "q"])
    o, p, qq = pool + "/o", pool + "/o/p", pool + "/o/q"
    cfg = config(tmp_path / "run", snap_job("first", {p: True}), snap_job("second", {qq: True}),
                 snap_job("third", {o: True}))
    t0 = time.time()
    cp, doc = once_json("--snapshot", "always", "second", "first", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    assert set(doc) >= {"schema", "version", "started_at", "finished_at", "exit_code",
                        "dry_run", "jobs"}
    assert doc["schema"] == "zrepl.py/once/1"
    assert isinstance(doc["version"], str) and doc["version"]
    check_time(doc["started_at"])
    check_time(doc["finished_at"])
    assert int(t0) <= epoch(doc["started_at"]) <= epoch(doc["finished_at"]) <= time.time()
    assert doc["exit_code"] == 0 and doc["dry_run"] is False
    for r in doc["jobs"]:
        check_job_report(r)
    assert sorted(j["job"] for j in doc["jobs"]) == ["first", "second"]
    assert snapshots(o)[o] == []                      # `third` was not selected
    assert len(snapshots(p)[p]) == 1 and len(snapshots(qq)[qq]) == 1


def test_once_runs_selected_jobs_in_configuration_order(pool, tmp_path):
    make_tree(pool + "/o", ["p", "q"])
    p, qq = pool + "/o/p", pool + "/o/q"
    cfg = config(tmp_path / "run", snap_job("first", {p: True}), snap_job("second", {qq: True}))
    cp, doc = once_json("--snapshot", "always", "second", "first", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    assert len(snapshots(p)[p]) == 1 and len(snapshots(qq)[qq]) == 1
    assert [j["job"] for j in doc["jobs"]] == ["first", "second"]


# --- exit codes (SPEC §1.3) ----------------------------------------------------------------------

def test_failed_job_beats_locked_job(pool, tmp_path):
    import fcntl
    make_tree(pool + "/x", ["f", "g"])
    f, g = pool + "/x/f", pool + "/x/g"
    bad = script(tmp_path, "bad", "echo refusing; exit 1\n")
    rundir = tmp_path / "run"
    cfg = config(rundir, snap_job("held_elsewhere", {f: True}),
                 snap_job("failing", {g: True}, hooks=[hook_yaml(bad, fatal=True)]))
    rundir.mkdir(mode=0o700)
    fd = os.open(str(rundir / "held_elsewhere.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"%d 1700000000\n" % os.getpid())
        cp, doc = once_json("--snapshot", "always", cfg=cfg)
    finally:
        os.close(fd)
    assert "locked by pid %d" % os.getpid() in cp.stderr
    assert [(j["job"], j["state"], j["exit_code"]) for j in doc["jobs"]] == \
        [("held_elsewhere", "locked", 3), ("failing", "failed", 1)]
    assert snapshots(pool + "/x") == {pool + "/x": [], f: [], g: []}
    assert not (rundir / "last" / "held_elsewhere.json").exists()
    assert json.loads((rundir / "last" / "failing.json").read_text())["state"] == "failed"
    assert_exit(cp, 1, doc)


def test_locked_alone_exits_3(pool, tmp_path):
    import fcntl
    make_tree(pool + "/x", [])
    rundir = tmp_path / "run"
    cfg = config(rundir, snap_job("only", {pool + "/x": True}))
    rundir.mkdir(mode=0o700)
    fd = os.open(str(rundir / "only.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242 1700000000\n")
        cp = run_cli("once", "--snapshot", "always", config=cfg)
    finally:
        os.close(fd)
    assert_no_traceback(cp)
    assert "job only is locked by pid 4242" in cp.stderr
    assert snapshots(pool + "/x") == {pool + "/x": []}
    assert_exit(cp, 3)


def test_max_runtime_stops_before_the_next_job(pool, tmp_path):
    make_tree(pool + "/m", ["one", "two"])
    one, two = pool + "/m/one", pool + "/m/two"
    slow = script(tmp_path, "slow", '[ "$ZREPL_HOOKTYPE" = pre_snapshot ] && sleep 1.5\n'
                                    'exit 0\n')
    snap(two, "other")                                 # would be pruned if `second` ran
    rundir = tmp_path / "run"
    cfg = config(rundir, snap_job("first", {one: True}, hooks=[hook_yaml(slow)]),
                 snap_job("second", {two: True}))
    before_two = state(two)
    cp, doc = once_json("--snapshot", "always", "--max-runtime", "1s", cfg=cfg)
    jobs = {j["job"]: j for j in doc["jobs"]}
    assert [j["job"] for j in doc["jobs"]] == ["first", "second"]
    assert (jobs["second"]["state"], jobs["second"]["exit_code"]) == ("timed_out", 4)
    assert jobs["second"]["pruning"]["local"] is None
    assert state(two) == before_two                    # second job not run at all
    assert jobs["first"]["pruning"]["local"] is None   # no phase starts after the deadline
    assert jobs["first"]["state"] == "timed_out", jobs["first"]["snapshotting"]
    assert_exit(cp, 4, doc)


def test_sigterm_interrupts_cleanly(pool, tmp_path):
    make_tree(pool + "/i", [])
    fs = pool + "/i"
    snap(fs, "other")                                  # pruning must not run afterwards
    gate, started, go = gate_hook(tmp_path)
    rundir = tmp_path / "run"
    cfg = write_config(tmp_path, config(rundir, snap_job("term", {fs: True},
                                                         hooks=[hook_yaml(gate)])))
    before = state(fs)
    proc = start_once(cfg, "--snapshot", "always", "--json")
    try:
        wait_for(started, proc)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    finally:
        go.write_text("")               # let the hook end even if zrepl.py does not stop it
    out, err = finish(proc)
    assert time.monotonic() - t0 < 10                  # SPEC §10.3: exit within 10 s
    doc = json.loads(out)
    job = doc["jobs"][0]
    assert (job["state"], job["exit_code"]) == ("interrupted", 130)
    assert job["pruning"]["local"] is None
    assert state(fs) == before                         # not pruned, no new snapshot
    saved = json.loads((rundir / "last" / "term.json").read_text())
    assert saved["state"] == "interrupted" and saved["exit_code"] == 130
    assert os.listdir(str(rundir / "last")) == ["term.json"]

    class CP:
        returncode, stderr = proc.returncode, err
    assert_exit(CP, 130, doc)


def test_sigterm_reaches_the_running_hook(pool, tmp_path):
    make_tree(pool + "/i", [])
    fs = pool + "/i"
    log = tmp_path / "hook.log"
    started = tmp_path / "started"
    hook = script(tmp_path, "hook",
                  '[ "$ZREPL_HOOKTYPE" = pre_snapshot ] || exit 0\n'
                  'trap \'echo TERM >> %s; exit 143\' TERM\n'
                  'touch %s\n'
                  'sleep 30 &\nwait $!\n' % (q(log), q(started)))
    cfg = write_config(tmp_path, config(tmp_path / "run", snap_job("term2", {fs: True},
                                                                   hooks=[hook_yaml(hook)])))
    proc = start_once(cfg, "--snapshot", "always")
    wait_for(started, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    assert snapshots(fs)[fs] == []
    assert log.exists() and log.read_text() == "TERM\n"
    # the hook would sleep 30 s: ending well before means the TERM reached it (a loaded
    # machine needed 3 s here, so the bound is loose)
    assert time.monotonic() - t0 < 15


# --- rundir (SPEC §2.4) --------------------------------------------------------------------------

def test_world_writable_rundir_is_refused(pool, tmp_path):
    make_tree(pool + "/w", [])
    rundir = tmp_path / "run"
    rundir.mkdir()
    rundir.chmod(0o777)
    cfg = config(rundir, snap_job("ww", {pool + "/w": True}))
    before = state(pool)
    cp = run_cli("once", "--snapshot", "always", config=cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 2, cp.stderr
    assert str(rundir) in cp.stderr and "world-writable" in cp.stderr
    assert cp.stdout == ""
    assert state(pool) == before
    assert os.listdir(rundir) == []


def test_rundir_that_cannot_be_created(pool, tmp_path):
    make_tree(pool + "/w", [])
    blocker = tmp_path / "plainfile"
    blocker.write_text("")
    rundir = blocker / "run"
    cfg = config(rundir, snap_job("nodir", {pool + "/w": True}))
    before = state(pool)
    cp = run_cli("once", "--snapshot", "always", config=cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 2, cp.stderr
    assert "global.rundir" in cp.stderr and str(rundir) in cp.stderr
    assert state(pool) == before


# --- status without a daemon (SPEC §1.5.4, §1.6.3) -----------------------------------------------

def test_status_from_last_reports(pool, tmp_path):
    make_tree(pool + "/st", ["a"])
    st = pool + "/st"
    snap(st, "other")
    rundir = tmp_path / "run"
    cfg = write_config(tmp_path, config(
        rundir,
        snap_job("snapjob", {st + "<": True}),
        snap_job("idlejob", {st + "/a": True}),
        "  - name: sinkjob\n"
        "    type: sink\n"
        "    root_fs: %s\n"
        "    serve: {type: local, listener_name: disk}\n" % q(st)))
    cp = run_cli("once", "--snapshot", "always", "snapjob", config=cfg)
    assert cp.returncode == 0, cp.stderr
    report = json.loads((rundir / "last" / "snapjob.json").read_text())
    name = report["snapshotting"]["name"]
    assert snapshots(st) == {st: [name], st + "/a": [name]}
    took = go_duration(epoch(report["finished_at"]) - epoch(report["started_at"]))

    cp = run_cli("status", config=cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 0, cp.stderr
    snap_block = [
        "job snapjob (snap): idle",
        "  last: %s took=%s result=done exit=0" % (report["started_at"], took),
        "  snapshot: %s taken=2 not-due=0 failed=0" % name,
        "  prune: done destroyed=1/1 held=0 errors=0",
    ]
    assert cp.stdout == "\n".join(
        ["daemon: not running (last reports from %s)" % os.path.join(str(rundir), "last"), ""]
        + snap_block + ["", "job idlejob (snap): never-run", "", "job sinkjob (sink): never-run"]
    ) + "\n"

    cp = run_cli("status", "--job", "snapjob", config=cfg)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines()[2:] == snap_block

    cp = run_cli("status", "--json", config=cfg)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["schema"] == "zrepl.py/status/1"
    assert doc["source"] == "last-reports" and doc["daemon"] is None
    assert list(doc["jobs"]) == ["snapjob", "idlejob", "sinkjob"]
    for j in doc["jobs"].values():
        assert set(j) >= {"type", "state", "next_run_at", "current", "last"}
    sj = doc["jobs"]["snapjob"]
    assert (sj["type"], sj["state"], sj["current"]) == ("snap", "idle", None)
    assert sj["last"] == report
    check_job_report(sj["last"])
    assert (doc["jobs"]["idlejob"]["state"], doc["jobs"]["idlejob"]["last"]) == ("never-run", None)
    assert doc["jobs"]["sinkjob"]["type"] == "sink"

    for args in (["--job", "unknown"], ["--watch"], ["--watch", "--json"]):
        cp = run_cli("status", *args, config=cfg, timeout=10)
        assert_no_traceback(cp)
        assert cp.returncode == 2, (args, cp.stdout, cp.stderr)
        assert cp.stdout == ""
    assert "unknown" in run_cli("status", "--job", "unknown", config=cfg).stderr


def test_status_shows_a_running_job(pool, tmp_path):
    make_tree(pool + "/run", [])
    gate, started, go = gate_hook(tmp_path)
    rundir = tmp_path / "rundir"
    cfg = write_config(tmp_path, config(rundir, snap_job("busy", {pool + "/run": True},
                                                         hooks=[hook_yaml(gate)])))
    proc = start_once(cfg, "--snapshot", "always")
    try:
        wait_for(started, proc)
        cp = run_cli("status", "--json", config=cfg)
        assert cp.returncode == 0, cp.stderr
        assert json.loads(cp.stdout)["jobs"]["busy"]["state"] == "running"
        cp = run_cli("status", config=cfg)
        assert "job busy (snap): running" in cp.stdout.splitlines()
    finally:
        go.write_text("")
    finish(proc)
    assert proc.returncode == 0
    assert len(snapshots(pool + "/run")[pool + "/run"]) == 1


# --- job selection and output of `once` (SPEC §1.5.2) ---------------------------------------------

def test_once_refuses_passive_and_unknown_jobs(pool, tmp_path):
    make_tree(pool + "/sel", [])
    cfg = config(tmp_path / "run",
                 "  - name: sinkjob\n"
                 "    type: sink\n"
                 "    root_fs: %s\n"
                 "    serve: {type: local, listener_name: disk}\n" % q(pool + "/sel"),
                 snap_job("snapjob", {pool + "/sel": True}))
    before = state(pool)
    cp = run_cli("once", "sinkjob", config=cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 2 and cp.stdout == ""
    assert "job sinkjob is passive" in cp.stderr
    cp = run_cli("once", "snapjob", "nosuchjob", "--snapshot", "always", config=cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 2 and cp.stdout == "" and "nosuchjob" in cp.stderr
    assert state(pool) == before                # nothing was done, not even for snapjob
    assert not (tmp_path / "run").exists()


def test_successful_once_is_silent(pool, tmp_path):
    make_tree(pool + "/quiet", ["a"])
    snap(pool + "/quiet", "other")
    cfg = config(tmp_path / "run", snap_job("quiet", {pool + "/quiet<": True}))
    cp = run_cli("once", "--snapshot", "always", config=cfg)
    assert cp.returncode == 0
    assert cp.stdout == "" and cp.stderr == ""
    got = snapshots(pool + "/quiet")
    assert len(got[pool + "/quiet"]) == 1 and got[pool + "/quiet"] == got[pool + "/quiet/a"]
    assert got[pool + "/quiet"][0].startswith("zrepl_")


# --- SPEC §10.3: a signal fans out to every live run; each run stops only its own hooks --------

def test_a_signal_stops_every_live_run_and_the_hooks_of_each():
    import zrepl
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    hooks = []
    try:
        fan = zrepl.SignalFanout().install()
        a, b = fan.add(zrepl.RunControl()), fan.add(zrepl.RunControl())
        bystander = zrepl.RunControl()               # a run the fan-out does not know
        for run in (a, b, bystander):
            proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
            run.hooks.running.add(proc)
            hooks.append(proc)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not (a.should_stop() and b.should_stop()):   # the handler runs between bytecodes
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert hooks[0].wait(timeout=5) == -signal.SIGTERM
        assert hooks[1].wait(timeout=5) == -signal.SIGTERM
        assert not bystander.should_stop() and hooks[2].poll() is None
        late = fan.add(zrepl.RunControl())           # a run that starts after the signal
        assert late.should_stop() and late.hooks.stopped.is_set()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for proc in hooks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- SPEC §10.2: triggers that arrive while a job is busy are remembered once -----------------

def test_triggers_merge_by_kind_and_none_is_dropped():
    import threading
    import zrepl
    t = zrepl.Triggers()
    assert t.take(0.01) == {}
    done = []
    t.post("wakeup")
    t.post("wakeup", waiter=done.append)          # while busy: merges with the first
    t.post("round")
    got = t.take(0)
    assert sorted(got) == ["round", "wakeup"] and got["wakeup"] == [done.append]
    assert t.take(0.01) == {}                      # taken once
    later = threading.Timer(0.2, t.post, args=("wakeup",))
    later.start()
    t0 = time.monotonic()
    assert t.take(10) == {"wakeup": []}            # a post wakes a waiting job at once
    assert time.monotonic() - t0 < 5
    later.join()
