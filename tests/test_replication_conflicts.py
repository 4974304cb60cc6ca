"""Replication conflicts and failing steps (SPEC §8.2 rules 2, 5, 8, 9; §8.3; §8.4 the
incremental pre-check), against real ZFS through `once --json`: §13 items 19, 20, 21, 37.

Conflicts never change either side: every test compares the name+GUID lists of its two
subtrees before and after ("unchanged" in SPEC §13), and checks that no hold was left
behind. Helpers and the layout (`<src>/<tag>`, sink root_fs `<dst>/<tag>`, identity host1)
come from test_replication.py.
"""
import pytest

from conftest import make_tree, run_cli, snap, state, zfs
from test_replication import (LAST_RECEIVED_TAG, REAL_ZFS, assert_exit, assert_guids_equal,
                              assert_only_known_holds, caps, cursor_holds, fs_reports, holds_view,
                              logged_calls, push_report, q, replicated_pair, Rig, snap_guids,
                              snap_order, zfs_logger)
from test_replication import pytest_generate_tests, transport  # noqa: F401  (every transport)


def conflict_of(job, fs):
    f = fs_reports(job)[fs]
    assert f["state"] == "conflict", f
    assert f["steps"] == [] and f["steps_done"] == 0
    assert f["error"]["kind"] == f["conflict"]["kind"]
    assert f["error"]["class"] == "local_to_fs" and f["error"]["temporary"] is False
    return f["conflict"]


# --- SPEC §13 item 19: diverged ------------------------------------------------------------

def test_diverged_receiver_is_a_conflict_and_the_other_filesystem_replicates(pools, tmp_path):
    rig = Rig(pools, tmp_path, "diverged")
    make_tree(rig.src, ["x", "x/y", "z"])
    xy, z = rig.fs("x/y"), rig.fs("z")
    rig.configure([xy, z])
    for fs in (xy, z):
        snap(fs, "s1")
    rig.ok()
    zfs("snapshot", rig.target(z) + "@foreign")          # someone snapshots the copy
    for fs in (xy, z):
        snap(fs, "s2")
    copy = snap_guids(rig.target(z))

    cp, doc = rig.once()
    job = push_report(doc)
    c = conflict_of(job, z)
    assert (c["kind"], c["sender_newest"], c["receiver_newest"], c["common"]) == \
        ("diverged", "@s2", "@foreign", "@s1")
    assert "@foreign" in c["message"] and "@s1" in c["message"]
    assert "zfs rollback -r" in c["hint"]
    assert "diverged" in cp.stderr and z in cp.stderr
    assert snap_guids(rig.target(z)) == copy              # the receiver is unchanged
    assert holds_view(z) == {z + "@s1": cursor_holds(z + "@s1"), z + "@s2": (0, ())}
    # the other filesystem went on
    assert fs_reports(job)[xy]["state"] == "done"
    assert_guids_equal(rig, xy)
    assert (job["state"], job["exit_code"], job["replication"]["state"]) == \
        ("failed", 1, "failed")
    # status shows the conflict on its own line (SPEC §1.5.4)
    lines = run_cli("status", "--job", "push", config=rig.cfg).stdout.splitlines()
    assert "  replication: failed attempts=1 fs=2 done=1 uptodate=0 failed=1 bytes=" in \
        "\n".join(lines)
    width = max(len(xy), len(z))
    assert "    %s  CONFLICT  diverged: %s" % (z.ljust(width), c["message"]) in lines, lines
    assert_exit(cp, 1, doc)


# --- SPEC §13 item 20: receiver-has-newer, no-common-ancestor, sender-empty ----------------

def _receiver_has_newer(rig, a):
    snap(a, "s1")
    rig.ok()
    zfs("snapshot", rig.target(a) + "@extra")            # nothing new on the sender
    return ("receiver-has-newer", "@s1", "@extra", "@s1")


def _no_common_ancestor(rig, a):
    snap(a, "s1")
    zfs("create", "-p", "-o", "mountpoint=none", rig.target(a))
    zfs("snapshot", rig.target(a) + "@r1")               # unrelated history
    return ("no-common-ancestor", "@s1", "@r1", None)


def _sender_empty(rig, a):
    return ("sender-empty", None, None, None)


@pytest.mark.parametrize("setup", [_receiver_has_newer, _no_common_ancestor, _sender_empty],
                         ids=["receiver-has-newer", "no-common-ancestor", "sender-empty"])
def test_conflict_changes_nothing(pools, tmp_path, setup):
    tag = setup.__name__.replace("_", "")
    rig = Rig(pools, tmp_path, tag)
    make_tree(rig.src, ["a"])
    a = rig.fs("a")
    rig.configure([a])
    want = setup(rig, a)
    before = rig.trees()
    refs = holds_view(rig.src), holds_view(rig.sink)

    # --dry-run already sees the conflict: exit 1 (SPEC §1.5.2)
    dcp, ddoc = rig.once("--dry-run")
    assert conflict_of(push_report(ddoc), a)["kind"] == want[0]
    assert_exit(dcp, 1, ddoc)
    assert rig.trees() == before

    cp, doc = rig.once()
    job = push_report(doc)
    c = conflict_of(job, a)
    assert (c["kind"], c["sender_newest"], c["receiver_newest"], c["common"]) == want
    assert c["message"] and c["hint"]
    assert want[0] in cp.stderr
    assert rig.trees() == before
    assert (holds_view(rig.src), holds_view(rig.sink)) == refs
    if setup is _sender_empty:                       # nothing was created for it
        assert sorted(state(rig.sink)) == [rig.sink]
    assert (job["state"], job["exit_code"]) == ("failed", 1)
    assert_exit(cp, 1, doc)


# --- SPEC §13 item 21: initial_replication --------------------------------------------------

@pytest.mark.parametrize("mode,received", [("all", ["@c", "@b", "@a"]),
                                           ("most_recent", ["@a"]),
                                           ("fail", None)])
def test_initial_replication_modes(pools, tmp_path, mode, received):
    rig = Rig(pools, tmp_path, "initial" + mode.replace("_", ""))
    make_tree(rig.src, ["a"])
    a = rig.fs("a")
    for s in ("c", "b", "a"):                      # created in this order: @a is the newest
        snap(a, s)
    rig.configure([a], push_extra=["conflict_resolution: {initial_replication: %s}" % mode])
    cp, doc = rig.once()
    job = push_report(doc)
    if received is None:
        c = conflict_of(job, a)
        assert c["kind"] == "initial-replication-disabled"
        assert sorted(state(rig.sink)) == [rig.sink]             # no receiver dataset at all
        assert holds_view(a) == {a + "@" + s: (0, ()) for s in "abc"}
        assert_exit(cp, 1, doc)
        return
    assert snap_order(rig.target(a)) == received
    guids = snap_guids(a)
    assert snap_guids(rig.target(a)) == {s: guids[s] for s in received}
    assert holds_view(a)[a + "@a"] == cursor_holds(a + "@a")
    assert holds_view(rig.target(a)) == {
        "%s%s" % (rig.target(a), s): (1, (LAST_RECEIVED_TAG,)) if s == "@a" else (0, ())
        for s in received}
    assert_only_known_holds(rig.src)
    assert_exit(cp, 0, doc)


# --- SPEC §13 item 37, §8.4: the receiver filesystem vanishes after the listing ---------------

@pytest.mark.parametrize("when", ["pre-check", "receive"])
def test_receiver_filesystem_gone_before_the_incremental_receive(pools, tmp_path, when):
    """The `zfs` wrapper takes the receiver copy of `a` away after both listings:
    - "pre-check": it moves the copy to `<sink>/moved` just before the check that the
      target exists (SPEC §8.4). Moving, not destroying, keeps the from-snapshot in the pool,
      so where ZFS redirects an incremental stream to the dataset holding its source
      (zfs-fuse.md §3.2) a receive started anyway would land in the moved dataset: there
      the check is zrepl.py's pre-check. OpenZFS refuses a missing target by itself
      (measured on 2.3), so there the check is `zfs receive`, and the move comes just
      before it;
    - "receive": it destroys the copy just before `zfs receive` itself runs.
    Either way the step fails `missing` and no snapshot appears elsewhere on the pool."""
    rig = Rig(pools, tmp_path, "vanish" + when.replace("-", ""))
    a, b = replicated_pair(rig)
    target, moved = rig.target(a), rig.sink + "/moved"
    marker = tmp_path / "vanished"
    precheck = caps().implementation != "openzfs"
    if when == "pre-check":
        # the pre-check names the incremental sources of several targets in one `zfs
        # get` (zrepl.py batches it); the first `get` naming a snapshot of the target
        match = ('"get:"*%s"@"*' if precheck else '"receive:"*%s') % q(target)
        act = "%s rename %s %s" % (REAL_ZFS, q(target), q(moved))
    else:
        match = '"receive:"*%s' % q(target)
        act = "%s release %s %s; %s destroy -r %s" % (
            REAL_ZFS, LAST_RECEIVED_TAG, q(target + "@s1"), REAL_ZFS, q(target))
    action = ('if [ ! -e %s ]; then case "$1:$*" in %s) : > %s; %s >/dev/null;; esac; fi'
              % (q(marker), match, q(marker), act))
    env, log = zfs_logger(tmp_path, action)
    s2 = snap_guids(a)["@s2"]

    cp, doc = rig.once(env=env)
    assert marker.exists(), "the wrapper never saw the %s for %s" % (when, target)
    job = push_report(doc)
    f = fs_reports(job)[a]
    assert f["state"] == "error" and f["error"]["kind"] == "missing", f
    assert [s["state"] for s in f["steps"]] == ["failed"]
    if when == "pre-check":          # the check caught it: nothing landed in `moved`
        if precheck:                 # zrepl.py's: no receive was even started
            assert [argv for argv in logged_calls(log, target) if argv[0] == "receive"] == []
        assert snap_order(moved) == ["@s1"]
    # @s2 of a appeared nowhere on the receiving pool (b's @s2 has another GUID)
    assert [n for n, v in state(pools.dst).items() if v["guid"] == s2] == []
    assert [n for n in state(rig.sink) if n.endswith("@s2")] == [rig.target(b) + "@s2"]
    # the sender kept its cursor; no step hold (nor any unknown hold) was left
    assert holds_view(a) == {a + "@s1": cursor_holds(a + "@s1"), a + "@s2": (0, ())}
    assert_only_known_holds(rig.src)
    # the other filesystem replicated
    assert fs_reports(job)[b]["state"] == "done"
    assert_guids_equal(rig, b)
    assert_exit(cp, 1, doc)
