#!/usr/bin/env python3
"""Snapshot and prune benchmark on real ZFS, measured side by side in one run.

  prune:  1,000 snapshots of one filesystem destroyed by `zrepl.py prune` vs a shell loop of
          one `zfs destroy` per snapshot (the same work, no tool in between)
  round:  one `zrepl.py once --snapshot always` over a tree of 200 filesystems vs a shell
          loop of one `zfs snapshot` per filesystem

Reports wall times, their ratio, and the zfs/zpool processes zrepl.py started (counted by
a logging wrapper first in PATH). Needs root and a ZFS; makes and destroys its own pool.

    python3 bench/snap_prune.py [--snapshots 1000] [--filesystems 200]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, LC_ALL="C", PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def sh(*argv, check=True, env=ENV):  # noqa: B008
    return subprocess.run(argv, check=check, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)


def wrapper(tmp):
    """A PATH directory whose zfs/zpool log each call, then run the real command."""
    log = os.path.join(tmp, "calls.log")
    bindir = os.path.join(tmp, "bin")
    os.mkdir(bindir)
    for cmd in ("zfs", "zpool"):
        real = sh("sh", "-c", "command -v " + cmd).stdout.strip()
        path = os.path.join(bindir, cmd)
        with open(path, "w") as f:
            f.write('#!/bin/sh\necho "%s $*" >> %s\nexec %s "$@"\n' % (cmd, log, real))
        os.chmod(path, 0o755)
    return bindir, log


def zrepl(config, *args, bindir):
    env = dict(ENV, PATH=bindir + ":" + ENV["PATH"])
    t = time.perf_counter()
    cp = sh(sys.executable, os.path.join(REPO, "zrepl.py"), "--config", config, *args,
            env=env, check=False)
    elapsed = time.perf_counter() - t
    if cp.returncode != 0:
        sys.exit("zrepl.py %s failed (%d): %s" % (" ".join(args), cp.returncode, cp.stderr))
    return elapsed


def count(log):
    try:
        with open(log) as f:
            lines = f.read().splitlines()
    finally:
        if os.path.exists(log):
            os.unlink(log)
    return len(lines), sum(1 for ln in lines if ln.split()[:2] in (["zfs", "destroy"],
                                                                  ["zfs", "snapshot"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=1000)
    ap.add_argument("--filesystems", type=int, default=200)
    args = ap.parse_args()
    pool = "zbsp%d" % os.getpid()
    img = "/var/tmp/%s.img" % pool
    tmp = tempfile.mkdtemp(prefix="zreplpy-bench-")
    sh("truncate", "-s", "1G", img)
    sh("zpool", "create", "-m", "none", pool, img)
    try:
        bindir, log = wrapper(tmp)
        cfg = os.path.join(tmp, "bench.yml")
        with open(cfg, "w") as f:
            f.write("global: {rundir: %s/run}\njobs:\n"
                    "  - name: prune1k\n    type: snap\n"
                    "    filesystems: {\"%s/p\": true}\n"
                    "    snapshotting: {type: manual}\n"
                    "    pruning: {keep: [{type: regex, regex: \"^keep$\"}]}\n"
                    "  - name: round\n    type: snap\n"
                    "    filesystems: {\"%s/t<\": true}\n"
                    "    snapshotting: {type: periodic, prefix: zrepl_, interval: 1h}\n"
                    "    pruning: {keep: [{type: regex, regex: \".*\"}]}\n"
                    % (tmp, pool, pool))
        names = ["s%04d" % i for i in range(args.snapshots)]

        def make_snapshots(fs):
            sh("zfs", "create", "-p", fs)
            for n in names:
                sh("zfs", "snapshot", "%s@%s" % (fs, n))

        # both filesystems exist before either side runs: the pool is in the same state
        make_snapshots(pool + "/p")
        make_snapshots(pool + "/q")
        ours = zrepl(cfg, "prune", "--job", "prune1k", bindir=bindir)
        calls, destroys = count(log)
        left = sh("zfs", "list", "-H", "-t", "snapshot", "-r", "-o", "name", pool + "/p").stdout
        assert left.strip() == "", "zrepl.py left snapshots behind"
        # the loop runs through the same logging wrapper: both sides pay its cost per call
        wrapped = dict(ENV, PATH=bindir + ":" + ENV["PATH"])
        t = time.perf_counter()
        sh("sh", "-c", "for s in %s; do zfs destroy %s/q@$s; done" % (" ".join(names), pool),
           env=wrapped)
        loop = time.perf_counter() - t
        count(log)
        print("prune %d snapshots of one fs: zrepl.py %.2f s (%d zfs processes, %d destroys)"
              " vs shell loop %.2f s: ratio %.2f"
              % (args.snapshots, ours, calls, destroys, loop, ours / loop))

        sh("zfs", "create", "-o", "mountpoint=none", pool + "/t")
        sh("zfs", "create", "-o", "mountpoint=none", pool + "/u")
        for i in range(args.filesystems - 1):
            sh("zfs", "create", "%s/t/fs%03d" % (pool, i))
            sh("zfs", "create", "%s/u/fs%03d" % (pool, i))
        ours = zrepl(cfg, "once", "round", "--snapshot", "always", bindir=bindir)
        calls, snaps = count(log)
        t = time.perf_counter()
        fss = [pool + "/u"] + ["%s/u/fs%03d" % (pool, i) for i in range(args.filesystems - 1)]
        sh("sh", "-c", "for f in %s; do zfs snapshot $f@x; done" % " ".join(fss), env=wrapped)
        loop = time.perf_counter() - t
        count(log)
        print("snapshot round over %d filesystems: zrepl.py %.2f s (%d zfs processes, %d "
              "snapshot calls) vs shell loop %.2f s: ratio %.2f"
              % (args.filesystems, ours, calls, snaps, loop, ours / loop))
    finally:
        sh("zpool", "destroy", "-f", pool, check=False)
        os.unlink(img)
        sh("rm", "-rf", tmp)


if __name__ == "__main__":
    main()
