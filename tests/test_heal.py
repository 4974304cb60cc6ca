"""`heal` (SPEC §1.1, §12): repair blocks a scrub found damaged from the other side's copy
with corrective receive (`zfs receive -c`, OpenZFS >= 2.2), against real ZFS.

The repair test corrupts a data block of the sender pool's vdev file (found by a marker
written into an uncompressed file), scrubs (permanent error), heals from the sink and
scrubs again: clean, and the file reads back with its original checksum. Where the ZFS
has no corrective receive (zfs-fuse), `heal` must refuse clearly and change nothing.
"""
import hashlib
import json
import os
import sys

import pytest

from conftest import POOL_DIR, REPO, assert_no_traceback, make_tree, run_cli, snap, state, \
    zfs, zpool
from test_replication import Rig

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402

pytestmark = pytest.mark.zfs
MARK = b"ZREPLHEALMARK"


def _has_corrective_receive():
    return zrepl.ZFS().capabilities()["recv_c"]


def test_heal_refuses_where_zfs_has_no_corrective_receive(pools, tmp_path):
    if _has_corrective_receive():
        pytest.skip("this ZFS has corrective receive (the refusal is for ZFS without it)")
    rig = Rig(pools, tmp_path, "norecvc")
    make_tree(rig.src, ["a"])
    snap(rig.fs("a"), "s1")
    rig.configure([rig.fs("a")])
    rig.ok()
    before = rig.trees()
    cp = run_cli("heal", "--job", "push", "--fs", rig.fs("a"), config=rig.cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 2, cp.stderr
    assert "corrective receive" in cp.stderr and "zfs receive -c" in cp.stderr
    assert rig.trees() == before


def test_heal_needs_a_snapshot_both_sides_have(pools, tmp_path):
    if not _has_corrective_receive():
        pytest.skip("this ZFS has no corrective receive (zfs receive -c, OpenZFS >= 2.2)")
    rig = Rig(pools, tmp_path, "nosnap")
    make_tree(rig.src, ["a"])
    snap(rig.fs("a"), "s1")
    rig.configure([rig.fs("a")])
    rig.ok()
    snap(rig.fs("a"), "only_here")
    before = rig.trees()
    cp = run_cli("heal", "--job", "push", "--fs", rig.fs("a"), "--snapshot", "only_here",
                 config=rig.cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 1 and "not on both sides" in cp.stderr, cp.stderr
    cp = run_cli("heal", "--job", "push", "--fs", rig.fs("a"), "--dry-run", "--json",
                 config=rig.cfg)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["heal"]["snapshot"] == "s1" and doc["heal"]["state"] == "planned"
    assert rig.trees() == before


def _vdev(pool):
    return POOL_DIR / (pool + ".img")


def test_heal_repairs_a_corrupted_block_from_the_sink(pools, tmp_path):
    if not _has_corrective_receive():
        pytest.skip("this ZFS has no corrective receive (zfs receive -c, OpenZFS >= 2.2)")
    rig = Rig(pools, tmp_path, "heal")
    mnt = tmp_path / "mnt"
    zfs("create", "-o", "compression=off", "-o", "mountpoint=%s" % mnt, rig.fs("data"))
    block = (MARK + os.urandom(3)) * (131072 // 16)
    with open(mnt / "file", "wb") as f:
        for _ in range(8):
            f.write(block)
    good = hashlib.sha256((mnt / "file").read_bytes()).hexdigest()
    snap(rig.fs("data"), "s1")
    rig.configure([rig.fs("data")])
    rig.ok()
    zfs("unmount", rig.fs("data"))

    # corrupt 4 KiB inside the third marked region of the vdev, with the pool exported
    zpool("export", pools.src)
    img = _vdev(pools.src)
    raw = img.read_bytes()
    at = -1
    for _ in range(3):
        at = raw.index(MARK, at + 1)
    del raw
    with open(img, "r+b") as f:
        f.seek(at + 100)
        f.write(os.urandom(4096))
    zpool("import", "-d", str(POOL_DIR), pools.src)
    zfs("mount", rig.fs("data"), check=False)
    zpool("scrub", "-w", pools.src)
    status = zpool("status", "-v", pools.src).stdout
    assert "Permanent errors" in status, status

    cp = run_cli("heal", "--job", "push", "--fs", rig.fs("data"), config=rig.cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("healed %s@s1 from the sink's copy" % rig.fs("data"))

    zpool("scrub", "-w", pools.src)
    zpool("clear", pools.src)
    zpool("scrub", "-w", pools.src)
    status = zpool("status", "-v", pools.src).stdout
    assert "No known data errors" in status, status
    zfs("mount", rig.fs("data"), check=False)
    assert hashlib.sha256((mnt / "file").read_bytes()).hexdigest() == good
    zfs("unmount", rig.fs("data"))
    # nothing else changed: same snapshots, same GUIDs on both sides
    assert set(state(rig.src)) >= {rig.fs("data"), rig.fs("data") + "@s1"}
