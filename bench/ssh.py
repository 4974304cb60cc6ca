#!/usr/bin/env python3
"""ssh+stdinserver benchmark: zrepl.py over ssh vs raw `zfs send | ssh zfs recv`, side by side.

  a  bulk: one dataset with SIZE MiB of incompressible data, full push over ssh to a sink
     behind a real sshd on 127.0.0.1 (`zrepl.py once`: push -> stdinserver sink) vs
     `zfs send fs@s | ssh <same options> root@127.0.0.1 zfs recv -u dst`; MiB/s and ratio.
  b  a no-change push of 20 filesystems: ssh processes started (goal 1), zfs processes on
     each side, and the wall time next to the same run over `local`.
  c  stream pipelines and ciphers: SIZE MiB of compressible data (a quarter random, the rest
     repeating text) pushed over ssh by zrepl.py plain, with `send.execpipe: [[zstd, -3]]` +
     the sink's `recv.execpipe: [[zstd, -d]]`, and raw `zfs send | zstd | ssh 'zstd -d | zfs
     recv'`; then (a)'s incompressible stream with the recommended cipher
     (aes128-gcm@openssh.com, AES-NI) for zrepl.py and raw alike.

Both use the same ssh client options (BatchMode, ServerAliveInterval, the bed's key and
known_hosts, default cipher). Every run is checked (GUIDs on the destination). Medians of
--runs runs, the tools interleaved.

    python3 bench/ssh.py [--only a,b,c] [--runs 3] [--size-mib 1024] [--zrepl zrepl.pyz]

Needs root, a ZFS (zfs-fuse will do) and sshd (Debian openssh-server). Makes and destroys its
own file-backed pools under /var/tmp and its own sshd on a free port.
"""
import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZREPL = os.path.join(REPO, "zrepl.py")
ENV = dict(os.environ, LC_ALL="C", PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def sh(*argv, check=True, env=None, input=None):
    return subprocess.run(argv, check=check, env=env or ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, input=input)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bed:
    def __init__(self, base):
        self.base = base
        self.port = free_port()
        for name in ("host_key", "id_zrepl", "id_raw"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(base, name))
        pub = lambda n: open(os.path.join(base, n + ".pub")).read().split()[:2]  # noqa: E731
        hk = pub("host_key")
        with open(os.path.join(base, "known_hosts"), "w") as f:
            f.write("[127.0.0.1]:%d %s %s\n" % (self.port, hk[0], hk[1]))
        self.forced = os.path.join(base, "stdinserver.sh")
        with open(self.forced, "w") as f:
            f.write('#!/bin/sh\n. %s/env\nexec %s %s --config "$(cat %s/config)" stdinserver bench\n'
                    % (base, shlex.quote(sys.executable), shlex.quote(ZREPL), base))
        os.chmod(self.forced, 0o755)
        self.use("/nonexistent")
        with open(os.path.join(base, "authorized_keys"), "w") as f:
            f.write('command="%s",restrict %s %s zrepl\n' % ((self.forced,) + tuple(pub("id_zrepl"))))
            f.write("%s %s raw\n" % tuple(pub("id_raw")))
        with open(os.path.join(base, "sshd_config"), "w") as f:
            f.write("ListenAddress 127.0.0.1\nPort %d\nHostKey %s/host_key\n"
                    "AuthorizedKeysFile %s/authorized_keys\nPermitRootLogin prohibit-password\n"
                    "PasswordAuthentication no\nStrictModes no\nUsePAM no\nLogLevel ERROR\n"
                    "PidFile %s/sshd.pid\n" % (self.port, base, base, base))
        os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f",
                                      os.path.join(base, "sshd_config")],
                                     stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)

    def use(self, config, env=None):
        with open(os.path.join(self.base, "config"), "w") as f:
            f.write(config)
        with open(os.path.join(self.base, "env"), "w") as f:
            f.write("".join("export %s=%s\n" % (k, shlex.quote(v)) for k, v in (env or {}).items()))

    def ssh_options(self, key, cipher=None):
        return ["-o", "BatchMode=yes", "-o", "ServerAliveInterval=15", "-p", str(self.port),
                "-i", os.path.join(self.base, key), "-o",
                "UserKnownHostsFile=%s/known_hosts" % self.base, "-l", "root"] + \
            (["-o", "Ciphers=" + cipher] if cipher else [])

    def connect_yaml(self, cipher=None):
        extra = ', "Ciphers=%s"' % cipher if cipher else ""
        return ('{type: ssh+stdinserver, host: 127.0.0.1, user: root, port: %d, identity_file: '
                '%s, options: ["UserKnownHostsFile=%s/known_hosts"%s]}'
                % (self.port, json.dumps(os.path.join(self.base, "id_zrepl")), self.base, extra))

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def make_pools(work, size):
    names = []
    for tag in ("bsrc", "bdst"):
        img = os.path.join(work, tag + ".img")
        with open(img, "wb") as f:
            f.truncate(size)
        name = "zrb%s%d" % (tag, os.getpid() % 10000)
        sh("zpool", "create", "-O", "mountpoint=none", name, img)
        names.append(name)
    return names


TEXT = b"".join(b"%08d the quick brown fox jumps over the lazy dog; zrepl.py bench\n" % i
               for i in range(12000))[:768 << 10]


def write_data(fs, mib, work, compressible=False):
    mnt = tempfile.mkdtemp(dir=work)
    sh("zfs", "set", "mountpoint=" + mnt, fs)
    if sh("zfs", "get", "-H", "-o", "value", "mounted", fs).stdout.strip() != "yes":
        sh("zfs", "mount", fs)
    with open(os.path.join(mnt, "data"), "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(256 << 10) + TEXT if compressible else os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    sh("zfs", "unmount", fs)
    sh("zfs", "set", "mountpoint=none", fs)


def destroy_tree(root):
    """Destroy `root` and everything below it, releasing zrepl's holds first (the sink's
    last-received hold made `zfs destroy -r` fail, and the next run a no-change one)."""
    if sh("zfs", "list", "-H", "-o", "name", root, check=False).returncode != 0:
        return
    cp = sh(sys.executable, ZREPL, "zfs-abstraction", "release-all", "--fs", root + "<:ok",
            check=False)
    if cp.returncode != 0:
        raise SystemExit("releasing the holds under %s failed:\n%s" % (root, cp.stderr))
    sh("zfs", "destroy", "-r", root)


def settle():
    """Let the pools finish what the last step left them (freeing a destroyed GiB, syncing
    written data) before the clock starts: else the next tool pays for it."""
    sh("sync")
    time.sleep(3)


def guid(name):
    return sh("zfs", "get", "-Hp", "-o", "value", "guid", name).stdout.strip()


def config(rundir, sink_root, filesystems, connect, serve, send_pipe=None, recv_pipe=None):
    return ("global: {rundir: %s}\njobs:\n"
            "  - name: sink\n    type: sink\n    root_fs: %s\n    serve: %s\n%s"
            "  - name: push\n    type: push\n    connect: %s\n    filesystems: {%s}\n"
            "    snapshotting: {type: manual}\n%s"
            "    pruning: {keep_sender: [{type: regex, regex: '.*'}], keep_receiver: "
            "[{type: regex, regex: '.*'}]}\n"
            % (rundir, sink_root, serve,
               "    recv: {execpipe: %s}\n" % json.dumps(recv_pipe) if recv_pipe else "",
               connect, ", ".join('"%s": true' % f for f in filesystems),
               "    send: {execpipe: %s}\n" % json.dumps(send_pipe) if send_pipe else ""))


def once(cfg_path, env=None):
    t0 = time.monotonic()
    cp = subprocess.run([sys.executable, ZREPL, "--config", cfg_path, "once"], env=env or ENV,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    took = time.monotonic() - t0
    if cp.returncode != 0:
        raise SystemExit("zrepl.py once failed:\n" + cp.stderr)
    return took


def bench_a(bed, src, dst, work, mib, runs):
    fs = src + "/bulk"
    sh("zfs", "create", "-o", "mountpoint=none", fs)
    write_data(fs, mib, work)
    sh("zfs", "snapshot", fs + "@s1")
    sh("zfs", "create", "-o", "mountpoint=none", dst + "/sink")
    cfg = os.path.join(work, "a.yml")
    with open(cfg, "w") as f:
        f.write(config(os.path.join(work, "run-a"), dst + "/sink", [fs], bed.connect_yaml(),
                       "{type: stdinserver, client_identities: [bench]}"))
    bed.use(cfg)
    times = {"zrepl.py over ssh": [], "raw send | ssh recv": []}
    for _ in range(runs):
        target = "%s/sink/bench/%s" % (dst, fs)
        destroy_tree("%s/sink/bench" % dst)
        settle()
        times["zrepl.py over ssh"].append(once(cfg))
        assert guid(target + "@s1") == guid(fs + "@s1")
        destroy_tree(dst + "/raw")
        settle()
        t0 = time.monotonic()
        send = subprocess.Popen(["zfs", "send", fs + "@s1"], stdout=subprocess.PIPE, env=ENV)
        recv = subprocess.run(["ssh"] + bed.ssh_options("id_raw") + ["127.0.0.1",
                              "zfs recv -u %s/raw" % dst], stdin=send.stdout, env=ENV,
                              stderr=subprocess.PIPE)
        send.stdout.close()
        send.wait()
        times["raw send | ssh recv"].append(time.monotonic() - t0)
        assert recv.returncode == 0 and send.returncode == 0, recv.stderr
        assert guid(dst + "/raw@s1") == guid(fs + "@s1")
    print("\n(a) full push of %d MiB over ssh to 127.0.0.1, medians of %d" % (mib, runs))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print("  %-22s %7.2f s  %7.1f MiB/s   (%s)" % (k, med[k], mib / med[k],
                                                     ", ".join("%.2f" % x for x in v)))
    print("  ratio zrepl.py / raw throughput: %.2f" % (med["raw send | ssh recv"] /
                                                       med["zrepl.py over ssh"]))


def raw_over_ssh(bed, fs, target, cipher=None, pipe=False):
    """`zfs send fs | [zstd -3 |] ssh ... '[zstd -d |] zfs recv -u target'` -> seconds."""
    t0 = time.monotonic()
    send = subprocess.Popen(["zfs", "send", fs], stdout=subprocess.PIPE, env=ENV)
    mid = None
    feed = send.stdout
    if pipe:
        mid = subprocess.Popen(["zstd", "-3", "-q", "-c"], stdin=send.stdout,
                               stdout=subprocess.PIPE, env=ENV)
        send.stdout.close()
        feed = mid.stdout
    remote = ("zstd -d -q -c | " if pipe else "") + "zfs recv -u %s" % target
    recv = subprocess.run(["ssh"] + bed.ssh_options("id_raw", cipher) + ["127.0.0.1", remote],
                          stdin=feed, env=ENV, stderr=subprocess.PIPE)
    feed.close()
    for p in (send, mid):
        if p is not None:
            p.wait()
    took = time.monotonic() - t0
    assert recv.returncode == 0 and send.returncode == 0, recv.stderr
    return took


def bench_c(bed, src, dst, work, mib, runs):
    """zstd in the pipeline on compressible data; the recommended cipher on random data."""
    cipher = "aes128-gcm@openssh.com"
    cases = []
    fs_text = src + "/text"
    sh("zfs", "create", "-o", "mountpoint=none", fs_text)
    write_data(fs_text, mib, work, compressible=True)
    sh("zfs", "snapshot", fs_text + "@s1")
    zstd = ([["zstd", "-3", "-q", "-c"]], [["zstd", "-d", "-q", "-c"]])
    cases += [("compressible, zrepl.py plain", fs_text, None, (None, None)),
              ("compressible, zrepl.py + zstd execpipe", fs_text, None, zstd),
              ("compressible, raw send | zstd | ssh", fs_text, None, "raw-zstd"),
              ("compressible, raw send | ssh", fs_text, None, "raw")]
    fs_bulk = src + "/bulk"
    if sh("zfs", "list", "-H", fs_bulk, check=False).returncode != 0:
        sh("zfs", "create", "-o", "mountpoint=none", fs_bulk)
        write_data(fs_bulk, mib, work)
        sh("zfs", "snapshot", fs_bulk + "@s1")
    cases += [("random, zrepl.py, %s" % cipher, fs_bulk, cipher, (None, None)),
              ("random, raw send | ssh, %s" % cipher, fs_bulk, cipher, "raw"),
              ("random, zrepl.py, default cipher", fs_bulk, None, (None, None)),
              ("random, raw send | ssh, default cipher", fs_bulk, None, "raw")]
    sh("zfs", "create", "-o", "mountpoint=none", dst + "/csink")
    times = {c[0]: [] for c in cases}
    for k in range(runs):
        for label, fs, ciph, how in cases:
            settle()
            if isinstance(how, str):
                destroy_tree(dst + "/craw")
                settle()
                times[label].append(raw_over_ssh(bed, fs + "@s1", dst + "/craw", ciph,
                                                 pipe=how == "raw-zstd"))
                assert guid(dst + "/craw@s1") == guid(fs + "@s1")
                continue
            destroy_tree(dst + "/csink/bench")
            settle()
            cfg = os.path.join(work, "c.yml")
            with open(cfg, "w") as f:
                f.write(config(os.path.join(work, "run-c"), dst + "/csink", [fs],
                               bed.connect_yaml(ciph),
                               "{type: stdinserver, client_identities: [bench]}",
                               send_pipe=how[0], recv_pipe=how[1]))
            bed.use(cfg)
            times[label].append(once(cfg))
            assert guid("%s/csink/bench/%s@s1" % (dst, fs)) == guid(fs + "@s1")
    stream = {fs: stream_bytes(fs + "@s1") for fs in (fs_text, fs_bulk)}
    zstd_bytes = stream_bytes(fs_text + "@s1", ["zstd", "-3", "-q", "-c"])
    print("\n(c) %d MiB pushed over ssh: stream pipelines and ciphers, medians of %d" % (mib, runs))
    print("  zstd -3 shrinks the compressible stream %.1fx (%.0f -> %.0f MiB)"
          % (stream[fs_text] / max(1, zstd_bytes), stream[fs_text] / 1048576,
             zstd_bytes / 1048576))
    med = {k: statistics.median(v) for k, v in times.items()}
    for label, fs, _, _ in cases:
        print("  %-44s %7.2f s  %7.1f MiB/s   (%s)" % (
            label, med[label], stream[fs] / 1048576 / med[label],
            ", ".join("%.2f" % x for x in times[label])))
    print("  zstd execpipe vs plain (compressible): %.2fx faster"
          % (med[cases[0][0]] / med[cases[1][0]]))
    print("  zrepl.py + zstd vs raw send | zstd | ssh: %.2fx raw throughput"
          % (med[cases[2][0]] / med[cases[1][0]]))
    print("  %s: zrepl.py vs raw: %.2fx raw throughput; default cipher: %.2fx"
          % (cipher, med[cases[5][0]] / med[cases[4][0]], med[cases[7][0]] / med[cases[6][0]]))


def stream_bytes(snapshot, *filters):
    """Bytes of `zfs send snapshot`, after the filter commands (e.g. zstd) if any."""
    procs = [subprocess.Popen(["zfs", "send", snapshot], stdout=subprocess.PIPE, env=ENV)]
    for argv in filters:
        procs.append(subprocess.Popen(argv, stdin=procs[-1].stdout, stdout=subprocess.PIPE))
        procs[-2].stdout.close()
    n = 0
    while True:
        b = procs[-1].stdout.read(1 << 20)
        if not b:
            break
        n += len(b)
    for p in procs:
        p.wait()
    return n


def logging_bin(work, name):
    d = os.path.join(work, "bin-" + name)
    os.makedirs(d, exist_ok=True)
    log = os.path.join(work, name + ".log")
    for tool in ("zfs", "ssh"):
        real = shutil.which(tool, path=ENV["PATH"])
        with open(os.path.join(d, tool), "w") as f:
            f.write('#!/bin/sh\necho "%s $1" >> %s\nexec %s "$@"\n' % (tool, log, real))
        os.chmod(os.path.join(d, tool), 0o755)
    return d, log


def count(log, tool):
    if not os.path.exists(log):
        return 0
    with open(log) as f:
        return sum(1 for ln in f if ln.startswith(tool + " "))


def bench_b(bed, src, dst, work, runs):
    root = src + "/many"
    fss = [root] + ["%s/c%02d" % (root, i) for i in range(19)]
    for fs in fss:
        sh("zfs", "create", "-o", "mountpoint=none", fs)
        sh("zfs", "snapshot", fs + "@s1")
    out = {}
    for transport in ("ssh", "local"):
        sink = "%s/b%s" % (dst, transport)
        sh("zfs", "create", "-o", "mountpoint=none", sink)
        cfg = os.path.join(work, "b-%s.yml" % transport)
        connect = bed.connect_yaml() if transport == "ssh" else \
            "{type: local, listener_name: l, client_identity: bench}"
        serve = "{type: stdinserver, client_identities: [bench]}" if transport == "ssh" else \
            "{type: local, listener_name: l}"
        with open(cfg, "w") as f:
            f.write(config(os.path.join(work, "run-b" + transport), sink, [root + "<"][:1],
                           connect, serve).replace('"%s": true' % root, '"%s<": true' % root))
        bed.use(cfg)
        once(cfg)                                   # the initial replication
        active_bin, active_log = logging_bin(work, "active-" + transport)
        passive_bin, passive_log = logging_bin(work, "passive-" + transport)
        env = dict(ENV, PATH=active_bin + ":" + ENV["PATH"])
        bed.use(cfg, {"PATH": passive_bin + ":" + ENV["PATH"]})
        walls = []
        for _ in range(runs):
            for log in (active_log, passive_log):
                if os.path.exists(log):
                    os.unlink(log)
            walls.append(once(cfg, env))
        out[transport] = (statistics.median(walls), count(active_log, "ssh"),
                          count(active_log, "zfs"), count(passive_log, "zfs"))
        for fs in fss:
            assert guid("%s/bench/%s@s1" % (sink, fs)) == guid(fs + "@s1")
    print("\n(b) no-change push of 20 filesystems, medians of %d" % runs)
    print("  %-8s %8s %14s %16s %17s" % ("", "wall", "ssh processes", "zfs (this side)",
                                          "zfs (other side)"))
    for transport, (wall, n_ssh, z_here, z_there) in out.items():
        print("  %-8s %7.2fs %14d %16d %17s" % (transport, wall, n_ssh, z_here,
                                                z_there if transport == "ssh" else "(same process)"))
    print("  ratio ssh / local wall: %.2f" % (out["ssh"][0] / out["local"][0]))


def main():
    global ZREPL
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="a,b,c")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--zrepl", default=ZREPL,
                    help="the zrepl.py (or zrepl.pyz) on both ends; default: this repository's")
    args = ap.parse_args()
    ZREPL = os.path.abspath(args.zrepl)
    print("ssh benchmark: %s, zrepl.py: %s" % (time.strftime("%Y-%m-%d %H:%M"), ZREPL),
          flush=True)
    work = tempfile.mkdtemp(prefix="zreplpy-bench-ssh-", dir="/var/tmp")
    bed = Bed(work)
    # (a) leaves a copy behind and (c) adds two streams of SIZE: room for all (sparse files)
    src, dst = make_pools(work, max(3 << 30, (args.size_mib * 6) << 20))
    try:
        if "a" in args.only:
            bench_a(bed, src, dst, work, args.size_mib, args.runs)
        if "b" in args.only:
            bench_b(bed, src, dst, work, args.runs)
        if "c" in args.only:
            bench_c(bed, src, dst, work, args.size_mib, args.runs)
    finally:
        bed.stop()
        for pool in (src, dst):
            sh("zpool", "destroy", "-f", pool, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
