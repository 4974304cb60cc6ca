"""Resumable replication (SPEC §8.7) end to end against real ZFS with `resume`: a transfer
cut by `--max-runtime`, by a killed `zfs send` or by a killed `zfs receive` leaves a resume
token; the next attempt or run reads it from the receiver's listing, checks it, sends
`zfs send -t` and moves only what was missing: bytes of the second transfer < what was
left + 5 %. A token that does not fit the job is cleared (`zfs receive -A`) and reported.
Pools without resume (zfs-fuse) skip with that reason; test_replication_interrupt.py
covers them.
"""
import json
import os
import signal
import sys
import time

import pytest

from conftest import REPO, make_tree, snap, wipe, write_data, zfs
from test_replication import Rig, assert_exit, assert_guids_equal, fs_reports, push_report
from test_replication import pytest_generate_tests, transport  # noqa: F401  (every transport)
from test_replication_interrupt import _children, start_once

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402

pytestmark = [pytest.mark.zfs, pytest.mark.poolsize("1G")]
MiB = 1 << 20
DATA = 96 * MiB
SLOW = ["send: {bandwidth_limit: {max: 12 MiB}}"]      # 96 MiB: 8 s


@pytest.fixture
def resumable(pools):
    caps = zrepl.ZFS().capabilities()
    if not all(caps.pools.get(p, {}).get("resume") for p in (pools.src, pools.dst)):
        pytest.skip("these pools have no resumable receive (%s %s)"
                    % (caps.implementation, caps.version))
    before = {p: set(zfs("list", "-H", "-o", "name", "-d", "1", p).stdout.split())
              for p in (pools.src, pools.dst)}
    yield pools
    # each test writes 96 MiB or more on each side: the module's 1 GiB pools would fill
    for p, had in before.items():
        for name in set(zfs("list", "-H", "-o", "name", "-d", "1", p).stdout.split()) - had:
            wipe(name)


def stream_size(snapshot, frm=None):
    argv = ["send", "-n", "-v", "-P"] + (["-i", frm] if frm else []) + [snapshot]
    size = zrepl.parse_estimate(zfs(*argv).stdout + zfs(*argv).stderr)
    assert size, "no size estimate for %s" % snapshot
    return size


def token(target):
    value = zfs("get", "-H", "-o", "value", "receive_resume_token", target).stdout.strip()
    return None if value in ("", "-") else value


def _zfs_child(proc, verb, name):
    """The `zfs <verb> ... <name>` child of proc that moves the stream: not a capability
    probe, not the `send -n` size estimate that runs just before it (catching that one
    made the kill miss); over ssh the receiving side's runs under sshd, so any such
    process on this host."""
    pids = _children(proc.pid) if Rig.transport == "local" else \
        [int(p) for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0].endswith(b"zfs") and argv[1] == verb.encode() and \
                b"-n" not in argv and any(a.startswith(name.encode()) for a in argv[2:]):
            return pid
    return None


def _kill_child_midway(proc, verb, name):
    """SIGKILL the `zfs <verb>` child of a running `once` after some bytes have landed."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "once ended before the kill: " + proc.communicate()[1]
        assert time.monotonic() < deadline, "no zfs %s to kill" % verb
        pid = _zfs_child(proc, verb, name)
        if pid is not None:
            break
        time.sleep(0.02)
    time.sleep(2.5)                       # 12 MiB/s: about a third of the stream
    os.kill(pid, signal.SIGKILL)


def _steps(doc, fs):
    return fs_reports(push_report(doc))[fs]


@pytest.mark.parametrize("how", ["max-runtime", "kill-send", "kill-receive"])
@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_interrupted_transfer_resumes(resumable, tmp_path, how, kind):
    rig = Rig(resumable, tmp_path, "res-%s-%s" % (kind, how))
    make_tree(rig.src, ["big"])
    big, target = rig.fs("big"), rig.target(rig.fs("big"))
    rig.configure([big], push_extra=SLOW)
    frm = None
    if kind == "incremental":
        snap(big, "s0")
        rig.ok()
        frm = big + "@s0"
    write_data(big, DATA)
    snap(big, "s1")
    whole = stream_size(big + "@s1", frm)

    if how == "max-runtime":
        # the cut must land mid-stream: start-up (connection, probes on both sides) is
        # timed with a dry run first, since it ranges from 1 s to over 5 s (ssh in the VM)
        t0 = time.monotonic()
        cp, doc = rig.once("--dry-run")
        assert_exit(cp, 0, doc)
        budget = int(time.monotonic() - t0 + 3.5)       # then ~3 s at 12 MiB/s of 8 s
        cp, doc = rig.once("--max-runtime", "%ds" % budget)
        assert_exit(cp, 4, doc)
        first = _steps(doc, big)["bytes_replicated"]
        assert token(target), "the cut transfer left no resume token"
        cp, doc = rig.once()
        assert_exit(cp, 0, doc)
        f = _steps(doc, big)
        second = f["bytes_replicated"]
    else:
        proc = start_once(rig)
        try:
            if how == "kill-send":
                _kill_child_midway(proc, "send", big + "@s1")
            else:
                _kill_child_midway(proc, "receive", target)
        except BaseException:
            proc.kill()                   # a run left going would keep the pools busy
            proc.communicate()
            raise
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        doc = json.loads(out)
        f = _steps(doc, big)
        assert push_report(doc)["replication"]["attempts"] == 2, err
        second = f["steps"][-1]["bytes_replicated"]
        first = f["bytes_replicated"] - second
    steps = f["steps"]
    assert steps[0]["kind"] == "resume" and steps[0]["resumed"] is True, steps
    assert [s["state"] for s in steps] == ["done"] * len(steps)
    assert 0 < first < whole, (first, whole)
    remaining = whole - first
    print("resume %s/%s: whole %d, first %d, second %d (remaining %d)"
          % (kind, how, whole, first, second, remaining))
    assert second < remaining + 0.05 * whole, (first, second, whole)
    assert token(target) is None
    assert_guids_equal(rig, big)


def test_a_token_that_does_not_fit_is_cleared_and_reported(resumable, tmp_path):
    """A partial receive whose snapshot is gone from the sender: the token cannot be
    resumed, so it is aborted with `zfs receive -A` (logged with the reason) and the
    filesystem goes on from its last snapshot; nothing but the partial state goes."""
    rig = Rig(resumable, tmp_path, "res-foreign")
    make_tree(rig.src, ["f"])
    fs, target = rig.fs("f"), rig.target(rig.fs("f"))
    rig.configure([fs])
    snap(fs, "s0")
    rig.ok()
    write_data(fs, 8 * MiB)
    snap(fs, "s1")
    # a foreign partial receive: an incremental stream cut after 1 MiB, received with -s
    stream = zfs("send", "-i", fs + "@s0", fs + "@s1", text=False).stdout
    cp = zfs("receive", "-s", "-u", target, input=stream[:1 * MiB], check=False)
    assert cp.returncode != 0 and token(target)
    # the token's snapshot vanishes from the sender: the token no longer fits
    zfs("destroy", fs + "@s1")
    snap(fs, "s2")
    cp, doc = rig.once()
    assert_exit(cp, 0, doc)
    assert "discarding the partial receive" in cp.stderr, cp.stderr
    assert token(target) is None
    assert [s["to"] for s in _steps(doc, fs)["steps"]] == ["@s2"]
    assert_guids_equal(rig, fs)
