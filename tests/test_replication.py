"""Replication (sections 6, 8, 9 `local`, 10, 12) through `once`, `prune`, `status` and
`zfs-abstraction`, against real ZFS: push + sink in one configuration over `local`.

SPEC §2.12 (the local replication example), §3.2-§3.5 (hold tags, the holds-only cursor
`zrepl_CURSOR_J_<job>`, the `zrepl:holds` record, staleness), §8 (planner, receiving side,
placeholders, protection, batching), §1.5.2 (`once`), §1.5.4 (`status`), §1.5.9
(`zfs-abstraction`), §1.6.2 (the job report), §13 items 17, 18, 21 (batching), 22, 23, 28,
29. Conflicts are in test_replication_conflicts.py, interrupted transfers (SIGKILL,
--max-runtime) in test_replication_interrupt.py; both import the helpers below.

Every test runs on its own subtree of the module's two pools: the sender's datasets under
`<src>/<tag>`, the sink's root_fs `<dst>/<tag>` (so `<src>/<tag>/z` arrives at
`<dst>/<tag>/host1/<src>/<tag>/z`). Every test checks what ZFS really has afterwards.
Calls are counted with a logging `zfs` first in PATH that then execs the real one.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import (REPO, assert_no_traceback, hold, make_tree, run_cli, snap, state,
                      write_data, zfs)

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402

REAL_ZFS = shutil.which("zfs", path="/usr/sbin:/sbin:/usr/bin:/bin")
KEEP_ALL = '[{type: regex, regex: ".*"}]'
PERIODIC = "{type: periodic, prefix: zrepl_, interval: 10m}"
MANUAL = "{type: manual}"
CURSOR_TAG = "zrepl_CURSOR_J_push"
LAST_RECEIVED_TAG = "zrepl_last_received_J_sink"
STEP_TAG = "zrepl_STEP_J_push"
MUTATING = {"snapshot", "destroy", "hold", "release", "set", "inherit", "create", "receive",
            "recv", "rename", "rollback", "bookmark"}
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


# --- helpers (shared with the other test_replication_* modules) -----------------------------

def q(text):
    """A YAML double-quoted scalar (JSON string syntax is valid YAML for ASCII)."""
    return json.dumps(str(text))


# The scenarios run over every transport: `local` (one process) and ssh+stdinserver (the
# sink served by `stdinserver` behind the session's real sshd). ZREPLPY_TRANSPORTS narrows it.
TRANSPORTS = [t for t in os.environ.get("ZREPLPY_TRANSPORTS", "local,ssh").split(",") if t]


def pytest_generate_tests(metafunc):
    """ZFS scenarios (those using `pools`) once per transport; pure tests once."""
    if "pools" in metafunc.fixturenames and "transport" in metafunc.fixturenames:
        metafunc.parametrize("transport", TRANSPORTS, indirect=True)


@pytest.fixture(autouse=True)
def transport(request):
    """Which transport this test's Rig configures (import this and pytest_generate_tests
    into a module to run its Rig scenarios over each transport)."""
    kind = getattr(request, "param", "local")
    Rig.transport, Rig.bed = kind, None
    if kind == "ssh":
        Rig.bed = request.getfixturevalue("ssh_bed")
    yield kind
    Rig.transport, Rig.bed = "local", None


class Rig:
    """One test's sender subtree `<src>/<tag>`, the sink's root_fs `<dst>/<tag>` (both
    created with mountpoint=none), its rundir and its configuration file."""

    transport = "local"
    bed = None

    def __init__(self, pools, tmp_path, tag):
        if self.transport != "local":       # the module's pools are shared by both runs
            tag = "%s_%s" % (tag, self.transport)
        self.src = "%s/%s" % (pools.src, tag)
        self.sink = "%s/%s" % (pools.dst, tag)
        self.recv_root = self.sink + "/host1"
        self.rundir = tmp_path / "run"
        self.cfg = tmp_path / "zrepl.yml"
        make_tree(self.src, [])
        make_tree(self.sink, [])

    def fs(self, rel):
        return "%s/%s" % (self.src, rel)

    def target(self, fs):
        """Where the sink keeps sender filesystem `fs`."""
        return "%s/%s" % (self.recv_root, fs)

    def configure(self, filesystems, *, snapshotting=MANUAL, keep_sender=KEEP_ALL,
                  keep_receiver=KEEP_ALL, push_extra=(), sink_extra=()):
        """Write the push + sink configuration (SPEC §2.12) and return its path.

        filesystems: a list of sender names (each accepted), or a {pattern: bool} dict.
        push_extra, sink_extra: extra YAML lines for the push / sink job (indented here).
        """
        if not isinstance(filesystems, dict):
            filesystems = {f: True for f in filesystems}
        fs = ", ".join("%s: %s" % (q(k), "true" if v else "false")
                       for k, v in filesystems.items())
        lines = ["global: {rundir: %s}" % q(self.rundir),
                 "jobs:",
                 "  - name: sink",
                 "    type: sink",
                 "    root_fs: %s" % q(self.sink),
                 "    serve: %s" % (self.SERVE[self.transport])]
        lines += ["    " + ln for ln in sink_extra]
        lines += ["  - name: push",
                  "    type: push",
                  "    connect: %s" % self.connect_yaml(),
                  "    filesystems: {%s}" % fs,
                  "    snapshotting: %s" % snapshotting]
        lines += ["    " + ln for ln in push_extra]
        lines += ["    pruning:",
                  "      keep_sender: %s" % keep_sender,
                  "      keep_receiver: %s" % keep_receiver]
        self.cfg.write_text("\n".join(lines) + "\n")
        self.serve()
        return self.cfg

    SERVE = {"local": "{type: local, listener_name: disk}",
             "ssh": "{type: stdinserver, client_identities: [host1]}"}

    def connect_yaml(self):
        if self.transport == "ssh":
            return self.bed.connect_yaml("host1")
        return "{type: local, listener_name: disk, client_identity: host1}"

    def serve(self, env=None):
        """Over ssh: the bed's forced command serves this configuration (with env)."""
        if self.bed is not None:
            self.bed.use(self.cfg, env)

    def once(self, *args, env=None, timeout=120):
        """`once --json ARGS` -> (CompletedProcess, document); no traceback allowed."""
        self.serve(env)
        cp = run_cli("once", "--json", *args, config=self.cfg, env=env, timeout=timeout)
        assert_no_traceback(cp)
        try:
            doc = json.loads(cp.stdout)
        except ValueError:
            raise AssertionError("once --json printed no JSON (exit %d):\n%s\n%s"
                                 % (cp.returncode, cp.stdout, cp.stderr))
        for job in doc["jobs"]:             # the typed report reads back to the same document
            assert zrepl.JobReport.from_json(job).to_json() == job
        return cp, doc

    def ok(self, *args, env=None):
        """`once` that must succeed completely -> the push job's report."""
        cp, doc = self.once(*args, env=env)
        assert cp.returncode == 0 and doc["exit_code"] == 0, cp.stderr
        job = push_report(doc)
        assert job["state"] == "done", (job["errors"], cp.stderr)
        return job

    def abstractions(self):
        """`zfs-abstraction list` restricted to this test's two subtrees -> its lines."""
        cp = run_cli("zfs-abstraction", "list", "--fs",
                     "%s<:ok,%s<:ok" % (self.src, self.sink))
        assert_no_traceback(cp)
        assert cp.returncode == 0, cp.stderr
        return cp.stdout.splitlines()

    def trees(self):
        """{name: guid} of both subtrees: "unchanged" in SPEC §13 compares these."""
        return {n: v["guid"] for root in (self.src, self.sink) for n, v in state(root).items()}


def assert_exit(cp, want, doc=None):
    """The process exit code and the `once` document's exit_code (SPEC §1.3)."""
    got = (cp.returncode, doc["exit_code"] if doc is not None else want)
    assert got == (want, want), "want exit %d, got %r; stderr:\n%s" % (want, got, cp.stderr)


def push_report(doc):
    jobs = {j["job"]: j for j in doc["jobs"]}
    assert list(jobs) == ["push"], list(jobs)
    return jobs["push"]


def fs_reports(job):
    return {f["fs"]: f for f in job["replication"]["filesystems"]}


def snap_guids(fs):
    """{"@name": guid} of fs's own snapshots (not its children's)."""
    return {n[len(fs):]: v["guid"] for n, v in state(fs).items() if n.startswith(fs + "@")}


def snap_order(fs):
    """fs's own snapshot names ("@x"), oldest first by createtxg."""
    st = {n: v for n, v in state(fs).items() if n.startswith(fs + "@")}
    return [n[len(fs):] for n in sorted(st, key=lambda n: st[n]["createtxg"])]


def assert_guids_equal(rig, fs):
    """SPEC §13 "GUIDs equal": same snapshot names with the same GUIDs on both sides."""
    sent = snap_guids(fs)
    assert sent, "%s has no snapshots" % fs
    assert snap_guids(rig.target(fs)) == sent


_CAPS = []


def caps():
    """This host's probed ZFS capabilities (once per test session)."""
    if not _CAPS:
        _CAPS.append(zrepl.ZFS().capabilities())
    return _CAPS[0]


def pool_caps(fs):
    """{bookmarks, resume, encryption} of fs's pool (probed again for a pool made since)."""
    pool = fs.split("/")[0]
    if pool not in caps().pools:
        _CAPS[:] = [zrepl.ZFS().capabilities()]
    return caps().pools[pool]


def has_bookmarks(fs):
    """Does fs's pool make bookmarks? Then the cursor is a bookmark, else a hold."""
    return pool_caps(fs)["bookmarks"]


def holds_view(root):
    """{snapshot: (userrefs, hold tags)} of every snapshot under root. The tags are read
    with `zfs holds` where it works (sorted), else from the local zrepl:holds record, in
    the order placed (zfs-fuse, whose `zfs holds` is broken); there a record on a snapshot
    without holds names nothing (SPEC §3.4 as zrepl.py keeps it: it is not rewritten when
    the last hold goes) and step holds are counted in userrefs but not recorded."""
    out = zfs("get", "-Hp", "-r", "-o", "name,property,value,source", "userrefs,zrepl:holds",
              root).stdout
    refs, tags = {}, {}
    for line in out.splitlines():
        name, prop, rest = line.split("\t", 2)
        value, _, source = rest.rpartition("\t")
        if "@" not in name:
            continue
        if prop == "userrefs":
            refs[name] = int(value)
        elif source == "local":
            tags[name] = tuple(value.split(","))
    if caps()["holds_list"]:
        tags = {}
        held = [n for n, r in refs.items() if r]
        for i in range(0, len(held), 50):
            for line in zfs("holds", "-H", *held[i:i + 50]).stdout.splitlines():
                name, tag = line.split("\t")[:2]
                tags.setdefault(name, []).append(tag)
        tags = {n: tuple(sorted(t)) for n, t in tags.items()}
    return {n: (refs[n], tags.get(n, ()) if refs[n] else ()) for n in refs}


def true_holds(*snapshots):
    """{snapshot: sorted hold tags} as ZFS has them, records aside: `zfs holds` where it
    works, else read out of the pool with zdb (tests/zfs-fuse/holds.sh, about a second):
    zrepl.py does not record its step holds there (README, "ZFS support")."""
    if caps()["holds_list"]:
        out = zfs("holds", "-H", *snapshots).stdout
    else:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zfs-fuse",
                              "holds.sh")
        cp = subprocess.run(["sh", script] + list(snapshots), capture_output=True,
                            text=True, check=True)
        out = cp.stdout
    tags = {n: [] for n in snapshots}
    for line in out.splitlines():
        name, tag = line.split("\t")[:2]
        tags[name].append(tag.strip())
    return {n: sorted(t) for n, t in tags.items()}


def cursor_bookmark(snapshot, job="push"):
    guid = int(zfs("get", "-Hp", "-o", "value", "guid", snapshot).stdout)
    return "%s#zrepl_CURSOR_G_%016x_J_%s" % (snapshot.split("@")[0], guid, job)


def cursor_holds(snapshot):
    """What holds_view shows for the sender snapshot the cursor points at: the cursor hold
    on pools without bookmarks; none on pools with them, where the cursor is a bookmark
    (checked here to exist)."""
    if not has_bookmarks(snapshot):
        return (1, (CURSOR_TAG,))
    mark = cursor_bookmark(snapshot)
    fs = snapshot.split("@")[0]
    marks = zfs("list", "-H", "-o", "name", "-t", "bookmark", "-r", fs).stdout.split("\n")
    assert mark in marks, "no cursor bookmark %s (bookmarks: %s)" % (mark, marks)
    return (0, ())


def cursor_line(snapshot):
    """The `zfs-abstraction list` line of the cursor at snapshot."""
    if not has_bookmarks(snapshot):
        return 'replication-cursor-hold "%s" on %s' % (CURSOR_TAG, snapshot)
    return "replication-cursor-bookmark-v2 %s" % cursor_bookmark(snapshot)


def assert_only_known_holds(root):
    """Every snapshot's userrefs equals the number of zrepl tags recorded on it: no leaked
    `.send-<pid>-0` or other hold that zfs-fuse could not show (zfs holds is broken)."""
    bad = {n: v for n, v in holds_view(root).items() if v[0] != len(v[1])}
    assert not bad, "snapshots with holds nobody recorded: %r" % bad


def local_prop(name, prop):
    value, source = zfs("get", "-H", "-o", "value,source", prop, name).stdout.rstrip(
        "\n").split("\t")
    return value if source == "local" else None


def zfs_logger(tmp_path, action=""):
    """A `zfs` first in PATH: logs its argv (tab-separated, one line a call), runs the shell
    snippet `action` (which sees "$@"), then execs the real zfs -> (env, log path)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "zfs-calls.log"
    wrapper = bindir / "zfs"
    wrapper.write_text('#!/bin/sh\nIFS="$(printf \'\\t\')"\necho "$*" >> %s\nIFS=" "\n%s\n'
                       'exec %s "$@"\n' % (q(log), action, REAL_ZFS))
    wrapper.chmod(0o755)
    return {"PATH": "%s:%s" % (bindir, os.environ.get("PATH", "/usr/bin:/bin"))}, log


def replicated_pair(rig):
    """Filesystems `a` and `b` of rig, replicated at @s1, with a new @s2 each -> (a, b)."""
    make_tree(rig.src, ["a", "b"])
    a, b = rig.fs("a"), rig.fs("b")
    rig.configure([a, b])
    for fs in (a, b):
        snap(fs, "s1")
    rig.ok()
    for fs in (a, b):
        snap(fs, "s2")
    return a, b


def logged_calls(log, *roots):
    """Logged argvs that name a dataset under one of roots (probes of bogus names are not)."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        argv = line.split("\t")
        if any(a == r or a.startswith((r + "/", r + "@")) for a in argv[1:] for r in roots):
            out.append(argv)
    return out


# --- SPEC §13 item 17: the initial push -----------------------------------------------------

def test_initial_push_creates_placeholders_and_mounts_nothing(pools, tmp_path):
    rig = Rig(pools, tmp_path, "init")
    make_tree(rig.src, ["x", "x/y", "z"])
    xy, z = rig.fs("x/y"), rig.fs("z")
    rig.configure([xy, z], snapshotting=PERIODIC)
    env, log = zfs_logger(tmp_path)
    job = rig.ok("--snapshot", "always", env=env)

    # the placeholders are made before the first stream (beside the step holds), not
    # while it waits for them
    calls = logged_calls(log, rig.src, rig.sink)
    creates = [i for i, argv in enumerate(calls) if argv[0] == "create"]
    streams = [i for i, argv in enumerate(calls) if argv[0] == "send" and "-n" not in argv]
    assert len(creates) == 4 and streams and max(creates) < streams[0], calls

    # one round, one shared name, replicated in full
    name = job["snapshotting"]["name"]
    assert re.fullmatch(r"zrepl_\d{8}_\d{6}_000", name), name
    for fs in (xy, z):
        assert snap_guids(fs) == {"@" + name: snap_guids(fs)["@" + name]}
        assert_guids_equal(rig, fs)
    reports = fs_reports(job)
    assert sorted(reports) == [xy, z]
    for fs, f in reports.items():
        assert f["state"] == "done" and f["receiver_fs"] == rig.target(fs)
        assert [(s["kind"], s["from"], s["to"], s["state"]) for s in f["steps"]] == \
            [("full", None, "@" + name, "done")]

    # the datasets in between are placeholders (SPEC §3.3), set locally
    for ph in (rig.recv_root, rig.target(pools.src), rig.target(rig.src),
               rig.target(rig.fs("x"))):
        assert local_prop(ph, "zrepl:placeholder") == "on", ph
        assert local_prop(ph, "mountpoint") == "none", ph
        assert local_prop(ph, "canmount") == "off", ph
    # the received filesystems are not (an inherited value does not count)
    for fs in (xy, z):
        assert local_prop(rig.target(fs), "zrepl:placeholder") is None
    cp = run_cli("test", "placeholder", "--dataset", rig.target(rig.fs("x")))
    assert cp.returncode == 0 and cp.stdout.splitlines()[1].startswith("yes\t"), cp.stdout
    cp = run_cli("test", "placeholder", "--dataset", rig.target(xy))
    assert cp.returncode == 0 and cp.stdout.splitlines()[1].startswith("no\t"), cp.stdout

    # received with -u: nothing on either side is mounted
    for root in (rig.src, rig.sink):
        mounted = zfs("get", "-H", "-r", "-o", "name,value", "mounted", root).stdout
        assert {ln.split("\t")[1] for ln in mounted.splitlines()} <= {"no", "-"}, mounted


# --- holds the job did not place (README "ZFS support": step holds are not recorded) -------

def test_a_hold_the_job_did_not_place_survives_every_cycle(pools, tmp_path):
    """Where `zfs holds` is broken, a snapshot held more times than its zrepl:holds record
    says may carry the job's step hold, and the job releases its step tag there; a user's
    own hold on the same snapshots (here on the first `to`, then on an old one) stays, and
    the snapshots stay held through it. OpenZFS names every tag: nothing is guessed."""
    rig = Rig(pools, tmp_path, "foreignhold")
    make_tree(rig.src, ["a"])
    a = rig.fs("a")
    rig.configure([a])
    snap(a, "s1")
    zfs("hold", "mine", a + "@s1")
    rig.ok()
    snap(a, "s2")
    env, log = zfs_logger(tmp_path)
    rig.ok(env=env)
    snap(a, "s3")
    rig.ok()
    assert_guids_equal(rig, a)
    held = true_holds(a + "@s1", a + "@s2", a + "@s3")
    assert held[a + "@s1"] == ["mine"] and held[a + "@s2"] == []
    assert held[a + "@s3"] == ([CURSOR_TAG] if cursor_holds(a + "@s3")[0] else [])
    assert holds_view(a)[a + "@s1"][0] == 1
    if not caps()["holds_list"]:
        # the unexplained hold on @s1 was tried as the job's step tag ("no such tag")
        tried = [c for c in logged_calls(log, a) if c[:2] == ["release", STEP_TAG]]
        assert any(a + "@s1" in c for c in tried), tried
    zfs("release", "mine", a + "@s1")


@pytest.mark.parametrize("record", [CURSOR_TAG, LAST_RECEIVED_TAG])
def test_a_crash_between_a_hold_and_its_record_is_cleaned_by_the_next_phase(
        pools, tmp_path, record):
    """Where `zfs holds` is broken, a phase records its new cursor and last-received holds
    after placing them, beside the releases of the old ones. A crash in between (the
    process is killed as that record's `zfs set` starts) leaves a hold no record names;
    the job's next phase releases its own tag there, and nothing else: every hold is
    recorded again, on the snapshots it belongs to. (OpenZFS lists holds: no records.)"""
    if caps()["holds_list"]:
        pytest.skip("this ZFS lists holds (`zfs holds`): zrepl.py writes no records")
    rig = Rig(pools, tmp_path, "crashrec" + record[6:10].lower())
    a, b = replicated_pair(rig)
    env, _ = zfs_logger(tmp_path, action=(
        'case "$*" in "set zrepl:holds=%s "*) kill -9 $PPID; sleep 5; exit 1;; esac' % record))
    rig.serve(env)
    cp = run_cli("once", config=rig.cfg, env=env)
    assert "Traceback" not in cp.stderr, cp.stderr
    if rig.transport == "local" or record == CURSOR_TAG:
        assert cp.returncode == -9, (cp.returncode, cp.stderr)
    # else the sink behind ssh was killed: the run's next attempt finds nothing to do
    time.sleep(0.5)                 # the killed run's other zfs calls of that level end
    for fs in (a, b):
        assert_guids_equal(rig, fs)   # the transfers were done; only the records are not
    side = a if record == CURSOR_TAG else rig.target(a)
    count, tags = holds_view(side)[side + "@s2"]
    assert count >= 1 and record not in tags, holds_view(side)
    rig.serve()
    rig.ok()                        # nothing new to send: the leftover stays for now
    for fs in (a, b):
        snap(fs, "s3")
    rig.ok()
    for fs in (a, b):
        assert_guids_equal(rig, fs)
        t = rig.target(fs)
        assert holds_view(fs) == {fs + "@s1": (0, ()), fs + "@s2": (0, ()),
                                  fs + "@s3": cursor_holds(fs + "@s3")}, holds_view(fs)
        assert holds_view(t) == {t + "@s1": (0, ()), t + "@s2": (0, ()),
                                 t + "@s3": (1, (LAST_RECEIVED_TAG,))}, holds_view(t)
    assert_only_known_holds(rig.src)
    assert_only_known_holds(rig.sink)


# --- SPEC §13 items 18 and 22: incrementals, a no-change cycle, the holds -------------------

def test_incremental_then_no_change_cycle_and_moving_holds(pools, tmp_path):
    rig = Rig(pools, tmp_path, "incr")
    make_tree(rig.src, ["x", "x/y", "z"])
    xy, z = rig.fs("x/y"), rig.fs("z")
    rig.configure([xy, z], snapshotting=PERIODIC)
    first = rig.ok("--snapshot", "always")["snapshotting"]["name"]

    # item 22, after 17: cursor hold on the sender's newest, last-received on the receiver's
    def assert_holds(newest, old, listing=True):
        for fs in (xy, z):
            sender = holds_view(fs)
            receiver = holds_view(rig.target(fs))
            assert sender["%s@%s" % (fs, newest)] == cursor_holds("%s@%s" % (fs, newest))
            assert receiver["%s@%s" % (rig.target(fs), newest)] == (1, (LAST_RECEIVED_TAG,))
            for o in old:
                assert sender["%s@%s" % (fs, o)] == (0, ())
                assert receiver["%s@%s" % (rig.target(fs), o)] == (0, ())
        if not listing:      # `zfs-abstraction` lists every pool of the host: seconds
            return
        assert rig.abstractions() == sorted(
            [cursor_line("%s@%s" % (fs, newest)) for fs in (xy, z)] +
            ['last-received-hold "%s" on %s@%s' % (LAST_RECEIVED_TAG, rig.target(fs), newest)
             for fs in (xy, z)], key=lambda line: re.split(r" on |^\S+ ", line)[-1].split("@")[0].split("#")[0])
    assert_holds(first, [])

    # item 18: a new snapshot -> one incremental per filesystem
    time.sleep(1.05)                 # snapshot names have one-second resolution
    env, log = zfs_logger(tmp_path)
    job = rig.ok("--snapshot", "always", env=env)
    second = job["snapshotting"]["name"]
    assert second != first
    for fs in (xy, z):
        assert_guids_equal(rig, fs)
        assert snap_order(fs) == ["@" + first, "@" + second]
        sends = [a for a in logged_calls(log, fs) if a[0] == "send" and "-n" not in a]
        assert sends == [["send", "-i", "%s@%s" % (fs, first), "%s@%s" % (fs, second)]]
        f = fs_reports(job)[fs]
        assert [(s["kind"], s["from"], s["to"]) for s in f["steps"]] == \
            [("incremental", "@" + first, "@" + second)]
    assert_holds(second, [first])

    # a no-change cycle: no mutating command, each side listed once
    log.unlink()
    job = rig.ok("--snapshot", "never", env=env)
    assert {f["state"] for f in job["replication"]["filesystems"]} == {"uptodate"}
    calls = logged_calls(log, rig.src, rig.sink)
    assert [a for a in calls if a[0] in MUTATING] == []
    listings = [a for a in calls if a[:3] == ["get", "-Hp", "-r"]]
    # Observed: exactly 2 -- one listing of the sender's filter roots, one of the sink's
    # root_fs. Pruning both sides reuses them: nothing mutating ran, so the listing cache
    # (SPEC §4.3 "a no-change cycle lists each side once") was never invalidated. At most
    # 4 would still be one listing per side per phase (replication, pruning).
    assert len(listings) == 2, listings
    assert sorted(a[-1] for a in listings) == sorted([z, rig.recv_root])
    assert [a for a in listings if a[-2:] == [xy, z]], listings
    assert_holds(second, [first], listing=False)

    # item 22: a user property on the receiver's newest snapshot does not break the next
    # incremental receive
    for fs in (xy, z):
        zfs("set", "test:note=checked by hand", "%s@%s" % (rig.target(fs), second))
    time.sleep(1.05)
    job = rig.ok("--snapshot", "always")
    third = job["snapshotting"]["name"]
    for fs in (xy, z):
        assert_guids_equal(rig, fs)
        assert fs_reports(job)[fs]["steps"][0]["kind"] == "incremental"
        assert zfs("get", "-H", "-o", "value", "test:note",
                   "%s@%s" % (rig.target(fs), second)).stdout.strip() == "checked by hand"
    assert_holds(third, [first, second], listing=False)


def test_receiver_listing_root_is_the_identity_root(pools, tmp_path):
    rig = Rig(pools, tmp_path, "lroot")
    make_tree(rig.src, ["a"])
    make_tree(rig.sink, ["otherclient"])            # another identity's tree under root_fs
    a = rig.fs("a")
    rig.configure([a])
    snap(a, "s1")
    env, log = zfs_logger(tmp_path)
    rig.ok(env=env)
    listings = [argv for argv in logged_calls(log, rig.sink)
                if argv[:3] == ["get", "-Hp", "-r"]]
    assert listings and all(argv[-1] == rig.recv_root for argv in listings), listings


# --- SPEC §7 on both sides of a push; §13 item 23 --------------------------------------------

def test_receiver_pruning_keeps_last_n(pools, tmp_path):
    rig = Rig(pools, tmp_path, "prrecv")
    make_tree(rig.src, ["a"])
    a = rig.fs("a")
    for s in ("s1", "s2", "s3", "s4"):
        snap(a, s)
    rig.configure([a], keep_receiver="[{type: last_n, count: 2}]",
                  push_extra=["conflict_resolution: {initial_replication: all}"])
    job = rig.ok()
    assert snap_order(a) == ["@s1", "@s2", "@s3", "@s4"]          # keep_sender keeps all
    assert snap_order(rig.target(a)) == ["@s3", "@s4"]
    assert snap_guids(rig.target(a)) == {k: v for k, v in snap_guids(a).items()
                                         if k in ("@s3", "@s4")}
    [recv] = job["pruning"]["receiver"]["filesystems"]
    assert (recv["fs"], recv["state"], sorted(recv["destroyed"])) == (a, "done", ["s1", "s2"])
    assert recv["kept_held"] == ["s4"]                # the last-received hold
    [send] = job["pruning"]["sender"]["filesystems"]
    assert send["destroyed"] == [] and send["planned_destroy"] == []


def test_sender_pruning_keeps_every_snapshot_newer_than_the_cursor(pools, tmp_path):
    rig = Rig(pools, tmp_path, "prsend")
    make_tree(rig.src, ["a"])
    a = rig.fs("a")
    rig.configure([a], keep_sender="[{type: not_replicated}, {type: last_n, count: 1}]")
    snap(a, "s1")
    rig.ok()
    snap(a, "s2")
    job = rig.ok()
    assert snap_order(a) == ["@s2"]          # s1 is replicated and not the newest: destroyed
    assert snap_order(rig.target(a)) == ["@s1", "@s2"]
    [send] = job["pruning"]["sender"]["filesystems"]
    assert send["destroyed"] == ["s1"]

    # item 23: the sink's root_fs disappears (renamed away, so that it can come back);
    # new snapshots cannot be replicated
    gone = rig.sink + "_gone"
    zfs("rename", rig.sink, gone)
    snap(a, "s3")
    snap(a, "s4")
    cp, doc = rig.once()
    job = push_report(doc)
    assert (job["state"], job["exit_code"]) == ("failed", 1)
    assert (job["replication"]["state"], job["replication"]["attempts"]) == ("failed", 1)
    assert "root_fs %s does not exist" % rig.sink in json.dumps(job["errors"])
    assert "root_fs %s does not exist" % rig.sink in cp.stderr
    assert snap_order(a) == ["@s2", "@s3", "@s4"]      # nothing newer than the cursor went
    assert holds_view(a)[a + "@s2"] == cursor_holds(a + "@s2")
    assert job["pruning"]["receiver"]["state"] == "failed"

    # the sink comes back: s3 and s4 follow incrementally, then the sender keeps only s4
    zfs("rename", gone, rig.sink)
    job = rig.ok()
    [f] = job["replication"]["filesystems"]
    assert [(s["kind"], s["from"], s["to"]) for s in f["steps"]] == \
        [("incremental_batch", "@s2", "@s4")]
    assert snap_order(rig.target(a)) == ["@s1", "@s2", "@s3", "@s4"]
    assert snap_order(a) == ["@s4"]
    assert holds_view(a) == {a + "@s4": cursor_holds(a + "@s4")}
    assert_exit(cp, 1, doc)


def test_pruning_after_a_phase_reads_the_listings_the_phase_kept_true(pools, tmp_path):
    """SPEC §4.3: a cycle that moved data lists each side once, and pruning lists
    nothing: the snapshots an incremental received (read back by GUID, which verifies
    them) and the holds the phase moved are applied to the kept listings. A stale
    listing would miss s2 and s3 and show the old cursor and last-received holds on s1."""
    rig = Rig(pools, tmp_path, "prlist")
    make_tree(rig.src, ["a", "b"])
    fss = [rig.fs("a"), rig.fs("b")]
    rig.configure(fss, keep_sender="[{type: not_replicated}, {type: last_n, count: 1}]",
                  keep_receiver="[{type: last_n, count: 2}]")
    for fs in fss:
        snap(fs, "s1")
    rig.ok()
    for fs in fss:
        snap(fs, "s2")
        snap(fs, "s3")
    env, log = zfs_logger(tmp_path)
    job = rig.ok(env=env)
    for fs in fss:
        assert snap_order(fs) == ["@s3"]
        assert snap_order(rig.target(fs)) == ["@s2", "@s3"]
        assert holds_view(fs)[fs + "@s3"] == cursor_holds(fs + "@s3")
        assert holds_view(rig.target(fs)) == {rig.target(fs) + "@s2": (0, ()),
                                              rig.target(fs) + "@s3": (1, (LAST_RECEIVED_TAG,))}
    pruned = {side: {f["fs"]: f for f in job["pruning"][side]["filesystems"]}
              for side in ("sender", "receiver")}
    for fs in fss:
        assert sorted(pruned["sender"][fs]["destroyed"]) == ["s1", "s2"]
        assert (pruned["receiver"][fs]["destroyed"], pruned["receiver"][fs]["kept_held"]) == \
            (["s1"], ["s3"])
    calls = logged_calls(log, rig.src, rig.sink)
    full = [a for a in calls if a[:3] == ["get", "-Hp", "-r"]]
    relisted = [a for a in calls if a[:4] == ["get", "-Hp", "-d", "1"] and
                "name,property,value,source" in a]
    assert sorted(a[-1] for a in full) == sorted([rig.src + "/b", rig.recv_root]), full
    assert relisted == []


def _is_size_estimate(argv):
    """`send -n -v -P` (SPEC §8.9), or a full stream's `referenced` where ZFS has no -n."""
    return (argv[0] == "send" and "-n" in argv) or (argv[0] == "get" and "referenced" in argv)


def test_size_estimates_are_made_at_planning_time_beside_the_step_holds(pools, tmp_path):
    """SPEC §8.9: the estimates run at planning time, `concurrency.size_estimates` at
    once, not each just before its step: here all six are made while the step hold
    (slowed by a second) is still waiting, and every step then uses its own."""
    rig = Rig(pools, tmp_path, "estimates")
    names = ["f%d" % i for i in range(6)]
    make_tree(rig.src, names)
    fss = [rig.fs(n) for n in names]
    for fs in fss:
        snap(fs, "s1")
    rig.configure(fss)
    marker = "hold-slept"
    env, log = zfs_logger(tmp_path, action=(
        '[ "$1" = hold ] && { sleep 1; echo %s >> %s; }' % (marker, q(tmp_path / "zfs-calls.log"))))
    job = rig.ok(env=env)
    lines = [ln.split("\t") for ln in log.read_text().splitlines()]
    woke = [i for i, a in enumerate(lines) if a == [marker]]
    estimates = [i for i, a in enumerate(lines) if _is_size_estimate(a) and
                 any(x.startswith(rig.src + "/") for x in a)]
    assert len(estimates) == 6 and woke, lines
    assert max(estimates) < woke[0], lines
    for fs, f in fs_reports(job).items():
        [step] = f["steps"]
        assert step["bytes_expected"] and step["bytes_expected"] > 0, (fs, step)


def test_a_lone_step_starts_beside_its_size_estimate(pools, tmp_path):
    """The size decides only whether a step may start beside a big one (the default
    concurrency): with one filesystem to replicate, its full stream starts at once and the
    estimate is made beside it; the report still has it. With two, each step waits for its
    own size before it starts. The one filesystem's estimate waits (30 s at most) for its
    stream to start, which it would never see if the step waited for it; the two
    filesystems' are slowed by a second."""
    marker = "estimate-slept"
    for names in (["solo"], ["f0", "f1"]):
        rig = Rig(pools, tmp_path, "lone" + str(len(names)))
        make_tree(rig.src, names)
        fss = [rig.fs(n) for n in names]
        for fs in fss:
            snap(fs, "s1")
        rig.configure(fss)
        sub = tmp_path / ("log" + str(len(names)))
        sub.mkdir()
        calls = q(sub / "zfs-calls.log")
        wait = ('i=0; while [ $i -lt 300 ] && ! grep -q "^send$(printf \'\\t\')%s/" %s; do '
                'sleep 0.1; i=$((i+1)); done' % (rig.src, calls)) if len(names) == 1 \
            else "sleep 1"
        env, log = zfs_logger(sub, action=(
            'case "$*" in *referenced*%s/*|send*-n*%s/*) %s; echo %s >> %s;; esac'
            % (rig.src, rig.src, wait, marker, calls)))
        job = rig.ok(env=env)
        lines = [ln.split("\t") for ln in log.read_text().splitlines()]
        slept = [i for i, a in enumerate(lines) if a == [marker]]
        streams = [i for i, a in enumerate(lines) if a[0] == "send" and "-n" not in a and
                   any(x.startswith(rig.src + "/") for x in a)]
        assert len(slept) == len(names) and len(streams) == len(names), lines
        if len(names) == 1:
            assert streams[0] < slept[0], lines
            # the filesystem received in full is listed again beside the verify, before
            # its last-received hold: pruning after it lists nothing
            listings = [i for i, a in enumerate(lines) if a[:2] == ["get", "-Hp"] and
                        a[2] in ("-r", "-d")]
            held = [i for i, a in enumerate(lines) if a[0] == "hold" and
                    a[1].startswith("zrepl_last_received_")]
            assert len(listings) == 3 and len(held) == 1 and listings[-1] < held[0], lines
        else:
            assert slept[0] < min(streams), lines
        for fs, f in fs_reports(job).items():
            [step] = f["steps"]
            assert step["bytes_expected"] and step["bytes_expected"] > 0, (fs, step)


def test_a_phase_moves_every_cursor_in_a_few_calls_for_all_filesystems(pools, tmp_path):
    """The issue's "mutating calls per side per cycle bounded by a constant": an
    incremental of six filesystems moves their cursors (holds, or bookmarks where the pool
    has them) and drops the step holds in a number of hold / release / holds calls that
    does not grow with the filesystems. `zfs bookmark` and a bookmark's destroy take one
    name each: those are one per filesystem, run side by side."""
    rig = Rig(pools, tmp_path, "cursors")
    names = ["f%d" % i for i in range(6)]
    make_tree(rig.src, names)
    fss = [rig.fs(n) for n in names]
    rig.configure(fss)
    for fs in fss:
        snap(fs, "s1")
    rig.ok()
    for fs in fss:
        snap(fs, "s2")
    env, log = zfs_logger(tmp_path)
    rig.ok(env=env)
    calls = logged_calls(log, rig.src)
    count = {verb: sum(1 for a in calls if a[0] == verb)
             for verb in ("hold", "release", "holds", "bookmark", "destroy")}
    marks = has_bookmarks(rig.src)
    # step holds placed once, each tag released once, one `zfs holds` before and after
    assert count["hold"] <= (1 if marks else 2), calls
    assert count["release"] <= 2 and count["holds"] <= 2, calls
    assert (count["bookmark"], count["destroy"]) == ((6, 6) if marks else (0, 0)), calls
    for fs in fss:
        assert holds_view(fs) == {fs + "@s1": (0, ()), fs + "@s2": cursor_holds(fs + "@s2")}
        if marks:
            assert _bookmarks(fs) == [cursor_bookmark(fs + "@s2")]


def _bookmarks(fs):
    out = zfs("list", "-H", "-o", "name", "-t", "bookmark", "-r", fs).stdout
    return sorted(ln for ln in out.splitlines() if "#" in ln)


def test_a_cursor_the_receiver_did_not_confirm_is_withdrawn(pools, tmp_path):
    """The sender places the new cursors beside the receiver's checks; where the receiver
    cannot hold what it received, that filesystem fails and its new cursor (hold or
    bookmark) is taken back: the cursor stays where the receiver is known to be. The other
    filesystem's cursor moves."""
    rig = Rig(pools, tmp_path, "withdraw")
    a, b = replicated_pair(rig)
    # the receiver's hold of its new snapshot of `a` fails (ZFS refuses it as it would
    # an unprivileged user); everything else is the real zfs
    env, _ = zfs_logger(tmp_path, action=(
        'case "$*" in "hold %s "*%s@s2*) echo "cannot hold \'%s@s2\': permission denied" >&2;'
        ' exit 1;; esac' % (LAST_RECEIVED_TAG, rig.target(a), rig.target(a))))
    rig.serve(env)
    cp, doc = rig.once(env=env)
    assert_exit(cp, 1, doc)
    reports = fs_reports(push_report(doc))
    assert reports[a]["state"] == "error" and reports[b]["state"] == "done", reports
    assert holds_view(a) == {a + "@s1": cursor_holds(a + "@s1"), a + "@s2": (0, ())}
    assert holds_view(b) == {b + "@s1": (0, ()), b + "@s2": cursor_holds(b + "@s2")}
    if has_bookmarks(a):
        assert _bookmarks(a) == [cursor_bookmark(a + "@s1")]
        assert _bookmarks(b) == [cursor_bookmark(b + "@s2")]
    # the next cycle, without the fault: `a` is up to date and its holds are right
    snap(a, "s3")
    rig.ok()
    assert holds_view(a)[a + "@s3"] == cursor_holds(a + "@s3")
    assert holds_view(rig.target(a))[rig.target(a) + "@s3"] == (1, (LAST_RECEIVED_TAG,))


def test_a_step_hold_zfs_refuses_fails_its_filesystem_after_its_step(pools, tmp_path):
    """A local sender places the step holds beside the streams (README "Performance"):
    where ZFS refuses the one on `a`'s new snapshot (as it would an unprivileged user),
    `a`'s step still runs and its cursor moves where the receiver confirmed it, then `a`
    fails with ZFS's refusal; `b` is done. No step hold is left anywhere, and the next
    cycle without the fault finds both up to date."""
    rig = Rig(pools, tmp_path, "stepfail")
    a, b = replicated_pair(rig)
    env, log = zfs_logger(tmp_path, action=(
        'case "$*" in "hold %s "*%s@s2*) echo "cannot hold \'%s@s2\': permission denied" >&2;'
        ' exit 1;; esac' % (STEP_TAG, a, a)))
    rig.serve(env)
    cp, doc = rig.once(env=env)
    assert_exit(cp, 1, doc)
    assert any(c[:2] == ["hold", STEP_TAG] and a + "@s2" in c for c in logged_calls(log, a))
    reports = fs_reports(push_report(doc))
    assert reports[a]["state"] == "error" and reports[b]["state"] == "done", reports
    assert "permission denied" in reports[a]["error"]["message"], reports[a]["error"]
    assert_guids_equal(rig, a)
    assert_guids_equal(rig, b)
    for fs in (a, b):
        assert holds_view(fs) == {fs + "@s1": (0, ()), fs + "@s2": cursor_holds(fs + "@s2")}
        assert holds_view(rig.target(fs)) == {rig.target(fs) + "@s1": (0, ()),
                                              rig.target(fs) + "@s2": (1, (LAST_RECEIVED_TAG,))}
    snap(a, "s3")
    rig.ok()
    assert_guids_equal(rig, a)
    assert holds_view(a)[a + "@s3"] == cursor_holds(a + "@s3")


# --- SPEC §8.5: batch_incrementals, §13 item 21 ------------------------------------------------

def test_batched_and_unbatched_incrementals_give_the_same_result(pools, tmp_path):
    sends = {}
    for batch in (True, False):
        tag = "batch%s" % ("T" if batch else "F")
        (tmp_path / tag).mkdir()
        rig = Rig(pools, tmp_path / tag, tag)
        make_tree(rig.src, ["a"])
        a = rig.fs("a")
        for s in ("c", "b", "a"):                     # created in this order
            snap(a, s)
        rig.configure([a], push_extra=[
            "conflict_resolution: {initial_replication: all}",
            "replication: {batch_incrementals: %s}" % ("true" if batch else "false")])
        env, log = zfs_logger(tmp_path / tag)
        job = rig.ok(env=env)
        assert_guids_equal(rig, a)
        assert snap_order(rig.target(a)) == ["@c", "@b", "@a"]
        assert holds_view(a)[a + "@a"] == cursor_holds(a + "@a")
        assert_only_known_holds(rig.src)
        [f] = job["replication"]["filesystems"]
        steps = [(s["kind"], s["from"], s["to"]) for s in f["steps"]]
        # (size estimates, `send -n -v -P`, are not transfers)
        sends[batch] = [argv for argv in logged_calls(log, a)
                        if argv[0] == "send" and "-n" not in argv]
        if batch:
            assert steps == [("full", None, "@c"), ("incremental_batch", "@c", "@a")]
            assert sends[batch] == [["send", a + "@c"], ["send", "-I", a + "@c", a + "@a"]]
            # the batch's `.sends` entry (SPEC §8.5) is gone once the batch ended normally
            assert (rig.rundir / "push.sends").read_text().strip() == ""
        else:
            assert steps == [("full", None, "@c"), ("incremental", "@c", "@b"),
                             ("incremental", "@b", "@a")]
            assert sends[batch] == [["send", a + "@c"], ["send", "-i", a + "@c", a + "@b"],
                                    ["send", "-i", a + "@b", a + "@a"]]
    assert len(sends[False]) > len(sends[True])


# --- SPEC §8.6: protection kinds, with and without bookmarks ----------------------------------

@pytest.mark.parametrize("kind", ["guarantee_incremental", "guarantee_nothing"])
def test_protection_kinds_without_bookmarks(pools, tmp_path, kind):
    rig = Rig(pools, tmp_path, "prot" + kind.split("_")[1])
    make_tree(rig.src, ["a"])
    a = rig.fs("a")
    rig.configure([a], keep_sender="[{type: not_replicated}, {type: last_n, count: 1}]",
                  push_extra=["replication: {protection: {initial: %s, incremental: %s}}"
                              % (kind, kind)])
    env, log = zfs_logger(tmp_path)
    snap(a, "s1")
    rig.ok(env=env)
    snap(a, "s2")
    rig.ok(env=env)
    assert snap_guids(rig.target(a))["@s2"] == snap_guids(a)["@s2"]
    holds = [argv for argv in logged_calls(log, rig.src, rig.sink) if argv[0] == "hold"]
    if kind == "guarantee_incremental" and has_bookmarks(a):
        # tentative cursor bookmarks during the step, then the cursor bookmark; no hold on
        # the sender at all (SPEC §8.6)
        assert sorted(argv[1] for argv in holds) == [LAST_RECEIVED_TAG] * 2
        marks = [argv for argv in logged_calls(log, rig.src) if argv[0] == "bookmark"]
        assert any("zrepl_CURSORTENTATIVE__G_" in argv[2] for argv in marks), marks
        out = zfs("list", "-H", "-o", "name", "-t", "bookmark", "-r", a).stdout.split()
        assert out == [cursor_bookmark(a + "@s2")]          # tentative ones are gone
        assert holds_view(a) == {a + "@s2": (0, ())}         # s1 pruned
        assert holds_view(rig.target(a)) == {rig.target(a) + "@s1": (0, ()),
                                             rig.target(a) + "@s2": (1, (LAST_RECEIVED_TAG,))}
    elif kind == "guarantee_incremental":
        # no bookmarks: no tentative cursor, no step hold; `from` is held by the cursor hold
        assert sorted(argv[1] for argv in holds) == sorted([CURSOR_TAG, LAST_RECEIVED_TAG] * 2)
        assert holds_view(a) == {a + "@s2": cursor_holds(a + "@s2")}       # s1 pruned
        assert holds_view(rig.target(a)) == {rig.target(a) + "@s1": (0, ()),
                                             rig.target(a) + "@s2": (1, (LAST_RECEIVED_TAG,))}
    else:
        # nothing is held on either side, so not_replicated finds no cursor and keeps all
        assert holds == []
        assert holds_view(a) == {a + "@s1": (0, ()), a + "@s2": (0, ())}
        assert holds_view(rig.target(a)) == {rig.target(a) + "@s1": (0, ()),
                                             rig.target(a) + "@s2": (0, ())}


# --- SPEC §13 item 28: names that a shell would mangle ---------------------------------------

def _hostile_names(root):
    """SPEC item 28's names where ZFS accepts them; zfs-fuse and OpenZFS both refuse `;`,
    `$`, `(`, `)` and `'` ("invalid character"), so fall back to what ZFS allows that a
    shell or an option parser would still mangle: spaces, a leading `-`, `:`."""
    wanted = [root + "/sp ace/a;b$(x)", root + "/quo'te"]
    cp = zfs("create", "-p", "-o", "mountpoint=none", wanted[0], check=False)
    if cp.returncode == 0:
        zfs("create", "-o", "mountpoint=none", wanted[1])
        return wanted
    assert "invalid character" in cp.stderr, cp.stderr
    names = [root + "/sp ace/a:b -rf", root + "/-quo te"]
    make_tree(root, ["sp ace", "sp ace/a:b -rf", "-quo te"])
    return names


def test_names_with_spaces_and_dashes_replicate_and_prune(pools, tmp_path):
    rig = Rig(pools, tmp_path, "names")
    odd = _hostile_names(rig.src)
    rig.configure(odd, keep_sender='[{type: not_replicated}, {type: last_n, count: 1}]',
                  keep_receiver='[{type: last_n, count: 2}]',
                  push_extra=["conflict_resolution: {initial_replication: all}"])
    for fs in odd:
        for s in ("-n one", "two: 2", "3 three"):
            snap(fs, s)
    job = rig.ok()
    for fs in odd:
        assert fs_reports(job)[fs]["state"] == "done"
        assert snap_order(fs) == ["@3 three"]                      # sender pruned
        assert snap_order(rig.target(fs)) == ["@two: 2", "@3 three"]   # receiver pruned
        assert snap_guids(rig.target(fs))["@3 three"] == snap_guids(fs)["@3 three"]
        assert holds_view(fs) == {fs + "@3 three": cursor_holds(fs + "@3 three")}
    # the placeholder between root and `a:b -rf` kept its name too
    assert local_prop(rig.target(rig.src + "/sp ace"), "zrepl:placeholder") == "on"
    # and the next run is an incremental with the same names
    for fs in odd:
        snap(fs, "four 4")
    job = rig.ok()
    for fs in odd:
        assert [(s["kind"], s["from"], s["to"]) for s in fs_reports(job)[fs]["steps"]] == \
            [("incremental", "@3 three", "@four 4")]
        assert snap_order(rig.target(fs)) == ["@3 three", "@four 4"]


# --- SPEC §3.5, §1.5.9, §13 item 29: release-stale ------------------------------------------

def test_release_stale_releases_an_old_step_hold_and_keeps_the_cursor(pools, tmp_path):
    rig = Rig(pools, tmp_path, "stale")
    make_tree(rig.src, ["a"])
    a = rig.fs("a")
    rig.configure([a])
    snap(a, "s1")
    rig.ok()
    snap(a, "s2")
    rig.ok()
    assert holds_view(a) == {a + "@s1": (0, ()), a + "@s2": cursor_holds(a + "@s2")}
    snap(a, "s3")                                     # newer than the cursor: not replicated
    # hand-made step holds; zfs-fuse cannot list holds, so record the tag as zrepl.py does
    # (SPEC §3.4): on s1 (older than the cursor: stale) and on s3 (newer: live)
    for s in ("s1", "s3"):
        zfs("set", "zrepl:holds=" + STEP_TAG, "%s@%s" % (a, s))
        hold("%s@%s" % (a, s), STEP_TAG)
    fs_arg = "%s<:ok,%s<:ok" % (rig.src, rig.sink)
    before = rig.trees(), holds_view(rig.src), holds_view(rig.sink)

    cp = run_cli("zfs-abstraction", "release-stale", "--dry-run", "--fs", fs_arg)
    assert_no_traceback(cp)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines() == ['would release step-hold "%s" on %s@s1' % (STEP_TAG, a)]
    assert (rig.trees(), holds_view(rig.src), holds_view(rig.sink)) == before

    cp = run_cli("zfs-abstraction", "release-stale", "--json", "--fs", fs_arg)
    assert_no_traceback(cp)
    assert cp.returncode == 0, cp.stderr
    adoc = json.loads(cp.stdout)
    assert (adoc["schema"], adoc["dry_run"], adoc["errors"]) == \
        ("zrepl.py/abstractions/1", False, [])
    [entry] = adoc["abstractions"]
    assert {k: entry.get(k) for k in ("type", "fs", "name", "full_path", "tag", "job",
                                      "guid", "string", "released", "error")} == {
        "type": "step-hold", "fs": a, "name": "s1", "full_path": a + "@s1", "tag": STEP_TAG,
        "job": "push", "guid": str(state(a + "@s1")[a + "@s1"]["guid"]),
        "string": 'step-hold "%s" on %s@s1' % (STEP_TAG, a), "released": True, "error": None}
    assert holds_view(a) == {a + "@s1": (0, ()), a + "@s2": cursor_holds(a + "@s2"),
                             a + "@s3": (1, (STEP_TAG,))}
    assert holds_view(rig.sink) == before[2]
    assert rig.trees() == before[0]

    # the released snapshot no longer blocks pruning; the held ones are kept as held
    rig.configure([a], keep_sender="[{type: last_n, count: 1}]")
    cp = run_cli("prune", "--job", "push", "--side", "sender", "--json", config=rig.cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 0, cp.stderr
    [side] = json.loads(cp.stdout)["sides"]
    [f] = side["filesystems"]
    if has_bookmarks(a):     # the cursor is a bookmark: s2 is not held, and not kept
        assert (sorted(f["destroyed"]), f["kept_held"], f["errors"]) == (["s1", "s2"],
                                                                          ["s3"], [])
        assert snap_order(a) == ["@s3"]
    else:
        assert (f["destroyed"], sorted(f["kept_held"]), f["errors"]) == (["s1"],
                                                                          ["s2", "s3"], [])
        assert snap_order(a) == ["@s2", "@s3"]


# --- SPEC §1.5.4 (status), §1.6.2-§1.6.3 (the once document) ---------------------------------

ERROR_KEYS = {"class", "temporary", "local_to_fs", "kind", "message", "fs", "hint"}


def check_error(e):
    assert set(e) >= ERROR_KEYS, e
    assert e["class"] in ("temporary", "local_to_fs", "permanent")
    assert isinstance(e["temporary"], bool) and isinstance(e["local_to_fs"], bool)
    assert isinstance(e["kind"], str) and isinstance(e["message"], str) and e["message"]
    assert e["fs"] is None or isinstance(e["fs"], str)
    assert e["hint"] is None or isinstance(e["hint"], str)


def check_time(value, nullable=False):
    assert (nullable and value is None) or RFC3339.match(value), value


def check_job_report(job):
    """SPEC §1.6.2, member by member (unknown members are allowed)."""
    assert set(job) >= {"schema", "job", "type", "state", "exit_code", "dry_run", "started_at",
                        "finished_at", "version", "snapshotting", "replication", "pruning",
                        "errors"}, sorted(job)
    assert job["schema"] == "zrepl.py/job-report/1"
    assert job["type"] in ("push", "pull", "snap", "sink", "source")
    assert job["state"] in ("running", "done", "failed", "interrupted", "timed_out", "locked")
    assert isinstance(job["exit_code"], int) and isinstance(job["dry_run"], bool)
    check_time(job["started_at"])
    check_time(job["finished_at"], nullable=True)
    assert isinstance(job["version"], str)
    for e in job["errors"]:
        check_error(e)
    snapping = job["snapshotting"]
    if snapping is not None:
        assert snapping["type"] in ("periodic", "cron", "manual")
        assert snapping["mode"] in ("due", "always", "never", "schedule")
        for f in snapping["filesystems"]:
            assert set(f) >= {"fs", "state", "snapshot", "error", "hooks"}
    repl = job["replication"]
    if repl is not None:
        assert set(repl) >= {"state", "attempts", "started_at", "finished_at", "error",
                             "bytes_expected", "bytes_replicated", "filesystems"}
        assert repl["state"] in ("done", "failed", "skipped", "cancelled", "running")
        assert isinstance(repl["attempts"], int) and repl["attempts"] >= 1
        check_time(repl["started_at"])
        check_time(repl["finished_at"], nullable=True)
        assert repl["bytes_expected"] is None or isinstance(repl["bytes_expected"], int)
        assert isinstance(repl["bytes_replicated"], int)
        if repl["error"] is not None:
            check_error(repl["error"])
        for f in repl["filesystems"]:
            assert set(f) >= {"fs", "receiver_fs", "state", "steps_total", "steps_done",
                              "bytes_expected", "bytes_replicated", "steps", "last_replicated",
                              "lag_s", "conflict", "error", "error_count"}, sorted(f)
            assert f["state"] in ("done", "uptodate", "stepping", "pending", "planned", "error",
                                  "conflict", "skipped", "cancelled")
            assert f["steps_total"] == len(f["steps"]) and 0 <= f["steps_done"] <= len(f["steps"])
            assert isinstance(f["bytes_replicated"], int) and isinstance(f["error_count"], int)
            for s in f["steps"]:
                assert set(s) >= {"kind", "from", "to", "state", "bytes_expected",
                                  "bytes_replicated", "resumed"}
                assert s["kind"] in ("full", "incremental", "incremental_batch", "resume")
                assert s["from"] is None or re.match(r"^[@#].", s["from"])
                assert re.match(r"^@.", s["to"])
                assert s["state"] in ("planned", "pending", "running", "done", "failed",
                                      "cancelled")
                assert isinstance(s["resumed"], bool)
            last = f["last_replicated"]
            if last is not None:
                assert set(last) >= {"name", "guid", "creation"}
                assert isinstance(last["guid"], str) and re.fullmatch(r"[0-9]+", last["guid"])
                check_time(last["creation"])
                assert isinstance(f["lag_s"], (int, float)) and f["lag_s"] >= 0
            else:
                assert f["lag_s"] is None
            if f["conflict"] is not None:
                assert set(f["conflict"]) >= {"kind", "message", "sender_newest",
                                              "receiver_newest", "common", "hint"}
            if f["error"] is not None:
                check_error(f["error"])
    assert set(job["pruning"]) >= {"sender", "receiver", "local"}
    for part in job["pruning"].values():
        if part is None:
            continue
        assert part["side"] in ("sender", "receiver", "local")
        assert part["state"] in ("done", "failed", "skipped")
        assert isinstance(part["dry_run"], bool)
        for f in part["filesystems"]:
            assert set(f) >= {"fs", "state", "skip_reason", "snapshots", "planned_destroy",
                              "destroyed", "kept_held", "errors", "error_count"}, sorted(f)


def check_once_doc(doc):
    assert set(doc) >= {"schema", "version", "started_at", "finished_at", "exit_code",
                        "dry_run", "jobs"}
    assert doc["schema"] == "zrepl.py/once/1"
    check_time(doc["started_at"])
    check_time(doc["finished_at"])
    for job in doc["jobs"]:
        check_job_report(job)


def test_once_json_document_and_status_lines(pools, tmp_path):
    rig = Rig(pools, tmp_path, "report")
    make_tree(rig.src, ["a", "longer-name"])
    a, b = rig.fs("a"), rig.fs("longer-name")
    rig.configure([a, b], snapshotting=PERIODIC)
    snap(a, "old")
    snap(b, "old")
    cp, doc = rig.once("--snapshot", "always")
    assert_exit(cp, 0, doc)
    check_once_doc(doc)
    assert doc["dry_run"] is False
    job = push_report(doc)
    name = job["snapshotting"]["name"]
    for fs in (a, b):
        f = fs_reports(job)[fs]
        assert f["state"] == "done" and f["receiver_fs"] == rig.target(fs)
        assert f["bytes_replicated"] > 0
        assert f["bytes_replicated"] == sum(s["bytes_replicated"] for s in f["steps"])
        # last_replicated: the newest sender snapshot on the receiver, GUID as a decimal string
        props = dict(line.split("\t")[1:3] for line in zfs(
            "get", "-Hp", "-o", "name,property,value", "guid,creation",
            "%s@%s" % (fs, name)).stdout.splitlines())
        assert f["last_replicated"] == {
            "name": name, "guid": props["guid"],
            "creation": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(props["creation"])))}
        assert 0 <= f["lag_s"] <= 60
    assert job["replication"]["bytes_replicated"] == sum(
        f["bytes_replicated"] for f in job["replication"]["filesystems"])
    # the report file is the same document
    saved = json.loads((rig.rundir / "last" / "push.json").read_text())
    assert saved["replication"]["filesystems"] == job["replication"]["filesystems"]

    cp = run_cli("status", config=rig.cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0] == "daemon: not running (last reports from %s)" % (rig.rundir / "last")
    i = lines.index("job push (push): idle")
    assert lines[lines.index("job sink (sink): never-run") + 1] == ""
    assert re.fullmatch(r"  last: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ took=(\d+h)?(\d+m)?\d+s "
                        r"result=done exit=0", lines[i + 1]), lines[i + 1]
    assert lines[i + 2] == "  snapshot: %s taken=2 not-due=0 failed=0" % name
    human = r"(\d+ B|\d+\.\d (KiB|MiB|GiB|TiB))"
    assert re.fullmatch(r"  replication: done attempts=1 fs=2 done=2 uptodate=0 failed=0 "
                        r"bytes=" + human, lines[i + 3]), lines[i + 3]
    width = len(b)
    for line, fs in zip(lines[i + 4:i + 6], (a, b)):
        # bytes=<moved>[/<estimated>]: the estimate appears where ZFS gives one (SPEC §1.5.4)
        assert re.fullmatch(r"    %s  DONE  steps=1/1  bytes=%s(/%s)?  last=@%s  lag=(\d+m)?\d+s"
                            % (re.escape(fs.ljust(width)), human, human, name), line), line
    # the sender's cursor is a hold on each fs, or a bookmark (no hold) where the pool has them
    held = 0 if has_bookmarks(a) else 2
    assert lines[i + 6] == "  prune sender: done destroyed=0/0 held=%d errors=0" % held
    assert re.fullmatch(r"  prune receiver: done destroyed=0/0 held=2 errors=0", lines[i + 7])

    cp = run_cli("status", "--json", config=rig.cfg)
    sdoc = json.loads(cp.stdout)
    assert sdoc["schema"] == "zrepl.py/status/1" and sdoc["source"] == "last-reports"
    check_job_report(sdoc["jobs"]["push"]["last"])
    assert sdoc["jobs"]["push"]["state"] == "idle"


# --- SPEC §1.5.2 --dry-run ----------------------------------------------------------------

def test_dry_run_changes_nothing_and_plans_steps(pools, tmp_path):
    rig = Rig(pools, tmp_path, "dry")
    make_tree(rig.src, ["a", "b"])
    a, b = rig.fs("a"), rig.fs("b")
    prune = dict(keep_sender="[{type: last_n, count: 1}]",
                 keep_receiver="[{type: last_n, count: 1}]")
    rig.configure([a], snapshotting=PERIODIC, **prune)
    snap(a, "s1")
    rig.ok("--snapshot", "never")
    # now a has new snapshots (an incremental batch), b one snapshot (a full), and the
    # sender something its keep rules would destroy
    rig.configure([a, b], snapshotting=PERIODIC, **prune)
    snap(a, "s2")
    snap(a, "s3")
    snap(b, "s1")
    report = (rig.rundir / "last" / "push.json").read_text()
    before = state(pools.src), state(pools.dst)

    env, log = zfs_logger(tmp_path)
    cp, doc = rig.once("--dry-run", "--snapshot", "always", env=env)
    assert (state(pools.src), state(pools.dst)) == before
    assert [argv for argv in logged_calls(log, rig.src, rig.sink)
            if argv[0] in MUTATING | {"send"}] == []
    assert (rig.rundir / "last" / "push.json").read_text() == report
    check_once_doc(doc)
    job = push_report(doc)
    assert doc["dry_run"] is True and job["dry_run"] is True
    assert {f["state"] for f in job["snapshotting"]["filesystems"]} <= {"planned", "taken"}
    reports = fs_reports(job)
    assert reports[a]["state"] == reports[b]["state"] == "planned"
    assert [(s["kind"], s["from"], s["to"], s["state"]) for s in reports[a]["steps"]] == \
        [("incremental_batch", "@s1", "@s3", "planned")]
    assert [(s["kind"], s["from"], s["to"], s["state"]) for s in reports[b]["steps"]] == \
        [("full", None, "@s1", "planned")]
    sender = {f["fs"]: f for f in job["pruning"]["sender"]["filesystems"]}
    if has_bookmarks(a):
        # the cursor is a bookmark: s1 is not held, and no rule keeps it
        assert sender[a]["planned_destroy"] == ["s1", "s2"] and sender[a]["destroyed"] == []
        assert [d["action"] for d in sender[a]["decisions"]] == ["destroy", "destroy", "keep"]
    else:
        # s1 carries the cursor hold: kept as held
        assert sender[a]["planned_destroy"] == ["s2"] and sender[a]["destroyed"] == []
        assert [d["action"] for d in sender[a]["decisions"]] == ["keep", "destroy", "keep"]
    assert_exit(cp, 0, doc)


# --- filesystems that disappear between runs ----------------------------------------------

def test_sender_filesystem_destroyed_between_runs(pools, tmp_path):
    rig = Rig(pools, tmp_path, "sgone")
    make_tree(rig.src, ["a", "b"])
    a, b = rig.fs("a"), rig.fs("b")
    rig.configure([a, b])
    snap(a, "s1")
    snap(b, "s1")
    rig.ok()
    copy = {n: v for n, v in state(rig.target(b)).items()}
    # the user destroys b on the sender (a cursor hold must go first; a bookmark need not)
    if not has_bookmarks(b):
        zfs("release", CURSOR_TAG, b + "@s1")
    zfs("destroy", "-r", b)
    snap(a, "s2")
    cp, doc = rig.once()
    job = push_report(doc)
    assert fs_reports(job)[a]["state"] == "done"
    assert b not in fs_reports(job)
    assert_guids_equal(rig, a)
    assert state(rig.target(b)) == copy                       # untouched, hold included
    assert holds_view(rig.target(b)) == {rig.target(b) + "@s1": (1, (LAST_RECEIVED_TAG,))}
    assert_exit(cp, 0, doc)


def test_receiver_copy_destroyed_before_a_run_is_replicated_again(pools, tmp_path):
    rig = Rig(pools, tmp_path, "rgone")
    make_tree(rig.src, ["a"])
    a = rig.fs("a")
    rig.configure([a])
    snap(a, "s1")
    rig.ok()
    zfs("release", LAST_RECEIVED_TAG, rig.target(a) + "@s1")
    zfs("destroy", "-r", rig.target(a))
    snap(a, "s2")
    job = rig.ok()
    # SPEC §8.2 rule 5: a missing receiver is an initial replication (most_recent)
    [f] = job["replication"]["filesystems"]
    assert [(s["kind"], s["from"], s["to"]) for s in f["steps"]] == [("full", None, "@s2")]
    assert snap_guids(rig.target(a)) == {"@s2": snap_guids(a)["@s2"]}
    assert holds_view(a) == {a + "@s1": (0, ()), a + "@s2": cursor_holds(a + "@s2")}
    assert holds_view(rig.target(a)) == {rig.target(a) + "@s2": (1, (LAST_RECEIVED_TAG,))}


def test_receiver_filesystem_without_sender_is_reported_skipped_by_pruning(pools, tmp_path):
    rig = Rig(pools, tmp_path, "orphan")
    make_tree(rig.src, ["a", "b"])
    a, b = rig.fs("a"), rig.fs("b")
    rig.configure([a, b], keep_receiver="[{type: last_n, count: 1}]")
    for fs in (a, b):
        snap(fs, "s1")
    rig.ok()
    for fs in (a, b):
        snap(fs, "s2")
    rig.configure([a], keep_receiver="[{type: last_n, count: 1}]")   # b leaves the filter
    copy = state(rig.target(b))
    job = rig.ok()
    assert state(rig.target(b)) == copy                     # never pruned, never touched
    cp = run_cli("prune", "--job", "push", "--side", "receiver", "--dry-run", config=rig.cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 0, cp.stderr
    entries = {f["fs"]: f for f in job["pruning"]["receiver"]["filesystems"]}
    assert entries[a]["state"] == "done"
    assert "%s (receiver): skipped: no corresponding sender filesystem" % b in \
        cp.stdout.splitlines(), cp.stdout
    assert (entries[b]["state"], entries[b]["skip_reason"]) == \
        ("skipped", "no corresponding sender filesystem"), entries.get(b)


# --- SPEC §7.3 / §13 item 24: a grid whose first bucket keeps one ---------------------------

def test_receiver_grid_keeps_the_newest_as_held_without_error(pools, tmp_path):
    rig = Rig(pools, tmp_path, "grid")
    make_tree(rig.src, ["a"])
    a = rig.fs("a")
    rig.configure([a], keep_receiver='[{type: grid, grid: "1x1h | 24x1h", regex: ".*"}]')
    snap(a, "s1")
    rig.ok()
    snap(a, "s2")
    job = rig.ok()
    [p] = job["pruning"]["receiver"]["filesystems"]
    # bucket 0 keeps its oldest (s1); s2 carries the last-received hold: kept as held
    assert (p["state"], p["destroyed"], p["kept_held"], p["errors"]) == \
        ("done", [], ["s2"], [])
    assert snap_order(rig.target(a)) == ["@s1", "@s2"]
    cp = run_cli("prune", "--job", "push", "--side", "receiver", "--dry-run", config=rig.cfg)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0] == "%s (receiver): 2 snapshots, keep 2, destroy 0" % a
    assert re.fullmatch(r"  KEEP     s2  held \(userrefs=1\); no rule keeps it", lines[2]), lines


# --- SPEC §3.3, §8.4, §8.9: placeholders and the order of initial replications -----------------

def test_parent_initial_replication_runs_before_its_childs(pools, tmp_path):
    """The child's snapshot is older, so the queue (oldest `to` first) would pick it first;
    SPEC §8.9 holds it back while its ancestor has a pending initial step, so the parent is
    received as a real filesystem and never becomes a placeholder."""
    rig = Rig(pools, tmp_path, "order")
    make_tree(rig.src, ["p", "p/c"])
    p, c = rig.fs("p"), rig.fs("p/c")
    snap(c, "s1")
    time.sleep(1.05)                   # creation has one-second resolution
    snap(p, "s1")
    rig.configure({p + "<": True})
    env, log = zfs_logger(tmp_path)
    rig.ok(env=env)
    receives = [argv[-1] for argv in logged_calls(log, rig.sink) if argv[0] == "receive"]
    assert receives == [rig.target(p), rig.target(c)]
    for fs in (p, c):
        assert_guids_equal(rig, fs)
        assert local_prop(rig.target(fs), "zrepl:placeholder") is None


def test_placeholder_becomes_a_real_filesystem_when_its_sender_is_added(pools, tmp_path):
    rig = Rig(pools, tmp_path, "convert")
    make_tree(rig.src, ["p", "p/c"])
    p, c = rig.fs("p"), rig.fs("p/c")
    snap(c, "s1")
    rig.configure([c])
    rig.ok()
    assert local_prop(rig.target(p), "zrepl:placeholder") == "on"
    snap(p, "s1")
    rig.configure([p, c])
    env, log = zfs_logger(tmp_path)
    job = rig.ok(env=env)
    assert [(s["kind"], s["to"]) for s in fs_reports(job)[p]["steps"]] == [("full", "@s1")]
    # a full receive with -F onto the empty placeholder (resumable, -s, where the pool can),
    # then the flag and canmount flip
    resumable = ["-s"] if pool_caps(pools.dst)["resume"] else []
    assert [argv for argv in logged_calls(log, rig.target(p)) if argv[0] == "receive"] == \
        [["receive", "-u"] + resumable + ["-F", rig.target(p)]]
    assert_guids_equal(rig, p)
    assert_guids_equal(rig, c)                       # the child survived the -F
    assert local_prop(rig.target(p), "zrepl:placeholder") == "off"
    assert local_prop(rig.target(p), "canmount") == "on"
    assert local_prop(rig.target(p), "mountpoint") == "none"
    cp = run_cli("test", "placeholder", "--dataset", rig.target(p))
    assert cp.stdout.splitlines()[1] == "no\t%s\toff" % rig.target(p), cp.stdout
    mounted = zfs("get", "-H", "-r", "-o", "value", "mounted", rig.sink).stdout.split()
    assert set(mounted) <= {"no", "-"}


# --- the everyday cycle: default concurrency, stream pipelines ------------------------------

def timed_zfs(tmp_path):
    """A `zfs` first in PATH that logs `start end argv` of every call (it waits for the
    real zfs instead of exec-ing it) -> (env, log path)."""
    bindir = tmp_path / "tbin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "zfs-timed.log"
    wrapper = bindir / "zfs"
    wrapper.write_text('#!/bin/sh\ns=$(date +%%s.%%N)\n%s "$@"\nrc=$?\n'
                       'echo "$s $(date +%%s.%%N) $*" >> %s\nexit $rc\n' % (REAL_ZFS, q(log)))
    wrapper.chmod(0o755)
    return {"PATH": "%s:%s" % (bindir, os.environ.get("PATH", "/usr/bin:/bin"))}, log


def receive_intervals(log, root):
    """[(start, end)] of the `zfs receive` calls into root, from timed_zfs's log."""
    out = []
    for line in log.read_text().splitlines():
        start, end, argv = line.split(" ", 2)
        words = argv.split(" ")
        if words[0] == "receive" and "-A" not in words and words[-1].startswith(root + "/"):
            out.append((float(start), float(end)))
    return out


def most_at_once(intervals):
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def test_step_is_big_by_estimate_and_by_kind():
    full = zrepl.Step("full", None, zrepl.Version("snapshot", "p/a", "s", 1, 1, 1),
                      "guarantee_resumability")
    incr = zrepl.Step("incremental", full.to, zrepl.Version("snapshot", "p/a", "t", 2, 2, 2),
                      "guarantee_resumability")
    assert zrepl.step_is_big(full, None) and not zrepl.step_is_big(incr, None)
    assert zrepl.step_is_big(incr, zrepl.BIG_STEP) and not zrepl.step_is_big(full, 4096)


def test_size_estimates_made_ahead_are_taken_by_their_own_step_only():
    """SizeEstimates (plain data, threads of its own): a step takes the estimate made for
    it, waits for one being made, and makes its own where none was started for it or
    the one made was of another step (the filesystem was planned again)."""
    import threading
    steps = {p: zrepl.Step("full", None, zrepl.Version("snapshot", p, "s", 1, 1, 1),
                           "guarantee_resumability") for p in ("p/a", "p/b", "p/c")}
    gate, calls = threading.Event(), []

    def estimate(path, step):
        calls.append(path)
        if path == "p/a":
            gate.wait(10)                      # still being made when its step starts
        return len(calls) * 100
    ahead = zrepl.SizeEstimates(estimate, [(p, steps[p]) for p in ("p/a", "p/b")], 1,
                                lambda: False)
    threading.Timer(0.2, gate.set).start()
    assert ahead.take("p/a", steps["p/a"]) == 100          # waited for it
    assert ahead.take("p/c", steps["p/c"]) in (200, 300)   # never queued: made now
    other = zrepl.Step("full", None, steps["p/b"].to, "guarantee_resumability")
    value = ahead.take("p/b", other)          # made (or being made) for another step
    ahead.close()
    assert calls[-1] == "p/b" and value == 100 * len(calls), calls   # its own, made now
    # stopped: nothing more starts; every step still gets its own
    stopped = zrepl.SizeEstimates(lambda p, s: 7, [(p, steps[p]) for p in steps], 2,
                                  lambda: True)
    assert [stopped.take(p, steps[p]) for p in steps] == [7, 7, 7]
    stopped.close()


@pytest.fixture
def big_pools(pools):
    """Two pools of this test's own: the module's are too small for two 66 MiB streams
    next to what the other tests left (OpenZFS's slop space)."""
    import conftest
    made = []
    try:
        stem = conftest._new_pool_name("")
        made.append(conftest._create_pool(stem + "a", "512M"))
        made.append(conftest._create_pool(stem + "b", "512M"))
        yield conftest.Pools(*made)
    finally:
        for name in made:
            conftest._destroy_pool(name)


def test_default_concurrency_overlaps_small_steps_and_runs_big_ones_alone(big_pools, tmp_path):
    """concurrency.steps unset: many small steps at once, never two big ones (SPEC §8.9
    as this project decided it: README "Concurrency")."""
    rig = Rig(big_pools, tmp_path, "conc")
    small = ["s%d" % i for i in range(6)]
    make_tree(rig.src, small + ["b1", "b2"])
    for rel in small:
        write_data(rig.fs(rel), 256 << 10)
        snap(rig.fs(rel), "a")
    rig.configure([rig.fs(r) for r in small])
    env, log = timed_zfs(tmp_path)
    rig.ok(env=env)
    if rig.transport == "local":
        # a remote side takes the default's steps one after another (a connection each
        # would be a login): README "Concurrency"
        assert most_at_once(receive_intervals(log, rig.sink)) >= 2
    for rel in small:
        assert_guids_equal(rig, rig.fs(rel))
    # two full streams above BIG_STEP: one after the other, with the small ones beside
    for rel in ("b1", "b2"):
        write_data(rig.fs(rel), zrepl.BIG_STEP + (2 << 20))
        snap(rig.fs(rel), "a")
    rig.configure([rig.fs(r) for r in small + ["b1", "b2"]])
    log.unlink()
    rig.ok(env=env)
    big = [iv for iv in receive_intervals(log, rig.sink)]
    assert len(big) == 2 and most_at_once(big) == 1, big
    for rel in ("b1", "b2"):
        assert_guids_equal(rig, rig.fs(rel))


def test_execpipe_stages_carry_the_stream_and_a_failing_stage_fails_the_step(
        pools, tmp_path):
    rig = Rig(pools, tmp_path, "pipe")
    make_tree(rig.src, ["a"])
    fs = rig.fs("a")
    write_data(fs, 1 << 20)
    snap(fs, "s1")
    gzip = ["send: {execpipe: [[gzip, \"-1\"], [cat]]}"]
    gunzip = ["recv: {execpipe: [[gzip, \"-d\"]]}"]
    rig.configure([fs], push_extra=gzip, sink_extra=gunzip)
    job = rig.ok()
    assert_guids_equal(rig, fs)
    # compressed on the wire: random data does not shrink, but the stream is gzip's
    assert fs_reports(job)[fs]["bytes_replicated"] > 0

    # a stage that fails: the step fails with that stage's stderr, nothing is left running
    snap(fs, "s2")
    broken = ["send: {execpipe: [[sh, \"-c\", \"head -c 1000 >/dev/null; echo "
              "zreplpy-stage-broke >&2; exit 3\"]]}"]
    rig.configure([fs], push_extra=broken, sink_extra=gunzip)
    before = rig.trees()
    cp, doc = rig.once()
    assert_exit(cp, 1, doc)
    f = fs_reports(push_report(doc))[fs]
    assert f["state"] == "error" and f["error"]["kind"] in ("execpipe", "stream-broken"), f
    assert "zreplpy-stage-broke" in cp.stderr and "exited with 3" in cp.stderr, cp.stderr
    deadline = time.time() + 10
    while subprocess_pids("zreplpy-stage-broke|zfs (send|receive).*" + fs):
        assert time.time() < deadline, "a stage or zfs process was left running"
        time.sleep(0.2)
    assert snap_guids(rig.target(fs)) == {"@s1": before[rig.target(fs) + "@s1"]}
    if not pool_caps(pools.dst)["resume"]:
        # a receiver that can resume keeps the step holds for the resume (SPEC §8.9)
        assert all(STEP_TAG not in tags for _, tags in holds_view(fs).values())
    # the fixed configuration converges, and then no step hold is left
    rig.configure([fs], push_extra=gzip, sink_extra=gunzip)
    rig.ok()
    assert_guids_equal(rig, fs)
    assert all(STEP_TAG not in tags for _, tags in holds_view(fs).values())


def subprocess_pids(pattern):
    import subprocess
    out = subprocess.run(["pgrep", "-f", pattern], stdout=subprocess.PIPE, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]
