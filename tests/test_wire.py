"""The wire (section 9, SPEC §9.1-9.3) without ZFS: records to and from JSON, every check on
what a peer sends, error documents, and frames over a real socketpair (Connection:
limits, heartbeats, the idle timeout, a peer that stops reading)."""
import json
import socket
import sys
import threading
import time

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402

V1 = zrepl.Version("snapshot", "tank/a", "s1", 123456789012345678, 10, 1700000000, 1)
V2 = zrepl.Version("snapshot", "tank/a", "s2", 2 ** 64 - 1, 20, 1700000100, 0)
BM = zrepl.Version("bookmark", "tank/a", "zrepl_CURSOR_G_1_J_push", 5, 9, 1690000000, None)


# --- records ---------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [
    zrepl.Step("full", None, V1, "guarantee_resumability"),
    zrepl.Step("incremental", BM, V2, "guarantee_incremental"),
    zrepl.Step("incremental_batch", V1, V2, "guarantee_nothing", includes=("s1", "s2")),
    zrepl.Step("resume", V1, V2, "guarantee_resumability", resume_token="1-abc-def0"),
    zrepl.Step("resume", None, V2, "guarantee_resumability", resume_token="1-0a"),
])
def test_step_round_trips_through_json(step):
    doc = json.loads(json.dumps(step.to_json()))
    back = zrepl.Step.from_json(doc, "tank/a")
    assert back == step


def test_dataset_round_trips_and_keeps_listing_order():
    ds = zrepl.Dataset("pool/sink/host1/tank/a", "filesystem", 77, "on", "1-ff", "off",
                       [BM, V1, V2])
    path, back = zrepl.Dataset.from_json(json.loads(json.dumps(ds.to_json("tank/a"))))
    assert path == "tank/a"
    assert back.name == ds.name and back.is_placeholder and back.resume_token == "1-ff"
    assert [(v.type, v.name, v.guid) for v in back.versions] == \
        [(v.type, v.name, v.guid) for v in (BM, V1, V2)]
    assert all(v.fs == ds.name for v in back.versions)


def _version_doc(**over):
    doc = V1.to_json()
    doc.update(over)
    return doc


BAD_VERSIONS = [
    ("type", "filesystem"), ("type", None), ("name", ""), ("name", "a@b"), ("name", "a#b"),
    ("name", "a/b"), ("name", "x" * 300), ("name", 5), ("name", "..") , ("name", "a\nb"),
    ("guid", 5), ("guid", "-1"), ("guid", "0x10"), ("guid", str(2 ** 64)), ("guid", ""),
    ("guid", "1" * 21), ("createtxg", -1), ("createtxg", "10"), ("createtxg", True),
    ("creation", 1.5), ("userrefs", -2), ("userrefs", "1"),
]


@pytest.mark.parametrize("key,value", BAD_VERSIONS)
def test_a_bad_version_field_is_a_protocol_error(key, value):
    with pytest.raises(zrepl.ProtocolError):
        zrepl.Version.from_json(_version_doc(**{key: value}), "tank/a")


BAD_STEPS = [
    {"kind": "rollback"},
    {"kind": "full", "from": V1.to_json()},
    {"kind": "incremental", "from": None},
    {"kind": "resume", "resume_token": None},
    {"kind": "full", "resume_token": "1-ab"},
    {"resume_token": "1-AB"},                       # tokens are lower-case hex and dashes
    {"resume_token": "1;rm -rf /"},
    {"to": BM.to_json()},                            # a step ends at a snapshot
    {"protection": "guarantee_everything"},
    {"includes": ["ok", "not/ok"]},
    {"includes": "s1"},
    {"to": None},
]


@pytest.mark.parametrize("over", BAD_STEPS)
def test_a_bad_step_is_a_protocol_error(over):
    doc = zrepl.Step("full", None, V1, "guarantee_resumability").to_json()
    doc.update(over)
    with pytest.raises(zrepl.ProtocolError):
        zrepl.Step.from_json(doc, "tank/a")


@pytest.mark.parametrize("name", ["", "/tank/a", "tank/a/", "tank/../x", "tank/./x", "tank/a@s",
                                  "tank/a#b", "tank/a%b", "-tank", "tank/" + "x" * 260,
                                  "tank/a\x00", "tank/ä", 7, None])
def test_a_bad_filesystem_name_is_a_protocol_error(name):
    with pytest.raises(zrepl.ProtocolError):
        zrepl.wire_dataset_name({"fs": name}, "fs")


def test_error_documents_rebuild_only_known_kinds():
    err = zrepl.ZreplError("tank/a@s changed", kind="changed", fs="tank/a")
    back = zrepl.error_from_json(json.loads(json.dumps(err.to_json())))
    assert (back.kind, back.message, back.fs, back.temporary, back.local_to_fs) == \
        ("changed", "tank/a@s changed", "tank/a", False, True)
    odd = zrepl.error_from_json({"message": "x", "kind": "made-up", "temporary": "yes"})
    assert odd.kind == "peer-error" and odd.temporary is False
    # a peer cannot make this process exit as if its own configuration were broken
    assert zrepl.error_from_json({"message": "x", "kind": "config"}).exit_code == 1
    assert zrepl.error_from_json([1, 2]).kind == "protocol"


def test_every_kind_raised_in_zrepl_py_is_in_the_table():
    source = (REPO / "zrepl.py").read_text()
    import re
    kinds = set(re.findall(r'kind="([a-z0-9-]+)"', source)) | \
        set(re.findall(r'^\s+kind = "([a-z0-9-]+)"', source, re.M))
    missing = sorted(k for k in kinds if k not in zrepl.ERROR_KINDS)
    assert missing == []
    for rx, rc, kind, temporary, local in [r for r in zrepl._CLASSIFY]:
        assert kind in zrepl.ERROR_KINDS, kind


def test_stream_end_round_trips():
    end = zrepl.StreamEnd(1, "cannot send", False, zrepl.ZreplError("x", kind="missing"))
    back = zrepl.StreamEnd.from_json(json.loads(json.dumps(end.to_json())))
    assert (back.exit_status, back.stderr_tail, back.aborted, back.error.kind) == \
        (1, "cannot send", False, "missing")
    with pytest.raises(zrepl.ProtocolError):
        zrepl.StreamEnd.from_json({"exit_status": "0"})


# --- frames over a socketpair ----------------------------------------------------------------

def _conn(sock, idle=zrepl.IDLE_TIMEOUT, name="peer"):
    fd = sock.detach()
    return zrepl.Connection(fd, fd, name=name, idle_timeout=idle)


def test_frames_cross_whole_and_heartbeats_are_invisible():
    a, b = socket.socketpair()
    ca, cb = _conn(a, name="a"), _conn(b, name="b")
    got = []

    def read():
        got.append(cb.receive_json(zrepl.REQUEST))
        got.append(cb.receive())
    reader = threading.Thread(target=read)
    reader.start()
    try:
        ca.send_json(zrepl.REQUEST, {"id": 1, "method": "Ping", "params": {}})
        ca.send(zrepl.HEARTBEAT)
        ca.send(zrepl.DATA, b"x" * (1 << 20))        # more than a socket buffer holds
        reader.join(timeout=20)
        assert got[0] == {"id": 1, "method": "Ping", "params": {}}
        kind, payload = got[1]
        assert (kind, payload) == (zrepl.DATA, b"x" * (1 << 20))
    finally:
        ca.close()
        cb.close()


@pytest.mark.parametrize("raw,why", [
    ((17).to_bytes(4, "big") + bytes((9,)) + b"x" * 17, "unknown kind"),
    (((1 << 20) + 1).to_bytes(4, "big") + bytes((zrepl.DATA,)), "limit"),
    ((70000).to_bytes(4, "big") + bytes((zrepl.HELLO,)), "limit"),
    ((1).to_bytes(4, "big") + bytes((zrepl.HEARTBEAT,)) + b"x", "limit"),
])
def test_a_frame_over_its_limit_or_of_unknown_kind_is_refused_unread(raw, why):
    a, b = socket.socketpair()
    cb = _conn(b)
    try:
        a.sendall(raw)
        with pytest.raises(zrepl.ProtocolError, match=why):
            cb.receive()
    finally:
        a.close()
        cb.close()


@pytest.mark.parametrize("payload", [b"{", b"[1]", b'{"a": 1, "a": 2}', b"\xff\xfe", b"",
                                     b'"x"', b"1e999999"])
def test_bad_json_is_a_protocol_error(payload):
    with pytest.raises(zrepl.ProtocolError):
        zrepl._json_frame(payload, "REQUEST")


def test_a_silent_peer_is_noticed_within_the_idle_timeout():
    a, b = socket.socketpair()
    cb = _conn(b, idle=1.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(zrepl.TransportError, match="sent nothing"):
            cb.receive()
        assert time.monotonic() - t0 < 4
    finally:
        a.close()
        cb.close()


def test_a_peer_that_stops_reading_is_noticed_while_we_write():
    a, b = socket.socketpair()
    cb = _conn(b, idle=1.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(zrepl.TransportError, match="stopped reading"):
            for _ in range(1000):               # far more than the socket buffers hold
                cb.send(zrepl.DATA, b"y" * (1 << 20))
        assert time.monotonic() - t0 < 5
    finally:
        a.close()
        cb.close()


def test_heartbeats_keep_an_idle_but_living_connection_open():
    a, b = socket.socketpair()
    ca, cb = _conn(a, name="a"), _conn(b, name="b", idle=zrepl.HEARTBEAT_INTERVAL + 3)
    try:
        done = []

        def later():
            time.sleep(zrepl.HEARTBEAT_INTERVAL + 5)  # longer than b's idle timeout
            ca.send_json(zrepl.RESPONSE, {"id": 1, "result": {}})
            done.append(1)
        t = threading.Thread(target=later)
        t.start()
        assert cb.receive_json(zrepl.RESPONSE) == {"id": 1, "result": {}}
        t.join()
    finally:
        ca.close()
        cb.close()


def test_eof_is_a_transport_error():
    a, b = socket.socketpair()
    cb = _conn(b)
    a.close()
    try:
        with pytest.raises(zrepl.TransportError, match="closed"):
            cb.receive()
    finally:
        cb.close()


def test_ssh_argv_is_a_list_with_the_configured_options():
    c = zrepl.Connect("ssh+stdinserver", host="backup.example", user="zrepl", port=2222,
                      identity_file="/etc/zrepl/id", options=["Compression=yes"])
    argv = zrepl.ssh_argv(c)
    assert argv[0] == "ssh" and "BatchMode=yes" in argv and "ServerAliveInterval=15" in argv
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-i") + 1] == "/etc/zrepl/id"
    assert argv[argv.index("-l") + 1] == "zrepl" and "Compression=yes" in argv
    assert argv[-3:] == ["--", "backup.example", "zrepl-stdinserver-needs-a-forced-command"]


# --- DATA frames moved by the kernel (SPEC §9.2; Linux os.splice, else read/write) -----------

def _proc_stream(argv, **kw):
    import subprocess
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    return zrepl.ZFSProcess(argv, proc, "t/fs")


def test_a_stream_crosses_as_data_frames_between_two_pipes(tmp_path):
    """A process's stdout -> DATA frames over a socketpair -> another process's stdin,
    byte for byte, whichever path (spliced or copied) this Python and OS take."""
    import hashlib
    import os
    import subprocess
    blob = os.urandom((5 << 20) + 12345)                 # not a multiple of a frame
    (tmp_path / "in").write_bytes(blob)
    a, b = socket.socketpair()
    ca, cb = _conn(a, name="a"), _conn(b, name="b")
    source = _proc_stream(["cat", str(tmp_path / "in")])
    counted = []
    metered = zrepl.MeteredStream(source, on_bytes=counted.append)
    out = tmp_path / "out"
    sink_proc = subprocess.Popen(["sh", "-c", 'cat > "$0"', str(out)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sink = zrepl.ZFSProcess(["cat"], sink_proc, "t/fs")
    result = {}

    def receive():
        stream = zrepl.WireInStream(cb, "test")
        result["complete"] = zrepl.relay(stream, sink)
        result["end"] = stream.end
    reader = threading.Thread(target=receive)
    reader.start()
    try:
        assert zrepl.relay(metered, zrepl.WireOutSink(ca, watch_replies=False))
        end = metered.finish()
        ca.send_json(zrepl.END, end.to_json())
        reader.join(timeout=60)
        assert result["complete"] and result["end"].exit_status == 0
        assert sink.finish().exit_status == 0
        assert sum(counted) == len(blob)
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob).digest()
    finally:
        ca.close()
        cb.close()


@pytest.mark.skipif(zrepl._SPLICE is None, reason="os.splice needs Linux and Python >= 3.10")
def test_a_data_frame_half_spliced_is_finished_by_receive(tmp_path):
    import os
    a, b = socket.socketpair()
    ca, cb = _conn(a, name="a"), _conn(b, name="b")
    payload = os.urandom(300_000)
    rfd, wfd = os.pipe()
    got = bytearray()

    def drain():
        while True:
            chunk = os.read(rfd, 65536)
            if not chunk:
                return
            got.extend(chunk)
    t = threading.Thread(target=drain)
    t.start()
    try:
        sender = threading.Thread(target=lambda: (ca.send(zrepl.DATA, payload),
                                                  ca.send_json(zrepl.END, {"x": 1})))
        sender.start()
        moved = 0
        while moved < 100_000:                        # part of the frame through the kernel
            moved += cb.splice_data(wfd, 100_000 - moved)
        rest = b""
        while len(rest) < len(payload) - moved:       # the rest the portable way
            kind, chunk = cb.receive()
            assert kind == zrepl.DATA
            rest += chunk
        assert cb.receive_json(zrepl.END) == {"x": 1}  # and the next frame is whole
        os.close(wfd)
        t.join(timeout=10)
        sender.join(timeout=10)
        assert bytes(got) + rest == payload
    finally:
        ca.close()
        cb.close()
        os.close(rfd)
