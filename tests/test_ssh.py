"""ssh+stdinserver end to end (SPEC §9.2, §9.5), on real pools behind the session's real sshd:
one connection for a no-change run, pull <- source, what a user sees when the ssh side is
misconfigured, the peer killed mid-transfer, and a network that stops forwarding."""
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import make_tree, snap, state, write_data, zfs
from test_replication import (Rig, assert_exit, assert_guids_equal, assert_only_known_holds,
                              fs_reports, push_report, q, zfs_logger, zrepl)

pytestmark = pytest.mark.zfs


@pytest.fixture
def rig(pools, tmp_path, ssh_bed):
    Rig.transport, Rig.bed = "ssh", ssh_bed
    yield lambda tag: Rig(pools, tmp_path, tag)
    Rig.transport, Rig.bed = "local", None


def ssh_logger(tmp_path):
    """An `ssh` first in PATH that logs each start, then execs the real one."""
    bindir = tmp_path / "sshbin"
    bindir.mkdir()
    log = tmp_path / "ssh-starts.log"
    real = subprocess.run(["sh", "-c", "command -v ssh"], capture_output=True,
                          text=True).stdout.strip()
    (bindir / "ssh").write_text('#!/bin/sh\necho "$$" >> %s\nexec %s "$@"\n' % (q(log), real))
    (bindir / "ssh").chmod(0o755)
    return {"PATH": "%s:%s" % (bindir, os.environ.get("PATH", "/usr/bin:/bin"))}, log


def test_a_no_change_run_opens_exactly_one_ssh_connection(rig, tmp_path):
    r = rig("onecon")
    make_tree(r.src, ["a", "b", "c", "c/d"])
    fss = [r.fs(x) for x in ("a", "b", "c", "c/d")]
    for fs in fss:
        snap(fs, "s1")
    r.configure(fss)
    r.ok()
    env, log = ssh_logger(tmp_path)
    job = r.ok(env=env)
    assert all(f["state"] == "uptodate" for f in fs_reports(job).values())
    assert len(log.read_text().split()) == 1
    # the default concurrency runs a remote side's steps one after another: one connection
    for fs in fss:
        snap(fs, "s2")
    log.unlink()
    job = r.ok(env=env)
    assert [f["steps_done"] for f in fs_reports(job).values()] == [1, 1, 1, 1]
    assert len(log.read_text().split()) == 1
    # an explicit concurrency.steps runs them side by side, a connection each (and a
    # retry's, where a loaded host's dial timed out)
    r.configure(fss, push_extra=["replication: {concurrency: {steps: 4}}"])
    for fs in fss:
        snap(fs, "s3")
    log.unlink()
    job = r.ok(env=env)
    assert [f["steps_done"] for f in fs_reports(job).values()] == [1, 1, 1, 1]
    assert 1 <= len(log.read_text().split()) <= len(fss) * (1 + zrepl.RETRIES_PER_ATTEMPT)
    for fs in fss:
        assert_guids_equal(r, fs)


def test_pull_from_a_source_runs_the_sources_snapshot_round(pools, tmp_path, ssh_bed):
    src, dst = pools.src + "/pullsrc", pools.dst + "/pulldst"
    make_tree(src, ["x", "x/y"])
    make_tree(dst, [])
    cfg = tmp_path / "zrepl.yml"
    cfg.write_text(
        "global: {rundir: %s}\njobs:\n"
        "  - name: source\n    type: source\n"
        "    serve: {type: stdinserver, client_identities: [host1]}\n"
        "    filesystems: {%s: true}\n"
        "    snapshotting: {type: periodic, prefix: zrepl_, interval: 10m}\n"
        "  - name: pull\n    type: pull\n    connect: %s\n    root_fs: %s\n    interval: 10m\n"
        "    pruning:\n"
        "      keep_sender: [{type: not_replicated}, {type: last_n, count: 2}]\n"
        "      keep_receiver: [{type: last_n, count: 5}]\n"
        % (q(tmp_path / "run"), q(src + "<"), ssh_bed.connect_yaml("host1"), q(dst)))
    ssh_bed.use(cfg)
    from conftest import run_cli
    import json
    for _ in range(3):
        # the names have whole seconds (zrepl's `dense` format): one round a second
        time.sleep(1.02 - time.time() % 1)
        cp = run_cli("once", "--json", "--snapshot", "always", config=cfg)
        assert cp.returncode == 0, cp.stderr + "\n".join(
            line for line in cp.stdout.splitlines() if '"error' in line or '"message' in line)
    doc = json.loads(cp.stdout)
    [job] = doc["jobs"]
    assert job["snapshotting"]["name"].startswith("zrepl_")  # the source's round, run there
    for fs in (src + "/x", src + "/x/y"):
        sent = {n.split("@")[1]: v["guid"] for n, v in state(fs).items() if "@" in n
                and n.startswith(fs + "@")}
        got = {n.split("@")[1]: v["guid"] for n, v in state(dst + "/" + fs).items() if "@" in n
               and n.startswith(dst + "/" + fs + "@")}
        assert len(sent) == 2 and set(sent.items()) <= set(got.items()) and len(got) == 3


def test_a_step_hold_the_source_refuses_fails_its_filesystem_before_its_step(
        pools, tmp_path, ssh_bed):
    """A remote sender places its step holds before the streams (one call a login, and
    none beside the streams): where the source's ZFS refuses the one on `a`'s new
    snapshot, nothing of `a`'s step runs and `b` is done; the next run catches up."""
    import json
    from conftest import run_cli
    src, dst = pools.src + "/pullhold", pools.dst + "/pullhold"
    make_tree(src, ["a", "b"])
    make_tree(dst, [])
    a, b = src + "/a", src + "/b"
    cfg = tmp_path / "zrepl.yml"
    cfg.write_text(
        "global: {rundir: %s}\njobs:\n"
        "  - name: source\n    type: source\n"
        "    serve: {type: stdinserver, client_identities: [host1]}\n"
        "    filesystems: {%s: true, %s: true}\n    snapshotting: {type: manual}\n"
        "  - name: pull\n    type: pull\n    connect: %s\n    root_fs: %s\n    interval: 10m\n"
        "    pruning: {keep_sender: [{type: regex, regex: '.*'}], "
        "keep_receiver: [{type: regex, regex: '.*'}]}\n"
        % (q(tmp_path / "run"), q(a), q(b), ssh_bed.connect_yaml("host1"), q(dst)))
    for fs in (a, b):
        snap(fs, "s1")
    ssh_bed.use(cfg)
    cp = run_cli("once", config=cfg)
    assert cp.returncode == 0, cp.stderr
    for fs in (a, b):
        snap(fs, "s2")
    env, log = zfs_logger(tmp_path, action=(
        'case "$*" in "hold zrepl_STEP_J_"*%s@s2*) '
        'echo "cannot hold \'%s@s2\': permission denied" >&2; exit 1;; esac' % (a, a)))
    ssh_bed.use(cfg, env)
    cp = run_cli("once", "--json", config=cfg)
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp.stderr
    assert "hold\tzrepl_STEP_J_" in log.read_text()      # the source's zfs refused it
    reports = {f["fs"]: f for f in json.loads(cp.stdout)["jobs"][0]["replication"]
               ["filesystems"]}
    assert reports[a]["state"] == "error" and reports[b]["state"] == "done", reports
    assert "permission denied" in reports[a]["error"]["message"], reports[a]["error"]
    names = {fs: sorted(n.split("@")[1] for n in state(dst + "/" + fs) if "@" in n)
             for fs in (a, b)}
    assert names == {a: ["s1"], b: ["s1", "s2"]}, names
    ssh_bed.use(cfg)
    cp = run_cli("once", config=cfg)
    assert cp.returncode == 0, cp.stderr
    assert sorted(n.split("@")[1] for n in state(dst + "/" + a) if "@" in n) == ["s1", "s2"]
    assert_only_known_holds(src)


@pytest.mark.parametrize("case", ["unknown-key", "unknown-host", "banner", "no-forced-command"])
def test_ssh_misconfiguration_is_one_clear_line(rig, ssh_bed, case, tmp_path):
    r = rig("mis" + case.replace("-", ""))
    make_tree(r.src, ["a"])
    snap(r.fs("a"), "s1")
    r.configure([r.fs("a")])
    text = r.cfg.read_text()
    try:
        if case == "unknown-key":
            ssh_bed.authorize("host2", False)        # host2's key is not authorized at all
            text = text.replace(str(ssh_bed.key("host1")), str(ssh_bed.key("host2")))
        elif case == "unknown-host":
            empty = tmp_path / "known_hosts"
            empty.write_text("")
            text = text.replace(str(ssh_bed.known_hosts), str(empty))
        elif case == "banner":
            ssh_bed.authorize("host2", 'command="echo Welcome to backup; %s host1",restrict'
                              % ssh_bed.forced)
            text = text.replace(str(ssh_bed.key("host1")), str(ssh_bed.key("host2")))
        else:
            ssh_bed.authorize("host2", "")
            text = text.replace(str(ssh_bed.key("host1")), str(ssh_bed.key("host2")))
        r.cfg.write_text(text)
        cp, doc = r.once()
    finally:
        ssh_bed.authorize("host2")
    assert_exit(cp, 1, doc)
    lines = [ln for ln in cp.stderr.splitlines() if "ERRO" in ln]
    want = {"unknown-key": ("authentication failed", "authorized_keys"),
            "unknown-host": ("host key", "known_hosts"),
            "banner": ("non-protocol output", "Welcome to backup"),
            "no-forced-command": ("forced command", "stdinserver")}[case]
    assert len(lines) == 1 and all(w in lines[0] for w in want), cp.stderr
    assert r.target(r.fs("a")) not in state(r.sink)


def _pids(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_the_peer_killed_mid_transfer_fails_clearly_and_the_next_run_converges(rig):
    r = rig("peerkill")
    make_tree(r.src, ["big"])
    fs = r.fs("big")
    write_data(fs, 24 << 20)
    snap(fs, "s1")
    r.configure([fs], push_extra=["send: {bandwidth_limit: {max: 2 MiB}}"])
    r.serve()
    from conftest import ZREPL_PY
    import sys
    # one attempt: the run ends with the error (with more, a later attempt of the same run
    # reconnects and converges; zrepl retries temporary errors the same way)
    proc = subprocess.Popen([sys.executable, str(ZREPL_PY), "--config", str(r.cfg), "once"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, ZREPL_REPLICATION_MAX_ATTEMPTS="1"))
    deadline = time.monotonic() + 60
    while not _pids("stdinserver host1") or not _pids("zfs receive"):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    for pid in _pids("stdinserver host1"):
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "ssh" in err and ("closed" in err or "broke" in err), err
    # the orphaned `zfs receive` ends once its stream is cut; then the next run converges
    deadline = time.monotonic() + 60
    while _pids("zfs receive .*" + fs):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r.configure([fs])
    r.ok()
    assert_guids_equal(r, fs)
    assert_only_known_holds(r.src)
    assert_only_known_holds(r.sink)


class Relay:
    """A TCP relay on 127.0.0.1 in front of the bed's sshd; freeze() stops forwarding
    (without closing anything), on the connections it has and on new ones: a cut network."""

    def __init__(self, port):
        self.target = port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.frozen = False
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            cid = len(self.conns)
            self.conns.append((a, b))
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y, cid), daemon=True).start()

    def _pump(self, x, y, cid):
        while True:
            try:
                data = x.recv(65536)
            except OSError:
                return
            if not data:
                try:
                    y.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            while self.frozen:
                time.sleep(0.2)         # hold the bytes: no EOF, no reset, nothing
            try:
                y.sendall(data)
            except OSError:
                return

    def freeze(self):
        self.frozen = True

    def close(self):
        self.listener.close()


def test_a_network_that_stops_forwarding_ends_the_run_within_the_timeout(rig, ssh_bed):
    r = rig("netcut")
    make_tree(r.src, ["big"])
    fs = r.fs("big")
    write_data(fs, 24 << 20)
    snap(fs, "s1")
    relay = Relay(ssh_bed.port)
    try:
        r.configure([fs], push_extra=["send: {bandwidth_limit: {max: 2 MiB}}",
                                      "replication: {timeout: 5s}"])
        text = r.cfg.read_text().replace(r.connect_yaml(), ssh_bed.connect_yaml(
            "host1", port=relay.port, dial_timeout="10s"))
        # the relay's port has the bed's host key
        kh = ssh_bed.known_hosts.read_text().replace("]:%d " % ssh_bed.port,
                                                     "]:%d " % relay.port)
        ssh_bed.known_hosts.write_text(ssh_bed.known_hosts.read_text() + kh)
        r.cfg.write_text(text)
        r.serve()
        from conftest import ZREPL_PY
        import sys
        proc = subprocess.Popen([sys.executable, str(ZREPL_PY), "--config", str(r.cfg), "once"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, ZREPL_REPLICATION_MAX_ATTEMPTS="1"))
        deadline = time.monotonic() + 60
        while not _pids("zfs receive .*" + fs):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)
        relay.freeze()
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=120)
        cut_to_exit = time.monotonic() - t0
        assert proc.returncode == 1, err
        assert "Traceback" not in err and "no bytes moved for 5s" in err, err
        # the watchdog (5 s), two in-attempt retries that cannot reach the host (each a
        # 5 s pause and a 10 s dial timeout: an emulated VM's ssh handshake through the
        # relay can take more than 3 s), pruning that cannot reach it either
        assert cut_to_exit < 5 + 2 * (5 + 10) + 10 + 15, cut_to_exit
        assert not _pids("zfs send .*" + fs)               # this side reaped its process
        # the far side hears nothing for its idle timeout and ends its session too
        deadline = time.monotonic() + 60
        while _pids("zfs receive .*" + fs):
            assert time.monotonic() < deadline, "the remote zfs receive was not reaped"
            time.sleep(0.5)
        print("cut to exit: %.1f s" % cut_to_exit)
    finally:
        relay.close()


def test_the_source_killed_mid_transfer_of_a_pull_fails_clearly_and_the_next_run_converges(
        pools, tmp_path, ssh_bed):
    src, dst = pools.src + "/pullkill", pools.dst + "/pullkill"
    make_tree(src, ["big"])
    make_tree(dst, [])
    fs = src + "/big"
    write_data(fs, 24 << 20)
    snap(fs, "s1")
    cfg = tmp_path / "zrepl.yml"
    cfg.write_text(
        "global: {rundir: %s}\njobs:\n"
        "  - name: source\n    type: source\n"
        "    serve: {type: stdinserver, client_identities: [host1]}\n"
        "    filesystems: {%s: true}\n    snapshotting: {type: manual}\n"
        "    send: {bandwidth_limit: {max: 2 MiB}}\n"
        "  - name: pull\n    type: pull\n    connect: %s\n    root_fs: %s\n    interval: 10m\n"
        "    pruning: {keep_sender: [{type: regex, regex: '.*'}], "
        "keep_receiver: [{type: regex, regex: '.*'}]}\n"
        % (q(tmp_path / "run"), q(fs), ssh_bed.connect_yaml("host1"), q(dst)))
    ssh_bed.use(cfg)
    from conftest import ZREPL_PY, run_cli
    import sys
    proc = subprocess.Popen([sys.executable, str(ZREPL_PY), "--config", str(cfg), "once"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, ZREPL_REPLICATION_MAX_ATTEMPTS="1"))
    deadline = time.monotonic() + 60
    while not _pids("zfs send .*" + fs):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    for pid in _pids("stdinserver host1"):
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "ssh" in err, err
    deadline = time.monotonic() + 60
    while _pids("zfs send .*" + fs):           # the orphaned send dies on its broken pipe
        assert time.monotonic() < deadline, "the source's zfs send was not reaped"
        time.sleep(0.2)
    cp = run_cli("once", config=cfg)
    assert cp.returncode == 0, cp.stderr
    got = {n: v["guid"] for n, v in state(dst + "/" + fs).items() if "@" in n}
    assert got == {dst + "/" + fs + "@s1": state(fs + "@s1")[fs + "@s1"]["guid"]}
    assert_only_known_holds(src)


# --- SPEC §9.7: bandwidth_limit over the wire, on whichever side configures it ------------

BW = "bandwidth_limit: {max: 1 MiB, bucket_capacity: 128 KiB}"
BW_BYTES = 5 << 20          # 5 MiB at 1 MiB/s: at least ~4.8 s whichever side holds it back


@pytest.mark.parametrize("side", ["push-send", "sink-recv"])
def test_a_push_honours_the_bandwidth_limit_of_either_side(rig, side):
    r = rig("bw" + side.replace("-", ""))
    make_tree(r.src, ["a"])
    fs = r.fs("a")
    write_data(fs, BW_BYTES)
    snap(fs, "s1")
    if side == "push-send":
        r.configure([fs], push_extra=["send: {%s}" % BW])
    else:                       # enforced by the stdinserver on the far side
        r.configure([fs], sink_extra=["recv: {%s}" % BW])
    t0 = time.monotonic()
    job = r.ok()
    elapsed = time.monotonic() - t0
    assert fs_reports(job)[fs]["bytes_replicated"] >= BW_BYTES
    assert elapsed >= (BW_BYTES - (128 << 10)) / (1 << 20) * 0.95, elapsed
    assert_guids_equal(r, fs)


@pytest.mark.parametrize("side", ["source-send", "pull-recv"])
def test_a_pull_honours_the_bandwidth_limit_of_either_side(pools, tmp_path, ssh_bed, side):
    tag = "bw" + side.replace("-", "")
    src, dst = pools.src + "/" + tag, pools.dst + "/" + tag
    make_tree(src, ["a"])
    make_tree(dst, [])
    fs = src + "/a"
    write_data(fs, BW_BYTES)
    snap(fs, "s1")
    cfg = tmp_path / "zrepl.yml"
    cfg.write_text(
        "global: {rundir: %s}\njobs:\n"
        "  - name: source\n    type: source\n"
        "    serve: {type: stdinserver, client_identities: [host1]}\n"
        "    filesystems: {%s: true}\n    snapshotting: {type: manual}\n%s"
        "  - name: pull\n    type: pull\n    connect: %s\n    root_fs: %s\n    interval: 10m\n%s"
        "    pruning: {keep_sender: [{type: regex, regex: '.*'}], "
        "keep_receiver: [{type: regex, regex: '.*'}]}\n"
        % (q(tmp_path / "run"), q(fs), "    send: {%s}\n" % BW if side == "source-send" else "",
           ssh_bed.connect_yaml("host1"), q(dst),
           "    recv: {%s}\n" % BW if side == "pull-recv" else ""))
    ssh_bed.use(cfg)
    from conftest import run_cli
    t0 = time.monotonic()
    cp = run_cli("once", config=cfg)
    elapsed = time.monotonic() - t0
    assert cp.returncode == 0, cp.stderr
    assert elapsed >= (BW_BYTES - (128 << 10)) / (1 << 20) * 0.95, elapsed
    got = {n: v["guid"] for n, v in state(dst + "/" + fs).items() if "@" in n}
    assert got == {dst + "/" + fs + "@s1": state(fs + "@s1")[fs + "@s1"]["guid"]}
