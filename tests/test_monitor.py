"""Section 13, `monitor` (Nagios/Icinga plugin conventions: exit 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN, one status line with perfdata). The evaluation is pure and tested
with plain data; the command runs against real ZFS at the end."""
import re
import time

import pytest

from conftest import REPO, make_tree, run_cli, snap

import sys
sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402

NOW = 1_800_000_000
L = zrepl.MonitorLimits
PERF = re.compile(r"^[a-z_]+=\d+s?;\d*;\d*;0;$")


def check(snapshots, limits=L(), report=None, prefix="zrepl_", lag=False):
    code, line = zrepl.evaluate_monitor("j", snapshots, report, NOW, limits, prefix, lag)
    text, _, perf = line.partition(" | ")
    assert text.startswith("ZREPL %s - job j: " % zrepl.NAGIOS_WORDS[code]), line
    assert "\n" not in line and all(PERF.match(p) for p in perf.split()), line
    return code, line


def snaps(*ages, prefix="zrepl_"):
    return [("%s%d" % (prefix, i), NOW - a) for i, a in enumerate(ages)]


def report(**last):
    """A job report whose replication rows have last_replicated created `age` s ago."""
    rows = [{"fs": fs, "last_replicated": None if age is None else
             {"name": "s", "guid": "1", "creation": zrepl.rfc3339(NOW - age)}}
            for fs, age in last.items()]
    return zrepl.JobReport.from_json({"job": "j", "type": "push",
                                      "replication": {"filesystems": rows}})


def test_no_thresholds_is_ok_with_perfdata():
    code, line = check({"p/a": snaps(60, 3600), "p/b": snaps(120)})
    assert code == 0
    assert "2 filesystems" in line and "at most 2m0s old" in line and "at least 1 snap" in line
    assert line.endswith("| snapshots_min=1;;;0; newest_age_max=120s;;;0;")


@pytest.mark.parametrize("age,want", [(100, 0), (700, 1), (2000, 2)])
def test_newest_snapshot_age(age, want):
    code, line = check({"p/a": snaps(age, age + 50)}, L(warn_age=600, crit_age=1800))
    assert code == want
    assert "newest_age_max=%ds;600;1800;0;" % age in line
    if want:
        assert "p/a newest snapshot" in line


@pytest.mark.parametrize("n,want", [(10, 0), (4, 1), (1, 2)])
def test_snapshot_count_is_a_lower_bound(n, want):
    code, line = check({"p/a": snaps(*range(60, 60 + n))}, L(warn_count=5, crit_count=2))
    assert code == want and "snapshots_min=%d;5;2;0;" % n in line


def test_only_snapshots_with_the_prefix_count():
    fs = {"p/a": snaps(10, 20, prefix="manual_") + snaps(5000)}
    code, line = check(fs, L(warn_age=600, warn_count=2))
    assert code == 1 and "p/a has 1 snapshots zrepl_*" in line
    assert "newest_age_max=5000s;" in line          # not the 10 s old manual_ one
    assert check(fs, L(warn_age=600), prefix="")[0] == 0        # every snapshot counts


def test_a_filesystem_without_any_snapshot_is_critical_when_age_is_checked():
    assert check({"p/a": []})[0] == 0
    code, line = check({"p/a": snaps(10), "p/b": []}, L(warn_age=600))
    assert code == 2 and "p/b has no snapshot zrepl_*" in line


def test_no_filesystems_is_unknown():
    assert check({})[0] == 3


def test_the_worst_state_wins_and_critical_is_named_first():
    fs = {"p/a": snaps(700), "p/b": snaps(4000), "p/c": snaps(10)}
    code, line = check(fs, L(warn_age=600, crit_age=1800))
    assert code == 2
    assert line.index("p/b newest") < line.index("p/a newest") and "p/c newest" not in line


def test_replication_lag_from_the_last_report():
    fs = {"p/a": snaps(10), "p/b": snaps(10)}
    lim = L(lag_warn=900, lag_crit=3600)
    assert check(fs, lim, report(**{"p/a": 60, "p/b": 120}), lag=True)[0] == 0
    code, line = check(fs, lim, report(**{"p/a": 60, "p/b": 1200}), lag=True)
    assert code == 1 and "p/b lags 20m0s" in line and "lag_max=1200s;900;3600;0;" in line
    code, line = check(fs, lim, report(**{"p/a": 60, "p/b": None}), lag=True)
    assert code == 2 and "p/b was never replicated" in line
    assert check(fs, lim, None, lag=True)[0] == 3               # the job never ran here
    assert check(fs, L(), None, lag=True)[0] == 0               # lag not asked for


def test_many_problems_are_summarised():
    fs = {"p/%02d" % i: snaps(5000) for i in range(9)}
    code, line = check(fs, L(crit_age=1800))
    assert code == 2 and line.count("newest snapshot 1h23m20s old") == 5 and "and 4 more" in line


# --- the command, against real ZFS ----------------------------------------------------------

@pytest.mark.zfs
def test_monitor_command_on_a_snap_job(pool, tmp_path):
    root = pool + "/mon"
    make_tree(root, ["a", "b"])
    cfg = tmp_path / "zrepl.yml"
    cfg.write_text("global: {rundir: %s}\njobs:\n  - name: snapjob\n    type: snap\n"
                   "    filesystems: {\"%s<\": true}\n"
                   "    snapshotting: {type: periodic, prefix: zrepl_, interval: 10m}\n"
                   "    pruning: {keep: [{type: regex, regex: \".*\"}]}\n" % (tmp_path / "run", root))
    cp = run_cli("monitor", "--job", "snapjob", "--warn-count", "1", config=cfg)
    assert cp.returncode == 1 and cp.stdout.startswith("ZREPL WARNING - job snapjob: 3 "), cp
    for fs in (root, root + "/a", root + "/b"):
        snap(fs, "zrepl_x")
        snap(fs, "other")
    cp = run_cli("monitor", "--job", "snapjob", "--warn-count", "1", "--warn-age", "1h",
                 config=cfg)
    assert cp.returncode == 0 and cp.stdout.startswith("ZREPL OK - job snapjob: 3 "), cp
    assert "snapshots_min=1;1;;0;" in cp.stdout and len(cp.stdout.splitlines()) == 1
    cp = run_cli("monitor", "--job", "snapjob", "--prefix", "", "--crit-count", "3",
                 config=cfg)
    assert cp.returncode == 2 and "has 2 snapshots" in cp.stdout, cp
    cp = run_cli("monitor", "--job", "nosuchjob", config=cfg)
    assert cp.returncode == 3 and cp.stdout.startswith("ZREPL UNKNOWN - "), cp
    assert "Traceback" not in cp.stderr
    cp = run_cli("monitor", "--job", "snapjob", "--warn-age", "soon", config=cfg)
    assert cp.returncode == 3 and cp.stdout.startswith("ZREPL UNKNOWN - usage: "), cp


@pytest.mark.zfs
def test_monitor_reads_the_lag_of_a_push_from_its_last_report(pools, tmp_path):
    from test_replication import Rig
    r = Rig(pools, tmp_path, "monlag")
    make_tree(r.src, ["a"])
    snap(r.fs("a"), "zrepl_1")
    r.configure([r.fs("a")])
    cp = run_cli("monitor", "--job", "push", "--lag-warn", "1h", config=r.cfg)
    assert cp.returncode == 3 and "no report of a run yet" in cp.stdout, cp  # never ran
    r.ok()
    cp = run_cli("monitor", "--job", "push", "--lag-warn", "1h", config=r.cfg)
    assert cp.returncode == 0 and "lag_max=" in cp.stdout, cp
    time.sleep(2)
    cp = run_cli("monitor", "--job", "push", "--lag-warn", "1s", config=r.cfg)
    assert cp.returncode == 1 and "%s lags" % r.fs("a") in cp.stdout, cp
    cp = run_cli("monitor", "--job", "sink", "--warn-count", "1", config=r.cfg)
    assert cp.returncode == 0 and "snapshots_min=1;1;;0;" in cp.stdout, cp   # what it received
