"""The ZFS fixture layer of conftest.py, checked against the real ZFS it wraps."""
import os

import pytest

from conftest import (POOL_DIR, ZFSCommandFailed, hold, make_tree, names, release, snap, state,
                      write_data, zfs, zpool)

# the module-level marker is the one that sizes the module-scoped `pools`
pytestmark = pytest.mark.poolsize("192M")


def img_size(pool_name):
    return os.path.getsize(str(POOL_DIR / (pool_name + ".img")))


def test_pools_tree_snapshots_data_holds_and_a_stream(pools):
    src, dst = pools.src, pools.dst
    assert src != dst and img_size(src) == img_size(dst) == 192 << 20
    root = src + "/r"
    assert make_tree(root, ["a", "a/b", "c"]) == [root, root + "/a", root + "/a/b", root + "/c"]
    snap(root, "s1", recursive=True)
    write_data(root + "/a", 100000)
    # write_data leaves the dataset as it found it: mountpoint=none, unmounted
    assert zfs("get", "-H", "-o", "value", "mountpoint,mounted", root + "/a").stdout.split() == ["none", "no"]
    snap(root + "/a", "s2")

    st = state(root)
    assert st[root]["userrefs"] is None
    assert st[root + "/a@s2"]["createtxg"] > st[root + "/a@s1"]["createtxg"]
    assert st[root + "/a@s2"]["guid"] > 0
    hold(root + "/a@s2", "zreplpy_test")
    assert state(root + "/a")[root + "/a@s2"]["userrefs"] == 1
    release(root + "/a@s2", "zreplpy_test")
    assert state(root + "/a")[root + "/a@s2"]["userrefs"] == 0

    stream = zfs("send", root + "/a@s2", text=False).stdout
    zfs("recv", "-u", dst + "/a", input=stream)
    assert names(dst) == [dst, dst + "/a", dst + "/a@s2"]
    assert state(dst)[dst + "/a@s2"]["guid"] == st[root + "/a@s2"]["guid"]
    assert int(zfs("get", "-Hp", "-o", "value", "used", dst + "/a").stdout) > 100000


def test_pools_are_shared_within_the_module(pools):
    assert names(pools.src + "/r/c") == [pools.src + "/r/c", pools.src + "/r/c@s1"]


@pytest.mark.poolsize("128M")
def test_pool_is_fresh_and_sized_by_the_closest_marker(pool):
    assert names(pool) == [pool]
    assert img_size(pool) == 128 << 20
    assert pool in zpool("list", "-H", "-o", "name").stdout.split()


def test_failed_commands_raise_with_stderr(pool):
    with pytest.raises(ZFSCommandFailed) as e:
        zfs("destroy", pool + "/missing")
    assert "dataset does not exist" in str(e.value)
    assert zfs("destroy", pool + "/missing", check=False).returncode == 1
