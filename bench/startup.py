#!/usr/bin/env python3
"""Start-up benchmark: `zrepl.pyz --help` against `python3 -c pass`, side by side in one run.

For each interpreter, the two commands run alternately, R rounds (default 101), so that a
busy moment of the host lands on both; prints the medians, their ratio and the fastest
runs. Add a command with --also (e.g. --also "version --json", which asks this host's ZFS).

    python3 bench/startup.py [--pyz zrepl.pyz] [--rounds 101] [--python /usr/bin/python3 ...]

Name interpreters by their real path: a version manager's `python3` shim is a shell script
that adds its own start-up to both sides (pyenv's: about 0.12 s).
"""
import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(argv):
    t = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyz", default=os.path.join(os.path.dirname(HERE), "zrepl.pyz"))
    ap.add_argument("--rounds", type=int, default=101)
    ap.add_argument("--python", action="append", help="an interpreter (repeatable; default: "
                                                       "the one running this script)")
    ap.add_argument("--also", action="append", default=[], help="another zrepl.pyz command "
                                                                "line to time beside them")
    args = ap.parse_args()
    if not os.path.exists(args.pyz):
        sys.exit(f"no {args.pyz}: run ./build.sh first")
    commands = [("-c pass", ["-c", "pass"]), ("zrepl.pyz --help", [args.pyz, "--help"])]
    commands += [("zrepl.pyz " + line, [args.pyz] + shlex.split(line)) for line in args.also]
    print("| Python | " + " | ".join(f"`{name}`" for name, _ in commands) + " |")
    print("|---" * (len(commands) + 1) + "|")
    for py in args.python or [os.path.realpath(sys.executable)]:
        version = subprocess.run([py, "-c", "import platform; print(platform.python_version())"],
                                 stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
        times = {name: [] for name, _ in commands}
        for name, argv in commands:                 # warm the page cache
            timed([py] + argv)
        for _ in range(args.rounds):
            for name, argv in commands:
                times[name].append(timed([py] + argv))
        base = statistics.median(times["-c pass"])
        cells = []
        for name, _ in commands:
            med, best = statistics.median(times[name]), min(times[name])
            cells.append(f"{med * 1e3:.1f} ms (min {best * 1e3:.1f})" if name == "-c pass" else
                         f"{med * 1e3:.1f} ms = **{med / base:.2f}×** (min {best * 1e3:.1f})")
        print(f"| {py} ({version}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
