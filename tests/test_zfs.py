"""Section 7, the ZFS adapter: pure parts with plain data, every method against real ZFS."""
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, hold, make_tree, pid_alive, release, setpriv_pdeathsig, snap, state, zfs

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402


# --- the classifier: exact texts from zfs-fuse.md §3.5 and OpenZFS -------------------------

CLASSIFY_CASES = [
    # (stderr, rc, kind, temporary, local_to_fs)
    ("connect: No such file or directory\nPlease make sure that the zfs-fuse daemon is "
     "running.\ninternal error: failed to initialize ZFS library\n", 1, "zfs-unavailable",
     False, False),
    ("The ZFS modules are not loaded.\nTry running '/sbin/modprobe zfs' as root to load them."
     "\n/dev/zfs and /proc/self/mounts are required.\n", 1, "zfs-unavailable", False, False),
    ("connect: Permission denied\ninternal error: failed to initialize ZFS library\n", 1,
     "permission", False, False),
    ("invalid option 'p'\nusage:\n\tlist [-rH]...\n", 2, "unsupported", False, False),
    ("too many arguments\nusage:\n\tsnapshot [-r] ...\n", 2, "unsupported", False, False),
    ("cannot open 'zfa/nonexist': dataset does not exist\n", 1, "missing", False, True),
    ("could not find any snapshots to destroy; check snapshot names.\n", 1, "missing", False,
     True),
    ("cannot hold 'zfa/x@s': tag already exists on this dataset\n", 1, "hold-exists", False,
     True),
    ("cannot release 't' from 'zfa/x@s': no such tag on this dataset\n", 1, "no-such-tag",
     False, True),
    ("cannot destroy 'zfa/data@s2': dataset is busy\n", 1, "busy", True, True),
    ("cannot destroy snapshot zfa/x@s: it's being held. Run 'zfs holds -r zfa/x@s' to see "
     "holders.\n", 1, "held", True, True),
    ("cannot destroy 'zfa/p4@1': snapshot has dependent clones\nuse '-R' to destroy the "
     "following datasets:\nzfa/cl\n", 1, "has-clones", False, True),
    ("cannot receive incremental stream: most recent snapshot of zfb/dg does not\nmatch "
     "incremental source\n", 1, "diverged", False, True),
    ("cannot receive incremental stream: destination zfb/dm has been modified\nsince most "
     "recent snapshot\n", 1, "receiver-modified", False, True),
    ("cannot receive new filesystem stream: destination has snapshots (eg. zfb/data@s1)\n"
     "must destroy them to overwrite it\n", 1, "receiver-has-snapshots", False, True),
    ("cannot receive new filesystem stream: destination 'zfb/data' exists\nmust specify -F "
     "to overwrite it\n", 1, "receiver-exists", False, True),
    ("cannot restore to zfb/same: destination already exists\n", 1, "busy", True, True),
    ("cannot receive new filesystem stream: out of space\n", 1, "no-space", False, True),
    ("cannot receive new filesystem stream: invalid backup stream\n", 1, "stream-broken",
     True, True),
    ("cannot receive: failed to read from stream\n", 1, "stream-broken", True, True),
    ("cannot receive: invalid stream (bad magic number)\n", 1, "stream-broken", True, True),
    ("cannot snapshot 'zfa/data@a+b': invalid character '+' in name\n", 1, "invalid-name",
     False, True),
    ("cannot create snapshot 'zfa/data@s1': dataset already exists\n", 1, "exists", False,
     True),
    ("cannot receive resume stream: destination zfb/x contains partially-complete state from "
     "\"zfs receive -s\".\n", 1, "partial-state", True, True),
    ("something nobody has seen before\n", 1, "zfs-error", False, True),
    # OpenZFS texts, captured from 2.3.2 in the lane's VM unless marked
    ("cannot open 'src/nope': dataset does not exist\nusage:\n\tsnapshot [-r] [-o "
     "property=value] ... <filesystem|volume>@<snap> ...\n\nFor the property list, run: zfs "
     "set|get\n", 2, "missing", False, True),
    ("cannot hold snapshot 'src/t@ghost': dataset does not exist\n", 1, "missing", False,
     True),
    ("cannot hold snapshot 'src/t@a': tag already exists on this dataset\n", 1, "hold-exists",
     False, True),
    ("cannot release hold from snapshot 'src/t@a': no such tag on this dataset\n", 1,
     "no-such-tag", False, True),
    ("could not find any snapshots to destroy; check snapshot names.\n", 1, "missing", False,
     True),
    # destroying a held snapshot: 2.1/2.2 say "dataset is busy"; 2.3 and 2.4 (zrepl #922)
    ("cannot destroy snapshot src/t@a: dataset is busy\n", 1, "busy", True, True),
    ("cannot destroy snapshot src/t@a: it's being held. Run 'zfs holds -r src/t@a' to see "
     "holders.\n", 1, "held", True, True),
    ("cannot resume send: resume token is corrupt (decompression failed)\n", 255,
     "zfs-error", False, True),
]


@pytest.mark.parametrize("stderr,rc,kind,temporary,local", CLASSIFY_CASES,
                         ids=[c[2] + "-" + str(i) for i, c in enumerate(CLASSIFY_CASES)])
def test_classify(stderr, rc, kind, temporary, local):
    err = zrepl.classify(["zfs", "destroy", "zfa/x@s"], rc, stderr, fs="zfa/x")
    assert (err.kind, err.temporary, err.local_to_fs) == (kind, temporary, local)
    assert isinstance(err, zrepl.ZFSError)
    assert err.error_class == ("temporary" if temporary else
                               "local_to_fs" if local else "permanent")
    # the message says what failed and why, but never carries a whole usage text
    assert "zfs destroy" in str(err) and "\tlist" not in str(err)


def test_classify_unknown_error_without_fs_is_not_local():
    err = zrepl.classify(["zpool", "list"], 1, "weird\n")
    assert (err.kind, err.local_to_fs) == ("zfs-error", False)


def test_classify_timeout_and_signal():
    t = zrepl.classify(["zfs", "list"], -15, "", killed_by_us=True)
    assert (t.kind, t.temporary) == ("timeout", True)
    k = zrepl.classify(["zfs", "list"], -9, "", signal_kill=True)
    assert (k.kind, k.temporary) == ("killed", True) and "signal 9" in str(k)


@pytest.mark.parametrize("rc,text,unsupported", [
    (2, "invalid option 'p'\nusage: ...", True),
    (2, "unrecognized command 'load-key'\nusage: zfs command args ...", True),
    (2, "invalid type 'bookmark'", True),
    (2, "bad property list: invalid property 'written'", True),
    (2, "too many arguments\nusage:", True),
    (255, "internal error: /usr/lib/zfs/pyzfs.py not found", True),
    (1, "cannot open 'zreplpy-probe-1/x': dataset does not exist", False),
    (1, "cannot receive: failed to read from stream", False),
    (2, "cannot open 'x': dataset does not exist", False),
    (255, "cannot resume send: resume token is corrupt", False),
])
def test_probe_says_unsupported(rc, text, unsupported):
    assert zrepl.probe_says_unsupported(rc, text) is unsupported


# Captured answers to the exact probes of CAPABILITY_PROBES (bogus pool zreplpy-probe-1):
# (capability, ZFS, rc, stdout+stderr, verdict). OpenZFS 2.3.2 prints its usage text after
# a real error for several commands; that must read as "yes".
_USAGE_SNAPSHOT = ("\nusage:\n\tsnapshot [-r] [-o property=value] ... "
                   "<filesystem|volume>@<snap> ...\n")
_USAGE_RECEIVE = ("\nusage:\n\treceive [-vMnsFhu] [-o <property>=<value>] ... "
                  "[-x <property>] ...\n\treceive -A <filesystem|volume>\n")
_USAGE_SEND = "\nusage:\n\tsend [-DLPbcehnpsVvw] [-i|-I snapshot]\n"
PROBE_SAMPLES = [
    ("multi_snapshot", "openzfs-2.3", 2,
     "cannot open 'zreplpy-probe-1/x': dataset does not exist" + _USAGE_SNAPSHOT, True),
    ("resume", "openzfs-2.3", 2,
     "cannot open 'zreplpy-probe-1/x': dataset does not exist" + _USAGE_RECEIVE, True),
    ("resume", "openzfs-2.3", 255,
     "cannot resume send: resume token is corrupt (decompression failed)", True),
    ("send_S", "openzfs-2.3", 2,
     "saved send must specify the dataset with partially-received state" + _USAGE_SEND, True),
    ("recv_c", "openzfs-2.3", 1, "cannot receive: failed to read from stream", True),
    ("holds_list", "openzfs-2.3", 1,
     "cannot open 'zreplpy-probe-1/x@x': dataset does not exist\nno datasets available", True),
    ("encryption", "openzfs-2.3", 1, "0 / 0 key(s) successfully verified\n"
     "cannot open 'zreplpy-probe-1/x': dataset does not exist", True),
    ("send_estimate", "openzfs-2.3", 1,
     "cannot open 'zreplpy-probe-1/x@x': dataset does not exist", True),
    ("unknown flag", "openzfs-2.3", 2, "invalid option 'Q'" + _USAGE_SEND, False),
    ("multi_snapshot", "zfs-fuse", 2, "too many arguments\nusage:\n\tsnapshot [-r] "
     "[-o property=value] ... <filesystem@snapname|volume@snapname>\n", False),
    ("resume", "zfs-fuse", 2, "invalid option 'A'\nusage:\n\treceive [-vnF] "
     "<filesystem|volume|snapshot>\n", False),
    ("resume", "zfs-fuse", 2, "invalid option 'n'\nusage:\n\tsend [-RDp] [-[iI] "
     "snapshot] <snapshot>\n", False),
    ("holds_list", "zfs-fuse", 255, "internal error: /usr/lib/zfs/pyzfs.py not found", False),
    ("bookmarks", "zfs-fuse", 2, "invalid type 'bookmark'\nusage:\n\tlist [-rH]", False),
    ("encryption", "zfs-fuse", 2, "unrecognized command 'load-key'\nusage: zfs command "
     "args ...", False),
    ("recv_c", "zfs-fuse", 2, "invalid option 'c'\nusage:\n\treceive [-vnF]", False),
    ("send_p", "zfs-fuse", 1, "cannot open 'zreplpy-probe-1/x': dataset does not exist",
     True),
    ("recv_u", "zfs-fuse", 1, "cannot receive: failed to read from stream", True),
    ("bare usage", "any", 2, "usage:\n\tsend [-RDp] <snapshot>\n", False),
    ("as a user", "openzfs-2.3", 1, "cannot open 'x': permission denied", None),
    ("daemon down", "zfs-fuse", 1, "connect: No such file or directory\nPlease make sure "
     "that the zfs-fuse daemon is running.\ninternal error: failed to initialize ZFS "
     "library", None),
    ("killed", "any", -9, "", None),
]


@pytest.mark.parametrize("cap,zfs_,rc,text,verdict", PROBE_SAMPLES,
                         ids=[f"{c[1]}-{c[0]}-{i}" for i, c in enumerate(PROBE_SAMPLES)])
def test_probe_verdict_on_captured_answers(cap, zfs_, rc, text, verdict):
    value, why = zrepl.probe_verdict(rc, text)
    assert value is verdict, why
    assert why


def test_probe_killed_by_the_time_limit_is_undecided():
    assert zrepl.probe_verdict(1, "", killed=True)[0] is None


# What each ZFS the lanes run is known to have. The probes must find exactly this: a
# probe answering "no" where the ZFS can (or "yes" where it cannot) fails here.
EXPECTED_CAPABILITIES = {
    "zfs-fuse": {n: n in ("recv_u", "send_p", "depth") for n in zrepl.CAPABILITY_NAMES},
    "openzfs-2.3": {n: True for n in zrepl.CAPABILITY_NAMES},
}
EXPECTED_POOL_FEATURES = {
    "zfs-fuse": {"bookmarks": False, "resume": False, "encryption": False},
    "openzfs-2.3": {"bookmarks": True, "resume": True, "encryption": True},
}


def _lane_zfs(caps):
    if caps.implementation == "zfs-fuse":
        return "zfs-fuse"
    if caps.implementation == "openzfs" and (caps.version or "").startswith("2.3."):
        return "openzfs-2.3"
    return None


@pytest.mark.zfs
def test_capabilities_are_exactly_what_this_zfs_has(zfs_available, pools):
    caps = zrepl.ZFS().capabilities()
    lane = _lane_zfs(caps)
    want_lane = os.environ.get("ZREPLPY_LANE")
    if want_lane == "openzfs":
        assert lane == "openzfs-2.3", f"the OpenZFS lane runs {caps.implementation} {caps.version}"
    if lane is None:
        pytest.skip(f"no expected capability table for {caps.implementation} {caps.version}")
    got = {n: caps[n] for n in zrepl.CAPABILITY_NAMES}
    assert caps.undecided == {}
    assert got == EXPECTED_CAPABILITIES[lane]
    # zfs-fuse redirects an incremental whose target is missing (zfs-fuse.md §3.2), so
    # the receiver checks first; OpenZFS refuses it itself (test_replication_conflicts)
    assert caps.receive_checks_target is (lane == "openzfs-2.3")
    for p in (pools.src, pools.dst):
        assert caps.pools[p] == EXPECTED_POOL_FEATURES[lane], p


def test_chunk_names_limits_count_and_bytes():
    names = ["p/fs@%04d" % i for i in range(250)]
    chunks = list(zrepl.chunk_names(names))
    assert [len(c) for c in chunks] == [100, 100, 50]
    assert sum(chunks, []) == names
    long_names = ["p/" + "x" * 200 + "@%d" % i for i in range(1000)]
    for c in zrepl.chunk_names(long_names):
        assert sum(len(n) + 1 for n in c) + 256 <= zrepl.ARGV_BYTES_LIMIT


def test_parse_listing_groups_sorts_and_keeps_tabs_in_values():
    text = textwrap.dedent("""\
        p/a\ttype\tfilesystem\t-
        p/a\tguid\t111\t-
        p/a\tzrepl:placeholder\ton\tlocal
        p/a@s2\ttype\tsnapshot\t-
        p/a@s2\tguid\t18446744073709551615\t-
        p/a@s2\tcreatetxg\t20\t-
        p/a@s2\tcreation\t1700000100\t-
        p/a@s2\tuserrefs\t1\t-
        p/a@s2\tzrepl:holds\tzrepl_CURSOR_J_j\tlocal
        p/a@s1\ttype\tsnapshot\t-
        p/a@s1\tguid\t5\t-
        p/a@s1\tcreatetxg\t10\t-
        p/a@s1\tcreation\t1700000000\t-
        p/a@s1\tuserrefs\t0\t-
        p/a/b\ttype\tfilesystem\t-
        p/a/b\tzrepl:placeholder\ton\tinherited from p/a
        p/a/b\tnote:x\tvalue\twith\ttabs\tlocal
        """)
    ds = zrepl.parse_listing(text)
    assert sorted(ds) == ["p/a", "p/a/b"]
    a = ds["p/a"]
    assert a.is_placeholder and not ds["p/a/b"].is_placeholder   # inherited does not count
    assert [v.name for v in a.versions] == ["s1", "s2"]
    s2 = a.versions[1]
    assert (s2.guid, s2.createtxg, s2.creation, s2.userrefs) == (2**64 - 1, 20, 1700000100, 1)
    assert s2.holds_record == ("zrepl_CURSOR_J_j",)
    assert s2.full_name == "p/a@s2"


def test_parse_listing_bookmark_sorts_before_snapshot_of_same_txg():
    lines = ["p/a\ttype\tfilesystem\t-"]
    for name, typ in (("p/a@s", "snapshot"), ("p/a#b", "bookmark")):
        lines += ["%s\ttype\t%s\t-" % (name, typ), "%s\tguid\t7\t-" % name,
                  "%s\tcreatetxg\t9\t-" % name, "%s\tcreation\t1\t-" % name]
    ds = zrepl.parse_listing("\n".join(lines))
    assert [(v.type, v.name) for v in ds["p/a"].versions] == [("bookmark", "b"),
                                                               ("snapshot", "s")]


def test_parse_listing_reads_the_resume_token_whatever_its_source():
    # OpenZFS 2.3 lists receive_resume_token with source `-` (a read-only property)
    text = ("p/a\ttype\tfilesystem\t-\np/a\treceive_resume_token\t1-abc-def\t-\n"
            "p/b\ttype\tfilesystem\t-\np/b\treceive_resume_token\t-\t-\n")
    ds = zrepl.parse_listing(text)
    assert ds["p/a"].resume_token == "1-abc-def" and ds["p/b"].resume_token is None


# --- against real ZFS --------------------------------------------------------------------


@pytest.fixture
def adapter(zfs_available):
    return zrepl.ZFS()


def _is_zfs_fuse(adapter):
    return adapter.capabilities().implementation == "zfs-fuse"


def test_capabilities_are_probed_once_and_match_this_zfs(adapter):
    caps = adapter.capabilities()
    assert caps.available and set(caps.flags) == set(zrepl.CAPABILITY_NAMES)
    calls = adapter.calls
    assert adapter.capabilities() is caps and adapter.calls == calls   # cached
    if caps.implementation == "zfs-fuse":
        # zfs-fuse.md §2: what this old ZFS lacks and has
        for name in ("list_p", "get_t", "bookmarks", "holds_list", "multi_snapshot",
                     "comma_destroy", "resume", "recv_o", "recv_x", "send_w", "send_c",
                     "send_L", "send_e", "send_estimate", "encryption"):
            assert caps[name] is False, name
        for name in ("recv_u", "send_p", "depth"):
            assert caps[name] is True, name
        assert caps.version == "pool-version 23"
        assert all(f == {"bookmarks": False, "resume": False, "encryption": False}
                   for f in caps.pools.values())


def test_probe_verdicts_are_kept_per_host_and_an_upgrade_probes_again(zfs_available, tmp_path):
    """The ~26 probes run once per ZFS installation, not once per process; the key is
    the zfs/zpool programs (a wrapper first in PATH is another program), pool features
    are asked every time."""
    cache = tmp_path / "capabilities.json"

    def probed(path=None):
        z = zrepl.ZFS()
        z.probe_cache = str(cache)
        if path:
            z.env["PATH"] = path + ":" + z.env["PATH"]
        caps = z.capabilities()
        return caps, z.calls

    first, calls_first = probed()
    assert calls_first >= 20 and cache.exists()
    again, calls_again = probed()
    assert calls_again <= 3, calls_again            # zpool list + pool features
    # those two run beside the caller's next step (a job's listings), asked for by the
    # first that needs the pools; a settled answer has them read already
    assert isinstance(again.pool_features, zrepl.Later)
    assert again.flags == first.flags and again.undecided == first.undecided
    assert (again.implementation, again.version) == (first.implementation, first.version)
    pools_now = set(subprocess.run(["zpool", "list", "-H", "-o", "name"], env=zrepl._zfs_env(),
                                   stdout=subprocess.PIPE, text=True).stdout.split())
    assert set(again.pools) == pools_now          # asked again, not remembered
    assert again.pools == first.pools and not isinstance(again.pool_features, zrepl.Later)
    z = zrepl.ZFS()
    z.probe_cache = str(cache)
    settled = z.capabilities(settled=True)
    assert z.calls == 2 and settled.available and settled.pool_features == first.pools
    # another zfs program (an upgrade, here a wrapper first in PATH): probed again
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "zfs"
    wrapper.write_text("#!/bin/sh\nexec %s \"$@\"\n" % shutil.which(
        "zfs", path=zrepl._zfs_env()["PATH"]))
    wrapper.chmod(0o755)
    upgraded, calls_upgraded = probed(str(bindir))
    assert calls_upgraded >= 20 and upgraded.flags == first.flags
    wrapper.write_text(wrapper.read_text() + "# upgraded again\n")
    assert probed(str(bindir))[1] >= 20
    assert probed(str(bindir))[1] <= 3
    # a damaged cache is probed over, never trusted
    cache.write_text("{not json")
    assert probed(str(bindir))[1] >= 20


def test_unavailable_zfs_is_reported_not_raised(tmp_path):
    z = zrepl.ZFS()
    z.env["PATH"] = str(tmp_path)          # no zfs anywhere on this PATH
    caps = z.capabilities()
    assert not caps.available and "no `zpool` command" in caps.error
    with pytest.raises(zrepl.ZFSUnavailable):
        z.run(["zfs", "list"])


def test_listing_is_one_process_with_exact_numbers(adapter, pools):
    root = pools.src + "/list"
    make_tree(root, ["a", "a/b", "c"])
    for fs in (root + "/a", root + "/a/b", root + "/c"):
        snap(fs, "s1")
        snap(fs, "s2")
    zfs("set", "zrepl:placeholder=on", root + "/a")
    zfs("set", "note:tab=has\ttab", root + "/c")
    adapter.capabilities()
    before = adapter.calls
    datasets, missing = adapter.list_datasets([root])
    assert adapter.calls == before + 1 and missing == []
    assert sorted(datasets) == [root, root + "/a", root + "/a/b", root + "/c"]
    truth = state(root)
    for d in datasets.values():
        assert d.guid == truth[d.name]["guid"]
        for v in d.versions:
            t = truth[v.full_name]
            assert (v.guid, v.createtxg, v.userrefs) == (t["guid"], t["createtxg"],
                                                         t["userrefs"])
        assert [v.name for v in d.versions] == ([] if d.name == root else ["s1", "s2"])
    assert datasets[root + "/a"].is_placeholder
    assert not datasets[root + "/a/b"].is_placeholder      # inherited, not local


def test_listing_reports_missing_roots_and_keeps_the_others(adapter, pools):
    root = pools.src + "/partial"
    make_tree(root, ["x"])
    datasets, missing = adapter.list_datasets([root, pools.src + "/nope"])
    assert missing == [pools.src + "/nope"]
    assert root + "/x" in datasets


def test_listing_without_snapshots(adapter, pools):
    root = pools.src + "/fsonly"
    make_tree(root, ["x"])
    snap(root + "/x", "s")
    datasets, _ = adapter.list_datasets([root], snapshots=False)
    assert datasets[root + "/x"].versions == []


# --- the listing cache follows the run's own changes (SPEC §4.3) ----------------------------

LISTING_EFFECTS = [
    (["zfs", "list", "-H", "-o", "name"], (None, ())),
    (["zfs", "hold", "t", "p/a@s", "p/b@s"], ("caller", ("p/a@s", "p/b@s"))),
    (["zfs", "hold", "-r", "t", "p/a@s"], ("all", ())),
    (["zfs", "release", "t", "p/a@s"], ("caller", ("p/a@s",))),
    (["zfs", "set", "zrepl:holds=a,b", "p/a@s", "p/b@t"], ("caller", ("p/a@s", "p/b@t"))),
    (["zfs", "inherit", "zrepl:holds", "p/a@s"], ("caller", ("p/a@s",))),
    (["zfs", "set", "zrepl:holds=a", "p/a"], ("dirty", ("p/a",))),
    (["zfs", "set", "zrepl:placeholder=off", "p/a"], ("dirty", ("p/a",))),
    (["zfs", "set", "canmount=on", "p/a"], (None, ())),       # no listed property
    (["zfs", "inherit", "-r", "zrepl:holds", "p/a"], ("all", ())),
    (["zfs", "snapshot", "p/b@s", "p/a@s"], ("dirty", ("p/a", "p/b"))),
    (["zfs", "snapshot", "-o", "x:y=1", "p/a@s"], ("dirty", ("p/a",))),
    (["zfs", "snapshot", "-r", "p@s"], ("all", ())),
    (["zfs", "destroy", "p/a@s1,s2"], ("destroy", ("p/a@s1", "p/a@s2"))),
    (["zfs", "destroy", "p/a#b"], ("destroy", ("p/a#b",))),
    (["zfs", "destroy", "p/a@s1%s3"], ("dirty", ("p/a",))),
    (["zfs", "destroy", "p/a"], ("all", ())),                  # a filesystem: its subtree
    (["zfs", "destroy", "-r", "p/a@s"], ("all", ())),
    (["zfs", "bookmark", "p/a@s", "p/a#b"], ("bookmark", ("p/a@s", "p/a#b"))),
    (["zfs", "receive", "-u", "-s", "-o", "x:y=1", "-x", "mountpoint", "p/a"],
     ("dirty", ("p/a",))),
    (["zfs", "receive", "-A", "p/a"], ("dirty", ("p/a",))),
    (["zfs", "receive", "-c", "p/a@s"], ("dirty", ("p/a",))),
    (["zfs", "receive", "-d", "p"], ("all", ())),              # the stream names the target
    (["zfs", "create", "-o", "zrepl:placeholder=on", "-o", "mountpoint=none", "p/a/b"],
     ("dirty", ("p/a/b",))),                                  # only it, on its pool
    (["zfs", "create", "-V", "1G", "-s", "p/v"], ("dirty", ("p/v",))),
    (["zfs", "create", "-p", "p/a/b"], ("all", ())),          # and its missing parents
    (["zfs", "create", "-x", "p/a"], ("all", ())),            # a flag it does not know
    (["zfs", "receive", "-u", "-Z", "p/a"], ("all", ())),      # a flag it does not know
    (["zfs", "rename", "p/a", "p/b"], ("all", ())),
]


@pytest.mark.parametrize("argv,effect", LISTING_EFFECTS, ids=[" ".join(a[1:4]) for a, _ in
                                                              LISTING_EFFECTS])
def test_listing_effect_of_each_mutating_command(argv, effect):
    assert zrepl.listing_effect(argv) == effect


def test_the_cached_listing_follows_the_runs_own_changes(zfs_available, pools):
    """A hold, release, record, destroy or bookmark that succeeded is applied to the cached
    listing with no process; a snapshot or a receive re-lists only its filesystem, in one
    `zfs get -d 1`. After each, the cached listing equals a fresh one (another adapter)."""
    argvs = []
    adapter = zrepl.ZFS(log=lambda level, sub, msg, **f: argvs.append(f.get("argv", "")))
    root = pools.src + "/follow"
    make_tree(root, ["a", "b", "c", "d"])
    a, b = root + "/a", root + "/b"
    for fs in (a, b):
        for name in ("s1", "s2", "s3"):
            snap(fs, name)
    adapter.capabilities()

    def same_as_fresh(processes):
        del argvs[:]
        cached = adapter.list_datasets([root])
        listed = [x for x in argvs if x.startswith("zfs get")]
        assert len(listed) == processes, listed
        assert cached == zrepl.ZFS().list_datasets([root])
        return cached[0], listed

    ds, _ = same_as_fresh(1)
    adapter.hold("t1", [ds[a].snapshots[0], ds[b].snapshots[0]])
    adapter.hold("t2", [ds[a].snapshots[0]])
    ds, _ = same_as_fresh(0)
    assert ds[a].snapshots[0].userrefs == 2 and ds[b].snapshots[0].userrefs == 1
    adapter.release("t1", [ds[a].snapshots[0], ds[b].snapshots[0]])
    ds, _ = same_as_fresh(0)
    assert [v.userrefs for v in (ds[a].snapshots[0], ds[b].snapshots[0])] == [1, 0]
    # a command that failed where zfs said by name that it changed nothing ("no such
    # tag", "tag already exists": success to the caller) needs no re-listing...
    assert adapter.release("t1", [ds[a].snapshots[0]]) == {a + "@s1": None}
    assert adapter.hold("t2", [ds[a].snapshots[0]]) == {a + "@s1": None}
    ds, _ = same_as_fresh(0)
    assert [v.userrefs for v in (ds[a].snapshots[0], ds[b].snapshots[0])] == [1, 0]
    # ...one that failed otherwise is not guessed at: its filesystem is listed again alone
    gone = zrepl.Version("snapshot", b, "nosuch", 1, 1, 1)
    assert adapter.hold("t3", [gone])[gone.full_name] is not None
    ds, listed = same_as_fresh(1)
    assert listed[0].endswith(" " + b)
    adapter.destroy_snapshots(b, ["s2"])
    ds, _ = same_as_fresh(0)
    assert [v.name for v in ds[b].snapshots] == ["s1", "s3"]
    if adapter.capabilities()["bookmarks"]:
        adapter.bookmark(a + "@s3", a + "#m3")
        ds, _ = same_as_fresh(0)
        adapter.destroy_bookmark(a + "#m3")
        ds, _ = same_as_fresh(0)

    # what only ZFS knows: the snapshot's numbers, the received dataset
    assert adapter.snapshot([a], "s4") == {a: None}
    ds, listed = same_as_fresh(1)
    assert "-d\t1" in listed[0].replace(" ", "\t") and listed[0].endswith(" " + a)
    stream = subprocess.run(["zfs", "send", a + "@s1"], stdout=subprocess.PIPE,
                            env=adapter.env, check=True).stdout
    adapter.run(["zfs", "receive", "-u", root + "/d/r"], input=stream)
    ds, listed = same_as_fresh(1)
    assert listed[0].endswith(" " + root + "/d/r") and [v.name for v in ds[root + "/d/r"]
                                                      .snapshots] == ["s1"]
    # an incremental receive whose snapshots the caller read back: no re-listing
    stream = subprocess.run(["zfs", "send", "-I", a + "@s1", a + "@s3"],
                            stdout=subprocess.PIPE, env=adapter.env, check=True).stdout
    proc = adapter.start(["zfs", "receive", "-u", root + "/d/r"], fs=root + "/d/r",
                         stdin=True)
    proc.write(stream)
    assert proc.finish().exit_status == 0
    got = adapter.get_versions([root + "/d/r@s2", root + "/d/r@s3"])
    adapter.settle_receives(root + "/d/r", list(got.values()), [proc.since])
    ds, _ = same_as_fresh(0)
    assert [v.name for v in ds[root + "/d/r"].snapshots] == ["s1", "s2", "s3"]
    # but not where something else changed the filesystem too
    adapter.run(["zfs", "set", "zrepl:placeholder=off", root + "/d/r"])
    stream = subprocess.run(["zfs", "send", "-i", a + "@s3", a + "@s4"],
                            stdout=subprocess.PIPE, env=adapter.env, check=True).stdout
    proc = adapter.start(["zfs", "receive", "-u", root + "/d/r"], fs=root + "/d/r",
                         stdin=True)
    proc.write(stream)
    assert proc.finish().exit_status == 0, proc.stderr_text
    adapter.settle_receives(root + "/d/r", [adapter.get_version(root + "/d/r@s4")],
                            [proc.since])
    ds, listed = same_as_fresh(1)
    assert [v.name for v in ds[root + "/d/r"].snapshots] == ["s1", "s2", "s3", "s4"]
    assert ds[root + "/d/r"].placeholder_value == "off"
    # a new filesystem is listed alone (what others did, unseen, stays unseen)...
    zfs("create", root + "/e")
    adapter.run(["zfs", "create", "-o", "mountpoint=none", root + "/f"])
    cached = adapter.list_datasets([root])
    listed = [x for x in argvs if x.startswith("zfs get")]
    assert root + "/f" in cached[0] and root + "/e" not in cached[0]
    assert "-d 1" in listed[-1] and listed[-1].endswith(" " + root + "/f")
    # ...and a command it cannot follow drops the listing: the next one lists everything
    adapter.run(["zfs", "create", "-p", root + "/g/h"])
    ds, listed = same_as_fresh(1)
    assert " -r " in listed[0] and {root + "/e", root + "/f", root + "/g/h"} <= set(ds)
    adapter.release("t2", [ds[a].snapshots[0]])


def test_a_bookmark_that_exists_is_success_only_with_the_same_guid(adapter, pools):
    """A cursor bookmark an interrupted run already made is the one meant (same GUID);
    a bookmark of that name on another snapshot is an error, never taken for it."""
    if not adapter.capabilities()["bookmarks"]:
        pytest.skip("this ZFS has no bookmarks (zfs-fuse.md §2)")
    fs = pools.src + "/bmexists"
    make_tree(fs, [])
    s1, s2 = snap(fs, "s1"), snap(fs, "s2")
    g1, g2 = (int(zfs("get", "-H", "-o", "value", "guid", s).stdout) for s in (s1, s2))
    adapter.bookmark(s1, fs + "#m", g1)
    adapter.bookmark(s1, fs + "#m", g1)                      # again: it is there
    for snapshot, guid in ((s2, g2), (s1, None)):           # another one's, or unjudged
        with pytest.raises(zrepl.ZFSError) as e:
            adapter.bookmark(snapshot, fs + "#m", guid)
        assert e.value.kind == "bookmark-exists"
    # side by side, each judged on its own: there already, made, another one's
    results = adapter.bookmarks([(s1, fs + "#m", g1), (s2, fs + "#n", g2),
                                 (s1, fs + "#n2", g1)])
    assert results == {fs + "#m": None, fs + "#n": None, fs + "#n2": None}
    results = adapter.bookmarks([(s1, fs + "#n", g1), (s2, fs + "#o", g2)])
    assert results[fs + "#n"].kind == "bookmark-exists" and results[fs + "#o"] is None
    marks = zfs("list", "-H", "-t", "bookmark", "-o", "name,guid", "-r", fs).stdout.split()
    assert marks == [fs + "#m", str(g1), fs + "#n", str(g2), fs + "#n2", str(g1),
                     fs + "#o", str(g2)]


def test_list_filesystems_and_pools(adapter, pools):
    make_tree(pools.src + "/lf", ["y"])
    names = adapter.list_filesystems()
    assert pools.src + "/lf/y" in names and names == sorted(names)
    assert {pools.src, pools.dst} <= set(adapter.list_pools())


def test_snapshot_reports_each_filesystem(adapter, pools):
    root = pools.src + "/snap"
    make_tree(root, ["a", "b"])
    snap(root + "/b", "n1")                      # b already has it: that fs fails, a does not
    result = adapter.snapshot([root + "/a", root + "/b", root + "/gone"], "n1")
    assert result[root + "/a"] is None
    assert result[root + "/b"].kind == "exists"
    assert result[root + "/gone"].kind == "missing"
    assert result[root + "/gone"].local_to_fs
    assert root + "/a@n1" in state(root)


def test_snapshot_recursive_is_atomic(adapter, pools):
    root = pools.src + "/snapr"
    make_tree(root, ["a", "a/b"])
    snap(root + "/a/b", "r1")
    with pytest.raises(zrepl.ZFSError) as e:
        adapter.snapshot_recursive(root, "r1")
    assert e.value.kind == "exists"
    assert root + "@r1" not in state(root)       # nothing of the failed -r was created
    adapter.snapshot_recursive(root, "r2")
    assert {root + "@r2", root + "/a@r2", root + "/a/b@r2"} <= set(state(root))


def test_destroy_snapshots_batches_and_attributes_errors(adapter, pools):
    fs = pools.src + "/destroy"
    make_tree(fs, [])
    for i in range(6):
        snap(fs, "d%d" % i)
    hold(fs + "@d2", "keepme")
    result = adapter.destroy_snapshots(fs, ["d0", "d1", "d2", "d3", "never-existed"])
    assert result["d0"] is None and result["d1"] is None and result["d3"] is None
    assert result["never-existed"] is None        # already gone counts as destroyed
    # OpenZFS: "it's being held" (held); zfs-fuse says "dataset is busy" (busy)
    assert result["d2"].kind in ("held", "busy") and result["d2"].temporary
    assert sorted(n for n in state(fs) if "@" in n) == [fs + "@d2", fs + "@d4", fs + "@d5"]
    release(fs + "@d2", "keepme")


def test_destroy_calls_per_snapshot_without_comma_destroy(adapter, pools):
    fs = pools.src + "/destroy2"
    make_tree(fs, [])
    for i in range(4):
        snap(fs, "e%d" % i)
    adapter.capabilities()
    before = adapter.calls
    adapter.destroy_snapshots(fs, ["e0", "e1", "e2"])
    expected = 1 if adapter.capabilities()["comma_destroy"] else 3
    assert adapter.calls - before == expected
    assert [n for n in state(fs) if "@" in n] == [fs + "@e3"]


def _version(adapter, full_name):
    v = adapter.get_version(full_name)
    assert v is not None, full_name
    return v


def test_get_version_matches_zfs(adapter, pools):
    fs = pools.src + "/getv"
    make_tree(fs, [])
    snap(fs, "g")
    v = _version(adapter, fs + "@g")
    assert (v.fs, v.name, v.type) == (fs, "g", "snapshot")
    assert v.guid == state(fs)[fs + "@g"]["guid"] and v.creation > 1e9
    with pytest.raises(zrepl.ZFSError) as e:
        adapter.get_version(fs + "@nope")
    assert e.value.kind == "missing"


def test_hold_and_release_are_idempotent_and_recorded(adapter, pools):
    fs = pools.src + "/holds"
    make_tree(fs, [])
    snap(fs, "h")
    v = _version(adapter, fs + "@h")
    assert adapter.hold("zrepl_STEP_J_j", [v]) == {fs + "@h": None}
    assert adapter.hold("zrepl_STEP_J_j", [v]) == {fs + "@h": None}   # tag exists: success
    assert state(fs)[fs + "@h"]["userrefs"] == 1
    record = not adapter.capabilities()["holds_list"]
    if record:   # SPEC §3.4: the tag is findable again through the zrepl:holds record
        assert adapter.get_local_property(fs + "@h", "zrepl:holds") == "zrepl_STEP_J_j"
        fresh = adapter.list_datasets([fs])[0][fs].versions[0]
        assert fresh.holds_record == ("zrepl_STEP_J_j",)
        assert adapter.holds([fresh]) == {fs + "@h": ["zrepl_STEP_J_j"]}
    adapter.hold("zrepl_CURSOR_J_j", [v])
    assert state(fs)[fs + "@h"]["userrefs"] == 2
    assert adapter.release("zrepl_STEP_J_j", [v]) == {fs + "@h": None}
    assert adapter.release("zrepl_STEP_J_j", [v]) == {fs + "@h": None}  # no such tag: ok
    assert state(fs)[fs + "@h"]["userrefs"] == 1
    if record:
        assert adapter.get_local_property(fs + "@h", "zrepl:holds") == "zrepl_CURSOR_J_j"
    adapter.release("zrepl_CURSOR_J_j", [v])
    assert state(fs)[fs + "@h"]["userrefs"] == 0
    fresh = adapter.list_datasets([fs])[0][fs].versions[0]
    assert adapter.holds([fresh]) == {fs + "@h": []}
    if record:   # a snapshot left unheld keeps its record unread: no txg sync to rewrite it
        assert adapter.get_local_property(fs + "@h", "zrepl:holds") == "zrepl_CURSOR_J_j"
        assert adapter.unrecorded(fresh) == 0
        adapter.hold("zrepl_last_received_J_j", [fresh])   # the next hold overwrites it
        assert adapter.get_local_property(fs + "@h", "zrepl:holds") == \
            "zrepl_last_received_J_j"
        adapter.release("zrepl_last_received_J_j", [fresh])


def test_step_holds_are_not_recorded_and_clear_a_stale_record(adapter, pools):
    """SPEC §3.4 as zrepl.py keeps it: a hold placed with record=False writes no record
    (one txg sync less per phase) and counts as unrecorded; on a snapshot whose record
    is stale (no holds), that record is cleared first, so the hold cannot make it true."""
    fs = pools.src + "/holds3"
    make_tree(fs, [])
    snap(fs, "a")
    snap(fs, "b")
    a, b = _version(adapter, fs + "@a"), _version(adapter, fs + "@b")
    record = not adapter.capabilities()["holds_list"]
    adapter.hold("zrepl_CURSOR_J_j", [a])
    adapter.release("zrepl_CURSOR_J_j", [a])           # leaves a's record, unread
    got = adapter.hold("zrepl_STEP_J_j", [a, b], record=False)
    assert got == {fs + "@a": None, fs + "@b": None}
    st = state(fs)
    assert st[fs + "@a"]["userrefs"] == st[fs + "@b"]["userrefs"] == 1
    assert adapter.get_local_property(fs + "@a", "zrepl:holds") is None
    assert adapter.get_local_property(fs + "@b", "zrepl:holds") is None
    fresh = {v.name: v for v in adapter.list_datasets([fs])[0][fs].versions}
    if record:
        assert adapter.holds(list(fresh.values())) == {fs + "@a": [], fs + "@b": []}
        assert [adapter.unrecorded(fresh[n]) for n in "ab"] == [1, 1]
    else:        # zfs holds lists every tag; nothing is unrecorded
        assert adapter.holds(list(fresh.values())) == {fs + "@a": ["zrepl_STEP_J_j"],
                                                        fs + "@b": ["zrepl_STEP_J_j"]}
        assert [adapter.unrecorded(fresh[n]) for n in "ab"] == [0, 0]
    released = adapter.release("zrepl_STEP_J_j", list(fresh.values()))
    assert released == {fs + "@a": None, fs + "@b": None}
    assert state(fs)[fs + "@a"]["userrefs"] == state(fs)[fs + "@b"]["userrefs"] == 0


def test_hold_tags_this_process_placed_are_known_without_asking(adapter, pools):
    """Where `zfs holds` works, the tags of a snapshot that had none are exactly the hold
    just placed, and a release takes its tag away: the phase's own step and last-received
    holds are then released without a `zfs holds` after the transfers. A hold placed
    by someone else shows in userrefs, and then the tags are asked again."""
    fs = pools.src + "/holds4"
    make_tree(fs, [])
    snap(fs, "a")
    v = _version(adapter, fs + "@a")
    adapter.hold("zrepl_STEP_J_j", [v])
    adapter.hold("zrepl_CURSOR_J_j", [v])
    before = adapter.calls
    assert sorted(adapter.holds([v])[fs + "@a"]) == ["zrepl_CURSOR_J_j", "zrepl_STEP_J_j"]
    asked = adapter.calls - before
    adapter.release("zrepl_STEP_J_j", [v])
    before = adapter.calls
    assert adapter.holds([v]) == {fs + "@a": ["zrepl_CURSOR_J_j"]}
    assert adapter.calls - before == asked
    if adapter.capabilities()["holds_list"]:
        assert asked == 0                      # known: no `zfs holds`
    zfs("hold", "theirs", fs + "@a")           # not this process's: userrefs says so
    fresh = adapter.list_datasets([fs])[0][fs].versions[0]
    assert fresh.userrefs == 2
    before = adapter.calls
    got = sorted(adapter.holds([fresh])[fs + "@a"])
    if adapter.capabilities()["holds_list"]:
        assert got == ["theirs", "zrepl_CURSOR_J_j"] and adapter.calls == before + 1
    else:                                      # the record names only zrepl.py's own
        assert got == ["zrepl_CURSOR_J_j"] and adapter.unrecorded(fresh) == 1
    zfs("release", "theirs", fs + "@a")
    adapter.release("zrepl_CURSOR_J_j", [fresh])
    assert state(fs)[fs + "@a"]["userrefs"] == 0


def test_hold_on_missing_snapshot_is_attributed(adapter, pools):
    fs = pools.src + "/holds2"
    make_tree(fs, [])
    snap(fs, "ok")
    ok = _version(adapter, fs + "@ok")
    ghost = zrepl.Version("snapshot", fs, "ghost", 1, 1, 1, 0)
    # record=False: no record write comes first, so the hold itself meets the missing one
    result = adapter.hold("zrepl_STEP_J_j", [ok, ghost], record=False)
    assert result[fs + "@ok"] is None
    assert result[fs + "@ghost"].kind == "missing"
    assert state(fs)[fs + "@ok"]["userrefs"] == 1
    adapter.release("zrepl_STEP_J_j", [ok])


def test_create_placeholder_and_properties(adapter, pools):
    name = pools.dst + "/ph"
    adapter.create_placeholder(name)
    assert adapter.get_local_property(name, "zrepl:placeholder") == "on"
    got = zfs("get", "-H", "-o", "property,value,source", "mountpoint,canmount",
              name).stdout.splitlines()
    assert sorted(got) == ["canmount\toff\tlocal", "mountpoint\tnone\tlocal"]
    datasets, _ = adapter.list_datasets([name])
    assert datasets[name].is_placeholder
    adapter.set_property(name, "zrepl:placeholder", "off")
    assert not adapter.list_datasets([name])[0][name].is_placeholder
    adapter.inherit_property(name, "zrepl:placeholder")
    assert adapter.get_local_property(name, "zrepl:placeholder") is None
    with pytest.raises(zrepl.ZFSError) as e:
        adapter.create_placeholder(pools.dst + "/no/parent")
    assert e.value.kind == "missing"


def test_command_timeout_kills_and_reaps(adapter, pools):
    # a tiny limit on a real listing: the process is terminated and reaped, kind `timeout`
    z = zrepl.ZFS(timeout=0.0001)
    with pytest.raises(zrepl.ZFSError) as e:
        for _ in range(20):        # the listing may win the race once; it cannot win 20 times
            z.run(["zfs", "get", "-Hp", "-r", "all", pools.src])
    assert e.value.kind == "timeout" and e.value.temporary
    time.sleep(0.2)
    zombies = subprocess.run(["ps", "-o", "stat=,ppid=", "-e"], stdout=subprocess.PIPE,
                             universal_newlines=True).stdout
    mine = [ln for ln in zombies.splitlines()
            if ln.split()[0].startswith("Z") and ln.split()[1] == str(os.getpid())]
    assert mine == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="needs root and runuser to run the adapter as an unprivileged user")
def test_permission_error_is_classified(zfs_available, tmp_path):
    if not os.path.exists("/var/run/zfs/zfs_socket"):
        pytest.skip("permission refusal is produced through zfs-fuse's root-only socket")
    # the unprivileged user needs an interpreter and a copy of zrepl.py it may read
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that an unprivileged user may run")
    shutil.copy(str(REPO / "zrepl.py"), str(tmp_path / "zrepl.py"))
    script = tmp_path / "probe.py"
    script.write_text("import sys; sys.path.insert(0, %r)\nimport zrepl\n"
                      "try:\n    zrepl.ZFS().run(['zfs', 'list'])\n"
                      "except zrepl.ZFSError as e:\n    print(e.kind, e.local_to_fs)\n"
                      % str(tmp_path))
    for path in (tmp_path, script, tmp_path / "zrepl.py"):
        os.chmod(str(path), 0o755)
    parent = tmp_path
    while str(parent) != "/":      # pytest's tmp dirs are 0700: let nobody through
        os.chmod(str(parent), os.stat(str(parent)).st_mode | 0o005)
        parent = parent.parent
    cp = subprocess.run(["runuser", "-u", "nobody", "--", python, str(script)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        universal_newlines=True)
    assert cp.stdout.split() == ["permission", "False"], cp.stderr


def _transfer(adapter, pools, name, size, snapshot, direct=False):
    """A filesystem of `size` bytes and its snapshot, with `zfs send` of it and `zfs
    receive` into the destination pool started, not yet connected (direct: the receive
    reads the send's stdout itself) -> (fs, target, send, recv)."""
    from conftest import write_data
    fs = pools.src + "/" + name
    make_tree(fs, [])
    write_data(fs, size)
    snap(fs, snapshot)
    step = zrepl.Step("full", None, _version(adapter, "%s@%s" % (fs, snapshot)),
                      "guarantee_nothing")
    send = adapter.send(fs, step)
    return fs, pools.dst + "/" + name, send, adapter.receive(
        pools.dst + "/" + name, feed=send if direct else None)


def test_a_relay_paused_after_the_last_chunk_still_ends_complete(adapter, pools):
    # SPEC §8.9: a limit's pause lets `zfs receive` take the whole stream and exit, and
    # `zfs send` exit too, before the relay's next move; Linux splice then answers EPIPE
    # before it looks at the (ended) sending pipe. That is the end of a complete stream.
    fs, target, send, recv = _transfer(adapter, pools, "paused", 200 << 10, "p")
    pauses = []

    def pause(n):
        pauses.append(n)
        time.sleep(0.5)                 # long enough for both commands to end

    complete = zrepl.relay(zrepl.MeteredStream(send, on_bytes=pause), recv)
    recv_end, send_end = recv.finish(timeout=30), send.finish(timeout=30)
    assert (recv_end.exit_status, send_end.exit_status) == (0, 0), (recv_end, send_end)
    assert complete
    assert sum(pauses) > 200 << 10
    assert state(target)[target + "@p"]["guid"] == state(fs)[fs + "@p"]["guid"]


@pytest.mark.parametrize("limited", [False, True])
def test_the_relay_counts_every_byte_with_and_without_a_limit(adapter, pools, limited):
    # unlimited, relay runs its own splice loop (where the OS has splice) with every
    # wrapper's counter called directly; a bandwidth limit keeps the layered path, where
    # each move pays the bucket first. Both count the whole stream, no byte twice.
    fs, target, send, recv = _transfer(adapter, pools, "counted-%s" % limited, 3 << 20, "c")
    raw = subprocess.run(["zfs", "send", fs + "@c"], stdout=subprocess.PIPE, check=True).stdout
    seen, outer = [], []
    bucket = zrepl.TokenBucket(1 << 30, 256 << 10) if limited else None
    stream = zrepl.MeteredStream(zrepl.MeteredStream(send, [bucket], on_bytes=seen.append),
                                 on_bytes=outer.append)
    assert (stream.kernel_source() is not None) == (not limited)
    assert zrepl.relay(stream, recv)
    recv_end, send_end = recv.finish(timeout=30), send.finish(timeout=30)
    assert (recv_end.exit_status, send_end.exit_status) == (0, 0), (recv_end, send_end)
    assert sum(seen) == sum(outer) == len(raw)
    assert seen == outer
    if limited:
        assert max(seen) <= 256 << 10          # never more than a bucketful at once
    assert state(target)[target + "@c"]["guid"] == state(fs)[fs + "@c"]["guid"]


def test_a_direct_pipe_is_chosen_exactly_where_the_send_counts_its_stream(adapter, pools):
    # the pipe itself works on every ZFS; what decides is the count: where direct_pipe()
    # says yes, `zfs send`'s own write count is the stream's length (progress, watchdog,
    # report); where it says no (zfs-fuse's daemon writes the stream), the count is not
    fs, target, send, recv = _transfer(adapter, pools, "direct", 3 << 20, "d", direct=True)
    raw = subprocess.run(["zfs", "send", fs + "@d"], stdout=subprocess.PIPE, check=True).stdout
    counted = []
    assert zrepl.watch_pipe(send, [send.stopped], [counted.append], recv, poll=0.05)
    recv_end, send_end = recv.finish(timeout=30), send.finish(timeout=30)
    assert (recv_end.exit_status, send_end.exit_status) == (0, 0), (recv_end, send_end)
    assert state(target)[target + "@d"]["guid"] == state(fs)[fs + "@d"]["guid"]
    assert (sum(counted) == len(raw)) == adapter.direct_pipe(), (sum(counted), len(raw))
    openzfs_linux = adapter.capabilities().implementation == "openzfs" and \
        sys.platform.startswith("linux")
    assert adapter.direct_pipe() == bool(openzfs_linux and setpriv_pdeathsig())
    # a relay is explained exactly where the direct pipe was possible but for the guard
    way, reason = adapter.local_streams()
    assert way == ("direct" if adapter.direct_pipe() else "relay")
    assert (reason is not None) == bool(openzfs_linux and not setpriv_pdeathsig()), reason


def test_a_direct_pipe_cut_midway_ends_and_the_receive_keeps_nothing(adapter, pools):
    if not adapter.direct_pipe():
        # measured: zfs-fuse's daemon holds the pipe and writes the whole stream for a
        # killed `zfs send`, so nothing can cut it but a relay that stops taking it
        pytest.skip("the direct pipe is not used on this ZFS (%s)"
                    % adapter.capabilities().implementation)
    fs, target, send, recv = _transfer(adapter, pools, "direct-cut", 8 << 20, "c",
                                       direct=True)
    assert zrepl.watch_pipe(send, [lambda: True], [], recv, poll=0)
    recv_end, send_end = recv.finish(timeout=30), send.finish(timeout=30)
    assert send_end.aborted and recv_end.error is not None       # a short stream
    assert target not in state(pools.dst)


def test_a_direct_pipe_whose_receive_fails_ends_the_send_too(adapter, pools):
    # this process holds no end of the pipe: a receive that gives up is the send's EPIPE,
    # not a send blocked for ever on a full pipe (finish's timeout would cancel it)
    fs, target, send, recv = _transfer(adapter, pools, "direct-refused", 3 << 20, "r")
    assert zrepl.relay(send, recv)              # the first one fills the target
    assert (recv.finish(timeout=30).exit_status, send.finish(timeout=30).exit_status) == (0, 0)
    step = zrepl.Step("full", None, _version(adapter, fs + "@r"), "guarantee_nothing")
    send = adapter.send(fs, step)
    recv = adapter.receive(target, feed=send)   # it exists: refused
    assert zrepl.watch_pipe(send, [send.stopped], [], recv, poll=0.05)
    recv_end, send_end = recv.finish(timeout=30), send.finish(timeout=30)
    assert recv_end.error is not None and recv_end.error.kind == "receiver-exists", recv_end
    assert send_end.exit_status != 0 and not send_end.aborted, send_end


_ORPHAN = """
import subprocess, sys, time
sys.path.insert(0, %r)
import zrepl
z = zrepl.ZFS()
fs, guarded = sys.argv[1], sys.argv[2] == "guarded"
send = z.start(["zfs", "send", fs + "@o"], fs=fs, stdout=True,
               guard=z._send_guard() if guarded else None)
# a reader that never reads, as a receive would hold the pipe: the send blocks on it
reader = subprocess.Popen(["sleep", "120"], stdin=send.proc.stdout)
send.proc.stdout.close()
print(send.pid, reader.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("guarded", [True, False])
def test_a_direct_pipes_send_dies_with_zrepl(adapter, pools, guarded):
    # a direct pipe has no relay whose death would end the stream: the send itself must
    # die with zrepl.py, or a kill -9 leaves `zfs send | zfs receive` running as orphans
    # (the unguarded send is the control: it does outlive its parent)
    if not adapter.direct_pipe():
        pytest.skip("the direct pipe is not used on this ZFS (%s)"
                    % adapter.capabilities().implementation)
    from conftest import write_data
    fs = pools.src + "/orphan-%s" % guarded
    make_tree(fs, [])
    write_data(fs, 8 << 20)
    snap(fs, "o")
    child = subprocess.Popen([sys.executable, "-c", _ORPHAN % str(REPO), fs,
                              "guarded" if guarded else "bare"], stdout=subprocess.PIPE)
    send_pid, reader_pid = map(int, child.stdout.readline().split())
    try:
        time.sleep(0.5)
        assert pid_alive(send_pid)                  # blocked on the full pipe
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        while pid_alive(send_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_alive(send_pid) != guarded
    finally:
        for pid in (send_pid, reader_pid):
            try:
                os.kill(pid, 9)
            except OSError:
                pass


@pytest.mark.parametrize("execs", [True, False])
def test_only_a_send_that_is_zfs_itself_counts_its_stream(pools, tmp_path, execs):
    # a `zfs` wrapper first in PATH that execs zfs becomes it; one that forks it stays a
    # shell whose own write count is 0 while the stream flows: that one keeps the relay
    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/PID/exe and /proc/PID/io are Linux's")
    real = shutil.which("zfs", path=zrepl.ZFS().env["PATH"])
    wrapper = tmp_path / "zfs"
    wrapper.write_text('#!/bin/sh\n%s%s "$@"\n' % ("exec " if execs else "", real))
    wrapper.chmod(0o755)
    wrapped = zrepl.ZFS()
    wrapped.env["PATH"] = "%s:%s" % (tmp_path, wrapped.env["PATH"])
    fs = pools.src + "/wrapped-%s" % execs
    make_tree(fs, [])
    snap(fs, "w")
    step = zrepl.Step("full", None, _version(wrapped, fs + "@w"), "guarantee_nothing")
    send = wrapped.send(fs, step)
    try:
        assert send.counts_its_stream(patience=2.0) == execs
    finally:
        send.cancel()
        send.finish(timeout=30)


def test_a_relay_cancelled_midway_ends_and_the_receive_keeps_nothing(adapter, pools):
    fs, target, send, recv = _transfer(adapter, pools, "cut", 3 << 20, "c")
    flag = []
    stream = zrepl.MeteredStream(send, on_bytes=flag.append, cancelled=lambda: bool(flag))
    assert zrepl.relay(stream, recv)            # a stopped stream ends the relay
    assert len(flag) == 1                       # at the first move's count, no second
    send.cancel()
    recv.close_stdin()
    recv_end, _ = recv.finish(timeout=30), send.finish(timeout=30)
    assert recv_end.error is not None           # a short stream: nothing received
    assert target not in state(pools.dst)
