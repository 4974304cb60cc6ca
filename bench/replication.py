#!/usr/bin/env python3
"""Replication benchmark: zrepl.py vs raw zfs send|recv and peer tools, side by side in one run.

  a  bulk: one dataset holding SIZE MiB of incompressible data, full replication by
     `zrepl.py once` (push -> sink over the `local` transport) vs a raw
     `zfs send fs@s | zfs recv -u dst` and the same with a Python relay in between (a
     read/write loop; os.splice with 1 MiB pipes); MiB/s of each, zrepl.py against the best
     of those pipes, and zrepl.py's fixed cost (a no-change run).
  b  20 filesystems (a root + 19 children) x 10 snapshots: the initial replication (all 200
     snapshots) and a no-change incremental (one new snapshot on all 20), for
     zrepl.py with batch_incrementals true and false, raw `zfs send -R` (the lower bound),
     pyznap and syncoid; wall times, ratios and zfs processes per tool.
  c  a no-change cycle on N filesystems (default 1,000): one `zrepl.py once --snapshot never`
     with nothing to do vs one `zfs list -H -t all -r` of the source tree. The destination is
     first filled by one raw `zfs send -R` into zrepl.py's layout, which a first zrepl.py run
     adopts (--c-seed raw, seconds), or by zrepl.py's own initial replication (--c-seed zrepl:
     minutes for 1,000 filesystems on zfs-fuse, see bench/README.md).

Every run is checked afterwards (snapshot count on the destination, GUIDs equal to the
source), so a broken run cannot pass as fast. Times are medians of --runs runs (min-max
shown); runs of the tools are interleaved so drift hits them alike. Every zfs/zpool process
of every tool, raw pipelines included, goes through a logging wrapper first in PATH, which
counts them (and costs each process about the same, under 1 ms; measured and printed).

    python3 bench/replication.py [--only a,b,c] [--runs 3] [--size-mib 1024]
                                 [--filesystems 1000] [--c-seed raw|zrepl] [--no-install]

Needs root and a ZFS (zfs-fuse will do). Makes and destroys its own file-backed pools under
/var/tmp. Peers: syncoid comes from `apt-get install -y sanoid`, pyznap from a venv
(`--venv`, default /var/tmp/zreplpy-bench-venv); both are installed if missing unless
--no-install. A peer that cannot be installed or run is reported as unavailable.
"""
import argparse
import collections
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZREPL = os.path.join(REPO, "zrepl.py")
ENV = dict(os.environ, LC_ALL="C", PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
IDENTITY = "bench"        # client_identity of the push job: sink root_fs/bench/<sender path>
PROBLEMS = []             # zrepl.py failures, reported at the end with command and error


def sh(*argv, check=True, env=None, timeout=None):
    return subprocess.run(argv, check=check, env=env or ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


class Unavailable(Exception):
    pass


class RunFailed(Exception):
    pass


def tail(text, n=300):
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


def med(values):
    return statistics.median(values)


def spread(values):
    return "%.2f-%.2f" % (min(values), max(values)) if len(values) > 1 else "%.2f" % values[0]


# --------------------------------------------------------------------------------------------
# the environment: pools, the logging wrapper, cleanup


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="zreplpy-bench-rep-", dir="/var/tmp")
        self.mnt = os.path.join(self.tmp, "mnt")
        os.mkdir(self.mnt)
        self.pools = []           # (name, image file)
        self.log = os.path.join(self.tmp, "calls.log")
        self.bindir = os.path.join(self.tmp, "bin")
        os.mkdir(self.bindir)
        for cmd in ("zfs", "zpool"):
            real = shutil.which(cmd, path=ENV["PATH"])
            if not real:
                sys.exit("%s not found: this benchmark needs a ZFS" % cmd)
            path = os.path.join(self.bindir, cmd)
            with open(path, "w") as f:
                f.write('#!/bin/sh\necho "%s $*" >> %s\nexec %s "$@"\n' % (cmd, self.log, real))
            os.chmod(path, 0o755)
        self.wenv = dict(ENV, PATH=self.bindir + ":" + ENV["PATH"])

    # pools ------------------------------------------------------------------------------
    def make_pool(self, tag, size):
        name = "zbrep%d%s" % (os.getpid(), tag)
        img = "/var/tmp/%s.img" % name
        sh("truncate", "-s", size, img)
        self.pools.append((name, img))
        sh("zpool", "create", "-m", "none", name, img)
        return name

    def drop_pool(self, name):
        for p in list(self.pools):
            if p[0] == name:
                unmount_tree(name)
                r = sh("zpool", "destroy", "-f", name, check=False)
                if r.returncode != 0:
                    time.sleep(1)
                    sh("zpool", "destroy", "-f", name, check=False)
                if os.path.exists(p[1]):
                    os.unlink(p[1])
                self.pools.remove(p)

    def cleanup(self):
        for name, _ in list(self.pools):
            try:
                self.drop_pool(name)
            except Exception as e:  # keep cleaning the others
                print("cleanup: pool %s: %s" % (name, e), file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # counting ---------------------------------------------------------------------------
    def reset_calls(self):
        if os.path.exists(self.log):
            os.unlink(self.log)

    def calls(self):
        """The zfs/zpool processes since reset_calls() -> Counter of 'zfs get', ..."""
        c = collections.Counter()
        if os.path.exists(self.log):
            with open(self.log) as f:
                for line in f:
                    w = line.split()
                    if w:
                        c[" ".join(w[:2])] += 1
        self.reset_calls()
        return c

    def timed(self, fn):
        """Run fn() with the call log reset -> (seconds, Counter of zfs calls)."""
        self.reset_calls()
        t = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t
        return elapsed, self.calls()


def fmt_calls(c):
    zfs = sum(v for k, v in c.items() if k.startswith("zfs "))
    zpool = sum(v for k, v in c.items() if k.startswith("zpool "))
    parts = ["%s %d" % (k.split()[1], v) for k, v in c.most_common() if k.startswith("zfs ")]
    s = "%d zfs" % zfs
    if parts:
        s += " (" + ", ".join(parts) + ")"
    if zpool:
        s += " + %d zpool" % zpool
    return s


def n_zfs(c):
    return sum(v for k, v in c.items() if k.startswith("zfs "))


# --------------------------------------------------------------------------------------------
# zfs helpers (unwrapped: setup and verification are not counted)


def exists(ds):
    return sh("zfs", "list", "-H", "-o", "name", ds, check=False).returncode == 0


def unmount_tree(ds):
    r = sh("zfs", "list", "-H", "-o", "name,mounted", "-t", "filesystem", "-r", ds, check=False)
    names = [ln.split("\t")[0] for ln in r.stdout.splitlines() if ln.endswith("\tyes")]
    for n in sorted(names, reverse=True):
        sh("zfs", "unmount", n, check=False)


def release_recorded_holds(ds):
    """Release every hold under ds: those `zfs holds -r` lists (OpenZFS) and those zrepl.py
    recorded in `zrepl:holds` (zfs-fuse, whose `zfs holds` is broken)."""
    r = sh("zfs", "get", "-Hp", "-r", "-o", "name,value", "userrefs", ds, check=False)
    held = [ln.split("\t")[0] for ln in r.stdout.splitlines()
            if "@" in ln and ln.split("\t")[-1] not in ("0", "-")]
    r = sh("zfs", "holds", "-H", *held, check=False) if held else None
    for line in r.stdout.splitlines() if r and r.returncode == 0 else ():
        f = line.split("\t")
        if len(f) >= 2 and "@" in f[0]:
            sh("zfs", "release", f[1], f[0], check=False)
    r = sh("zfs", "get", "-Hp", "-r", "-o", "name,value,source", "zrepl:holds", ds, check=False)
    for line in r.stdout.splitlines():
        f = line.split("\t")
        if len(f) == 3 and "@" in f[0] and f[2] == "local" and f[1] not in ("", "-"):
            for tag in f[1].split(","):
                sh("zfs", "release", tag, f[0], check=False)


def destroy_tree(ds):
    if not exists(ds):
        return
    unmount_tree(ds)
    release_recorded_holds(ds)
    for attempt in range(3):
        r = sh("zfs", "destroy", "-r", ds, check=False)
        if r.returncode == 0 or not exists(ds):
            return
        time.sleep(1)
    raise RuntimeError("cannot destroy %s: %s" % (ds, tail(r.stderr)))


def settle(pool):
    """Wait until pool has freed what destroys left it (OpenZFS frees in the background):
    else the next run would compete with that freeing, or find the pool still full."""
    sh("zpool", "sync", pool, check=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        r = sh("zpool", "get", "-Hp", "-o", "value", "freeing", pool, check=False)
        if r.returncode != 0 or r.stdout.strip() in ("0", "-", ""):
            return                      # done, or a ZFS that frees at once (zfs-fuse)
        time.sleep(0.2)
    raise RuntimeError("pool %s still freeing after 300 s" % pool)


def snapshot_guids(root):
    """{path relative to root + @snap: guid} for every snapshot under root."""
    r = sh("zfs", "get", "-Hp", "-r", "-o", "name,value", "guid", root, check=False)
    out = {}
    for line in r.stdout.splitlines():
        name, _, guid = line.partition("\t")
        if "@" in name:
            out[name[len(root):]] = guid
    return out


def verify(src, dst, expected):
    """dst holds exactly src's snapshots (by relative name and GUID) and `expected` of them."""
    s, d = snapshot_guids(src), snapshot_guids(dst)
    if len(d) != expected:
        raise RunFailed("destination %s has %d snapshots, expected %d" % (dst, len(d), expected))
    if s != d:
        bad = sorted(k for k in set(s) | set(d) if s.get(k) != d.get(k))
        raise RunFailed("destination %s differs from source %s in %d snapshots (e.g. %s)"
                        % (dst, src, len(bad), bad[0]))


def raw_pipe(send_argv, recv_argv, env):
    """zfs send ... | zfs recv ..., both exit statuses checked."""
    snd = subprocess.Popen(send_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    rcv = subprocess.Popen(recv_argv, stdin=snd.stdout, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env)
    snd.stdout.close()
    rout, rerr = rcv.communicate()
    serr = snd.stderr.read()
    snd.wait()
    if snd.returncode or rcv.returncode:
        raise RunFailed("%s | %s: rc %s %s: %s %s" % (" ".join(send_argv), " ".join(recv_argv),
                                                      snd.returncode, rcv.returncode,
                                                      tail(serr.decode()), tail(rerr.decode())))


# two userspace relays, run as `zfs send | python3 -c RELAY | zfs recv`: how much any copy loop
# between the two zfs processes costs on this machine (diagnostics for (a))
RELAY_RW = """
import os
while True:
    b = os.read(0, 1 << 20)          # zrepl.py's _relay loop: 1 MiB reads, default pipe size
    if not b:
        break
    v = memoryview(b)
    while v:
        v = v[os.write(1, v):]
"""
RELAY_SPLICE = """
import fcntl, os
for fd in (0, 1):
    fcntl.fcntl(fd, 1031, 1 << 20)   # F_SETPIPE_SZ: 1 MiB pipes
while os.splice(0, 1, 1 << 20):      # zero-copy, still counts bytes
    pass
"""


def both_listings(argvs, env):
    """Run the listings side by side; each must succeed."""
    procs = [subprocess.Popen(a, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              universal_newlines=True)
             for a in argvs]
    for a, p in zip(argvs, procs):
        err = p.communicate()[1]
        if p.returncode != 0:
            raise RuntimeError("%s exited %d: %s" % (" ".join(a), p.returncode, tail(err)))


def relay_pipe(send_argv, relay_code, recv_argv, env):
    snd = subprocess.Popen(send_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    rel = subprocess.Popen([sys.executable, "-c", relay_code], stdin=snd.stdout,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    snd.stdout.close()
    rcv = subprocess.Popen(recv_argv, stdin=rel.stdout, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env)
    rel.stdout.close()
    _, rerr = rcv.communicate()
    lerr = rel.stderr.read()
    serr = snd.stderr.read()
    rel.wait()
    snd.wait()
    if snd.returncode or rel.returncode or rcv.returncode:
        raise RunFailed("send | relay | recv: rc %s %s %s: %s %s %s"
                        % (snd.returncode, rel.returncode, rcv.returncode, tail(serr.decode()),
                           tail(lerr.decode()), tail(rerr.decode())))


def calibrate_wrapper(bench, ds):
    """Cost of one zfs process, plain and through the counting wrapper (median of 3 x 20)."""
    out = []
    for env in (ENV, bench.wenv):
        per = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(20):
                sh("zfs", "get", "-H", "-o", "value", "guid", ds, env=env)
            per.append((time.perf_counter() - t) / 20)
        out.append(med(per) * 1000)
    bench.reset_calls()
    return out


# --------------------------------------------------------------------------------------------
# zrepl.py


def zrepl_config(bench, name, filesystems, sink_root, batch=True, initial="most_recent"):
    rundir = os.path.join(bench.tmp, "run-" + name)
    path = os.path.join(bench.tmp, name + ".yml")
    fs = ", ".join('"%s": true' % k for k in filesystems)
    with open(path, "w") as f:
        f.write("global: {rundir: %s}\n"
                "jobs:\n"
                "  - name: bench_sink\n"
                "    type: sink\n"
                "    root_fs: %s\n"
                "    serve: {type: local, listener_name: bench}\n"
                "  - name: bench_push\n"
                "    type: push\n"
                "    connect: {type: local, listener_name: bench, client_identity: %s}\n"
                "    filesystems: {%s}\n"
                "    snapshotting: {type: manual}\n"
                "    conflict_resolution: {initial_replication: %s}\n"
                "    replication: {batch_incrementals: %s}\n"
                "    pruning:\n"
                "      keep_sender: [{type: regex, regex: \".*\"}]\n"
                "      keep_receiver: [{type: regex, regex: \".*\"}]\n"
                % (rundir, sink_root, IDENTITY, fs, initial, "true" if batch else "false"))
    return path


def run_rss(argv, env):
    """Run argv to completion -> (CompletedProcess, peak RSS in MiB of it and the children
    it waited for: os.wait4's rusage, read for this one process, not the bench's others).
    ru_maxrss is KiB on Linux and the BSDs."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status) if hasattr(
            os, "waitstatus_to_exitcode") else (status >> 8)
        out.seek(0)
        err.seek(0)
        cp = subprocess.CompletedProcess(argv, p.returncode,
                                         out.read().decode("utf-8", "replace"),
                                         err.read().decode("utf-8", "replace"))
    return cp, usage.ru_maxrss / 1024.0


def run_zrepl(bench, config, what, env=None):
    """`zrepl.py --config CFG once --snapshot never --json` through the wrapper (or in env)
    -> report; its peak RSS (MiB) is left in bench.last_rss."""
    argv = [sys.executable, bench.args.zrepl, "--config", config, "once", "--snapshot", "never",
            "--json"]
    cp, bench.last_rss = run_rss(argv, bench.wenv if env is None else env)
    doc = None
    try:
        doc = json.loads(cp.stdout)
    except ValueError:
        pass
    bad = []
    if doc:
        for job in doc.get("jobs", []):
            rep = job.get("replication") or {}
            for fs in rep.get("filesystems", []):
                if fs.get("state") not in ("done", "uptodate"):
                    bad.append("%s: %s %s" % (fs.get("fs"), fs.get("state"),
                                              json.dumps(fs.get("error") or fs.get("conflict"))))
            for e in job.get("errors") or []:
                bad.append(json.dumps(e))
    if cp.returncode != 0 or doc is None or bad:
        msg = ("%s: `%s` (config %s) exited %d; stderr: %s; report: %s"
               % (what, " ".join(argv[1:]), config, cp.returncode, tail(cp.stderr, 600),
                  "; ".join(bad)[:600] or tail(cp.stdout, 300)))
        with open(config) as f:
            msg += "\n      config:\n        " + f.read().strip().replace("\n", "\n        ")
        PROBLEMS.append(msg)
        raise RunFailed("zrepl.py exited %d: %s"
                        % (cp.returncode, tail(cp.stderr or "; ".join(bad))))
    return doc


# --------------------------------------------------------------------------------------------
# peers


def find_syncoid(install):
    path = shutil.which("syncoid", path=ENV["PATH"])
    if not path and install:
        r = sh("apt-get", "install", "-y", "sanoid", check=False, timeout=600,
               env=dict(ENV, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode != 0:
            raise Unavailable("apt-get install -y sanoid failed (%d): %s"
                              % (r.returncode, tail(r.stderr, 200)))
        path = shutil.which("syncoid", path=ENV["PATH"])
    if not path:
        raise Unavailable("syncoid not installed (apt-get install -y sanoid)"
                          + ("" if install else "; --no-install given"))
    return path


def find_pyznap(venv, install):
    exe = os.path.join(venv, "bin", "pyznap")
    if not os.path.exists(exe) and install:
        if not os.path.exists(os.path.join(venv, "bin", "pip")):
            r = sh(sys.executable, "-m", "venv", venv, check=False, timeout=300)
            if r.returncode != 0:
                raise Unavailable("python3 -m venv %s failed: %s" % (venv, tail(r.stderr, 200)))
        r = sh(os.path.join(venv, "bin", "pip"), "install", "-q", "pyznap", check=False,
               timeout=600)
        if r.returncode != 0:
            raise Unavailable("pip install pyznap failed (%d): %s"
                              % (r.returncode, tail(r.stderr, 200)))
    if not os.path.exists(exe):
        raise Unavailable("pyznap not found at %s" % exe
                          + ("" if install else "; --no-install given"))
    return exe


# --------------------------------------------------------------------------------------------
# (a) bulk


def write_snapshot(bench, fs, mib, block, *props):
    """Create fs (with props), write `mib` blocks of 1 MiB from block() into one file
    through a temporary mountpoint, unmount it (mountpoint=none), snapshot fs@s."""
    mnt = os.path.join(bench.mnt, fs.replace("/", "_"))
    sh("zfs", "create", "-o", "mountpoint=" + mnt, *[a for p in props for a in ("-o", p)], fs)
    with open(os.path.join(mnt, "data"), "wb") as f:
        for _ in range(mib):
            f.write(block())
        f.flush()
        os.fsync(f.fileno())
    unmount_tree(fs)
    sh("zfs", "set", "mountpoint=none", fs)
    sh("zfs", "snapshot", fs + "@s")


def williams_order(tools, k):
    """Round k's order of tools (a Williams square): over len(tools) rounds, an even
    number, every tool runs once in every position and once right after every other
    tool. A run is not independent of the one before it (a GiB destroyed, its frees and
    writeback: until stop 25 the splice relay always ran right after the slow read/write
    one, and zrepl.py measured 0.91x it at 4 GiB there, 0.97x with the two alternating)."""
    n = len(tools)
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    return [tools[(i + k) % n] for i in first]


def bench_bulk(bench, args):
    rounds = -(-args.runs // 4) * 4         # whole Williams squares of the four pipes
    print("== (a) bulk: one dataset, %d MiB incompressible, full replication (median of %d "
          "rounds, --runs rounded up to a multiple of 4)" % (args.size_mib, rounds), flush=True)
    pool_size = "%dM" % max(512, args.size_mib * 5 // 2)
    src = bench.make_pool("as", pool_size)
    dst = bench.make_pool("ad", pool_size)
    try:
        fs = src + "/bulk"
        t = time.perf_counter()
        write_snapshot(bench, fs, args.size_mib, lambda: os.urandom(1 << 20))
        # stream size, and how fast zfs send alone can go (the sender's ceiling)
        t2 = time.perf_counter()
        p = subprocess.Popen(["zfs", "send", fs + "@s"], stdout=subprocess.PIPE, env=ENV)
        nbytes = 0
        while True:
            b = p.stdout.read(1 << 20)
            if not b:
                break
            nbytes += len(b)
        p.wait()
        send_only = time.perf_counter() - t2
        mib = nbytes / 1048576.0
        print("setup: wrote %d MiB in %.1f s; stream %.1f MiB; `zfs send > pipe` alone %.2f s = "
              "%.0f MiB/s" % (args.size_mib, t2 - t, mib, send_only, mib / send_only), flush=True)
        # which way zrepl.py's local stream goes here: `zfs send` straight into `zfs
        # receive`, or through zrepl.py's relay (`version` says, from the same checks)
        v = subprocess.run([sys.executable, args.zrepl, "version", "--json"], env=bench.wenv,
                           stdout=subprocess.PIPE, universal_newlines=True)
        try:
            streams = json.loads(v.stdout)["zfs"].get("local_streams") or "?"
        except (ValueError, KeyError):
            streams = "?"
        print("zrepl.py's local streams here: %s" % streams, flush=True)

        sh("zfs", "create", "-o", "mountpoint=none", dst + "/raw")
        sh("zfs", "create", "-o", "mountpoint=none", dst + "/zr")
        cfg = zrepl_config(bench, "bulk", [fs], dst + "/zr")
        zdst = "%s/zr/%s" % (dst, IDENTITY)
        labels = collections.OrderedDict([
            ("raw", "raw zfs send | zfs recv -u"),
            ("zrepl", "zrepl.py once"),
            ("zrepl_fixed", "  zrepl.py no-change once (fixed cost)"),
            ("relay_rw", "  send | python read/write relay | recv"),
            ("relay_splice", "  send | python splice relay | recv")])
        if not hasattr(os, "splice"):
            del labels["relay_splice"]
        times = {k: [] for k in labels}
        counts = {}
        failed = {}
        send = ["zfs", "send", fs + "@s"]
        raw_target = dst + "/raw/bulk"
        ztarget = "%s/%s" % (zdst, fs)
        # every pipe is timed with the real zfs in PATH: the counting wrapper costs each
        # zfs process a shell's start (35 ms under the OpenZFS lane's emulation), which
        # would weigh on zrepl.py's dozen processes, not on a pipe's two; zrepl.py's
        # calls are counted in one more, untimed pass through the wrapper at the end
        # raw receives into a parent that exists; so does zrepl.py: one untimed run makes
        # its placeholders above the target, and each timed run destroys just the target
        try:
            run_zrepl(bench, cfg, "(a) placeholders", env=ENV)
        except RunFailed as e:
            failed["zrepl"] = str(e)
        # that run received the payload too: with it beside the next pipe's copy the
        # destination pool (2.5 x the payload) was full (stop 29's raw "out of space")
        destroy_tree(ztarget)
        settle(dst)
        for k in range(rounds):
            for tool in williams_order(("raw", "zrepl", "relay_rw", "relay_splice"), k):
                if tool in failed or tool not in labels:
                    continue
                try:
                    if tool == "zrepl":
                        target = ztarget
                        destroy_tree(target)
                        el, _ = bench.timed(lambda: run_zrepl(
                            bench, cfg, "(a) bulk run %d" % (k + 1), env=ENV))
                    else:
                        target = raw_target
                        destroy_tree(target)
                        recv = ["zfs", "recv", "-u", target]
                        if tool == "raw":
                            el, _ = bench.timed(lambda: raw_pipe(send, recv, ENV))
                        else:
                            code = RELAY_RW if tool == "relay_rw" else RELAY_SPLICE
                            el, _ = bench.timed(lambda: relay_pipe(send, code, recv, ENV))
                    verify(fs, target, 1)
                    times[tool].append(el)
                    if tool == "zrepl":
                        el, _ = bench.timed(lambda: run_zrepl(bench, cfg, "(a) no-change run",
                                                              env=ENV))
                        times["zrepl_fixed"].append(el)
                except (RunFailed, RuntimeError) as e:
                    failed[tool] = str(e)
                    print("  %s run %d FAILED: %s" % (tool, k + 1, e), flush=True)
                destroy_tree(raw_target)
                destroy_tree(ztarget)
                settle(dst)
        # the calls: a pipe's are its two; zrepl.py's through the wrapper (a first run
        # there probes, as the wrapper is another zfs program to the probes' cache)
        counts.update(raw=collections.Counter({"zfs send": 1, "zfs recv": 1}))
        counts.update(relay_rw=counts["raw"], relay_splice=counts["raw"])
        if "zrepl" not in failed:
            try:
                run_zrepl(bench, cfg, "(a) counted, warm-up")
                destroy_tree(ztarget)
                settle(dst)
                bench.reset_calls()
                run_zrepl(bench, cfg, "(a) counted run")
                counts["zrepl"] = bench.calls()
                run_zrepl(bench, cfg, "(a) counted no-change run")
                counts["zrepl_fixed"] = bench.calls()
            except RunFailed as e:
                print("  zrepl.py's counted run FAILED: %s" % e, flush=True)
            destroy_tree(ztarget)
        res = {"mib": mib}
        for tool, label in labels.items():
            if not times[tool]:
                print("  %-40s FAILED: %s" % (label, failed.get(tool, "no run")))
                continue
            m = med(times[tool])
            res[tool] = m
            rate = "" if tool == "zrepl_fixed" else "= %5.0f MiB/s" % (mib / m)
            rel = "" if tool in ("raw", "zrepl_fixed") or "raw" not in res else \
                "%.2fx raw" % (res["raw"] / m)
            print("  %-40s %6.2f s (%s) %-15s %-9s %s"
                  % (label, m, spread(times[tool]), rate, rel,
                     fmt_calls(counts.get(tool, collections.Counter()))))
        pipes = [t for t in ("raw", "relay_rw", "relay_splice") if t in res]
        if pipes and "zrepl" in res:
            # the goal: zrepl.py against the best pipe measured in this run
            best = min(pipes, key=res.get)
            ratio = res[best] / res["zrepl"]
            res.update(ratio=ratio, best=labels[best].strip())
            print("a bulk %.0f MiB full: zrepl.py %.0f MiB/s vs the best pipe (%s) %.0f MiB/s "
                  "= %.2fx (goal >= 0.95x: %s)"
                  % (mib, mib / res["zrepl"], res["best"], mib / res[best], ratio,
                     "MET" if ratio >= 0.95 else "MISSED"), flush=True)
        return res
    finally:
        bench.drop_pool(src)
        bench.drop_pool(dst)


# --------------------------------------------------------------------------------------------
# (b) 20 filesystems x 10 snapshots


B_TOOLS = [("raw", "raw zfs send -R | recv -u"),
           ("zrepl_batch", "zrepl.py batch_incr=true"),
           ("zrepl_single", "zrepl.py batch_incr=false"),
           ("pyznap", "pyznap send"),
           ("syncoid", "syncoid -r --no-sync-snap")]
B_FS, B_SNAPS = 20, 10


def build_tree(bench, root):
    """root + 19 children, 10 snapshots (`zfs snapshot -r`), 16 KiB of random data per fs per
    snapshot (as tools/zfs-fuse/peers-bench.sh); written through a temporary mountpoint,
    then unmounted and mountpoint=none."""
    mnt = os.path.join(bench.mnt, "tree")
    sh("zfs", "create", "-o", "mountpoint=" + mnt, root)
    kids = ["fs%02d" % i for i in range(1, B_FS)]
    for kid in kids:
        sh("zfs", "create", "%s/%s" % (root, kid))
    dirs = [mnt] + [os.path.join(mnt, kid) for kid in kids]
    for s in range(1, B_SNAPS + 1):
        for d in dirs:
            with open(os.path.join(d, "file%02d" % s), "wb") as f:
                f.write(os.urandom(16384))
        sh("zfs", "snapshot", "-r", "%s@s%02d" % (root, s))
    unmount_tree(root)
    sh("zfs", "set", "mountpoint=none", root)


def bench_tree(bench, args):
    print("== (b) %d filesystems x %d snapshots: initial (all %d snapshots) and no-change "
          "incremental (median of %d)" % (B_FS, B_SNAPS, B_FS * B_SNAPS, args.runs), flush=True)
    tools = dict(B_TOOLS)
    unavailable = {}
    pyznap = syncoid = None
    try:
        pyznap = find_pyznap(args.venv, not args.no_install)
    except Unavailable as e:
        unavailable["pyznap"] = str(e)
    except Exception as e:
        unavailable["pyznap"] = "install failed: %s" % e
    try:
        syncoid = find_syncoid(not args.no_install)
    except Unavailable as e:
        unavailable["syncoid"] = str(e)
    except Exception as e:
        unavailable["syncoid"] = "install failed: %s" % e
    pyznap_conf = os.path.join(bench.tmp, "pyznap.conf")   # pyznap needs one, even for send
    open(pyznap_conf, "w").close()

    src = bench.make_pool("bs", "1G")
    dst = bench.make_pool("bd", "1G")
    root = src + "/rep"
    for tool in ("raw", "pyznap", "syncoid", "zrb", "zrn"):
        sh("zfs", "create", "-o", "mountpoint=none", "%s/%s" % (dst, tool))
    plain, wrapped = calibrate_wrapper(bench, dst)
    print("one zfs process costs %.1f ms, %.1f ms through the counting wrapper (every tool "
          "pays this per process)" % (plain, wrapped), flush=True)
    cfgs = {"zrepl_batch": zrepl_config(bench, "tree_batch", [root + "<"], dst + "/zrb",
                                        batch=True, initial="all"),
            "zrepl_single": zrepl_config(bench, "tree_single", [root + "<"], dst + "/zrn",
                                         batch=False, initial="all")}
    # where each tool's copy of root lands, and what to destroy between runs
    target = {"raw": dst + "/raw/rep", "pyznap": dst + "/pyznap/rep",
              "syncoid": dst + "/syncoid/rep",
              "zrepl_batch": "%s/zrb/%s/%s" % (dst, IDENTITY, root),
              "zrepl_single": "%s/zrn/%s/%s" % (dst, IDENTITY, root)}
    cleanup = dict(target, zrepl_batch="%s/zrb/%s" % (dst, IDENTITY),
                   zrepl_single="%s/zrn/%s" % (dst, IDENTITY))

    def run(tool, phase, last, new):
        t = target[tool]
        if tool == "raw":
            if phase == "initial":
                raw_pipe(["zfs", "send", "-R", "%s@%s" % (root, last)],
                         ["zfs", "recv", "-u", t], bench.wenv)
            else:
                raw_pipe(["zfs", "send", "-R", "-I", "@" + last, "%s@%s" % (root, new)],
                         ["zfs", "recv", "-u", t], bench.wenv)
        elif tool.startswith("zrepl"):
            run_zrepl(bench, cfgs[tool], "(b) %s %s" % (tool, phase))
        elif tool == "pyznap":
            cp = sh(pyznap, "--config", pyznap_conf, "send", "-s", root, "-d", t,
                    "--dest-auto-create", env=bench.wenv, check=False, timeout=600)
            if cp.returncode != 0:
                raise RunFailed("pyznap rc %d: %s" % (cp.returncode, tail(cp.stderr + cp.stdout)))
        elif tool == "syncoid":
            cp = sh(syncoid, "-r", "--no-sync-snap", "--quiet", root, t, env=bench.wenv,
                    check=False, timeout=600)
            if cp.returncode != 0:
                raise RunFailed("syncoid rc %d: %s" % (cp.returncode, tail(cp.stderr + cp.stdout)))

    order = [t for t, _ in B_TOOLS if t not in unavailable]
    times = {(t, p): [] for t in order for p in ("initial", "incremental")}
    counts = {}
    failed = {}
    try:
        for k in range(args.runs):
            for tool in order:
                if tool in failed:
                    continue
                destroy_tree(root)
                destroy_tree(cleanup[tool])
                build_tree(bench, root)
                try:
                    last = "s%02d" % B_SNAPS
                    el, c = bench.timed(lambda: run(tool, "initial", last, None))
                    verify(root, target[tool], B_FS * B_SNAPS)
                    times[(tool, "initial")].append(el)
                    counts[(tool, "initial")] = c
                    sh("zfs", "snapshot", "-r", root + "@n1")
                    el, c = bench.timed(lambda: run(tool, "incremental", last, "n1"))
                    verify(root, target[tool], B_FS * (B_SNAPS + 1))
                    times[(tool, "incremental")].append(el)
                    counts[(tool, "incremental")] = c
                    print("  run %d %-28s initial %5.2f s, incremental %5.2f s"
                          % (k + 1, tools[tool], times[(tool, "initial")][-1], el), flush=True)
                except (RunFailed, RuntimeError, subprocess.TimeoutExpired) as e:
                    failed[tool] = str(e)
                    print("  run %d %-28s FAILED: %s" % (k + 1, tools[tool], e), flush=True)
                destroy_tree(cleanup[tool])
    finally:
        bench.drop_pool(src)
        bench.drop_pool(dst)

    res = {}
    for phase in ("initial", "incremental"):
        raw = med(times[("raw", phase)]) if times.get(("raw", phase)) else None
        for tool, label in B_TOOLS:
            if tool in unavailable:
                print("b %-11s %-28s unavailable: %s" % (phase, label, unavailable[tool]))
                continue
            v = times.get((tool, phase))
            if not v:
                print("b %-11s %-28s FAILED: %s" % (phase, label, failed.get(tool, "no run")))
                continue
            m = med(v)
            res[(tool, phase)] = m
            extra = ""
            if raw and tool != "raw":
                extra = "%5.2fx raw" % (m / raw)
            if tool.startswith("zrepl"):
                for peer in ("pyznap", "syncoid"):
                    pv = times.get((peer, phase))
                    if pv:
                        extra += ", speed-up vs %s %4.2fx" % (peer, med(pv) / m)
            print("b %-11s %-28s %6.2f s (%s)  %-55s %s"
                  % (phase, label, m, spread(v), extra, fmt_calls(counts[(tool, phase)])),
                  flush=True)
    return res, unavailable, failed


# --------------------------------------------------------------------------------------------
# (c) no-change cycle on N filesystems


def bench_nochange(bench, args):
    n = args.filesystems
    print("== (c) no-change cycle on %d filesystems (median of %d)" % (n, args.runs), flush=True)
    src = bench.make_pool("cs", "1G")
    dst = bench.make_pool("cd", "1G")
    try:
        root = src + "/many"
        t = time.perf_counter()
        sh("zfs", "create", "-o", "mountpoint=none", root)
        for i in range(n - 1):
            sh("zfs", "create", "%s/fs%04d" % (root, i))
        sh("zfs", "snapshot", "-r", root + "@c1")
        setup = time.perf_counter() - t
        print("setup: %d filesystems + snapshot -r in %.1f s" % (n, setup), flush=True)
        plain, wrapped = calibrate_wrapper(bench, root + "/fs0000")
        print("one zfs process on this pool costs %.1f ms, %.1f ms through the counting wrapper"
              % (plain, wrapped), flush=True)
        sh("zfs", "create", "-o", "mountpoint=none", dst + "/zr")
        cfg = zrepl_config(bench, "nochange", [root + "<"], dst + "/zr")
        target = "%s/zr/%s/%s" % (dst, IDENTITY, root)
        if args.c_seed == "raw":
            # the state zrepl.py's own initial replication leaves, minus its holds: the
            # placeholders zrepl.py would create (SPEC 3.3), then one send -R of the tree
            for ph in ("%s/zr/%s" % (dst, IDENTITY), "%s/zr/%s/%s" % (dst, IDENTITY, src)):
                sh("zfs", "create", "-o", "zrepl:placeholder=on", "-o", "mountpoint=none",
                   "-o", "canmount=off", ph)
            el, _ = bench.timed(lambda: raw_pipe(["zfs", "send", "-R", root + "@c1"],
                                                 ["zfs", "recv", "-u", target], ENV))
            verify(root, target, n)
            print("seed: raw zfs send -R | zfs recv -u of the tree %.1f s" % el, flush=True)
        try:
            what = ("initial replication" if args.c_seed == "zrepl"
                    else "first run (adopts the seed)")
            init, ic = bench.timed(lambda: run_zrepl(bench, cfg, "(c) " + what))
            verify(root, target, n)
        except RunFailed as e:
            print("c setup: zrepl.py %s FAILED: %s" % (what, e))
            return {}
        print("zrepl.py %s %.1f s, %s" % (what, init, fmt_calls(ic)), flush=True)
        print("  peak RSS of that run: %.1f MiB" % bench.last_rss, flush=True)
        ours, lists, dlists, blists, cs, rss = [], [], [], [], [], []
        for k in range(args.runs):
            try:
                el, c = bench.timed(lambda: run_zrepl(bench, cfg, "(c) no-change run %d" % (k + 1)))
            except RunFailed as e:
                print("c no-change zrepl.py FAILED: %s" % e)
                return {}
            rss.append(bench.last_rss)
            verify(root, target, n)
            ours.append(el)
            cs.append(c)
            el, _ = bench.timed(lambda: sh("zfs", "list", "-H", "-t", "all", "-r", root,
                                           env=bench.wenv))
            lists.append(el)
            el, _ = bench.timed(lambda: sh("zfs", "list", "-H", "-t", "all", "-r", target,
                                           env=bench.wenv))
            dlists.append(el)
            # both at once, as zrepl.py lists them: on zfs-fuse one daemon answers both
            el, _ = bench.timed(lambda: both_listings(
                [["zfs", "list", "-H", "-t", "all", "-r", x] for x in (root, target)],
                bench.wenv))
            blists.append(el)
        m, lm, dm, bm = med(ours), med(lists), med(dlists), med(blists)
        print("  zfs list -H -t all -r of the source (%d datasets)  %6.2f s (%s)"
              % (2 * n, lm, spread(lists)))
        print("  the same listing of the destination tree         %6.2f s (%s)"
              % (dm, spread(dlists)))
        print("  both listings side by side                       %6.2f s (%s)"
              % (bm, spread(blists)))
        print("c no-change %d fs: zrepl.py once %.2f s (%s), %s vs one zfs list of the source "
              "%.2f s: %.2fx (%.2fx the two listings src+dst, %.2fx the two side by side)"
              % (n, m, spread(ours), fmt_calls(cs[-1]), lm, m / lm, m / (lm + dm), m / bm),
              flush=True)
        print("  peak RSS of zrepl.py's no-change runs: %.1f MiB (max)" % max(rss), flush=True)
        return {"zrepl": m, "list": lm, "dlist": dm, "both": bm, "calls": n_zfs(cs[-1]),
                "initial": init, "rss": max(rss)}
    finally:
        bench.drop_pool(src)
        bench.drop_pool(dst)


TRACE_WRAPPER = """#!/bin/sh
s=$(date +%%s.%%N)
%s "$@"
rc=$?
echo "$s $(date +%%s.%%N) $rc %s $*" >> %s
exit $rc
"""


def bench_trace(bench, args):
    """(t) Where one incremental's time goes: (b)'s tree replicated by zrepl.py, one new
    snapshot on all 20, then one run with every zfs/zpool process timed (start and end)
    by a wrapper. Prints the timeline, relative to the start of zrepl.py."""
    print("== (t) trace of one incremental, %d filesystems" % B_FS, flush=True)
    src = bench.make_pool("ts", "1G")
    dst = bench.make_pool("td", "1G")
    try:
        root = src + "/rep"
        build_tree(bench, root)
        sh("zfs", "create", "-o", "mountpoint=none", dst + "/zr")
        cfg = zrepl_config(bench, "trace", [root + "<"], dst + "/zr", initial="all")
        tbin = os.path.join(bench.tmp, "tbin")
        os.makedirs(tbin, exist_ok=True)
        log = os.path.join(bench.tmp, "trace.log")
        for cmd in ("zfs", "zpool"):
            path = os.path.join(tbin, cmd)
            with open(path, "w") as f:
                f.write(TRACE_WRAPPER % (shutil.which(cmd, path=ENV["PATH"]), cmd, log))
            os.chmod(path, 0o755)
        env = dict(ENV, PATH=tbin + ":" + ENV["PATH"])
        argv = [sys.executable, args.zrepl, "--config", cfg, "once", "--snapshot", "never",
                "--json"]
        # the initial replication and a no-change run through the same wrapper: the
        # probes' cache (kept from a job's second run on, keyed by the zfs program) then
        # serves the traced run, as it serves a user's every cron run
        for _ in range(2):
            cp = sh(*argv, env=env, check=False)
            if cp.returncode != 0:
                raise RunFailed("set-up run exited %d: %s" % (cp.returncode, tail(cp.stderr)))
        os.unlink(log)
        sh("zfs", "snapshot", "-r", root + "@n1")
        t0 = time.time()
        cp = sh(*argv, env=env, check=False)
        t1 = time.time()
        if cp.returncode != 0:
            raise RunFailed("traced run exited %d: %s" % (cp.returncode, tail(cp.stderr)))
        verify(root, "%s/zr/%s/%s" % (dst, IDENTITY, root), B_FS * (B_SNAPS + 1))
        rows = []
        with open(log) as f:
            for line in f:
                a, b, rc, rest = line.split(" ", 3)
                rows.append((float(a) - t0, float(b) - t0, rc, rest.strip()))
        rows.sort()
        print("  total %.2f s, %d processes; start end (s from zrepl.py's start), rc, argv:"
              % (t1 - t0, len(rows)))
        for a, b, rc, what in rows:
            words = what.split()
            short = " ".join(w if len(w) < 40 else "..." + w[-30:] for w in words[:7])
            print("  %6.3f %6.3f %s %s%s" % (a, b, rc, short, " ..." if len(words) > 7 else ""))
        if rows:
            print("  before the first process (Python start, config): %.2f s; after the "
                  "last one: %.2f s" % (rows[0][0], (t1 - t0) - max(r[1] for r in rows)))
        return {"seconds": t1 - t0, "processes": len(rows)}
    finally:
        bench.drop_pool(src)
        bench.drop_pool(dst)


def bench_stream(bench, args):
    """(d) One big full stream: zrepl.py's peak RSS must not grow with the stream (the bytes
    go pipe to pipe by splice, or through one fixed buffer). Zeros with compression=off are
    real blocks on disk and in the stream, and cheap to write."""
    gib = args.stream_gib
    print("== (d) streaming %d GiB: zrepl.py's peak RSS, one run each" % gib, flush=True)
    size = "%dG" % (gib + 2)
    src = bench.make_pool("ds", size)
    dst = bench.make_pool("dd", size)
    try:
        fs = src + "/stream"
        t = time.perf_counter()
        zero = bytes(1 << 20)
        write_snapshot(bench, fs, gib * 1024, lambda: zero, "compression=off")
        print("setup: %d GiB written in %.1f s" % (gib, time.perf_counter() - t), flush=True)
        sh("zfs", "create", "-o", "mountpoint=none", dst + "/zr")
        cfg = zrepl_config(bench, "stream", [fs], dst + "/zr")
        el, c = bench.timed(lambda: run_zrepl(bench, cfg, "(d) %d GiB" % gib))
        rss = bench.last_rss
        target = "%s/zr/%s/%s" % (dst, IDENTITY, fs)
        verify(fs, target, 1)
        run_zrepl(bench, cfg, "(d) the same with nothing to send")
        base = bench.last_rss
        print("d %d GiB full: zrepl.py %.1f s (%.0f MiB/s), %s; peak RSS %.1f MiB "
              "(a run with nothing to send: %.1f MiB)"
              % (gib, el, gib * 1024 / el, fmt_calls(c), rss, base), flush=True)
        return {"rss": rss, "base": base, "seconds": el}
    except RunFailed as e:
        print("d zrepl.py FAILED: %s" % e)
        return {}
    finally:
        bench.drop_pool(src)
        bench.drop_pool(dst)


# --------------------------------------------------------------------------------------------


def goals(a, b, c, d=None):
    print("== goals")
    out = []
    if a and "ratio" in a:
        out.append(("a  zrepl.py bulk >= 0.95x the best pipe (%s)" % a["best"],
                    a["ratio"] >= 0.95, "%.2fx" % a["ratio"]))
    if b:
        res = b[0]
        for tool in ("zrepl_batch", "zrepl_single"):
            mode = "batch=true" if tool == "zrepl_batch" else "batch=false"
            for phase, lim in (("initial", 1.1), ("incremental", 1.5)):
                z, r = res.get((tool, phase)), res.get(("raw", phase))
                if z and r:
                    out.append(("b  %s %s <= %.1fx raw" % (mode, phase, lim), z / r <= lim,
                                "%.2fx" % (z / r)))
                for peer, lim2 in (("pyznap", 2.0), ("syncoid", 3.0)):
                    p = res.get((peer, phase))
                    if z and p:
                        out.append(("b  %s %s >= %.0fx faster than %s" % (mode, phase, lim2, peer),
                                    p / z >= lim2, "%.2fx" % (p / z)))
    for name, ok, val in out:
        print("  %-52s %-7s %s" % (name, "MET" if ok else "MISSED", val))
    if c:
        ok = c["zrepl"] <= 1.3 * (c["list"] + c["dlist"])
        print("  %-52s %-7s %.2fx" % ("c  no-change cycle <= 1.3x the two listings", 
                                      "MET" if ok else "MISSED",
                                      c["zrepl"] / (c["list"] + c["dlist"])))
        print("  %-52s %-7s %.2fx" % ("c  (the same against the two side by side)", "",
                                      c["zrepl"] / c["both"]))
        print("  %-52s %-7s %.1f MiB" % ("c  peak RSS <= 100 MiB",
                                         "MET" if c["rss"] <= 100 else "MISSED", c["rss"]))
    if d:
        print("  %-52s %-7s %.1f MiB" % ("d  peak RSS streaming <= 50 MiB",
                                         "MET" if d["rss"] <= 50 else "MISSED", d["rss"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="a,b,c", help="comma list of sections: a,b,c,d,t "
                    "(d, the big stream, and t, a traced incremental, only when asked for)")
    ap.add_argument("--stream-gib", type=int, default=10, help="stream size of (d)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024, help="payload of (a)")
    ap.add_argument("--filesystems", type=int, default=1000, help="filesystems of (c)")
    ap.add_argument("--c-seed", choices=("raw", "zrepl"), default="raw",
                    help="(c): how the destination is first filled: one raw send -R into "
                         "zrepl.py's layout, then a zrepl.py run that adopts it (default, "
                         "seconds), or zrepl.py's own initial replication (minutes)")
    ap.add_argument("--zrepl", default=ZREPL,
                    help="the zrepl.py (or zrepl.pyz) to run; default: this repository's")
    ap.add_argument("--venv", default="/var/tmp/zreplpy-bench-venv", help="pyznap's venv")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get/pip install missing peers; report them unavailable")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not only <= {"a", "b", "c", "d", "t"}:
        ap.error("--only takes a comma list of a, b, c, d, t")
    if args.runs < 1 or args.size_mib < 1 or args.filesystems < 2:
        ap.error("--runs, --size-mib must be >= 1 and --filesystems >= 2")
    if os.geteuid() != 0:
        sys.exit("needs root (it creates pools)")
    uname = os.uname()
    print("replication benchmark: %s, %s %s, %d cores, python %s"
          % (time.strftime("%Y-%m-%d %H:%M"), uname.sysname, uname.release, os.cpu_count(),
             sys.version.split()[0]), flush=True)
    with open(args.zrepl, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    where = ""
    if os.path.abspath(args.zrepl) == ZREPL and shutil.which("git"):  # a VM may lack git
        head = sh("git", "-C", REPO, "log", "-1", "--format=%h", check=False).stdout.strip()
        dirty = sh("git", "-C", REPO, "diff", "--quiet", "HEAD", "--", "zrepl.py",
                   check=False).returncode
        where = ", repository at %s%s" % (head or "?", " + local changes" if dirty else "")
    print("zrepl.py: %s (sha256 %s%s)" % (args.zrepl, digest, where), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally: below
    bench = Bench(args)
    a = b = c = d = None
    t0 = time.perf_counter()
    try:
        for sec, fn in (("a", bench_bulk), ("b", bench_tree), ("c", bench_nochange),
                        ("d", bench_stream), ("t", bench_trace)):
            if sec not in only:
                continue
            try:
                r = fn(bench, args)
            except Exception as e:   # one section failing must not stop the others
                print("section (%s) aborted: %s: %s" % (sec, type(e).__name__, e), flush=True)
                r = None
            if sec == "a":
                a = r
            elif sec == "b":
                b = r
            elif sec == "c":
                c = r
            elif sec == "d":
                d = r
        goals(a, b, c, d)
        if PROBLEMS:
            print("== zrepl.py problems")
            for p in PROBLEMS:
                print("  " + p)
        with open(args.zrepl, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest()[:12] != digest:
                print("WARNING: %s changed during the run; the numbers mix versions "
                      "(pin one with --zrepl COPY)" % args.zrepl)
        print("total %.0f s" % (time.perf_counter() - t0))
    finally:
        bench.cleanup()
    return 1 if PROBLEMS else 0


if __name__ == "__main__":
    sys.exit(main())
