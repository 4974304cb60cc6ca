"""Section 13, logging (SPEC §11.3): the three formats, outlets with their own levels, a
failing outlet that stops nothing, and `once` tagging every line with job and invocation."""
import io
import json
import os
import re
import stat
import time
import sys

import pytest

from conftest import REPO, make_tree, run_cli, snap

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402

T = 1_796_292_000.25        # 2026-12-03T10:00:00.250Z


def rec(level="warn", job="push", fields=None, message='cannot "hold" it'):
    return zrepl.LogRecord(T, level, job, "repl", message, fields or {"fs": "tank/a b"})


def test_human_format():
    line = zrepl.format_record(rec(), "human")
    assert re.match(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.250[+-]\d{4} '
                    r'\[WARN\]\[push\]\[repl\]: cannot "hold" it fs="tank/a b"$', line), line
    assert zrepl.format_record(rec(), "human", with_time=False).startswith("[WARN][push]")


def test_logfmt_quotes_only_what_needs_it():
    line = zrepl.format_record(rec(fields={"fs": "tank/a b", "step": "@a", "n": 3,
                                           "eq": "x=y"}), "logfmt", with_time=False)
    assert line == ('level=warn job=push subsystem=repl msg="cannot \\"hold\\" it" '
                    'fs="tank/a b" step=@a n=3 eq="x=y"')


def test_json_is_one_object_per_line():
    doc = json.loads(zrepl.format_record(rec(fields={"fs": "a", "invocation": 2}), "json"))
    assert doc == {"time": "2026-12-03T10:00:00Z", "level": "warn", "job": "push",
                   "subsystem": "repl", "msg": 'cannot "hold" it', "fs": "a", "invocation": 2}
    assert "time" not in json.loads(zrepl.format_record(rec(), "json", with_time=False))


def test_each_outlet_has_its_own_level_and_bind_adds_tags():
    loud, quiet = io.StringIO(), io.StringIO()
    log = zrepl.Logger(outlets=[zrepl.StreamOutlet(loud, "debug", "logfmt", False),
                                zrepl.StreamOutlet(quiet, "error", "logfmt", False)])
    run = log.bind(job="snapjob", invocation=7)
    run("info", "snapshot", "taken", fs="p/a")
    run("error", "snapshot", "failed", fs="p/b")
    assert loud.getvalue().splitlines() == [
        "level=info job=snapjob subsystem=snapshot msg=\"taken\" invocation=7 fs=p/a",
        "level=error job=snapjob subsystem=snapshot msg=\"failed\" invocation=7 fs=p/b"]
    assert quiet.getvalue().splitlines() == [loud.getvalue().splitlines()[1]]


def test_a_failing_outlet_is_reported_once_on_the_first_and_stops_nothing(tmp_path):
    first = io.StringIO()
    gone = zrepl.FileOutlet(str(tmp_path / "no" / "such" / "dir.log"), "info", "human")
    log = zrepl.Logger(outlets=[zrepl.StreamOutlet(first, "warn", "human", False), gone])
    for _ in range(3):
        log("warn", "job", "still running")
    lines = first.getvalue().splitlines()
    assert lines.count("[WARN][][job]: still running") == 3
    assert sum("log outlet file failed" in ln for ln in lines) == 1, lines


def test_file_outlet_appends_0640_and_reopens_after_rotation(tmp_path):
    path = tmp_path / "zrepl.log"
    out = zrepl.FileOutlet(str(path), "info", "json", with_time=False)
    log = zrepl.Logger(outlets=[out])
    log("info", "job", "one")
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o777 == 0o640 & ~_umask()
    os.rename(path, tmp_path / "zrepl.log.1")        # logrotate
    log("info", "job", "two")                         # still into the old file
    log.reopen()                                      # SIGHUP
    log("info", "job", "three")
    assert [json.loads(x)["msg"] for x in (tmp_path / "zrepl.log.1").read_text().splitlines()] \
        == ["one", "two"]
    assert json.loads(path.read_text())["msg"] == "three"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.zfs
def test_once_logs_to_the_configured_file_tagged_with_job_and_invocation(pool, tmp_path):
    root = pool + "/logtag"
    make_tree(root, ["a"])
    snap(root + "/a", "zrepl_old")
    logfile = tmp_path / "zrepl.log"
    cfg = tmp_path / "zrepl.yml"
    cfg.write_text(
        "global:\n  rundir: %s\n  logging:\n"
        "    - {type: stdout, level: error, format: human}\n"
        "    - {type: file, level: debug, format: json, path: %s}\n"
        "jobs:\n  - name: snapjob\n    type: snap\n    filesystems: {\"%s<\": true}\n"
        "    snapshotting: {type: periodic, prefix: zrepl_, interval: 10m}\n"
        "    pruning: {keep: [{type: last_n, count: 1}]}\n" % (tmp_path / "run", logfile, root))
    cp = run_cli("once", "--snapshot", "always", config=cfg)
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == ""                            # the stdout outlet: errors only
    docs = [json.loads(x) for x in logfile.read_text().splitlines()]
    mine = [d for d in docs if d["job"] == "snapjob"]
    assert mine and all(d["invocation"] == 1 for d in mine), docs
    # the shared ZFS adapter's lines too: the snapshot and the destroy of the old one
    cmds = [d["argv"] for d in mine if d["subsystem"] == "zfs.cmd"]
    assert any(c.startswith("zfs snapshot") for c in cmds), cmds
    assert any(c.startswith("zfs destroy") and "zrepl_old" in c for c in cmds), cmds


# --- tcp outlets: a collector on 127.0.0.1 -------------------------------------------------

class Collector:
    """A TCP log collector on 127.0.0.1 that keeps every line it receives."""

    def __init__(self, port=0):
        import socket
        import threading
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.data = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                self.data += chunk
            conn.close()

    def lines(self, n, timeout=10):
        import time as t
        deadline = t.monotonic() + timeout
        while self.data.count(b"\n") < n and t.monotonic() < deadline:
            t.sleep(0.05)
        return self.data.decode().splitlines()

    def close(self):
        self.sock.close()


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_outlet_sends_lines_and_flushes_at_close():
    c = Collector()
    try:
        out = zrepl.TCPOutlet("127.0.0.1:%d" % c.port, "info", "json", retry_interval=0.2)
        log = zrepl.Logger(outlets=[out])
        for i in range(3):
            log("info", "job", "line %d" % i, fs="p/a")
        log.close()
        assert [json.loads(x)["msg"] for x in c.lines(3)] == ["line 0", "line 1", "line 2"]
    finally:
        c.close()


def test_tcp_outlet_reconnects_and_says_how_many_lines_it_dropped():
    port = _free_port()                                   # nobody listens yet
    out = zrepl.TCPOutlet("127.0.0.1:%d" % port, "info", "logfmt", retry_interval=0.2,
                          with_time=False)
    log = zrepl.Logger(outlets=[out])
    t0 = time.monotonic()
    for i in range(out.QUEUE_MAX + 200):
        log("info", "job", "n%d" % i)
    assert time.monotonic() - t0 < 2                      # a job never waits for the collector
    c = Collector(port)
    try:
        lines = c.lines(out.QUEUE_MAX + 1)
        notices = [ln for ln in lines if "log lines dropped" in ln]
        assert len(notices) == 1 and "200 log lines dropped" in notices[0], notices
        kept = [ln for ln in lines if ln not in notices]     # the oldest 1000, in order
        assert kept == ['level=info job="" subsystem=job msg="n%d"' % i
                        for i in range(out.QUEUE_MAX)], kept[:3]
    finally:
        log.close()
        c.close()


def test_lines_dropped_while_the_outlet_connects_go_into_the_same_notice():
    # lines logged while a connect is under way (here: by the connect itself) find the
    # queue full and are dropped; they belong in the one notice, not in a second one
    port = _free_port()

    class Outlet(zrepl.TCPOutlet):
        late = 0

        def _connect(self):
            for _ in range(50):
                Outlet.late += 1
                log("info", "job", "late")
            return super()._connect()

    out = Outlet("127.0.0.1:%d" % port, "info", "logfmt", retry_interval=0.2,
                 with_time=False)
    log = zrepl.Logger(outlets=[out])
    for i in range(out.QUEUE_MAX + 200):
        log("info", "job", "n%d" % i)
    c = Collector(port)
    try:
        c.lines(out.QUEUE_MAX + 1)
        time.sleep(0.5)                          # a second notice would have come by now
        lines = c.lines(0)
        notices = [ln for ln in lines if "log lines dropped" in ln]
        assert len(notices) == 1, notices
        kept = [ln for ln in lines if ln not in notices]
        assert len(kept) == out.QUEUE_MAX
        emitted = out.QUEUE_MAX + 200 + Outlet.late
        assert "%d log lines dropped" % (emitted - len(kept)) in notices[0], notices
        ours = [ln for ln in kept if "late" not in ln]             # the oldest, in order
        assert ours == ['level=info job="" subsystem=job msg="n%d"' % i
                        for i in range(len(ours))]
    finally:
        log.close()
        c.close()
