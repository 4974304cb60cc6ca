"""`restore` (SPEC §1.5.11, §9.8) on real pools, over each transport: replicated data comes
back from the sink (restore mode: list and send only) onto new local datasets, parents
first, missing parents as placeholders, GUIDs kept, never over an existing dataset."""
import json

import pytest

from conftest import assert_no_traceback, make_tree, run_cli, snap, state, write_data, zfs
from test_replication import Rig, snap_guids
from test_replication import pytest_generate_tests, transport  # noqa: F401  (every transport)

pytestmark = pytest.mark.zfs


def restore(rig, *args):
    rig.serve()
    cp = run_cli("restore", "--job", "push", *args, config=rig.cfg)
    assert_no_traceback(cp)
    return cp


def test_restore_brings_the_tree_back_and_never_overwrites(pools, tmp_path):
    rig = Rig(pools, tmp_path, "restore")
    make_tree(rig.src, ["home", "home/alice", "home/bob"])
    fss = [rig.fs("home"), rig.fs("home/alice"), rig.fs("home/bob")]
    write_data(fss[1], 1 << 20)
    for name in ("s1", "s2"):
        for fs in fss:
            snap(fs, name)
    rig.configure(fss)
    rig.ok()
    to = rig.src + "/rescued"
    make_tree(to, [])
    before = state(rig.sink)
    cp = restore(rig, "--all", "--to", to, "--dry-run")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines() == ["would restore %s@s2 -> %s/%s" % (fs, to, fs) for fs in fss]
    assert sorted(state(to)) == [to]
    cp = restore(rig, "--fs", fss[0], fss[1], "--to", to, "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["schema"] == "zrepl.py/restore/1" and doc["exit_code"] == 0
    assert [(r["fs"], r["state"]) for r in doc["filesystems"]] == [(fss[0], "done"),
                                                                   (fss[1], "done")]
    for fs in fss[:2]:
        got = snap_guids("%s/%s" % (to, fs))
        assert got == {"@s2": snap_guids(fs)["@s2"]}            # the same snapshot, by GUID
    # the placeholders above: zrepl's, and never mounted
    top = "%s/%s" % (to, pools.src)
    assert zfs("get", "-H", "-o", "value,source", "zrepl:placeholder", top).stdout.split() == \
        ["on", "local"]
    # again: the existing copies are refused, the missing one is restored
    cp = restore(rig, "--all", "--to", to)
    assert cp.returncode == 1
    lines = cp.stdout.splitlines()
    assert lines[0].startswith("ERROR %s: restore never overwrites" % fss[0])
    assert lines[2] == "restored %s@s2 -> %s/%s" % (fss[2], to, fss[2])
    assert state(rig.sink) == before                        # the sink gave, and kept all


def test_restore_of_a_named_snapshot_and_its_refusals(pools, tmp_path):
    rig = Rig(pools, tmp_path, "restore2")
    make_tree(rig.src, ["a"])
    fs = rig.fs("a")
    for name in ("s1", "s2"):
        snap(fs, name)
    rig.configure([fs], push_extra=["conflict_resolution: {initial_replication: all}"])
    rig.ok()
    to = rig.src + "/back"
    make_tree(to, [])
    cp = restore(rig, "--fs", fs, "--to", to, "--snapshot", "nope")
    assert cp.returncode == 2 and "nothing was done" in cp.stderr
    cp = restore(rig, "--fs", fs, "--to", rig.src + "/missing")
    assert cp.returncode == 1 and "does not exist" in cp.stdout
    cp = restore(rig, "--fs", fs, "--to", to, "--snapshot", "s1")
    assert cp.returncode == 0, cp.stderr
    assert snap_guids("%s/%s" % (to, fs)) == {"@s1": snap_guids(fs)["@s1"]}
