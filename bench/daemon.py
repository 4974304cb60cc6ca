#!/usr/bin/env python3
"""Daemon benchmark: what `zrepl.py daemon` costs idle, how fast it stops, and one sink
under 50 tcp clients at once, side by side with the same clients one after another.

  a  idle: a daemon with a tcp sink, a manual push and a periodic snap job (10 minutes)
     is left alone for --idle seconds (default 60); CPU seconds it used (utime + stime
     from /proc/PID/stat), its threads and open fds.
  b  SIGTERM during a transfer: a push held to 2 MiB/s by its bandwidth limit is woken
     with `signal wakeup`; once bytes move, SIGTERM; seconds until the daemon exited, the
     report's state, zfs processes left behind.
  c  50 tcp clients: 50 push jobs (own configurations and rundirs, one filesystem of
     --mib MiB each) run `once` at the same moment against one daemon's tcp sink; the
     wall time vs one client's median time x 50; every received snapshot's GUID checked.

    python3 bench/daemon.py [--only a,b,c] [--idle 60] [--clients 50] [--mib 4]

Needs root and a ZFS (zfs-fuse will do), Linux's /proc for a. Makes and destroys its own
file-backed pools under /var/tmp.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ssh import ENV, ZREPL, destroy_tree, free_port, guid, make_pools, sh, write_data  # noqa

KEEP_ALL = "[{type: regex, regex: '.*'}]"


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_and_fds(pid):
    with open("/proc/%d/status" % pid) as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return threads, len(os.listdir("/proc/%d/fd" % pid))


class Daemon:
    def __init__(self, work, tag, jobs):
        self.rundir = os.path.join(work, tag + "-run")
        self.cfg = os.path.join(work, tag + ".yml")
        with open(self.cfg, "w") as f:
            f.write("global: {rundir: %s}\njobs:\n%s" % (self.rundir, jobs))
        self.proc = subprocess.Popen([sys.executable, ZREPL, "--config", self.cfg, "daemon"],
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     universal_newlines=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(self.rundir, "control")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start:\n%s" % (self.proc.communicate(),))
            time.sleep(0.05)

    def cli(self, *args):
        return sh(sys.executable, ZREPL, "--config", self.cfg, *args, check=False)

    def stop(self):
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=120)
        return time.monotonic() - t0, self.proc.returncode, out + err


def sink(root, port):
    sh("zfs", "create", "-p", "-o", "mountpoint=none", root)
    return ("  - name: sink\n    type: sink\n    root_fs: %s\n    serve: {type: tcp, listen: "
            "\"127.0.0.1:%d\", clients: {\"127.0.0.1\": host1}}\n" % (root, port))


def push(fs, connect, extra=""):
    return ("  - name: push\n    type: push\n    connect: %s\n    filesystems: {\"%s\": true}\n"
            "    snapshotting: {type: manual}\n    pruning: {keep_sender: %s, keep_receiver: "
            "%s}\n%s" % (connect, fs, KEEP_ALL, KEEP_ALL, extra))


def bench_a(work, src, dst, seconds):
    sh("zfs", "create", "-p", src + "/idle/a")
    sh("zfs", "snapshot", src + "/idle/a@s1")
    port = free_port()
    d = Daemon(work, "idle", sink(dst + "/idle", port) + push(
        src + "/idle/a", "{type: tcp, address: \"127.0.0.1:%d\"}" % port) +
        "  - name: snapper\n    type: snap\n    filesystems: {\"%s/idle<\": true}\n"
        "    snapshotting: {type: periodic, prefix: zrepl_, interval: 10m}\n"
        "    pruning: {keep: %s}\n" % (src, KEEP_ALL))
    time.sleep(5)                           # start-up done, first snapshot round taken
    c0, (th, fds) = cpu_seconds(d.proc.pid), threads_and_fds(d.proc.pid)
    time.sleep(seconds)
    c1 = cpu_seconds(d.proc.pid)
    took, rc, out = d.stop()
    print("a  idle daemon: %.2f CPU seconds in %d s (%.3f%%); %d threads, %d fds; exit %d"
          % (c1 - c0, seconds, 100 * (c1 - c0) / seconds, th, fds, rc))


def bench_b(work, src, dst):
    fs = src + "/term/a"
    sh("zfs", "create", "-p", fs)
    write_data(fs, 32, work)
    sh("zfs", "snapshot", fs + "@s1")
    port = free_port()
    d = Daemon(work, "term", sink(dst + "/term", port) + push(
        fs, "{type: tcp, address: \"127.0.0.1:%d\"}" % port,
        "    send: {bandwidth_limit: {max: 2 MiB, bucket_capacity: 256 KiB}}\n"))
    d.cli("signal", "wakeup", "push")
    moved = 0
    deadline = time.monotonic() + 60
    while moved < (1 << 20) and time.monotonic() < deadline:
        doc = json.loads(d.cli("status", "--json").stdout)
        cur = doc["jobs"]["push"]["current"] or {}
        moved = (cur.get("replication") or {}).get("bytes_replicated", 0)
        time.sleep(0.1)
    took, rc, out = d.stop()
    with open(os.path.join(d.rundir, "last", "push.json")) as f:
        report = json.load(f)
    state = report["state"]
    if state != "interrupted":
        raise SystemExit("the push did not run as planned: %s\n%s" % (report["errors"], out))
    left = sh("pgrep", "-f", "zfs (send|recv|receive)", check=False).stdout.split()
    print("b  SIGTERM with %.1f MiB moved: exit %d after %.2f s; report %s; zfs processes "
          "left: %d" % (moved / (1 << 20), rc, took, state, len(left)))


def bench_c(work, src, dst, clients, mib, runs):
    base = src + "/many"
    for i in range(clients):
        sh("zfs", "create", "-p", "%s/c%02d" % (base, i))
        write_data("%s/c%02d" % (base, i), mib, work)
    sh("zfs", "snapshot", "-r", base + "@s1")
    port = free_port()
    root = dst + "/many"
    d = Daemon(work, "many", sink(root, port))
    connect = "{type: tcp, address: \"127.0.0.1:%d\"}" % port
    cfgs = []
    for i in range(clients):
        cfg = os.path.join(work, "client%02d.yml" % i)
        with open(cfg, "w") as f:
            f.write("global: {rundir: %s/client%02d-run}\njobs:\n%s"
                    % (work, i, push("%s/c%02d" % (base, i), connect)))
        cfgs.append(cfg)
    parent = os.path.join(work, "parent.yml")    # the placeholders above every c<i>, once
    with open(parent, "w") as f:
        f.write("global: {rundir: %s/parent-run}\njobs:\n%s" % (work, push(base, connect)))

    def reset():
        destroy_tree(root + "/host1")
        sh(sys.executable, ZREPL, "--config", parent, "once")

    def run(cfg_list):
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, ZREPL, "--config", c, "once"], env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True) for c in cfg_list]
        fails = [p.communicate()[1] for p in procs if p.wait() != 0]
        took = time.monotonic() - t0
        if fails:
            raise SystemExit("%d clients failed, e.g.:\n%s" % (len(fails), fails[0]))
        return took

    singles, together = [], []
    for _ in range(runs):
        reset()
        singles.append(run(cfgs[:1]))
        reset()
        together.append(run(cfgs))
        bad = [i for i in range(clients) if guid("%s/host1/%s/c%02d@s1" % (root, base, i))
               != guid("%s/c%02d@s1" % (base, i))]
        if bad:
            raise SystemExit("clients %s: received GUIDs differ" % bad)
    took, rc, out = d.stop()
    one, many = statistics.median(singles), statistics.median(together)
    print("c  %d tcp clients x %d MiB into one sink: %.1f s together vs one client %.2f s "
          "x %d = %.1f s (%.2fx); all GUIDs equal; daemon exit %d"
          % (clients, mib, many, one, clients, one * clients, one * clients / many, rc))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="a,b,c")
    ap.add_argument("--idle", type=int, default=60)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="zreplpy-bench-daemon-", dir="/var/tmp")
    src, dst = make_pools(work, max(1 << 30, (args.clients * args.mib * 3) << 20))
    try:
        if "a" in args.only:
            bench_a(work, src, dst, args.idle)
        if "b" in args.only:
            bench_b(work, src, dst)
        if "c" in args.only:
            bench_c(work, src, dst, args.clients, args.mib, args.runs)
    finally:
        for pool in (src, dst):
            sh("zpool", "destroy", "-f", pool, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
