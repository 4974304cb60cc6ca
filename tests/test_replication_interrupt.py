"""Interrupted transfers against real ZFS (1 GiB pools): SIGKILL of `once` mid-transfer and
`--max-runtime` with a bandwidth limit. SPEC §1.3, §1.5.2 (--max-runtime), §8.5 (the
`.sends` record of `zfs send -I` batches and the cleanup of leaked `.send-<pid>-0` holds),
§8.6, §8.9 (cancelling), §9.7 (bandwidth limit), §13 items 25 and 26.

zfs-fuse keeps a transfer going when its `zfs` client dies; only cutting the stream stops
it, and a dying `zfs send -I` leaks `.send-<pid>-0` holds that `zfs holds` cannot show
(zfs-fuse.md §3.3-§3.4). So after every interruption the tests check that each sender
snapshot's `userrefs` equals the number of zrepl tags recorded on it.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ZREPL_PY, make_tree, pid_alive, snap, state, write_data, zfs
from test_replication import (CURSOR_TAG, LAST_RECEIVED_TAG, STEP_TAG, assert_exit,
                              assert_guids_equal, assert_only_known_holds, cursor_holds,
                              cursor_line, fs_reports, holds_view, pool_caps, push_report,
                              Rig, snap_order, true_holds)
from test_replication import pytest_generate_tests, transport  # noqa: F401  (every transport)

pytestmark = pytest.mark.poolsize("1G")
MiB = 1 << 20


def start_once(rig, *args):
    return subprocess.Popen([sys.executable, str(ZREPL_PY), "--config", str(rig.cfg), "once",
                             "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def kill_when(proc, ready, timeout=60):
    """SIGKILL `proc` as soon as ready() is true; wait until its zfs children are gone too
    (they are not killed with it: the test wants what a real SIGKILL leaves behind).
    timeout only bounds a failure: over ssh in the OpenZFS lane's emulated VM the target
    appeared 25 s after the start (both sides' Python, probes and listings)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError("once ended (exit %d) before the kill:\n%s" % (proc.returncode,
                                                                                err))
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.005)
    kids = _children(proc.pid)
    assert proc.poll() is None, "once ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 60
    while any(pid_alive(k) for k in kids):
        assert time.monotonic() < deadline, "zfs children of the killed once still run"
        time.sleep(0.05)
    return kids


def exists(name):
    return zfs("list", "-H", "-o", "name", name, check=False).returncode == 0


# --- SPEC §13 item 25: SIGKILL mid-transfer, then a rerun -------------------------------------

def test_sigkill_mid_transfer_then_rerun_leaves_only_cursor_and_last_received(pools, tmp_path):
    rig = Rig(pools, tmp_path, "kill")
    make_tree(rig.src, ["big"])
    big = rig.fs("big")
    target = rig.target(big)
    rig.configure([big])
    write_data(big, 150 * MiB)
    snap(big, "s1")

    # 1. the full send of 150 MiB: killed once the receiver dataset shows up
    proc = start_once(rig)
    kill_when(proc, lambda: exists(target))
    assert holds_view(big)[big + "@s1"][0] == 1                   # what the rerun must clean:
    assert true_holds(big + "@s1") == {big + "@s1": [STEP_TAG]}   # the step hold
    resumable = pool_caps(pools.dst)["resume"]
    if resumable:
        # `receive -s` kept what arrived: the rerun resumes it (test_resume.py measures it)
        assert exists(target) and zfs("get", "-H", "-o", "value", "receive_resume_token",
                                      target).stdout.strip() not in ("", "-")
    else:
        # the kill cut the stream: zfs-fuse leaves no half-received dataset (zfs-fuse.md §3.3)
        assert not exists(target)
    cp, doc = rig.once()
    assert_exit(cp, 0, doc)
    [f] = push_report(doc)["replication"]["filesystems"]
    assert [(s["kind"], s["to"], s["state"]) for s in f["steps"]] == \
        [("resume" if resumable else "full", "@s1", "done")]
    assert_guids_equal(rig, big)
    assert holds_view(big) == {big + "@s1": cursor_holds(big + "@s1")}
    assert holds_view(target) == {target + "@s1": (1, (LAST_RECEIVED_TAG,))}
    assert_only_known_holds(rig.src)
    assert_only_known_holds(rig.sink)

    # 2. an incremental `-I` batch of 48 MiB: killed while it streams
    write_data(big, 48 * MiB)
    snap(big, "s2")
    snap(big, "s3")
    sends = rig.rundir / "push.sends"
    proc = start_once(rig)
    kill_when(proc, lambda: sends.exists() and sends.read_text().strip() != "")
    assert '"pid"' in sends.read_text()          # the killed batch is on record
    held = true_holds(big + "@s1", big + "@s3")
    # `to` has the step hold; `from` has it too, unless the job's cursor hold protects it
    # already (a pool without bookmarks): that one lasts until the cursor moves past it
    assert STEP_TAG in held[big + "@s3"], held
    assert STEP_TAG in held[big + "@s1"] or CURSOR_TAG in held[big + "@s1"], held
    cp, doc = rig.once()
    assert_exit(cp, 0, doc)
    [f] = push_report(doc)["replication"]["filesystems"]
    steps = [(s["kind"], s["from"], s["to"], s["state"]) for s in f["steps"]]
    if resumable and steps[0][0] == "resume":
        # the batch died inside one of its incrementals: that one resumes, the rest follow
        assert steps[-1][2:] == ("@s3", "done") and {s[3] for s in steps} == {"done"}, steps
    else:
        assert steps == [("incremental_batch", "@s1", "@s3", "done")]
    assert_guids_equal(rig, big)
    assert sends.read_text().strip() == ""
    assert rig.abstractions() == [
        cursor_line(big + "@s3"),
        'last-received-hold "%s" on %s@s3' % (LAST_RECEIVED_TAG, target)]
    # no leaked `.send-<pid>-0` and no stray step hold on any sender snapshot
    assert holds_view(big) == {big + "@s1": (0, ()), big + "@s2": (0, ()),
                               big + "@s3": cursor_holds(big + "@s3")}
    assert_only_known_holds(rig.sink)

    # 3. the next prune destroys what the rules allow: nothing blocks it
    snap(big, "s4")
    rig.configure([big], keep_sender="[{type: not_replicated}, {type: last_n, count: 1}]",
                  keep_receiver="[{type: last_n, count: 1}]")
    cp, doc = rig.once()
    job = push_report(doc)
    for side in ("sender", "receiver"):
        [p] = job["pruning"][side]["filesystems"]
        assert (sorted(p["destroyed"]), p["errors"]) == (["s1", "s2", "s3"], []), p
    assert snap_order(big) == ["@s4"] and snap_order(target) == ["@s4"]
    assert_guids_equal(rig, big)
    assert_exit(cp, 0, doc)


# --- SPEC §1.5.2 --max-runtime with §9.7 bandwidth_limit; §13 item 26 ------------------------

def test_max_runtime_cuts_a_throttled_transfer_cleanly(pools, tmp_path):
    rig = Rig(pools, tmp_path, "deadline")
    make_tree(rig.src, ["slow"])
    slow = rig.fs("slow")
    target = rig.target(slow)
    write_data(slow, 40 * MiB)
    snap(slow, "s1")
    rig.configure([slow], push_extra=["send: {bandwidth_limit: {max: 1 MiB}}"])
    t0 = time.monotonic()
    # 5 s: start-up (probes, listings) takes 2-3 s under the OpenZFS lane's emulation;
    # over ssh the far side starts too (ssh, Python, its probes): up to 6 s more there
    limit = 5 if Rig.transport == "local" else 12
    cp, doc = rig.once("--max-runtime", "%ds" % limit)
    took = time.monotonic() - t0
    assert took < limit + 12, took
    job = push_report(doc)
    assert (job["state"], job["exit_code"]) == ("timed_out", 4)
    assert job["replication"]["state"] == "cancelled"
    f = fs_reports(job)[slow]
    assert f["state"] == "cancelled" and [s["state"] for s in f["steps"]] == ["cancelled"]
    assert 0 < f["bytes_replicated"] < 40 * MiB
    # no pruning after the deadline (SPEC §1.5.2)
    assert job["pruning"]["sender"] is None and job["pruning"]["receiver"] is None
    resumable = pool_caps(pools.dst)["resume"]
    if resumable:
        # `receive -s` kept what arrived, and the step hold keeps @s1 for the resume
        assert exists(target)
        assert holds_view(slow) == {slow + "@s1": (1, (STEP_TAG,))}
    else:
        # nothing of the cut transfer is left: no receiver dataset, no hold anywhere
        assert not exists(target)
        assert all("%recv" not in n for n in state(pools.dst))
        assert holds_view(slow) == {slow + "@s1": (0, ())}
    assert_only_known_holds(rig.src)
    saved = json.loads((rig.rundir / "last" / "push.json").read_text())   # still written
    assert (saved["state"], saved["exit_code"]) == ("timed_out", 4)
    assert_exit(cp, 4, doc)

    # a later run without the limit completes
    rig.configure([slow])
    job = rig.ok()
    assert fs_reports(job)[slow]["state"] == "done"
    assert [s["kind"] for s in fs_reports(job)[slow]["steps"]] == \
        ["resume" if resumable else "full"]
    assert_guids_equal(rig, slow)
    assert holds_view(slow) == {slow + "@s1": cursor_holds(slow + "@s1")}


def test_watchdog_cancels_a_step_that_moves_no_bytes(pools, tmp_path):
    # SPEC §8.9: a step that moves no stream bytes for replication.timeout is cancelled as
    # kind `timeout` (temporary), retried, and the filesystem fails when retries run out.
    # A 1-byte-per-second bandwidth limit makes the relay stall on its first chunk.
    rig = Rig(pools, tmp_path, "watchdog")
    fs = rig.fs("slow")
    make_tree(fs, [])
    write_data(fs, 2 << 20)
    snap(fs, "s1")
    rig.configure([fs], push_extra=["replication: {timeout: 2s}",
                                    "send: {bandwidth_limit: {max: 1 B}}"])
    t0 = time.monotonic()
    cp, doc = rig.once(env={"ZREPL_REPLICATION_MAX_ATTEMPTS": "1"}, timeout=120)
    elapsed = time.monotonic() - t0
    assert cp.returncode == 1, cp.stderr
    entry = {f["fs"]: f for f in push_report(doc)["replication"]["filesystems"]}[fs]
    assert entry["state"] == "error"
    assert entry["error"]["kind"] == "timeout" and entry["error"]["temporary"] is True
    assert elapsed < 60
    if pool_caps(pools.dst)["resume"]:
        # what arrived is kept (`receive -s`): the step is not re-sent in place but left
        # to the next attempt, which resumes it; its step hold keeps @s1 for that
        assert entry["error_count"] == 1
        assert state(fs)[fs + "@s1"]["userrefs"] == 1
    else:
        assert entry["error_count"] == 3            # the first try and two retries
        # nothing half-received, no step hold left
        assert rig.target(fs) not in state(pools.dst)
        assert state(fs)[fs + "@s1"]["userrefs"] == 0
    # no orphaned zfs process (the once process has exited, so its reaped children cannot
    # linger as zombies either)
    ps = subprocess.run(["ps", "-eo", "stat=,args="], stdout=subprocess.PIPE,
                        universal_newlines=True).stdout
    assert not [ln for ln in ps.splitlines()
                if ("zfs send" in ln and fs in ln) or ("zfs receive" in ln and rig.sink in ln)]
