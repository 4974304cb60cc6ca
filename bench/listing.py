#!/usr/bin/env python3
"""Listing benchmark: zrepl.py's one-call listing vs raw zfs, side by side in one run.

Makes a file-backed pool with N filesystems x S snapshots (default 1,000 x 5), then times,
best of R runs each:
  raw-get   zfs get -Hp -r -o name,property,value type,guid,createtxg,creation,userrefs ROOT
  raw-list  zfs list -H -t all -r -o name ROOT  (names only: the cheapest listing there is)
  zrepl.py  ZFS().list_datasets([ROOT])          (parsed, grouped, sorted Dataset objects)
and prints the wall times, the ratio to raw-get, and how many zfs processes zrepl.py ran.

    python3 bench/listing.py [--filesystems 1000] [--snapshots 5] [--runs 3]

Needs root and a ZFS (zfs-fuse will do). The pool is destroyed at the end.
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import zrepl  # noqa: E402

ENV = dict(os.environ, LC_ALL="C", PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def sh(*argv, check=True):
    return subprocess.run(argv, check=check, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)


def best(runs, fn):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filesystems", type=int, default=1000)
    ap.add_argument("--snapshots", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    pool = "zbench%d" % os.getpid()
    img = "/var/tmp/%s.img" % pool
    sh("truncate", "-s", "2G", img)
    sh("zpool", "create", "-m", "none", pool, img)
    try:
        root = pool + "/b"
        t = time.perf_counter()
        sh("zfs", "create", "-o", "mountpoint=none", root)
        for i in range(args.filesystems - 1):
            sh("zfs", "create", "%s/fs%04d" % (root, i))
        for s in range(args.snapshots):
            sh("zfs", "snapshot", "-r", "%s@s%d" % (root, s))
        print("setup: %d filesystems x %d snapshots in %.1f s"
              % (args.filesystems, args.snapshots, time.perf_counter() - t))
        props = "type,guid,createtxg,creation,userrefs"
        raw_get = best(args.runs, lambda: sh("zfs", "get", "-Hp", "-r", "-o",
                                             "name,property,value", props, root))
        raw_list = best(args.runs, lambda: sh("zfs", "list", "-H", "-t", "all", "-r", "-o",
                                              "name", root))
        z = zrepl.ZFS()
        z.capabilities()
        calls = []

        def listing():
            before = z.calls
            datasets, _ = z.list_datasets([root])
            calls.append(z.calls - before)
            assert len(datasets) == args.filesystems
            assert sum(len(d.versions) for d in datasets.values()) == \
                args.filesystems * args.snapshots
        ours = best(args.runs, listing)
        print("raw-get   %.3f s" % raw_get)
        print("raw-list  %.3f s" % raw_list)
        print("zrepl.py  %.3f s  (%d zfs process per listing)  = %.2fx raw-get, %.2fx raw-list"
              % (ours, max(calls), ours / raw_get, ours / raw_list))
    finally:
        sh("zpool", "destroy", "-f", pool, check=False)
        os.unlink(img)


if __name__ == "__main__":
    main()
