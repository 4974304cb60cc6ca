"""Section 11 (Pruner) through `once` and `prune`, against real ZFS.

SPEC §7 (what is pruned, decision, grid, execution and back-off), §1.5.8 (`prune` text and
dry-run layout), §1.6.2-§1.6.3 (PruneReport, `zrepl.py/prune/1`), §13 items 11-13, 15 (empty
keep list) and 24 (a held newest snapshot under a grid rule). Every test checks which
snapshots ZFS really has afterwards.
"""
import json
import os
import re
import subprocess
import time

import pytest

from conftest import (_ZFS_ENV, assert_no_traceback, hold, make_tree, release, run_cli, snap,
                      state, write_data, zfs)
from test_snapper import (ZFS_BIN, assert_exit, config, once_json, q, snap_job,
                          snapshots, zfs_calls, zfs_logger)


LAST3_MANUAL = ('[{type: last_n, count: 3, regex: "^zrepl_"}, '
                '{type: regex, regex: "^manual_"}]')


def prune(*args, cfg, env=None):
    cp = run_cli("prune", *args, config=cfg, env=env)
    assert_no_traceback(cp)
    return cp


def prune_json(*args, cfg, env=None):
    cp = prune("--json", *args, cfg=cfg, env=env)
    try:
        return cp, json.loads(cp.stdout)
    except ValueError:
        raise AssertionError("prune --json printed no JSON (exit %d):\n%s\n%s"
                             % (cp.returncode, cp.stdout, cp.stderr))


def by_fs(prune_report):
    return {f["fs"]: f for f in prune_report["filesystems"]}


def make_snaps(fs, *short):
    for s in short:
        snap(fs, s)


# --- SPEC §13 item 11: five rounds, last_n + regex ----------------------------------------------

def test_five_rounds_keep_last_three_and_manual(pool, tmp_path):
    make_tree(pool + "/a", ["b"])
    a, b = pool + "/a", pool + "/a/b"
    for fs in (a, b):
        make_snaps(fs, "manual_keep", "other")
    manual_guids = {fs: state(fs)[fs + "@manual_keep"]["guid"] for fs in (a, b)}
    cfg = config(tmp_path / "run", snap_job("five", {a + "<": True}, keep=LAST3_MANUAL))
    rounds = []
    last_start = 0.0
    for i in range(5):
        time.sleep(max(0.0, last_start + 1.1 - time.time()))
        last_start = time.time()
        cp, doc = once_json("--snapshot", "always", cfg=cfg)
        assert cp.returncode == 0, cp.stderr
        job = doc["jobs"][0]
        assert job["state"] == "done"
        rounds.append(job["snapshotting"]["name"])
        if i == 0:
            destroyed = {f["fs"]: f["destroyed"] for f in job["pruning"]["local"]["filesystems"]}
            assert destroyed == {a: ["other"], b: ["other"]}
    assert len(set(rounds)) == 5
    want = sorted(rounds[-3:] + ["manual_keep"])
    assert snapshots(a) == {a: want, b: want}
    for fs in (a, b):
        assert state(fs)[fs + "@manual_keep"]["guid"] == manual_guids[fs]
    # the last run destroyed exactly the round that dropped out of the newest three
    last = {f["fs"]: f for f in doc["jobs"][0]["pruning"]["local"]["filesystems"]}
    assert last[a]["destroyed"] == [rounds[1]] and last[b]["destroyed"] == [rounds[1]]


# --- SPEC §13 item 12: a held snapshot is left in place -----------------------------------------

def test_held_snapshot_is_kept_held_not_an_error(pool, tmp_path):
    make_tree(pool + "/h", [])
    fs = pool + "/h"
    make_snaps(fs, "manual_keep", "other", "junk")
    hold(fs + "@other", "mine")
    try:
        cfg = config(tmp_path / "run", snap_job("held", {fs: True}, keep=LAST3_MANUAL))
        cp = prune("--job", "held", cfg=cfg)
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout == "%s (local): destroyed 1 of 3 snapshots, kept held 1\n" % fs
        assert snapshots(fs) == {fs: ["manual_keep", "other"]}

        cp, doc = prune_json("--job", "held", cfg=cfg)
        assert cp.returncode == 0, cp.stderr
        assert doc["exit_code"] == 0
        part = doc["sides"][0]
        assert part["state"] == "done"
        e = by_fs(part)[fs]
        assert e["state"] == "done" and e["errors"] == [] and e["error_count"] == 0
        assert e["kept_held"] == ["other"] and e["destroyed"] == [] and e["planned_destroy"] == []
        other = [d for d in e["decisions"] if d["snapshot"] == "other"]
        assert other == [{"snapshot": "other", "action": "keep",
                          "reasons": ["held (userrefs=1)", "no rule keeps it"]}]
        assert state(fs)[fs + "@other"]["userrefs"] == 1
    finally:
        release(fs + "@other", "mine")


# --- SPEC §13 item 13 and §1.5.8: dry-run, JSON and exact text layout ---------------------------

def test_prune_dry_run_explains_and_changes_nothing(pool, tmp_path):
    make_tree(pool + "/a", ["b"])
    a, b = pool + "/a", pool + "/a/b"
    z = ["zrepl_20200101_00000%d_000" % i for i in range(1, 5)]
    make_snaps(a, "manual_keep", *z, "other")
    make_snaps(b, "other", "manual_x")
    hold(b + "@other", "mine")
    rundir = tmp_path / "run"
    cfg = config(rundir, snap_job("explain", {a + "<": True}, keep=LAST3_MANUAL))
    before = state(pool)
    try:
        cp, doc = prune_json("--job", "explain", "--dry-run", cfg=cfg)
        assert cp.returncode == 0, cp.stderr
        assert state(pool) == before
        assert doc["schema"] == "zrepl.py/prune/1" and doc["dry_run"] is True
        assert doc["job"] == "explain" and doc["exit_code"] == 0
        (part,) = doc["sides"]
        assert part["dry_run"] is True
        ea = by_fs(part)[a]
        assert {"snapshot": "other", "action": "destroy",
                "reasons": ["no rule keeps it"]} in ea["decisions"]
        assert [d["snapshot"] for d in ea["decisions"]] == ["manual_keep"] + z + ["other"]
        assert sorted(ea["planned_destroy"]) == ["other", z[0]] and ea["destroyed"] == []

        cp = prune("--job", "explain", "--dry-run", cfg=cfg)
        assert cp.returncode == 0, cp.stderr
        assert state(pool) == before
        w = len(z[0])
        last_n = "#1 last_n(count=3, regex=^zrepl_): %d of newest 3"
        expected = "\n".join([
            "%s (local): 6 snapshots, keep 4, destroy 2" % a,
            "  KEEP     %s  #2 regex(^manual_): matches" % "manual_keep".ljust(w),
            "  DESTROY  %s  no rule keeps it" % z[0],
            "  KEEP     %s  %s" % (z[1], last_n % 3),
            "  KEEP     %s  %s" % (z[2], last_n % 2),
            "  KEEP     %s  %s" % (z[3], last_n % 1),
            "  DESTROY  %s  no rule keeps it" % "other".ljust(w),
            "",
            "%s (local): 2 snapshots, keep 2, destroy 0" % b,
            "  KEEP     other     held (userrefs=1); no rule keeps it",
            "  KEEP     manual_x  #2 regex(^manual_): matches",
        ]) + "\n"
        assert cp.stdout == expected
        assert not rundir.exists()          # dry-run: no lock, nothing written
    finally:
        release(b + "@other", "mine")


# --- SPEC §7.2 / §2.8: an empty keep list keeps everything -----------------------------------------

def test_empty_keep_list_destroys_nothing(pool, tmp_path):
    make_tree(pool + "/k", [])
    fs = pool + "/k"
    make_snaps(fs, "zrepl_old", "other", "x")
    cfg = config(tmp_path / "run", snap_job("keepall", {fs: True}, keep="[]"))
    cp = run_cli("configcheck", config=cfg)
    assert cp.returncode == 0, cp.stderr
    assert "warning" in cp.stderr and "keep" in cp.stderr
    before = state(fs)
    cp, doc = once_json("--snapshot", "never", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    assert state(fs) == before
    e = by_fs(doc["jobs"][0]["pruning"]["local"])[fs]
    assert e["snapshots"] == 3 and e["planned_destroy"] == [] and e["destroyed"] == []
    cp, doc = prune_json("--job", "keepall", cfg=cfg)
    assert cp.returncode == 0
    assert all(d["action"] == "keep" for d in by_fs(doc["sides"][0])[fs]["decisions"])
    assert state(fs) == before


# --- SPEC §13 item 15 (scaled down) and §4.5: one destroy per snapshot on zfs-fuse ---------------

def test_many_snapshots_one_destroy_each_survivors_exact(pool, tmp_path):
    make_tree(pool + "/many", [])
    fs = pool + "/many"
    all_names = ["s%04d" % i for i in range(1, 121)]
    subprocess.run(["sh", "-c", 'for n in "$@"; do %s snapshot %s@"$n" || exit 1; done'
                    % (ZFS_BIN, q(fs)), "sh"] + all_names, check=True, env=_ZFS_ENV)
    assert snapshots(fs)[fs] == all_names
    env, zlog = zfs_logger(tmp_path)
    cfg = config(tmp_path / "run", snap_job("many", {fs: True},
                                            keep='[{type: last_n, count: 10}]'))
    cp = prune("--job", "many", cfg=cfg, env=env)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == "%s (local): destroyed 110 of 120 snapshots\n" % fs
    assert snapshots(fs)[fs] == all_names[-10:]
    destroys = zfs_calls(zlog, "destroy", pool)
    if zfs_caps_comma_destroy():
        assert len(destroys) <= 10
    else:
        # no comma lists and no % ranges on zfs-fuse: exactly one call per snapshot
        assert sorted(c[1:] for c in destroys) == [[fs + "@" + n] for n in all_names[:110]]


def zfs_caps_comma_destroy():
    """The host's `comma_destroy` capability as `version --json` reports it."""
    cp = run_cli("version", "--json")
    return json.loads(cp.stdout)["zfs"]["capabilities"]["comma_destroy"]


# --- grid on real snapshots; SPEC §13 item 24 (held newest kept, no error, twice) -----------------

def test_grid_keeps_oldest_per_bucket_and_held_newest(pool, tmp_path):
    make_tree(pool + "/g", ["all"])
    g, gall = pool + "/g", pool + "/g/all"
    for fs in (g, gall):
        make_snaps(fs, "foreign", "zrepl_1", "zrepl_2", "zrepl_3")
    hold(g + "@zrepl_3", "zrepl_last_received_J_sink")   # like a receiver's newest snapshot
    jobs = (snap_job("grid", {g: True},
                     keep='[{type: grid, grid: "1x1h | 24x1h", regex: "^zrepl_"}]') +
            snap_job("gridall", {gall: True},
                     keep='[{type: grid, grid: "1x1h(keep=all) | 24x1h", regex: "^zrepl_"}]'))
    cfg = config(tmp_path / "run", jobs)
    try:
        cp, doc = prune_json("--job", "grid", "--dry-run", cfg=cfg)
        assert cp.returncode == 0, cp.stderr
        dec = {d["snapshot"]: d for d in by_fs(doc["sides"][0])[g]["decisions"]}
        assert dec["zrepl_1"]["reasons"] == ["#1 grid(1x1h | 24x1h): bucket 1 of 25, oldest 1 kept"]
        assert dec["zrepl_2"]["action"] == "destroy" and dec["foreign"]["action"] == "destroy"
        assert dec["zrepl_3"] == {"snapshot": "zrepl_3", "action": "keep",
                                  "reasons": ["held (userrefs=1)", "no rule keeps it"]}
        for run in range(2):     # "two runs within an hour"
            cp, doc = once_json("--snapshot", "never", cfg=cfg)
            assert cp.returncode == 0, cp.stderr
            for job in doc["jobs"]:
                assert job["state"] == "done" and job["errors"] == []
            eg = by_fs(doc["jobs"][0]["pruning"]["local"])[g]
            assert eg["kept_held"] == ["zrepl_3"] and eg["errors"] == []
            assert eg["destroyed"] == (["foreign", "zrepl_2"] if run == 0 else [])
            assert snapshots(g)[g] == ["zrepl_1", "zrepl_3"]
            assert snapshots(gall)[gall] == ["zrepl_1", "zrepl_2", "zrepl_3"]
        assert state(g)[g + "@zrepl_3"]["userrefs"] == 1
    finally:
        release(g + "@zrepl_3", "zrepl_last_received_J_sink")


def test_receiver_grid_keeps_held_newest_without_error(pool, tmp_path):
    """SPEC §13 item 24 for real: local push -> sink, `keep_receiver` grid `1x1h | 24x1h`."""
    make_tree(pool + "/src", ["x"])
    make_tree(pool + "/sink", [])
    src, x = pool + "/src", pool + "/src/x"
    recv_root = "%s/sink/host1/%s" % (pool, src)
    cfg = config(tmp_path / "run",
                 "  - name: sink\n"
                 "    type: sink\n"
                 "    root_fs: %s\n"
                 "    serve: {type: local, listener_name: disk}\n"
                 "  - name: push\n"
                 "    type: push\n"
                 "    connect: {type: local, listener_name: disk, client_identity: host1}\n"
                 "    filesystems: {%s: true}\n"
                 "    snapshotting: {type: periodic, prefix: zrepl_, interval: 10m}\n"
                 "    pruning:\n"
                 "      keep_sender: [{type: regex, regex: \".*\"}]\n"
                 "      keep_receiver: [{type: grid, grid: \"1x1h | 24x1h\", regex: \"^zrepl_\"}]\n"
                 % (q(pool + "/sink"), q(src + "<")))
    rounds = []
    for run in range(2):                      # two runs within an hour
        if run:
            time.sleep(1.1)                   # a new second: a new snapshot name
        cp, doc = once_json("--snapshot", "always", cfg=cfg)
        assert cp.returncode == 0, cp.stderr
        job = doc["jobs"][0]
        assert job["state"] == "done" and job["errors"] == []
        rounds.append(job["snapshotting"]["name"])
        part = job["pruning"]["receiver"]
        assert part["state"] == "done"
        for fs in (src, x):
            e = by_fs(part)[fs]
            assert e["kept_held"] == [rounds[-1]] and e["errors"] == [] and e["destroyed"] == []
    st, recv = state(src), state(recv_root)
    for rel in ("", "/x"):
        assert snapshots(recv_root + rel)[recv_root + rel] == rounds
        for r in rounds:
            assert recv["%s%s@%s" % (recv_root, rel, r)]["guid"] == \
                st["%s%s@%s" % (src, rel, r)]["guid"]
        assert recv["%s%s@%s" % (recv_root, rel, rounds[1])]["userrefs"] == 1  # last-received
        assert recv["%s%s@%s" % (recv_root, rel, rounds[0])]["userrefs"] == 0


# --- `prune --json` document (SPEC §1.6.3, PruneReport of §1.6.2) ---------------------------------

ERROR_KEYS = {"class", "temporary", "local_to_fs", "kind", "message", "fs", "hint"}


def check_error(err):
    assert set(err) >= ERROR_KEYS, err
    assert err["class"] in ("temporary", "local_to_fs", "permanent")
    assert isinstance(err["temporary"], bool) and isinstance(err["local_to_fs"], bool)
    assert isinstance(err["kind"], str) and isinstance(err["message"], str)
    assert err["fs"] is None or isinstance(err["fs"], str)
    assert err["hint"] is None or isinstance(err["hint"], str)


def check_prune_report(part, side, dry_run):
    """Every member of SPEC §1.6.2's PruneReport, type-checked."""
    assert set(part) >= {"side", "state", "dry_run", "error", "filesystems"}
    assert part["side"] == side and part["dry_run"] is dry_run
    assert part["state"] in ("done", "failed", "skipped")
    if part["error"] is not None:
        check_error(part["error"])
    for f in part["filesystems"]:
        assert set(f) >= {"fs", "state", "skip_reason", "snapshots", "planned_destroy",
                          "destroyed", "kept_held", "errors", "error_count", "decisions"}, f
        assert isinstance(f["fs"], str) and f["state"] in ("done", "error", "skipped")
        assert f["skip_reason"] is None or isinstance(f["skip_reason"], str)
        assert isinstance(f["snapshots"], int) and isinstance(f["error_count"], int)
        for key in ("planned_destroy", "destroyed", "kept_held"):
            assert isinstance(f[key], list) and all(isinstance(n, str) for n in f[key])
        for e in f["errors"]:
            assert isinstance(e["snapshot"], str)
            check_error(e["error"])
        assert len(f["decisions"]) == f["snapshots"]
        for d in f["decisions"]:
            assert set(d) == {"snapshot", "action", "reasons"}
            assert d["action"] in ("keep", "destroy")
            assert d["reasons"] and all(isinstance(r, str) for r in d["reasons"])


def test_prune_json_schema(pool, tmp_path):
    make_tree(pool + "/s", ["t"])
    s, t = pool + "/s", pool + "/s/t"
    make_snaps(s, "manual_1", "gone")
    make_snaps(t, "gone2")
    cfg = config(tmp_path / "run", snap_job("schema", {s + "<": True}, keep=LAST3_MANUAL))
    cp, doc = prune_json("--job", "schema", "--side", "sender", cfg=cfg)  # snap: --side ignored
    assert cp.returncode == 0, cp.stderr
    assert set(doc) >= {"schema", "job", "dry_run", "exit_code", "sides"}
    assert doc["schema"] == "zrepl.py/prune/1" and doc["job"] == "schema"
    assert doc["dry_run"] is False and doc["exit_code"] == 0
    assert isinstance(doc["sides"], list) and len(doc["sides"]) == 1
    part = doc["sides"][0]
    check_prune_report(part, "local", False)
    assert [f["fs"] for f in part["filesystems"]] == [s, t]
    assert by_fs(part)[s]["destroyed"] == ["gone"] and by_fs(part)[t]["destroyed"] == ["gone2"]
    assert snapshots(s) == {s: ["manual_1"], t: []}


def test_prune_passive_job_is_a_usage_error(pool, tmp_path):
    make_tree(pool + "/sink", [])
    cfg = config(tmp_path / "run",
                 "  - name: backup_sink\n"
                 "    type: sink\n"
                 "    root_fs: %s\n"
                 "    serve: {type: local, listener_name: disk}\n" % q(pool + "/sink"),
                 snap_job("other", {pool + "/sink": True}))
    snap(pool + "/sink", "x")
    before = state(pool)
    for extra in ([], ["--dry-run"], ["--json"]):
        cp = prune("--job", "backup_sink", *extra, cfg=cfg)
        assert cp.returncode == 2, cp.stderr
        assert cp.stdout == ""
        assert "backup_sink" in cp.stderr and "passive" in cp.stderr
    assert state(pool) == before
    cp = prune("--job", "nosuchjob", cfg=cfg)
    assert cp.returncode == 2 and "nosuchjob" in cp.stderr


# --- SPEC §7.6: refusals that are not errors -------------------------------------------------------

def test_snapshot_with_dependent_clone_is_kept_not_an_error(pool, tmp_path):
    make_tree(pool + "/d", [])
    d = pool + "/d"
    make_snaps(d, "origin", "plain")
    zfs("clone", d + "@origin", pool + "/clone")
    cfg = config(tmp_path / "run", snap_job("clone", {d: True}, keep=LAST3_MANUAL))
    cp, doc = prune_json("--job", "clone", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    part = doc["sides"][0]
    assert part["state"] == "done"
    e = by_fs(part)[d]
    assert e["state"] == "done" and e["errors"] == [] and e["error_count"] == 0
    assert e["destroyed"] == ["plain"]
    assert "origin" not in e["destroyed"]
    dec = {x["snapshot"]: x for x in e["decisions"]}
    assert dec["origin"]["action"] == "keep"
    assert any("clone" in r for r in dec["origin"]["reasons"])
    assert snapshots(d) == {d: ["origin"]}
    assert zfs("get", "-H", "-o", "value", "origin", pool + "/clone").stdout.strip() == \
        d + "@origin"


def test_snapshot_gone_before_its_destroy_counts_as_destroyed(pool, tmp_path):
    # a real concurrent actor: right after the pruner's listing, the `zfs` in PATH renames
    # one of the snapshots it is about to destroy (then it is "missing" = already gone)
    make_tree(pool + "/m", [])
    m = pool + "/m"
    make_snaps(m, "a", "b", "c")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "rename-once"
    marker.write_text("")
    zfs_bin = ZFS_BIN
    (bindir / "zfs").write_text(
        "#!/bin/sh\n"
        "%s \"$@\"\nrc=$?\n"
        "if [ \"$1\" = get ] && [ -e %s ] && echo \"$*\" | grep -q -- %s; then\n"
        "  rm -f %s; %s rename %s %s\n"
        "fi\nexit $rc\n" % (zfs_bin, q(marker), q(" " + m), q(marker), zfs_bin,
                            q(m + "@b"), q(m + "@b_moved")))
    (bindir / "zfs").chmod(0o755)
    env = {"PATH": "%s:%s" % (bindir, os.environ.get("PATH", "/usr/bin:/bin"))}
    cfg = config(tmp_path / "run", snap_job("gone", {m: True}, keep=LAST3_MANUAL))
    cp, doc = prune_json("--job", "gone", cfg=cfg, env=env)
    assert not marker.exists(), "the listing was not intercepted"
    assert cp.returncode == 0, cp.stderr
    e = by_fs(doc["sides"][0])[m]
    assert e["errors"] == [] and e["state"] == "done"
    assert sorted(e["destroyed"]) == ["a", "b", "c"]
    assert snapshots(m) == {m: ["b_moved"]}


# --- SPEC §7.6: a real destroy failure, back-off and error counts ---------------------------------

def test_destroy_failure_backs_off_and_goes_last_next_time(pool, tmp_path):
    """A true failure: zfs refuses to destroy the base snapshot of a running incremental
    receive (`cannot destroy 'X@a_from': dataset already exists`, zfs-fuse.md §3.2)."""
    make_tree(pool + "/src", [])
    make_tree(pool + "/t", ["y", "z"])
    src, x, y, z = pool + "/src", pool + "/t/x", pool + "/t/y", pool + "/t/z"
    later = ["b%02d" % i for i in range(1, 13)]      # sort after a_from, created before it
    write_data(src, 64 << 10)
    for s in later + ["a_from"]:
        snap(src, s)
    zfs("recv", "-u", x, input=zfs("send", "%s@%s" % (src, later[0]), text=False).stdout)
    zfs("recv", "-u", x, input=zfs("send", "-I", "@" + later[0], src + "@a_from",
                                   text=False).stdout)
    write_data(src, 1 << 20)
    snap(src, "n_new")
    stream = zfs("send", "-i", "@a_from", src + "@n_new", text=False).stdout
    make_snaps(y, "old1", "old2")
    make_snaps(z, "old1")
    env, zlog = zfs_logger(tmp_path)
    cfg = config(tmp_path / "run", snap_job("backoff", {pool + "/t<": True},
                                            keep='[{type: regex, regex: "^keep"}]'))
    recv = subprocess.Popen(["zfs", "receive", "-u", x], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_ZFS_ENV)
    runs = []
    try:
        recv.stdin.write(stream[:len(stream) // 2])
        recv.stdin.flush()
        time.sleep(0.3)
        failing = zfs("destroy", x + "@a_from", check=False)
        if "has dependent clones" in failing.stderr:
            # OpenZFS: the receive's %recv clone makes its origin "has dependent clones",
            # which the pruner keeps with a reason (SPEC §7.6) instead of failing
            pytest.skip("on this ZFS a receive in flight does not make a destroy fail")
        assert "dataset already exists" in failing.stderr, failing.stderr  # the failure is real

        # run 1: x fails at its first destroy and is left alone; y and z are pruned
        cp, doc = once_json("--snapshot", "never", cfg=cfg, env=env)
        runs.append((cp, doc, 1))
        job = doc["jobs"][0]
        part = job["pruning"]["local"]
        assert job["state"] == "failed" and job["exit_code"] == 1 and part["state"] == "failed"
        ex = by_fs(part)[x]
        assert ex["state"] == "error" and ex["error_count"] == 1
        assert [e["snapshot"] for e in ex["errors"]] == ["a_from"]
        assert ex["errors"][0]["error"]["fs"] == x
        assert ex["errors"][0]["error"]["kind"] not in ("missing", "held", "busy", "has-clones")
        assert sorted(ex["planned_destroy"]) == ["a_from"] + later
        left = snapshots(x)[x]
        assert "a_from" in left
        # back-off: x's destroys stopped at the failure (a few may have been in flight)
        assert set(left) - {"a_from"}, "every other snapshot of x was still destroyed"
        assert set(left) - {"a_from"} <= set(later)
        assert by_fs(part)[y]["destroyed"] == ["old1", "old2"] and snapshots(y) == {y: []}
        assert by_fs(part)[z]["destroyed"] == ["old1"] and snapshots(z) == {z: []}
        assert by_fs(part)[y]["error_count"] == 0

        # run 2: x is processed last, its error count rises; the others are still pruned
        make_snaps(y, "old3")
        make_snaps(z, "old3")
        zlog.write_text("")
        cp, doc = once_json("--snapshot", "never", cfg=cfg, env=env)
        runs.append((cp, doc, 1))
        part = doc["jobs"][0]["pruning"]["local"]
        assert by_fs(part)[x]["error_count"] == 2 and by_fs(part)[x]["state"] == "error"
        assert snapshots(y) == {y: []} and snapshots(z) == {z: []}
        destroys = [c[-1].split("@")[0] for c in zfs_calls(zlog, "destroy", pool)]
        assert destroys and destroys[-1] == x and destroys[:2] == [y, z], destroys
        assert x not in destroys[:destroys.index(x)] and set(destroys[destroys.index(x):]) == {x}

        # the text form of a failed prune
        cp = prune("--job", "backoff", cfg=cfg)
        assert cp.returncode == 1
        lines = cp.stdout.splitlines()
        assert lines[0] == "%s (local): destroyed 0 of 0 snapshots" % (pool + "/t")
        i = next(i for i, ln in enumerate(lines) if ln.startswith(x + " "))
        assert re.fullmatch(r"%s \(local\): destroyed \d+ of \d+ snapshots, errors 1"
                            % re.escape(x), lines[i]), cp.stdout
        assert lines[i + 1].startswith("  ERROR a_from: local_to_fs: "), cp.stdout
        assert "dataset already exists" in lines[i + 1]
        assert lines[i + 2:] == ["%s (local): destroyed 0 of 0 snapshots" % y,
                                 "%s (local): destroyed 0 of 0 snapshots" % z]
    finally:
        try:
            recv.stdin.write(stream[len(stream) // 2:])
            recv.stdin.close()
        except OSError:
            pass
        recv.wait(timeout=60)
    assert recv.returncode == 0, recv.stderr.read()

    # run 3: the receive is over; x is pruned and its error count is reset
    cp, doc = once_json("--snapshot", "never", cfg=cfg, env=env)
    runs.append((cp, doc, 0))
    ex = by_fs(doc["jobs"][0]["pruning"]["local"])[x]
    assert ex["state"] == "done" and ex["error_count"] == 0 and ex["errors"] == []
    assert "a_from" in ex["destroyed"] and "n_new" in ex["destroyed"]
    assert snapshots(pool + "/t") == {pool + "/t": [], x: [], y: [], z: []}
    assert doc["jobs"][0]["state"] == "done"
    for cp, doc, want in runs:
        assert_exit(cp, want, doc)

