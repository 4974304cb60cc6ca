"""The passive side against bad input (section 9, SPEC §9.1-9.3, §9.8), on real pools:
`stdinserver` as sshd runs it (a process on a pipe pair), crafted requests that try to
leave the identity's subtree or the source's filter, and random and mutated frames. After
each batch both pools are exactly as before: the same names with the same GUIDs."""
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading

import pytest

from conftest import REPO, ZREPL_PY, free_port, make_tree, snap, state
from test_daemon import DaemonProc

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402

pytestmark = pytest.mark.zfs


class Bed:
    """A sink serving host1 and host2 (each with a replicated-looking subtree) and a
    source serving src1 over stdinserver, in one configuration."""

    count = 0

    def __init__(self, pools, tmp_path):
        Bed.count += 1                  # the module's pools are shared: a subtree per test
        self.src = "%s/conf%d" % (pools.src, Bed.count)
        self.sink = "%s/conf%d" % (pools.dst, Bed.count)
        make_tree(self.src, ["a", "a/kid", "b"])
        make_tree(self.sink, ["host1", "host1/data", "host2", "host2/secret", "outside"])
        for fs in (self.src + "/a", self.src + "/a/kid", self.src + "/b",
                   self.sink + "/host1/data", self.sink + "/host2/secret", self.sink + "/outside"):
            snap(fs, "s1")
            snap(fs, "s2")
        self.cfg = tmp_path / "zrepl.yml"
        self.cfg.write_text(
            "global: {rundir: %s}\n"
            "jobs:\n"
            "  - name: sink\n    type: sink\n    root_fs: %s\n"
            "    serve: {type: stdinserver, client_identities: [host1, host2]}\n"
            "  - name: source\n    type: source\n"
            "    serve: {type: stdinserver, client_identities: [src1]}\n"
            "    filesystems: {%s: true}\n"
            "    snapshotting: {type: manual}\n"
            % (json.dumps(str(tmp_path / "run")), json.dumps(self.sink),
               json.dumps(self.src + "/a<")))
        self.roots = (self.src, self.sink)
        self.tmp = tmp_path

    def trees(self):
        return {n: v["guid"] for root in self.roots for n, v in state(root).items()}

    def guid(self, full):
        return state(full)[full]["guid"]


class Session:
    """A client of one `stdinserver IDENTITY` process, speaking the wire with zrepl.py's
    own Connection: what sshd's forced command gives a remote peer."""

    def __init__(self, cfg, identity, mode="replicate"):
        self.proc = subprocess.Popen([sys.executable, str(ZREPL_PY), "--config", str(cfg),
                                      "stdinserver", identity], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.conn = zrepl.Connection(self.proc.stdout.fileno(), self.proc.stdin.fileno(),
                                     name="stdinserver", close_fds=False, idle_timeout=20)
        self.ids = 0
        self.hello = None
        self.mode = mode

    def start(self, hello=None):
        got = b""
        while zrepl.PREAMBLE not in got:
            got += self._raw()
        with self.conn._rlock:
            self.conn._rbuf[:0] = got[got.index(zrepl.PREAMBLE) + len(zrepl.PREAMBLE):]
        self.conn.send_json(zrepl.HELLO, hello or {"protocol": zrepl.PROTOCOL_VERSION,
                                                   "software": "test",
                                                   "job": "t", "mode": self.mode})
        self.hello = self.conn.receive_json(zrepl.HELLO)
        return self.hello

    def _raw(self):
        zrepl._select([self.conn.rfd], [], 5)
        with self.conn._rlock:
            data = os.read(self.conn.rfd, 4096)
        if not data:
            raise zrepl.TransportError("stdinserver ended before its preamble: %s"
                                       % self.proc.stderr.read().decode())
        return data

    def call(self, method, params):
        """-> ("result", doc) | ("error", Error document) | ("closed", None)."""
        self.ids += 1
        try:
            self.conn.send_json(zrepl.REQUEST, {"id": self.ids, "method": method,
                                                "params": params})
            doc = self.conn.receive_json(zrepl.RESPONSE, timeout=20)
        except zrepl.TransportError:
            return "closed", None
        if doc.get("error") is not None:
            return "error", doc["error"]
        return "result", doc["result"]

    def end(self):
        """Close our side -> (exit status, stderr)."""
        self.conn.close()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        err = self.proc.stderr.read().decode("utf-8", "replace")
        self.proc.stderr.close()
        return self.proc.wait(timeout=30), err


class Listening:
    """The Bed's sink and source served by a daemon over tcp (identities by source
    address: host1 127.0.0.1, host2 127.0.0.2, src1 127.0.0.3) or tls (by certificate
    CN), for the same crafted and fuzzed sessions as stdinserver gets."""

    ADDR = {"host1": "127.0.0.1", "host2": "127.0.0.2", "src1": "127.0.0.3"}

    def __init__(self, bed, via, certs=None):
        self.via, self.certs = via, certs
        self.ports = {"sink": free_port(), "source": free_port()}
        if via == "tcp":
            serve = {"sink": 'clients: {"127.0.0.1": host1, "127.0.0.2": host2}',
                     "source": 'clients: {"127.0.0.3": src1}'}
        else:
            cert, key = certs.path("backup")
            keys = "ca: %s, cert: %s, key: %s" % (json.dumps(certs.ca), json.dumps(cert),
                                                  json.dumps(key))
            serve = {"sink": keys + ", client_cns: [host1, host2]",
                     "source": keys + ", client_cns: [src1]"}
        cfg = bed.tmp / ("daemon-%s.yml" % via)
        cfg.write_text(
            "global: {rundir: %s}\njobs:\n"
            "  - name: sink\n    type: sink\n    root_fs: %s\n"
            "    serve: {type: %s, listen: \"127.0.0.1:%d\", %s}\n"
            "  - name: source\n    type: source\n"
            "    serve: {type: %s, listen: \"127.0.0.1:%d\", %s}\n"
            "    filesystems: {%s: true}\n    snapshotting: {type: manual}\n"
            % (json.dumps(str(bed.tmp / ("run-" + via))), json.dumps(bed.sink), via,
               self.ports["sink"], serve["sink"], via, self.ports["source"], serve["source"],
               json.dumps(bed.src + "/a<")))
        self.daemon = DaemonProc(cfg, bed.tmp / ("run-" + via))

    def session(self, ident, mode="replicate"):
        return NetSession(self, ident, mode)

    def stop(self):
        rc, took, out = self.daemon.stop()
        assert rc == 0 and "Traceback" not in out, out
        return out


class NetSession(Session):
    """A client of the daemon's tcp or tls listener, speaking as Session does to
    stdinserver (its start and call); there is no process of its own to end."""

    def __init__(self, listening, identity, mode="replicate"):
        port = listening.ports["source" if identity == "src1" else "sink"]
        sock = socket.create_connection(("127.0.0.1", port), timeout=20,
                                        source_address=(Listening.ADDR[identity], 0))
        if listening.via == "tls":
            ctx = zrepl.tls_context(False, listening.certs.ca, *listening.certs.path(identity))
            sock = ctx.wrap_socket(sock)
        sock.settimeout(None)
        self.conn = zrepl.socket_connection(sock, "listener", tls=listening.via == "tls")
        self.ids = 0
        self.hello = None
        self.mode = mode

    def end(self):
        self.conn.close()
        return None, ""


def step(fs, name, guid, kind="full", frm=None):
    to = {"type": "snapshot", "name": name, "guid": str(guid), "createtxg": 1,
          "creation": 1, "userrefs": 0}
    return {"kind": kind, "from": frm, "to": to, "protection": "guarantee_resumability",
            "resume_token": None, "includes": []}


@pytest.fixture
def bed(pools, tmp_path):
    return Bed(pools, tmp_path)


def test_each_identity_sees_only_its_own_subtree(bed):
    for ident, mine, other in (("host1", "data", "secret"), ("host2", "secret", "data")):
        s = Session(bed.cfg, ident)
        hello = s.start()
        assert hello["job"] == "sink" and hello["identity"] == ident
        assert hello["root"] == "%s/%s" % (bed.sink, ident)
        kind, doc = s.call("ListFilesystems", {"versions": True})
        assert kind == "result"
        paths = [f["path"] for f in doc["filesystems"]]
        assert paths == [mine], paths
        assert all(f["name"].startswith(hello["root"] + "/") for f in doc["filesystems"])
        assert s.call("Goodbye", {}) == ("result", {})
        rc, err = s.end()
        assert rc == 0, err
    s = Session(bed.cfg, "src1")
    s.start()
    kind, doc = s.call("ListFilesystems", {"versions": True})
    assert sorted(f["path"] for f in doc["filesystems"]) == [bed.src + "/a", bed.src + "/a/kid"]
    s.call("Goodbye", {})
    assert s.end()[0] == 0


def crafted(bed):
    """(identity, mode, method, params, what must come back) — each must change nothing."""
    h2 = bed.sink + "/host2/secret"
    real_guid = bed.guid(bed.sink + "/host1/data@s1")
    b_guid = bed.guid(bed.src + "/b@s1")
    a_guid = bed.guid(bed.src + "/a@s1")
    names = ["..", "../host2/secret", "data/..", "data/../../host2/secret", "/data", "./data",
             "data/.", "data@s1", "data#b", "data%x", "data\x01", "data\nx", "-data",
             "data/" + "x" * 300, "", "data/", "da ta\t", "dätä", "host2/secret",
             bed.sink + "/host2/secret", "x" * 256]
    cases = []
    for n in names:
        cases.append(("host1", "replicate", "DestroySnapshots",
                      {"fs": n, "snapshots": [{"name": "s1", "guid": str(real_guid)}]}, "refused"))
    for n in ["s1@x", "s1/..", "", "s#1", "x" * 300, "s1\x00"]:
        cases.append(("host1", "replicate", "DestroySnapshots",
                      {"fs": "data", "snapshots": [{"name": n, "guid": str(real_guid)}]},
                      "refused"))
    for g in ["abc", "-1", str(2 ** 64), "", "0x10", 5]:
        cases.append(("host1", "replicate", "DestroySnapshots",
                      {"fs": "data", "snapshots": [{"name": "s1", "guid": g}]}, "refused"))
    # the right name with another GUID: answered, destroyed nothing
    cases.append(("host1", "replicate", "DestroySnapshots",
                  {"fs": "data", "snapshots": [{"name": "s1", "guid": str(real_guid + 1)}]},
                  "not-destroyed"))
    for method in ("Send", "SendCompleted", "ReplicationCursor", "SnapshotRound",
                   "ListFilesystemVersions", "EstimateSize", "HoldCursors", "Bogus", "",
                   "__init__"):
        cases.append(("host1", "replicate", method, {"fs": "data", "step": step("data", "s1",
                                                                                 real_guid)},
                      "refused"))
    for method in ("Receive", "DestroySnapshots", "PrepareSteps", "AbortPartialReceive",
                   "FinishPlaceholderConversion", "FinishPhase", "ReleaseSuperseded"):
        cases.append(("host1", "restore", method, {"fs": "data", "snapshots": []}, "refused"))
    cases.append(("host1", "restore", "Send", {"fs": "../host2/secret",
                                               "step": step("x", "s1", 1)}, "refused"))
    cases.append(("host1", "replicate", "AbortPartialReceive", {"fs": "../host2"}, "refused"))
    cases.append(("host1", "replicate", "FinishPlaceholderConversion", {"fs": h2}, "refused"))
    # the source: only what its filter accepts
    for method, params in (
            ("DestroySnapshots", {"fs": bed.src + "/b", "snapshots": [
                {"name": "s1", "guid": str(b_guid)}]}),
            ("ReplicationCursor", {"fs": bed.src + "/b"}),
            ("ListFilesystemVersions", {"fs": bed.src + "/b"}),
            ("Send", {"fs": bed.src + "/b", "step": step(bed.src + "/b", "s1", b_guid)}),
            ("SendCompleted", {"fs": bed.src + "/b", "step": step(bed.src + "/b", "s1", b_guid)}),
            ("PrepareSteps", {"plans": [{"fs": bed.src + "/b",
                                         "steps": [step(bed.src + "/b", "s1", b_guid)]}]}),
            ("ReleaseStepHolds", {"fs": bed.src}),
            ("DestroySnapshots", {"fs": bed.src + "/a/../b", "snapshots": []}),
            ("Receive", {"fs": bed.src + "/a", "step": step(bed.src + "/a", "s1", a_guid)}),
            ("AbortPartialReceive", {"fs": bed.src + "/a"}),
            ("Send", {"fs": bed.src + "/a", "step": step(bed.src + "/a", "s1", a_guid + 1)}),
            ("DecodeResumeToken", {"token": "1-x; rm -rf /"})):
        cases.append(("src1", "replicate", method, params, "refused"))
    return cases


@pytest.fixture(params=["stdinserver", "tcp", "tls"])
def via(request, bed):
    """Who serves the Bed: `stdinserver` processes, or a daemon's tcp or tls listener ->
    a function (identity, mode) -> a session not yet started."""
    if request.param == "stdinserver":
        yield lambda ident, mode="replicate": Session(bed.cfg, ident, mode)
        return
    listening = Listening(bed, request.param, request.getfixturevalue("certs")
                          if request.param == "tls" else None)
    try:
        yield listening.session
    finally:
        listening.stop()


def test_crafted_requests_are_refused_and_change_nothing(bed, via):
    before = bed.trees()
    cases = crafted(bed)
    assert len(cases) >= 50
    outcomes = {}
    session = None
    for ident, mode, method, params, want in cases:
        if session is None or session[0] != (ident, mode):
            if session is not None:
                session[1].end()
            session = ((ident, mode), via(ident, mode))
            session[1].start()
        kind, doc = session[1].call(method, params)
        if kind == "closed":                     # a validation failure ends the session
            rc, err = session[1].end()
            assert rc in (1, None) and "Traceback" not in err, err
            session = None
        elif want == "not-destroyed":
            assert kind == "result" and doc["results"][0]["destroyed"] is False, doc
        else:
            assert kind == "error", (method, params, doc)
            assert doc["kind"] in ("refused", "protocol", "missing", "changed"), doc
        outcomes[kind] = outcomes.get(kind, 0) + 1
    if session is not None:
        session[1].end()
    assert bed.trees() == before
    assert outcomes.get("closed", 0) > 0 and outcomes.get("error", 0) > 0, outcomes


def test_a_local_client_gets_its_endpoint_without_waiting_for_a_hello(bed, tmp_path):
    # over a wire the HELLO carries the server's capabilities and the sink's resumability;
    # a local client reads none of it, so the pools' features (read beside a job's
    # listings where the probes come from the cache) are not waited for
    config = zrepl.load_config(str(bed.cfg))
    log = zrepl.Logger(io.StringIO(), "error")
    cache = tmp_path / "capabilities.json"
    zfs = zrepl.ZFS()
    zfs.probe_cache = str(cache)
    zfs.capabilities()                          # probed: the next process is served by the cache
    zfs = zrepl.ZFS()
    zfs.probe_cache = str(cache)
    caps = zfs.capabilities()                   # as `once` checks the host first
    endpoint, role, answer = zrepl.serve_endpoint(config, config.job("sink"), "host1",
                                                  "replicate", zfs, log, hello=False)
    assert (role, answer) == ("sink", None) and endpoint.root == bed.sink + "/host1"
    assert isinstance(caps.pool_features, zrepl.Later)
    _, _, answer = zrepl.serve_endpoint(config, config.job("sink"), "host1", "replicate",
                                        zfs, log)
    assert answer["root"] == bed.sink + "/host1" and answer["resumable"] in (True, False)
    assert answer["capabilities"]["pools"] == zfs.capabilities().pools != {}
    with pytest.raises(zrepl.EndpointError):     # the identity is checked all the same
        zrepl.serve_endpoint(config, config.job("sink"), "-x", "replicate", zfs, log,
                             hello=False)


def test_an_identity_nobody_serves_and_restore_of_a_source_are_refused(bed):
    before = bed.trees()
    cp = subprocess.run([sys.executable, str(ZREPL_PY), "--config", str(bed.cfg),
                         "stdinserver", "host3"], stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert cp.returncode == 2 and "no job serves identity host3" in cp.stderr
    assert cp.stdout == ""
    s = Session(bed.cfg, "src1", mode="restore")
    hello = s.start()
    assert "error" in hello and "nothing to restore" in hello["error"]["message"]
    assert s.end()[0] == 1
    s = Session(bed.cfg, "host1")
    theirs = zrepl.PROTOCOL_VERSION + 1
    answer = s.start({"protocol": theirs, "mode": "replicate"})
    assert answer["error"]["kind"] == "protocol"
    rc, err = s.end()
    assert rc == 1 and "protocol version mismatch: local %d, remote %d" % (
        zrepl.PROTOCOL_VERSION, theirs) in err, err
    assert bed.trees() == before


# --- fuzz ----------------------------------------------------------------------------------

NASTY = [None, True, -1, 0, 2 ** 70, 1.5, "", "..", "/", "-x", "a@b", "a#b", "a%b", "\x00",
         "x" * 5000, [], {}, [None], {"a": 1}, "data", "s1", "1-ab", "ünï"]
METHOD_NAMES = [m for m in zrepl.METHODS if m not in ("Receive", "FinishPlaceholderConversion")]


def mutate(obj, rnd, depth=0):
    if isinstance(obj, dict) and obj and rnd.random() < 0.8:
        obj = dict(obj)
        key = rnd.choice(list(obj))
        r = rnd.random()
        if r < 0.2:
            del obj[key]
        elif r < 0.6 or depth > 3:
            obj[key] = rnd.choice(NASTY)
        else:
            obj[key] = mutate(obj[key], rnd, depth + 1)
        if rnd.random() < 0.1:
            obj[rnd.choice(["extra", "id", "method"])] = rnd.choice(NASTY)
        return obj
    if isinstance(obj, list) and obj and rnd.random() < 0.7:
        obj = list(obj)
        obj[rnd.randrange(len(obj))] = mutate(obj[0], rnd, depth + 1)
        return obj
    return rnd.choice(NASTY)


def frame(kind, payload):
    return len(payload).to_bytes(4, "big") + bytes((kind,)) + payload


def fuzz_frames(rnd, bases):
    """1-3 frames of one session after a valid HELLO: random bytes, headers of any kind
    and length, requests with mutated methods and params, bit flips, truncations."""
    out = []
    for _ in range(rnd.randint(1, 3)):
        r = rnd.random()
        if r < 0.1:
            out.append(os.urandom(rnd.randint(1, 64)))
        elif r < 0.2:
            out.append(frame(rnd.randrange(256), os.urandom(rnd.randint(0, 32))))
        elif r < 0.25:
            out.append(rnd.randrange(1 << 32).to_bytes(4, "big") + bytes((rnd.randint(1, 6),)))
        else:
            method = rnd.choice(METHOD_NAMES + ["Nope", ""])
            req = {"id": rnd.randint(1, 100), "method": method,
                   "params": bases.get(method, {})}
            req = mutate(req, rnd) if rnd.random() < 0.9 else req
            data = frame(zrepl.REQUEST, json.dumps(req).encode())
            if rnd.random() < 0.15:
                i = rnd.randrange(len(data))
                data = data[:i] + bytes((data[i] ^ (1 << rnd.randrange(8)),)) + data[i + 1:]
            if rnd.random() < 0.05:
                data = data[:rnd.randrange(len(data))]
            if rnd.random() < 0.05:
                data = frame(rnd.choice([zrepl.DATA, zrepl.END, zrepl.RESPONSE,
                                         zrepl.HELLO]), data[5:][:60000])
            out.append(data)
    return out


def bases_for(bed, ident):
    if ident == "src1":
        fs = bed.src + "/a"
        g = bed.guid(fs + "@s1")
    else:
        fs = "data"
        g = bed.guid(bed.sink + "/host1/data@s1")
    st = step(fs, "s1", g + 7)
    return {"ListFilesystems": {"versions": True}, "ListFilesystemVersions": {"fs": fs},
            "EstimateSize": {"fs": fs, "steps": [st]},
            "PrepareSteps": {"plans": [{"fs": fs, "steps": [st]}]},
            "Send": {"fs": fs, "step": st, "prepared": False},
            "SendCompleted": {"fs": fs, "step": st}, "ReleaseStepHolds": {"fs": fs},
            "FinishPhase": {"cursors": [{"fs": fs, "to": st["to"]}], "release": [fs],
                            "keep": [], "received": [{"fs": fs, "to": st["to"],
                                                      "protection": "guarantee_nothing"}]},
            "HoldCursors": {"cursors": [{"fs": fs, "to": st["to"]}]},
            "ReleaseSuperseded": {"received": [{"fs": fs, "to": st["to"],
                                                "protection": "guarantee_incremental"}]},
            "DecodeResumeToken": {"token": "1-abc"}, "ReplicationCursor": {"fs": fs},
            "DestroySnapshots": {"fs": fs, "snapshots": [{"name": "s1", "guid": str(g + 7)}]},
            "SnapshotRound": {"mode": "always", "dry_run": True},
            "AbortPartialReceive": {"fs": fs}, "Ping": {}, "Goodbye": {}}


def test_ten_thousand_fuzzed_frames_break_no_session_and_change_nothing(bed):
    """In-process Servers (the code `stdinserver` runs) over socketpairs, backed by the real
    pools; then a sample through real stdinserver processes."""
    before = bed.trees()
    config = zrepl.load_config(str(bed.cfg))
    zfs = zrepl.ZFS()
    log = zrepl.Logger(io.StringIO(), "error")
    jobs = {"host1": config.job("sink"), "src1": config.job("source")}
    rnd = random.Random(20261203)
    crashes, sent, handled = [], 0, []

    class CountingServer(zrepl.Server):
        """The real Server; counts the requests that got past framing and JSON."""
        def handle(self, req):
            handled.append(str(req.get("method")))
            return super().handle(req)
    bases = {ident: bases_for(bed, ident) for ident in jobs}
    while sent < 10000:
        ident = rnd.choice(list(jobs))
        a, b = socket.socketpair()
        fd = b.detach()
        conn = zrepl.Connection(fd, fd, name="fuzz", idle_timeout=2)

        def serve(conn=conn, ident=ident):
            try:
                CountingServer(conn, lambda mode: zrepl.serve_endpoint(
                    config, jobs[ident], ident, mode, zfs, log), log).serve()
            except zrepl.ZreplError:
                pass
            except BaseException as e:          # anything else is a bug
                crashes.append(repr(e))
            finally:
                conn.close()
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        frames = fuzz_frames(rnd, bases[ident])
        try:
            a.sendall(frame(zrepl.HELLO, json.dumps({"protocol": zrepl.PROTOCOL_VERSION,
                                                     "mode": "replicate",
                                                     "job": "f"}).encode()))
            for data in frames:
                a.sendall(data)
            sent += len(frames)
        except OSError:
            pass
        a.shutdown(socket.SHUT_WR)
        t.join(timeout=30)
        assert not t.is_alive(), "a fuzzed session did not end"
        a.close()
    assert crashes == []
    assert sent >= 10000
    # most frames are well-formed enough to reach a method, every method is reached
    assert len(handled) > 3000 and set(METHOD_NAMES) <= set(handled), len(handled)
    # and through the real command: it exits 0 or 1, never with a traceback
    for _ in range(40):
        ident = rnd.choice(["host1", "src1"])
        s = Session(bed.cfg, ident)
        s.start()
        for data in fuzz_frames(rnd, bases[ident]):
            try:
                s.conn._write(data)
            except zrepl.ZreplError:
                break
        rc, err = s.end()
        assert rc in (0, 1) and "Traceback" not in err, err
    assert bed.trees() == before


@pytest.mark.parametrize("how", ["tcp", "tls"])
def test_fuzzed_sessions_through_the_tcp_and_tls_listeners_change_nothing(bed, how, request):
    """The in-process fuzz above covers the Server; this is the daemon's listener path:
    sessions of fuzzed frames end, the daemon goes on serving, nothing changes."""
    before = bed.trees()
    listening = Listening(bed, how, request.getfixturevalue("certs") if how == "tls" else None)
    rnd = random.Random(4242)
    bases = {ident: bases_for(bed, ident) for ident in ("host1", "src1")}
    try:
        for _ in range(40):
            ident = rnd.choice(["host1", "src1"])
            s = listening.session(ident)
            s.start()
            for data in fuzz_frames(rnd, bases[ident]):
                try:
                    s.conn._write(data)
                except zrepl.ZreplError:
                    break
            s.end()
        s = listening.session("host1")          # still serving, confined as before
        assert s.start()["identity"] == "host1"
        kind, doc = s.call("ListFilesystems", {"versions": False})
        assert kind == "result" and [f["path"] for f in doc["filesystems"]] == ["data"]
        s.end()
    finally:
        out = listening.stop()
    assert "internal error" not in out, out
    assert bed.trees() == before
