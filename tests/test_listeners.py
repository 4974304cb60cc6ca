"""tcp and tls between two "hosts" on 127.0.0.1 (section 9, SPEC §9.6, §10.2): a daemon
serves a sink and a source; push and pull jobs of another configuration (its own rundir)
connect to it with `once`. Clients are mapped by address (tcp) or certificate CN (tls,
certificates made by the tests with openssl); everyone else is turned away clearly."""
import json

import pytest

from conftest import assert_no_traceback, free_port, make_tree, run_cli, snap, write_data
from test_daemon import DaemonProc
from test_replication import KEEP_ALL, assert_guids_equal, fs_reports, push_report, q

pytestmark = pytest.mark.zfs


class TwoHosts:
    """The serving host's configuration (its daemon) and the connecting host's."""

    count = 0

    def __init__(self, pools, tmp_path):
        TwoHosts.count += 1
        self.src = "%s/ln%d" % (pools.src, TwoHosts.count)
        self.sink = "%s/ln%d" % (pools.dst, TwoHosts.count)
        make_tree(self.src, ["a"])
        make_tree(self.sink, [])
        self.fs = self.src + "/a"
        self.tmp = tmp_path
        self.server_cfg = tmp_path / "server.yml"
        self.server_run = tmp_path / "server-run"
        self.daemon = None

    def serve(self, *jobs):
        text = "global: {rundir: %s}\njobs:\n" % q(self.server_run) + "".join(jobs)
        self.server_cfg.write_text(text)
        self.daemon = DaemonProc(self.server_cfg, self.server_run)

    def client(self, name, job):
        cfg = self.tmp / (name + ".yml")
        cfg.write_text("global: {rundir: %s}\njobs:\n%s" % (q(self.tmp / (name + "-run")), job))
        return cfg

    def once(self, cfg):
        cp = run_cli("once", "--json", config=cfg, timeout=120)
        assert_no_traceback(cp)
        return cp, json.loads(cp.stdout)

    def stop(self):
        if self.daemon is not None:
            rc, took, err = self.daemon.stop()
            assert rc == 0 and "Traceback" not in err, err
            self.daemon = None
            return err
        return ""


@pytest.fixture
def hosts(pools, tmp_path):
    h = TwoHosts(pools, tmp_path)
    yield h
    h.stop()


def sink_job(name, root, serve):
    return ("  - name: %s\n    type: sink\n    root_fs: %s\n    serve: %s\n"
            % (name, q(root), serve))


def push_job(fs, connect):
    return ("  - name: push\n    type: push\n    connect: %s\n    filesystems: {%s: true}\n"
            "    snapshotting: {type: manual}\n"
            "    pruning: {keep_sender: %s, keep_receiver: %s}\n"
            % (connect, q(fs), KEEP_ALL, KEEP_ALL))


def tls(certs, name, server=False, **over):
    cert, key = certs.path(name)
    fields = {"ca": certs.ca, "cert": cert, "key": key}
    fields.update(over)
    return ", ".join("%s: %s" % (k, q(v) if isinstance(v, str) else v)
                     for k, v in fields.items())


def test_tcp_push_to_a_daemon_sink_maps_clients_by_address(hosts):
    write_data(hosts.fs, 2 << 20)
    snap(hosts.fs, "s1")
    ok_port, other_port = free_port(), free_port()
    hosts.serve(
        sink_job("sink", hosts.sink, "{type: tcp, listen: \"127.0.0.1:%d\", clients: "
                                     "{\"127.0.0.1\": host1}}" % ok_port),
        sink_job("other", hosts.sink + "x", "{type: tcp, listen: \"127.0.0.1:%d\", clients: "
                                            "{\"10.0.0.0/8\": \"net-*\"}}" % other_port))
    cfg = hosts.client("push", push_job(hosts.fs, "{type: tcp, address: \"127.0.0.1:%d\"}"
                                        % ok_port))
    cp, doc = hosts.once(cfg)
    assert cp.returncode == 0, cp.stderr
    target = "%s/host1/%s" % (hosts.sink, hosts.fs)
    assert fs_reports(push_report(doc))[hosts.fs]["state"] == "done"
    snap(hosts.fs, "s2")
    cp, doc = hosts.once(cfg)
    assert cp.returncode == 0, cp.stderr
    assert fs_reports(push_report(doc))[hosts.fs]["steps_done"] == 1
    rig = type("R", (), {"target": lambda self, fs: target})()
    assert_guids_equal(rig, hosts.fs)

    stranger = hosts.client("stranger", push_job(
        hosts.fs, "{type: tcp, address: \"127.0.0.1:%d\"}" % other_port))
    cp, doc = hosts.once(stranger)
    assert cp.returncode == 1, cp.stderr
    assert "closed the connection before the protocol began" in cp.stderr, cp.stderr
    err = hosts.stop()
    assert "client address 127.0.0.1 is not in serve.clients" in err, err


def test_tls_push_and_pull_authenticate_both_sides_by_cn(hosts, certs):
    write_data(hosts.fs, 1 << 20)
    snap(hosts.fs, "s1")
    sink_port, source_port = free_port(), free_port()
    server_cert, server_key = certs.path("backup")
    served = "ca: %s, cert: %s, key: %s" % (q(certs.ca), q(server_cert), q(server_key))
    hosts.serve(
        sink_job("sink", hosts.sink, "{type: tls, listen: \"127.0.0.1:%d\", %s, "
                                     "client_cns: [host1]}" % (sink_port, served)),
        "  - name: source\n    type: source\n    filesystems: {%s: true}\n"
        "    snapshotting: {type: manual}\n"
        "    serve: {type: tls, listen: \"127.0.0.1:%d\", %s, client_cns: [src1]}\n"
        % (q(hosts.fs), source_port, served))

    def connect(port, who, **over):
        return "{type: tls, address: \"127.0.0.1:%d\", %s}" % (
            port, tls(certs, who, **dict({"server_cn": "backup"}, **over)))

    cp, doc = hosts.once(hosts.client("push", push_job(hosts.fs, connect(sink_port, "host1"))))
    assert cp.returncode == 0, cp.stderr
    assert fs_reports(push_report(doc))[hosts.fs]["state"] == "done"

    pulled = hosts.sink + "/pulled"
    make_tree(pulled, [])
    pull = hosts.client("pull", "  - name: pull\n    type: pull\n    connect: %s\n"
                                "    root_fs: %s\n    interval: manual\n"
                                "    pruning: {keep_sender: %s, keep_receiver: %s}\n"
                        % (connect(source_port, "src1"), q(pulled), KEEP_ALL, KEEP_ALL))
    cp, doc = hosts.once(pull)
    assert cp.returncode == 0, cp.stderr
    assert fs_reports(doc["jobs"][0])[hosts.fs]["state"] == "done"

    for name, conn, want in (
            ("wrongcn", connect(sink_port, "host1", server_cn="elsewhere"),
             "the server's certificate names CN 'backup', not server_cn 'elsewhere'"),
            ("outsider", connect(sink_port, "outsider"), "before the protocol began"),
            ("rogue", connect(sink_port, "rogue-host1"), "")):
        cp, doc = hosts.once(hosts.client(name, push_job(hosts.fs, conn)))
        assert cp.returncode == 1, (name, cp.stderr)
        assert want in cp.stderr, (name, cp.stderr)
    err = hosts.stop()
    assert "presents CN 'outsider', which is not in serve.client_cns" in err, err
