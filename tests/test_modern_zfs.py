"""What modern ZFS (OpenZFS 2.x) adds, against real ZFS: the cursor bookmark and
incrementals from it after the sender pruned, a pool that gains bookmarks moving from the
holds-only cursor to the bookmark, raw encrypted replication, placeholders under an
encrypted root_fs, and configcheck's send-encryption refusals (SPEC §2.10, §3.2, §3.6, §8.4,
§8.6, §8.8). Each test skips, with the reason, where this ZFS lacks the capability.
"""
import os
import subprocess

import pytest

from conftest import (POOL_DIR, _destroy_pool, _new_pool_name, assert_no_traceback,
                      make_tree, run_cli, snap, state, zfs, zpool)
from test_replication import (CURSOR_TAG, Rig, assert_exit, assert_guids_equal, fs_reports,
                              logged_calls, push_report, snap_guids, zfs_logger)
from test_replication import pytest_generate_tests, transport  # noqa: F401  (every transport)

import zrepl

pytestmark = pytest.mark.zfs


def _caps():
    return zrepl.ZFS().capabilities()


def _need(name):
    caps = _caps()
    if not caps[name]:
        pytest.skip("this ZFS (%s %s) has no %s" % (caps.implementation, caps.version, name))


def zfs_holds(snapshot):
    out = zfs("holds", "-H", snapshot).stdout
    return sorted(ln.split("\t")[1] for ln in out.splitlines() if ln.strip())


def _bookmarks(fs):
    out = zfs("list", "-H", "-o", "name", "-t", "bookmark", "-r", fs).stdout
    return sorted(ln.split("#", 1)[1] for ln in out.splitlines() if "#" in ln)


def test_cursor_is_a_bookmark_and_feeds_incrementals_after_the_sender_pruned(pools, tmp_path):
    _need("bookmarks")
    rig = Rig(pools, tmp_path, "bm")
    make_tree(rig.src, ["a"])
    fs = rig.fs("a")
    rig.configure([fs], keep_sender='[{type: not_replicated, keep_snapshot_at_cursor: false}]')
    snap(fs, "s1")
    guid = int(zfs("get", "-Hp", "-o", "value", "guid", fs + "@s1").stdout)
    rig.ok()
    assert _bookmarks(fs) == ["zrepl_CURSOR_G_%016x_J_push" % guid]
    assert fs + "@s1" not in state(fs)           # pruned: only the bookmark is left
    snap(fs, "s2")
    guid2 = int(zfs("get", "-Hp", "-o", "value", "guid", fs + "@s2").stdout)
    job = rig.ok()
    [step] = fs_reports(job)[fs]["steps"]
    assert (step["kind"], step["from"], step["to"]) == (
        "incremental", "#zrepl_CURSOR_G_%016x_J_push" % guid, "@s2")
    # s2 went the same way (at the cursor, not kept); the receiver has both
    assert _bookmarks(fs) == ["zrepl_CURSOR_G_%016x_J_push" % guid2]
    assert snap_guids(rig.target(fs)) == {"@s1": guid, "@s2": guid2}


def test_a_pool_that_gains_bookmarks_moves_its_cursor_to_a_bookmark(pools, tmp_path):
    _need("bookmarks")
    name = _new_pool_name("o")
    img = POOL_DIR / (name + ".img")
    POOL_DIR.mkdir(parents=True, exist_ok=True)
    (POOL_DIR / (name + ".pid")).write_text("%d\n" % os.getpid())
    subprocess.run(["truncate", "-s", "256M", str(img)], check=True)
    try:
        zpool("create", "-d", "-m", "none", name, img)    # every feature disabled
        rig = Rig(pools, tmp_path, "upgrade")
        fs = name + "/a"
        make_tree(fs, [])
        rig.configure([fs])
        snap(fs, "s1")
        rig.ok()
        assert _bookmarks(fs) == []                          # holds-only cursor
        assert zfs_holds(fs + "@s1") == [CURSOR_TAG]
        zpool("set", "feature@extensible_dataset=enabled", name)
        zpool("set", "feature@bookmarks=enabled", name)
        snap(fs, "s2")
        rig.ok()
        guid = int(zfs("get", "-Hp", "-o", "value", "guid", fs + "@s2").stdout)
        assert _bookmarks(fs) == ["zrepl_CURSOR_G_%016x_J_push" % guid]
        # the old cursor hold is gone, nothing else holds the sender's snapshots
        assert zfs_holds(fs + "@s1") == [] and zfs_holds(fs + "@s2") == []
        assert_guids_equal(rig, fs)
    finally:
        _destroy_pool(name)


def test_raw_encrypted_replication_stays_encrypted_without_the_key(pools, tmp_path):
    _need("encryption")
    _need("send_w")
    rig = Rig(pools, tmp_path, "enc")
    keyfile = tmp_path / "key"
    keyfile.write_bytes(b"k" * 32)
    fs = rig.src + "/secret"
    zfs("create", "-o", "encryption=on", "-o", "keyformat=raw",
        "-o", "keylocation=file://%s" % keyfile, "-o", "mountpoint=none", fs)
    plain = rig.fs("plain")
    make_tree(plain, [])
    rig.configure([fs, plain], push_extra=["send: {encrypted: true}"])
    snap(fs, "s1")
    snap(plain, "s1")
    cp, doc = rig.once()
    assert_exit(cp, 1, doc)                 # plain is refused, secret goes on
    reports = fs_reports(push_report(doc))
    assert reports[plain]["error"]["kind"] == "not-encrypted"
    assert reports[fs]["state"] == "done"
    target = rig.target(fs)
    got = zfs("get", "-H", "-o", "value", "encryption,keystatus", target).stdout.split()
    assert got[0] != "off" and got[1] == "unavailable", got
    snap(fs, "s2")
    cp, doc = rig.once()
    [step] = fs_reports(push_report(doc))[fs]["steps"]
    assert (step["kind"], step["to"], step["state"]) == ("incremental", "@s2", "done")
    assert zfs("get", "-H", "-o", "value", "keystatus", target).stdout.strip() == "unavailable"
    assert_guids_equal(rig, fs)


@pytest.mark.parametrize("setting", ["unspecified", "inherit", "off"])
def test_placeholders_under_an_encrypted_root_fs(pools, tmp_path, setting):
    """recv.placeholder.encryption (SPEC §8.4): under `unspecified` the identity placeholder
    inherits, and a deeper placeholder under an encrypted parent is an error for that
    filesystem; `inherit` makes them encrypted, `off` unencrypted."""
    _need("encryption")
    rig = Rig(pools, tmp_path, "phenc" + setting)
    keyfile = tmp_path / "key"
    keyfile.write_bytes(b"p" * 32)
    zfs("destroy", "-r", rig.sink)
    zfs("create", "-o", "encryption=on", "-o", "keyformat=raw", "-o", "mountpoint=none",
        "-o", "keylocation=file://%s" % keyfile, rig.sink)
    make_tree(rig.src, ["a"])
    fs = rig.fs("a")
    snap(fs, "s1")
    rig.configure([fs], sink_extra=["recv: {placeholder: {encryption: %s}}" % setting])
    cp, doc = rig.once()
    def enc(ds):
        return zfs("get", "-H", "-o", "value", "encryption", ds).stdout.strip()
    # root_fs/<identity> inherits unless `off` says otherwise
    assert (enc(rig.recv_root) == "off") is (setting == "off")
    parent = rig.recv_root + "/" + rig.src.split("/")[0]
    if setting == "unspecified":
        assert_exit(cp, 1, doc)
        err = fs_reports(push_report(doc))[fs]["error"]
        assert "placeholder encryption is unspecified" in err["message"], err
        return
    assert_exit(cp, 0, doc)
    assert (enc(parent) == "off") is (setting == "off")
    assert_guids_equal(rig, fs)


def test_configcheck_refuses_what_the_sender_would_refuse(pools, tmp_path):
    """zrepl's send rules checked against this host's datasets: `send.encrypted` over an
    unencrypted filesystem, and `send.raw` without `send.encrypted` over an encrypted one,
    are configcheck errors (exit 2), not a failure at every run."""
    _need("encryption")
    rig = Rig(pools, tmp_path, "ccenc")
    keyfile = tmp_path / "key"
    keyfile.write_bytes(b"c" * 32)
    secret, plain = rig.src + "/secret", rig.fs("plain")
    zfs("create", "-o", "encryption=on", "-o", "keyformat=raw", "-o", "mountpoint=none",
        "-o", "keylocation=file://%s" % keyfile, secret)
    make_tree(plain, [])
    for send, fs, text in (("{encrypted: true}", plain, "is not encrypted"),
                           ("{raw: true}", secret, "mixed intent")):
        rig.configure([fs], push_extra=["send: %s" % send])
        cp = run_cli("configcheck", config=rig.cfg)
        assert_no_traceback(cp)
        assert cp.returncode == 2 and text in cp.stderr and fs in cp.stderr, cp.stderr
    rig.configure([secret, plain], push_extra=["send: {raw: true}"])
    assert run_cli("configcheck", config=rig.cfg).returncode == 2
    rig.configure([secret], push_extra=["send: {encrypted: true}"])
    cp = run_cli("configcheck", config=rig.cfg)
    assert cp.returncode == 0, cp.stderr


SEND_OPTIONS = [("send_properties", "-p", "send_p"), ("backup_properties", "-b", "send_b"),
                ("large_blocks", "-L", "send_L"), ("compressed", "-c", "send_c"),
                ("embedded_data", "-e", "send_e")]


def test_send_and_recv_options_reach_zfs_and_estimates_reach_the_report(pools, tmp_path):
    """Every send option becomes its flag on `zfs send` (in SPEC §4.4's order), recv
    properties become `-o`/`-x` on `zfs receive`, and the size estimate (`send -n -v -P`)
    is the step's and the filesystem's bytes_expected (SPEC §8.8, §1.7)."""
    for _, _, cap in SEND_OPTIONS:
        _need(cap)
    _need("recv_o")
    _need("recv_x")
    _need("send_estimate")
    rig = Rig(pools, tmp_path, "opts")
    make_tree(rig.src, ["a"])
    fs = rig.fs("a")
    zfs("set", "zreplpy:keep=yes", fs)
    zfs("set", "zreplpy:drop=yes", fs)
    snap(fs, "s1")
    rig.configure([fs], push_extra=["send: {%s}" % ", ".join("%s: true" % o
                                                             for o, _, _ in SEND_OPTIONS)],
                  sink_extra=['recv: {properties: {override: {"zreplpy:over": "1"}, '
                              'inherit: ["zreplpy:drop"]}}'])
    env, log = zfs_logger(tmp_path)
    job = rig.ok(env=env)
    [send] = [a for a in logged_calls(log, fs) if a[0] == "send" and "-n" not in a]
    assert send[1:-1] == ["-p", "-b", "-L", "-c", "-e"], send
    [recv] = [a for a in logged_calls(log, rig.sink) if a[0] == "receive"]
    assert "-o" in recv and "zreplpy:over=1" in recv and ["-x", "zreplpy:drop"] == \
        recv[recv.index("-x"):recv.index("-x") + 2], recv
    # `-b` sends only *received* property values (zfs-send(8)): the locally set one stays home
    assert _user_props(rig.target(fs)) == {"zreplpy:keep": "-", "zreplpy:drop": "-",
                                           "zreplpy:over": "1"}
    f = fs_reports(job)[fs]
    assert f["steps"][0]["bytes_expected"] and f["bytes_expected"] == \
        f["steps"][0]["bytes_expected"]
    assert_guids_equal(rig, fs)
    # without `-b`, `-p` carries the local values, and recv's -x / -o still apply
    make_tree(rig.src, ["b"])
    other = rig.fs("b")
    zfs("set", "zreplpy:keep=yes", other)
    zfs("set", "zreplpy:drop=yes", other)
    snap(other, "s1")
    rig.configure([other], push_extra=["send: {send_properties: true}"],
                  sink_extra=['recv: {properties: {override: {"zreplpy:over": "1"}, '
                              'inherit: ["zreplpy:drop"]}}'])
    rig.ok()
    assert _user_props(rig.target(other)) == {"zreplpy:keep": "yes", "zreplpy:drop": "-",
                                              "zreplpy:over": "1"}


def _user_props(fs):
    return dict(line.split("\t")[1:3] for line in zfs(
        "get", "-H", "-o", "name,property,value", "zreplpy:keep,zreplpy:drop,zreplpy:over",
        fs).stdout.splitlines())
