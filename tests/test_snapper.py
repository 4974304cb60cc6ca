"""Section 11 (Snapper, run_hook) through `once`, against real ZFS.

SPEC §6 (one instant per round, `zfs snapshot -r` grouping where ZFS has no multi-name
snapshot, hooks, due/always/never), §1.5.2 (`once`, --dry-run), §1.6.2 (the report), §13
items 7-10. Every test checks the snapshots ZFS really has afterwards, not only exit codes.
Calls are counted with a logging `zfs` first in PATH that then execs the real one.
"""
import calendar
import json
import os
import re
import shutil
import sys
import time

from conftest import (REPO, _ZFS_ENV, assert_no_traceback, make_tree, names, run_cli, snap,
                      state, zfs)

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402


ZFS_BIN = shutil.which("zfs", path=_ZFS_ENV["PATH"])
DENSE = re.compile(r"zrepl_(\d{8})_(\d{6})_000")


# --- helpers --------------------------------------------------------------------------------

def q(text):
    """A YAML double-quoted scalar (JSON string syntax is valid YAML for ASCII)."""
    return json.dumps(str(text))


def hook_yaml(path, fatal=False, timeout=None, filesystems=None):
    parts = ["type: command", "path: " + q(path), "err_is_fatal: " + ("true" if fatal else "false")]
    if timeout:
        parts.append("timeout: " + timeout)
    if filesystems is not None:
        parts.append("filesystems: {%s}" % ", ".join(
            "%s: %s" % (q(k), "true" if v else "false") for k, v in filesystems.items()))
    return "{" + ", ".join(parts) + "}"


def snap_job(name, filesystems, *, interval="10m", prefix="zrepl_", timestamp_format=None,
             hooks=(), keep="[{type: regex, regex: \"^zrepl_\"}]"):
    fs = ", ".join("%s: %s" % (q(k), "true" if v else "false") for k, v in filesystems.items())
    lines = ["  - name: %s" % name,
             "    type: snap",
             "    filesystems: {%s}" % fs,
             "    snapshotting:",
             "      type: periodic",
             "      prefix: %s" % prefix,
             "      interval: %s" % interval]
    if timestamp_format:
        lines.append("      timestamp_format: %s" % q(timestamp_format))
    if hooks:
        lines.append("      hooks:")
        lines += ["        - " + h for h in hooks]
    lines.append("    pruning: {keep: %s}" % keep)
    return "\n".join(lines) + "\n"


def config(rundir, *jobs):
    return "global: {rundir: %s}\njobs:\n%s" % (q(rundir), "".join(jobs))


def script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def zfs_logger(tmp_path):
    """A `zfs` first in PATH that logs its argv (tab-separated, one write) and execs the real one."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "zfs-calls.log"
    script(bindir, "zfs", 'line=$(printf "%%s\\t" "$@")\nprintf "%%s\\n" "$line" >> %s\n'
                          'exec %s "$@"\n' % (q(log), ZFS_BIN))
    return {"PATH": "%s:%s" % (bindir, os.environ.get("PATH", "/usr/bin:/bin"))}, log


def zfs_calls(log, verb, pool):
    """The logged zfs calls with subcommand `verb` that name something in `pool`."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        argv = line.rstrip("\t").split("\t")
        if argv and argv[0] == verb and any(a == pool or a.startswith(pool + "/") or
                                            a.startswith(pool + "@") for a in argv[1:]):
            out.append(argv)
    return out


def snapshots(root):
    """{fs: [short snapshot names]} under root, every filesystem listed (maybe empty)."""
    out = {}
    for n in names(root):
        fs, _, s = n.partition("@")
        out.setdefault(fs, [])
        if s:
            out[fs].append(s)
    return {k: sorted(v) for k, v in out.items()}


def once_json(*args, cfg, env=None, timeout=120):
    cp = run_cli("once", "--json", *args, config=cfg, env=env, timeout=timeout)
    assert_no_traceback(cp)
    try:
        doc = json.loads(cp.stdout)
    except ValueError:
        raise AssertionError("once --json printed no JSON (exit %d):\n%s\n%s"
                             % (cp.returncode, cp.stdout, cp.stderr))
    return cp, doc


class ExitCodeMismatch(AssertionError):
    """Only the exit code was wrong (an xfail for an exit-code bug can name this exception)."""


def assert_exit(cp, want, doc=None):
    """Checked last in a test: the process exit code (and the once document's exit_code)."""
    got = (cp.returncode, doc["exit_code"] if doc is not None else want)
    if got != (want, want):
        raise ExitCodeMismatch("want exit %d, got process exit %d%s; stderr:\n%s" % (
            want, got[0], "" if doc is None else ", document exit_code %r" % got[1], cp.stderr))


def fs_entries(job_report):
    return {f["fs"]: f for f in job_report["snapshotting"]["filesystems"]}


def read_hook_log(path):
    return [ln.split("|") for ln in path.read_text().splitlines()] if path.exists() else []


LOGGING_HOOK = ('printf "%%s|%%s|%%s|%%s|%%s|%%s|%%s\\n" "$ZREPL_HOOKTYPE" "$ZREPL_FS" '
                '"$ZREPL_SNAPNAME" "${ZREPL_DRYRUN-unset}" "$ZREPL_TIMEOUT" "$(pwd)" "%s" >> %s\n')


def logging_hook(tmp_path, name, log, extra=""):
    """A hook appending `type|fs|snapname|dryrun|timeout|cwd|name` to log, then `extra`."""
    return script(tmp_path, name, LOGGING_HOOK % (name, q(log)) + extra)


# --- SPEC §13 item 7: one instant, one `zfs snapshot -r` ------------------------------------

def multi_snapshot():
    """Does this ZFS take several names in one atomic `zfs snapshot a@n b@n`? (SPEC §6.2)"""
    return zrepl.ZFS().capabilities()["multi_snapshot"]


def test_round_takes_one_shared_name_with_one_recursive_snapshot(pool, tmp_path):
    make_tree(pool + "/a", ["b"])
    make_tree(pool + "/c", [])
    env, zlog = zfs_logger(tmp_path)
    cfg = config(tmp_path / "run", snap_job("snapjob", {pool + "/a<": True}))
    t0 = time.time()
    cp = run_cli("once", "--snapshot", "always", config=cfg, env=env)
    t1 = time.time()
    assert_no_traceback(cp)
    assert cp.returncode == 0, cp.stderr
    got = snapshots(pool)
    assert got[pool + "/c"] == [] and got[pool] == []
    assert len(got[pool + "/a"]) == 1 and got[pool + "/a"] == got[pool + "/a/b"]
    name = got[pool + "/a"][0]
    m = DENSE.fullmatch(name)
    assert m, name
    # the name is the round's instant in UTC
    stamp = calendar.timegm(time.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S"))
    assert int(t0) <= stamp <= t1
    # exactly one snapshot command: one multi-name snapshot where ZFS has it (atomic
    # across the names), else one recursive at the top of the subtree
    if multi_snapshot():
        assert zfs_calls(zlog, "snapshot", pool) == [
            ["snapshot", "%s/a@%s" % (pool, name), "%s/a/b@%s" % (pool, name)]]
    else:
        assert zfs_calls(zlog, "snapshot", pool) == [["snapshot", "-r", "%s/a@%s" % (pool, name)]]
    # atomic: both snapshots were born in the same transaction group
    st = state(pool)
    assert st["%s/a@%s" % (pool, name)]["createtxg"] == st["%s/a/b@%s" % (pool, name)]["createtxg"]


def test_filter_and_placeholders_decide_recursive_groups(pool, tmp_path):
    # a: its child x/y is excluded, so a and a/x are snapshotted alone; a/b is complete (-r);
    # ph is a placeholder (never snapshotted), so p is not complete either
    make_tree(pool + "/a", ["b", "b/c", "x", "x/y"])
    make_tree(pool + "/p", [])
    zfs("create", "-o", "mountpoint=none", "-o", "zrepl:placeholder=on", pool + "/p/ph")
    make_tree(pool + "/p/q", [])
    make_tree(pool + "/out", [])
    env, zlog = zfs_logger(tmp_path)
    cfg = config(tmp_path / "run", snap_job("grp", {pool + "/a<": True, pool + "/a/x/y": False,
                                                    pool + "/p<": True}))
    cp, doc = once_json("--snapshot", "always", cfg=cfg, env=env)
    assert cp.returncode == 0, cp.stderr
    name = doc["jobs"][0]["snapshotting"]["name"]
    assert DENSE.fullmatch(name)
    got = snapshots(pool)
    taken = sorted(fs for fs, s in got.items() if s)
    assert taken == sorted(pool + "/" + r for r in ("a", "a/b", "a/b/c", "a/x", "p", "p/q"))
    assert all(got[fs] == [name] for fs in taken)
    for untouched in ("a/x/y", "p/ph", "out"):
        assert got[pool + "/" + untouched] == []
    calls = sorted(zfs_calls(zlog, "snapshot", pool))
    if multi_snapshot():
        assert calls == [["snapshot"] + ["%s@%s" % (fs, name) for fs in taken]]
        return
    assert calls == sorted([
        ["snapshot", "-r", "%s/a/b@%s" % (pool, name)],
        ["snapshot", "%s/a@%s" % (pool, name)],
        ["snapshot", "%s/a/x@%s" % (pool, name)],
        ["snapshot", "%s/p@%s" % (pool, name)],
        ["snapshot", "-r", "%s/p/q@%s" % (pool, name)],
    ])
    entries = fs_entries(doc["jobs"][0])
    assert sorted(entries) == taken     # the placeholder and rejected datasets are not listed
    assert all(e["state"] == "taken" and e["snapshot"] == "%s@%s" % (fs, name)
               for fs, e in entries.items())


# --- SPEC §13 item 8 and §6.6: due / always / never --------------------------------------------

def test_due_never_always_after_a_round(pool, tmp_path):
    make_tree(pool + "/a", ["b"])
    # millisecond names: two rounds in one second still get different names, no sleep needed
    cfg = config(tmp_path / "run", snap_job(
        "due", {pool + "/a<": True}, timestamp_format="20060102_150405.000",
        keep="[{type: regex, regex: \"^zrepl_\"}]"))
    cp, doc = once_json("--snapshot", "always", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    first = doc["jobs"][0]["snapshotting"]["name"]
    assert snapshots(pool + "/a") == {pool + "/a": [first], pool + "/a/b": [first]}
    before = state(pool + "/a")

    # a foreign snapshot that no rule keeps: proves the pruning phase still runs
    snap(pool + "/a", "other")
    cp, doc = once_json(cfg=cfg)          # default: due; interval 10m has not passed
    assert cp.returncode == 0, cp.stderr
    job = doc["jobs"][0]
    assert job["snapshotting"]["mode"] == "due" and job["snapshotting"]["name"] is None
    assert {e["state"] for e in job["snapshotting"]["filesystems"]} == {"not_due"}
    assert job["pruning"]["local"]["state"] == "done"
    assert state(pool + "/a") == before                  # no new snapshot, @other destroyed

    snap(pool + "/a", "other")
    cp, doc = once_json("--snapshot", "never", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    never = doc["jobs"][0]["snapshotting"]
    assert never is None or all(f["state"] != "taken" for f in never["filesystems"])
    assert state(pool + "/a") == before                  # never: no round; still prunes

    cp, doc = once_json("--snapshot", "always", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    second = doc["jobs"][0]["snapshotting"]["name"]
    assert second != first
    assert snapshots(pool + "/a") == {pool + "/a": sorted([first, second]),
                                      pool + "/a/b": sorted([first, second])}


def test_due_once_the_interval_has_passed(pool, tmp_path):
    # interval 15s: slack = min(60s, 1.5s); due when now - creation >= 13.5s (long enough
    # for the second `once` to start and finish under emulation, the OpenZFS lane's VM,
    # where 6s was not always enough)
    make_tree(pool + "/d", [])
    cfg = config(tmp_path / "run", snap_job("due2", {pool + "/d": True}, interval="15s",
                                            timestamp_format="20060102_150405.000"))
    assert run_cli("once", config=cfg).returncode == 0      # no prefixed snapshot: due
    assert len(snapshots(pool + "/d")[pool + "/d"]) == 1
    assert run_cli("once", config=cfg).returncode == 0      # right after: not due
    assert len(snapshots(pool + "/d")[pool + "/d"]) == 1
    creation = int(zfs("get", "-Hp", "-o", "value", "creation",
                       pool + "/d@" + snapshots(pool + "/d")[pool + "/d"][0]).stdout)
    time.sleep(max(0.0, creation + 15.0 - time.time()))
    cp = run_cli("once", config=cfg)
    assert cp.returncode == 0, cp.stderr
    assert len(snapshots(pool + "/d")[pool + "/d"]) == 2


# --- hooks: order, environment, filters (SPEC §6.2) --------------------------------------------

def test_hooks_order_and_environment(pool, tmp_path):
    make_tree(pool + "/a", ["b"])
    log = tmp_path / "hooks.log"
    check = ('if %s list -H -o name "$ZREPL_FS@$ZREPL_SNAPNAME" >/dev/null 2>&1; then '
             'echo "$ZREPL_HOOKTYPE $ZREPL_FS present" >> %s; else '
             'echo "$ZREPL_HOOKTYPE $ZREPL_FS absent" >> %s; fi\n' % (ZFS_BIN, q(log), q(log)))
    h1 = logging_hook(tmp_path, "h1", log)
    h2 = logging_hook(tmp_path, "h2", log, check)
    only_b = logging_hook(tmp_path, "onlyb", log)
    cfg = config(tmp_path / "run", snap_job("hooked", {pool + "/a<": True}, hooks=[
        hook_yaml(h1),
        hook_yaml(h2, fatal=True, timeout="7s"),
        hook_yaml(only_b, filesystems={pool + "/a/b": True})]))
    cp, doc = once_json("--snapshot", "always", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    name = doc["jobs"][0]["snapshotting"]["name"]
    assert snapshots(pool + "/a") == {pool + "/a": [name], pool + "/a/b": [name]}
    lines = log.read_text().splitlines()
    records = [ln.split("|") for ln in lines if "|" in ln]
    a, b = pool + "/a", pool + "/a/b"
    # per filesystem: pre-edges in configuration order, post-edges reversed; the filtered
    # hook only for a/b; one `snapshot -r` for both, so every pre-edge comes before it and
    # every post-edge after it
    order = [(r[0], r[1], r[6]) for r in records]
    assert [(t, h) for t, fs, h in order if fs == a] == [
        ("pre_snapshot", "h1"), ("pre_snapshot", "h2"),
        ("post_snapshot", "h2"), ("post_snapshot", "h1")]
    assert [(t, h) for t, fs, h in order if fs == b] == [
        ("pre_snapshot", "h1"), ("pre_snapshot", "h2"), ("pre_snapshot", "onlyb"),
        ("post_snapshot", "onlyb"), ("post_snapshot", "h2"), ("post_snapshot", "h1")]
    assert [t for t, _, _ in order] == ["pre_snapshot"] * 5 + ["post_snapshot"] * 5
    for r in records:
        assert r[2] == name            # ZREPL_SNAPNAME: the short name
        assert r[3] == ""              # ZREPL_DRYRUN: set and empty
        assert r[4] == ("7" if r[6] == "h2" else "30")   # ZREPL_TIMEOUT in whole seconds
        assert r[5] == "/"             # cwd
    # the snapshot does not exist during pre-hooks and does during post-hooks
    seen = sorted(ln for ln in lines if "|" not in ln)
    assert seen == ["post_snapshot %s present" % a, "post_snapshot %s present" % b,
                    "pre_snapshot %s absent" % a, "pre_snapshot %s absent" % b]
    hooks_b = fs_entries(doc["jobs"][0])[b]["hooks"]
    assert [(os.path.basename(h["path"]), h["edge"], h["exit_status"], h["error"])
            for h in hooks_b] == [("h1", "pre", 0, None), ("h2", "pre", 0, None),
                                  ("onlyb", "pre", 0, None), ("onlyb", "post", 0, None),
                                  ("h2", "post", 0, None), ("h1", "post", 0, None)]
    assert all(isinstance(h["duration_s"], (int, float)) for h in hooks_b)


# --- SPEC §13 item 9: a fatal pre-hook failing for one filesystem --------------------------------

def test_fatal_pre_hook_failure_skips_only_that_filesystem(pool, tmp_path):
    make_tree(pool + "/a", ["b"])
    a, b = pool + "/a", pool + "/a/b"
    log = tmp_path / "hooks.log"
    h1 = logging_hook(tmp_path, "h1", log)
    h2 = logging_hook(tmp_path, "h2", log,
                      'if [ "$ZREPL_FS" = %s ]; then echo "boom: cannot quiesce $ZREPL_FS"; '
                      'echo "on stderr too" >&2; exit 3; fi\n' % q(b))
    h3 = logging_hook(tmp_path, "h3", log)
    env, zlog = zfs_logger(tmp_path)
    rundir = tmp_path / "run"
    cfg = config(rundir, snap_job("fatal", {a + "<": True}, hooks=[
        hook_yaml(h1), hook_yaml(h2, fatal=True), hook_yaml(h3)]))
    cp, doc = once_json("--snapshot", "always", cfg=cfg, env=env)
    job = doc["jobs"][0]
    name = job["snapshotting"]["name"]
    assert snapshots(a) == {a: [name], b: []}
    # a/b is out of the round, so a is snapshotted alone (no -r over a/b)
    assert zfs_calls(zlog, "snapshot", pool) == [["snapshot", "%s@%s" % (a, name)]]
    order = [(r[0], r[1], r[6]) for r in read_hook_log(log)]
    assert [o for o in order if o[1] == b] == [
        ("pre_snapshot", b, "h1"), ("pre_snapshot", b, "h2"),   # h3 skipped after the failure
        ("post_snapshot", b, "h1")]                             # only succeeded pre-hooks
    assert [o for o in order if o[1] == a] == [
        ("pre_snapshot", a, "h1"), ("pre_snapshot", a, "h2"), ("pre_snapshot", a, "h3"),
        ("post_snapshot", a, "h3"), ("post_snapshot", a, "h2"), ("post_snapshot", a, "h1")]
    assert job["state"] == "failed" and job["exit_code"] == 1
    entries = fs_entries(job)
    assert entries[a]["state"] == "taken" and entries[a]["snapshot"] == "%s@%s" % (a, name)
    eb = entries[b]
    assert eb["state"] == "skipped" and eb["snapshot"] is None
    assert eb["error"]["kind"] == "hook" and eb["error"]["fs"] == b
    failed = [h for h in eb["hooks"] if h["error"]]
    assert len(failed) == 1 and failed[0]["edge"] == "pre" and failed[0]["exit_status"] == 3
    assert failed[0]["path"] == str(h2)
    assert "boom: cannot quiesce " + b in failed[0]["output_tail"]
    assert "on stderr too" in failed[0]["output_tail"]
    assert [os.path.basename(h["path"]) + ":" + h["edge"] for h in eb["hooks"]] == \
        ["h1:pre", "h2:pre", "h1:post"]
    # the same report was written to rundir/last
    saved = json.loads((rundir / "last" / "fatal.json").read_text())
    assert fs_entries(saved)[b]["hooks"] == eb["hooks"]
    assert saved["state"] == "failed" and saved["exit_code"] == 1
    assert b in cp.stderr and "hook" in cp.stderr      # the failure is logged at error level
    assert_exit(cp, 1, doc)


def test_non_fatal_hook_failure_still_snapshots_but_fails_the_round(pool, tmp_path):
    make_tree(pool + "/n", [])
    fs = pool + "/n"
    log = tmp_path / "hooks.log"
    bad = logging_hook(tmp_path, "bad", log, 'echo "not fatal"; exit 1\n')
    good = logging_hook(tmp_path, "good", log)
    cfg = config(tmp_path / "run", snap_job("nonfatal", {fs: True}, hooks=[
        hook_yaml(good), hook_yaml(bad, fatal=False)]))
    cp, doc = once_json("--snapshot", "always", cfg=cfg)
    job = doc["jobs"][0]
    name = job["snapshotting"]["name"]
    assert snapshots(fs) == {fs: [name]}
    e = fs_entries(job)[fs]
    assert e["state"] == "taken" and e["error"] is None
    assert job["state"] == "failed"
    # the failed hook's own post-edge is skipped; the other one runs
    assert [(r[0], r[6]) for r in read_hook_log(log)] == [
        ("pre_snapshot", "good"), ("pre_snapshot", "bad"), ("post_snapshot", "good")]
    bad_entries = [h for h in e["hooks"] if h["error"]]
    assert len(bad_entries) == 1 and bad_entries[0]["exit_status"] == 1
    assert "not fatal" in bad_entries[0]["output_tail"]
    assert job["exit_code"] == 1
    assert_exit(cp, 1, doc)


def test_hook_timeout_is_a_failure(pool, tmp_path):
    make_tree(pool + "/t", ["u"])
    t, u = pool + "/t", pool + "/t/u"
    slow = script(tmp_path, "slow", 'if [ "$ZREPL_FS" = %s ]; then exec sleep 20; fi\n' % q(u))
    cfg = config(tmp_path / "run", snap_job("slowhook", {t + "<": True}, hooks=[
        hook_yaml(slow, fatal=True, timeout="1s")]))
    started = time.monotonic()
    cp, doc = once_json("--snapshot", "always", cfg=cfg, timeout=60)
    took = time.monotonic() - started
    assert took < 8, "the 1s hook timeout was not enforced (took %.1fs)" % took
    job = doc["jobs"][0]
    name = job["snapshotting"]["name"]
    assert snapshots(t) == {t: [name], u: []}
    e = fs_entries(job)[u]
    assert e["state"] == "skipped"
    h = e["hooks"][0]
    assert h["error"] is not None and "timed out" in h["error"]["message"]
    assert h["exit_status"] != 0
    assert 0.9 <= h["duration_s"] < 8
    assert job["state"] == "failed" and job["exit_code"] == 1
    assert_exit(cp, 1, doc)


# --- SPEC §13 item 10: a hook destroys a filesystem before its snapshot ------------------------

def test_hook_destroying_a_standalone_filesystem(pool, tmp_path):
    # x, y, z are separate round members (the filter accepts them, not their parent)
    make_tree(pool + "/r", ["x", "y", "z"])
    x, y, z = (pool + "/r/" + c for c in "xyz")
    killer = script(tmp_path, "killer", 'if [ "$ZREPL_HOOKTYPE" = pre_snapshot ]; then '
                                        '%s destroy %s; fi\n' % (ZFS_BIN, q(y)))
    cfg = config(tmp_path / "run", snap_job("killer1", {x: True, y: True, z: True}, hooks=[
        hook_yaml(killer, filesystems={x: True})]))
    cp, doc = once_json("--snapshot", "always", cfg=cfg)
    job = doc["jobs"][0]
    name = job["snapshotting"]["name"]
    assert snapshots(pool + "/r") == {pool + "/r": [], x: [name], z: [name]}
    entries = fs_entries(job)
    assert entries[x]["state"] == entries[z]["state"] == "taken"
    assert entries[y]["state"] == "failed" and entries[y]["error"]["kind"] == "missing"
    assert all(h["error"] is None for h in entries[x]["hooks"])   # only y's snapshot failed
    assert job["state"] == "failed" and job["exit_code"] == 1
    assert_exit(cp, 1, doc)


def test_hook_destroying_a_filesystem_inside_a_recursive_group(pool, tmp_path):
    make_tree(pool + "/r", ["x", "y"])
    r, x, y = pool + "/r", pool + "/r/x", pool + "/r/y"
    killer = script(tmp_path, "killer", 'if [ "$ZREPL_HOOKTYPE" = pre_snapshot ]; then '
                                        '%s destroy %s; fi\n' % (ZFS_BIN, q(y)))
    cfg = config(tmp_path / "run", snap_job("killer2", {r + "<": True}, hooks=[
        hook_yaml(killer, filesystems={x: True})]))
    cp, doc = once_json("--snapshot", "always", cfg=cfg)
    job = doc["jobs"][0]
    name = job["snapshotting"]["name"]
    assert snapshots(r) == {r: [name], x: [name]}      # y is gone, the others are taken
    entries = fs_entries(job)
    assert entries[r]["state"] == entries[x]["state"] == "taken"
    assert all(h["error"] is None for h in entries[x]["hooks"])
    assert entries[y]["state"] == "failed", entries[y]
    assert entries[y]["snapshot"] is None
    assert job["state"] == "failed" and job["exit_code"] == 1


# --- SPEC §6.1: a name that already exists ---------------------------------------------------------

def _hour_safe():
    """Avoid running across an hour boundary with an hourly timestamp format."""
    left = 3600 - time.time() % 3600
    if left < 5:
        time.sleep(left + 0.1)


def test_existing_snapshot_name_is_error_exists(pool, tmp_path):
    make_tree(pool + "/e", ["f"])
    e, f = pool + "/e", pool + "/e/f"
    cfg = config(tmp_path / "run", snap_job("hourly", {e + "<": True},
                                            timestamp_format="2006-01-02_15"))
    _hour_safe()
    cp, doc = once_json("--snapshot", "always", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    name = doc["jobs"][0]["snapshotting"]["name"]
    assert name == "zrepl_" + time.strftime("%Y-%m-%d_%H", time.gmtime())
    before = state(e)
    cp, doc = once_json("--snapshot", "always", cfg=cfg)
    job = doc["jobs"][0]
    assert job["snapshotting"]["name"] == name
    entries = fs_entries(job)
    for fs in (e, f):
        assert entries[fs]["state"] == "failed"
        assert entries[fs]["error"]["kind"] == "exists"
    assert state(e) == before      # same snapshots, same GUIDs
    assert job["state"] == "failed" and job["exit_code"] == 1
    assert_exit(cp, 1, doc)


def test_existing_name_on_one_filesystem_does_not_stop_the_others(pool, tmp_path):
    make_tree(pool + "/e", ["f", "g"])
    e, f, g = pool + "/e", pool + "/e/f", pool + "/e/g"
    cfg = config(tmp_path / "run", snap_job("hourly2", {e + "<": True},
                                            timestamp_format="2006-01-02_15"))
    _hour_safe()
    name = "zrepl_" + time.strftime("%Y-%m-%d_%H", time.gmtime())
    snap(f, name)
    guid = state(f)[f + "@" + name]["guid"]
    cp, doc = once_json("--snapshot", "always", cfg=cfg)
    assert snapshots(e) == {e: [name], f: [name], g: [name]}
    assert state(f)[f + "@" + name]["guid"] == guid          # the old one, untouched
    entries = fs_entries(doc["jobs"][0])
    assert entries[e]["state"] == entries[g]["state"] == "taken"
    assert entries[f]["state"] == "failed" and entries[f]["error"]["kind"] == "exists"
    assert doc["jobs"][0]["exit_code"] == 1
    assert_exit(cp, 1, doc)


# --- --dry-run: no snapshot, no hook, no report, no lock ------------------------------------------

def test_dry_run_changes_nothing(pool, tmp_path):
    import fcntl
    make_tree(pool + "/a", ["b"])
    snap(pool + "/a", "other")                 # no rule keeps it: would be destroyed
    log = tmp_path / "hooks.log"
    h = logging_hook(tmp_path, "h", log)
    rundir = tmp_path / "run"
    cfg = config(rundir, snap_job("dry", {pool + "/a<": True}, hooks=[hook_yaml(h)]))
    before = state(pool)
    cp, doc = once_json("--dry-run", "--snapshot", "always", cfg=cfg)
    assert cp.returncode == 0, cp.stderr
    assert state(pool) == before
    assert not log.exists()
    assert not rundir.exists()          # no lock, no report: the rundir was not even made
    assert doc["dry_run"] is True
    job = doc["jobs"][0]
    assert job["dry_run"] is True
    name = job["snapshotting"]["name"]
    assert DENSE.fullmatch(name)
    assert {fs: e["state"] for fs, e in fs_entries(job).items()} == {
        pool + "/a": "planned", pool + "/a/b": "planned"}
    prune = job["pruning"]["local"]
    planned = {f["fs"]: f["planned_destroy"] for f in prune["filesystems"]}
    assert planned[pool + "/a"] == ["other"] and prune["dry_run"] is True

    # a dry run does not take the job lock: it runs while someone else holds it
    rundir.mkdir(mode=0o700)
    fd = os.open(str(rundir / "dry.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"1 1700000000\n")
        cp = run_cli("once", "--dry-run", "--snapshot", "always", config=cfg)
        assert cp.returncode == 0, cp.stderr
        assert "locked" not in cp.stderr
    finally:
        os.close(fd)
    assert state(pool) == before
    assert not log.exists()
    written = sorted(os.path.relpath(os.path.join(d, f), str(rundir))
                     for d, _, files in os.walk(str(rundir)) for f in files)
    assert written == ["dry.lock"]                       # no report, no other lock
