"""Section 13, Prometheus metrics (SPEC §11.2): the text exposition rendered from job
reports and parsed back; `once` writing a prometheus_textfile on real ZFS."""
import re
import sys

import pytest

from conftest import REPO, make_tree, run_cli, snap

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.e+]+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse(text):
    """Text exposition -> ({(name, frozenset(labels)): value}, {name: type}); strict."""
    samples, types, helped = {}, {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter") and name not in types
            types[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, "not a sample line: %r" % line
        name, labels, value = m.groups()
        pairs = LABEL.findall(labels or "")
        assert ",".join('%s="%s"' % p for p in pairs) == (labels or ""), line
        assert name in types and name in helped, line
        key = (name, frozenset((k, v.replace('\\"', '"').replace("\\\\", "\\")) for k, v in pairs))
        assert key not in samples, "duplicate sample %r" % line
        samples[key] = float(value)
    return samples, types


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


CONFIG = """\
jobs:
  - name: push
    type: push
    connect: {type: local, listener_name: l, client_identity: me}
    filesystems: {"p/a<": true}
    snapshotting: {type: manual}
    pruning: {keep_sender: [{type: last_n, count: 1}], keep_receiver: [{type: last_n, count: 1}]}
  - name: sink
    type: sink
    root_fs: q/sink
    serve: {type: local, listener_name: l}
  - name: never
    type: snap
    filesystems: {"p/b<": true}
    snapshotting: {type: manual}
    pruning: {keep: [{type: last_n, count: 1}]}
"""


def config(tmp_path):
    path = tmp_path / "zrepl.yml"
    path.write_text(CONFIG)
    return zrepl.load_config(str(path), skip_cert_check=True)


def report(fs_states=("done", "error"), started="2026-12-03T10:00:00Z"):
    return zrepl.JobReport.from_json(report_doc(fs_states, started))


def report_doc(fs_states=("done", "error"), started="2026-12-03T10:00:00Z"):
    state = "failed" if "error" in fs_states else "done"
    rows = [{"fs": "p/a%s" % ("" if i == 0 else "/c%d" % i), "state": st, "lag_s": 30 * (i + 1),
             "bytes_replicated": 1000 * i} for i, st in enumerate(fs_states)]
    return {"job": "push", "type": "push", "state": state, "exit_code": 0 if state == "done" else 1,
            "started_at": started, "finished_at": "2026-12-03T10:00:12Z",
            "snapshotting": {"filesystems": [{"fs": "p/a", "state": "taken"},
                                             {"fs": "p/a/c1", "state": "not_due"}]},
            "replication": {"state": "failed" if "error" in fs_states else "done",
                            "filesystems": rows},
            "pruning": {"sender": {"side": "sender", "state": "done", "filesystems": [
                {"fs": "p/a", "state": "done", "destroyed": ["x", "y"]},
                {"fs": "p/a/c1", "state": "error", "destroyed": []}]},
                "receiver": None, "local": None}}


def test_a_report_renders_to_a_valid_exposition(tmp_path):
    cfg = config(tmp_path)
    rep = report()
    state = zrepl.update_metrics_state({}, rep)
    samples, types = parse(zrepl.render_metrics(cfg, {"push": rep}, state))
    job = {"zrepl_job": "push"}
    assert value(samples, "zrepl_replication_filesystem_errors", **job) == 1
    assert value(samples, "zrepl_job_last_exit_code", **job) == 1
    assert value(samples, "zrepl_job_last_run_duration_seconds", **job) == 12
    assert value(samples, "zrepl_replication_lag_seconds", filesystem="p/a/c1", **job) == 60
    assert value(samples, "zrepl_replication_last_bytes", filesystem="p/a/c1", **job) == 1000
    assert value(samples, "zrepl_pruning_destroyed_last", prune_side="sender", **job) == 2
    assert value(samples, "zrepl_pruning_errors", prune_side="sender", **job) == 1
    t10 = zrepl._parse_time("2026-12-03T10:00:00Z")
    assert value(samples, "zrepl_snapshot_newest_timestamp_seconds", filesystem="p/a", **job) == t10
    assert value(samples, "zrepl_replication_last_success_timestamp_seconds", filesystem="p/a",
                 **job) == t10 + 12
    # the failed filesystem was never up to date, the job never fully successful
    assert ("zrepl_replication_last_success_timestamp_seconds",
            frozenset(dict(job, filesystem="p/a/c1").items())) not in samples
    assert not any(k[0] == "zrepl_replication_last_successful" for k in samples)
    assert not any(dict(k[1]).get("zrepl_job") == "never" for k in samples)   # never ran
    assert types["zrepl_build_info"] == "gauge"
    assert value(samples, "zrepl_build_info", version=zrepl.VERSION,
                 python=zrepl.platform.python_version()) == 1


def test_the_state_carries_successes_across_a_failed_invocation(tmp_path):
    cfg = config(tmp_path)
    good = report(fs_states=("done", "uptodate"))
    state = zrepl.update_metrics_state({}, good)
    later = report(fs_states=("error", "error"), started="2026-12-03T11:00:00Z")
    state = zrepl.update_metrics_state(state, later)
    samples, _ = parse(zrepl.render_metrics(cfg, {"push": later}, state))
    t = zrepl._parse_time("2026-12-03T10:00:12Z")
    assert value(samples, "zrepl_replication_last_successful", zrepl_job="push") == t
    assert value(samples, "zrepl_replication_filesystem_errors", zrepl_job="push") == 2
    assert value(samples, "zrepl_snapshot_newest_timestamp_seconds", zrepl_job="push",
                 filesystem="p/a") == zrepl._parse_time("2026-12-03T11:00:00Z")


def test_a_failed_listing_is_minus_one_and_odd_labels_are_escaped(tmp_path):
    cfg = config(tmp_path)
    doc = report_doc()
    doc["replication"] = {"state": "failed", "filesystems": []}
    doc["snapshotting"] = {"filesystems": [{"fs": 'p/a "q"\\z', "state": "taken"}]}
    rep = zrepl.JobReport.from_json(doc)
    samples, _ = parse(zrepl.render_metrics(cfg, {"push": rep},
                                            zrepl.update_metrics_state({}, rep)))
    assert value(samples, "zrepl_replication_filesystem_errors", zrepl_job="push") == -1
    assert value(samples, "zrepl_snapshot_newest_timestamp_seconds", zrepl_job="push",
                 filesystem='p/a "q"\\z') > 0


@pytest.mark.zfs
def test_once_writes_the_textfile_from_every_jobs_last_report(pools, tmp_path):
    src, dst = pools.src + "/prom", pools.dst + "/prom"
    make_tree(src, ["a"])
    make_tree(dst, [])
    snap(src + "/a", "s1")
    prom = tmp_path / "textfile" / "zrepl.prom"
    prom.parent.mkdir()
    cfg = tmp_path / "zrepl.yml"
    cfg.write_text(
        "global:\n  rundir: %s\n  monitoring: [{type: prometheus_textfile, path: %s}]\n"
        "jobs:\n  - name: sink\n    type: sink\n    root_fs: %s\n"
        "    serve: {type: local, listener_name: l}\n"
        "  - name: push\n    type: push\n    connect: {type: local, listener_name: l, "
        "client_identity: me}\n    filesystems: {\"%s/a\": true}\n    snapshotting: {type: manual}\n"
        "    pruning: {keep_sender: [{type: regex, regex: '.*'}], keep_receiver: "
        "[{type: regex, regex: '.*'}]}\n"
        "  - name: snapper\n    type: snap\n    filesystems: {\"%s<\": true}\n"
        "    snapshotting: {type: periodic, prefix: zrepl_, interval: 10m}\n"
        "    pruning: {keep: [{type: regex, regex: '.*'}]}\n"
        % (tmp_path / "run", prom, dst, src, src))
    cp = run_cli("once", "push", config=cfg)
    assert cp.returncode == 0, cp.stderr
    samples, _ = parse(prom.read_text())
    assert value(samples, "zrepl_replication_filesystem_errors", zrepl_job="push") == 0
    assert value(samples, "zrepl_replication_last_successful", zrepl_job="push") > 0
    assert value(samples, "zrepl_replication_lag_seconds", zrepl_job="push",
                 filesystem=src + "/a") >= 0
    cp = run_cli("once", "snapper", config=cfg)         # another job's run keeps push's lines
    assert cp.returncode == 0, cp.stderr
    samples, _ = parse(prom.read_text())
    assert value(samples, "zrepl_job_last_exit_code", zrepl_job="push") == 0
    assert value(samples, "zrepl_snapshot_newest_timestamp_seconds", zrepl_job="snapper",
                 filesystem=src + "/a") > 0
    assert [p.name for p in prom.parent.iterdir()] == ["zrepl.prom"]   # no temp file left
    prom.parent.chmod(0o500)                         # unwritable: a warning, not a failure
    try:
        if not __import__("os").access(str(prom.parent), __import__("os").W_OK):
            cp = run_cli("once", "snapper", config=cfg)
            assert cp.returncode == 0 and "prometheus_textfile" in cp.stderr, cp.stderr
    finally:
        prom.parent.chmod(0o755)


def test_the_daemon_serves_metrics_over_http_and_writes_the_textfile(pools, tmp_path):
    from urllib.request import urlopen
    from conftest import free_port
    from test_daemon import DaemonProc
    src, dst = pools.src + "/promd", pools.dst + "/promd"
    make_tree(src, ["a"])
    make_tree(dst, [])
    snap(src + "/a", "s1")
    port = free_port()
    prom = tmp_path / "zrepl.prom"
    cfg = tmp_path / "zrepl.yml"
    cfg.write_text(
        "global:\n  rundir: %s\n  monitoring: [{type: prometheus, listen: \"127.0.0.1:%d\"},"
        " {type: prometheus_textfile, path: %s}]\n"
        "jobs:\n  - name: sink\n    type: sink\n    root_fs: %s\n"
        "    serve: {type: local, listener_name: l}\n"
        "  - name: push\n    type: push\n    connect: {type: local, listener_name: l, "
        "client_identity: me}\n    filesystems: {\"%s/a\": true}\n    snapshotting: {type: manual}\n"
        "    pruning: {keep_sender: [{type: regex, regex: '.*'}], keep_receiver: "
        "[{type: regex, regex: '.*'}]}\n" % (tmp_path / "run", port, prom, dst, src))
    dp = DaemonProc(cfg, tmp_path / "run")
    try:
        samples, types = parse(urlopen("http://127.0.0.1:%d/metrics" % port, timeout=30)
                               .read().decode())
        assert value(samples, "zrepl_start_time", raw=zrepl.VERSION) > 0
        cp = run_cli("signal", "wakeup", "push", "--wait", config=cfg)
        assert cp.returncode == 0, cp.stderr
        samples, types = parse(urlopen("http://127.0.0.1:%d/metrics" % port, timeout=30)
                               .read().decode())
        assert types["zrepl_replication_bytes_replicated"] == "counter"
        assert value(samples, "zrepl_replication_bytes_replicated", zrepl_job="push",
                     filesystem=src + "/a") > 0
        assert value(samples, "zrepl_replication_filesystem_errors", zrepl_job="push") == 0
        assert value(samples, "zrepl_job_last_exit_code", zrepl_job="push") == 0
        written, _ = parse(prom.read_text())      # after the invocation, from the daemon
        assert value(written, "zrepl_job_last_exit_code", zrepl_job="push") == 0
    finally:
        rc, took, out = dp.stop()
    assert rc == 0 and "Traceback" not in out, out
