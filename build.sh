#!/usr/bin/env bash
# build.sh — the one entry point for building and testing zrepl.py.
#
#   ./build.sh          build zrepl.pyz at the repo top (shiv, in a cached throwaway venv)
#   ./build.sh test     do all set-up (apt, venv, zfs-fuse), build, run every test lane
#   ./build.sh demo     build, make two small demo pools, replicate one to the other (demo clean)
#   ./build.sh test-openzfs   the whole suite inside a VM with OpenZFS 2.x (tests/openzfs-vm/):
#                       builds the image once (cached in $OPENZFS_VM_DIR), boots it, copies the
#                       project in, runs pytest there, brings the results back to
#                       .build/openzfs/, stops the VM (OPENZFS_VM_KEEP=1 leaves it running;
#                       OPENZFS_LANE_TIMEOUT: seconds before pytest there is stopped, 9000)
#   ./build.sh clean    remove build artefacts
#
# Environment: PYTHON (interpreter for the build venv, default python3),
# PYENV_ROOT (where the 3.8 / newest-3.x test lanes look, default /root/.pyenv).
#
# Why the .pyz needs no extraction
# --------------------------------
# zrepl.pyz must run as `env -i PATH=... HOME=/nonexistent python3 zrepl.pyz` from a read-only
# directory (SPEC §0.1). shiv's own __main__.py is `import _bootstrap; _bootstrap.bootstrap()`,
# and that bootstrap always extracts site-packages/ before importing anything: to ~/.shiv, to
# $SHIV_ROOT, or to a --root baked in at build time. None of those fits: HOME is unwritable,
# env -i removes SHIV_ROOT, a fixed --root such as /tmp/x is shared by all users (root would
# import code another user planted there), a "$VAR" --root falls back to a path relative to
# the cwd, and --preamble runs only after extraction. Our payload is one pure-Python module,
# and zipimport loads it straight from "zrepl.pyz/site-packages". So after shiv has built the
# archive, we replace only its __main__.py with a short launcher that puts that path on
# sys.path and calls the entry point that shiv recorded in environment.json (`-e zrepl:_entry`).
# All other members stay exactly as shiv wrote them. The result writes nothing to disk at start,
# leaves nothing behind after SIGKILL, and works with a read-only /tmp.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$top"

BUILD=.build
VENV=$BUILD/venv
PYZ=zrepl.pyz
PYTHON=${PYTHON:-python3}
PYENV_VERSIONS=${PYENV_ROOT:-/root/.pyenv}/versions
# Debian keeps zfs/zpool in /sbin; non-login root shells (cron, CI) often lack it in PATH
export PATH="$PATH:/usr/sbin:/sbin"
export PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive

say() { printf 'build.sh: %s\n' "$*" >&2; }
# milliseconds since the epoch; EPOCHREALTIME (bash 5) may use the locale's decimal comma
now_ms() { local t=${EPOCHREALTIME:-$SECONDS.000000}; t=${t/[.,]/}; echo $((10#$t / 1000)); }
secs_since() { local d=$(($(now_ms) - $1)); printf '%d.%02d' $((d / 1000)) $((d % 1000 / 10)); }
die() { say "error: $*"; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }
show() { echo "+ $*"; "$@"; }

apt_install() {
    # a fresh image has empty package lists: only then is `apt-get update` worth its time
    apt-get install -y -q "$@" </dev/null >/dev/null 2>&1 \
        || { apt-get update -q </dev/null >/dev/null && apt-get install -y -q "$@" </dev/null >/dev/null; }
}

# make_venv DIR PYTHON: create DIR as a venv of PYTHON unless a working one is already there
make_venv() {
    local dir=$1 py=$2
    if "$dir/bin/python" -c '' 2>/dev/null; then
        return 0
    fi
    rm -rf "$dir"
    if ! "$py" -m venv "$dir" >/dev/null 2>&1; then
        rm -rf "$dir"
        # Debian ships venv/ensurepip separately, in python3-venv
        if is_root && command -v apt-get >/dev/null 2>&1; then
            say "'$py -m venv' failed; installing python3-venv"
            apt_install python3-venv || die "apt-get install python3-venv failed"
        fi
        "$py" -m venv "$dir" || { rm -rf "$dir"; die "'$py -m venv $dir' failed (install python3-venv)"; }
    fi
}

# venv_need DIR SPEC...: pip-install the requirement SPECs not yet satisfied in venv DIR.
# pip takes most of a second even when everything is satisfied, and an import check cannot see
# versions (Python 3.8's venv brings setuptools 56, too old for pyproject metadata), so DIR keeps
# a list of the specs it already satisfies.
venv_need() {
    local dir=$1 spec missing=()
    shift
    for spec in "$@"; do
        grep -qxF -- "$spec" "$dir/.zreplpy-satisfied" 2>/dev/null || missing+=("$spec")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing into $dir: ${missing[*]}"
        "$dir/bin/python" -m pip install -q "${missing[@]}" || die "pip install ${missing[*]} failed"
        printf '%s\n' "${missing[@]}" >>"$dir/.zreplpy-satisfied"
    fi
}

# shiv is pinned to 1.x: the launcher below relies on its archive layout
# (site-packages/ prefix, environment.json with entry_point)
BUILD_REQS=("shiv>=1.0,<2" "setuptools>=61" wheel)
TEST_REQS=(pytest vermin)

build() {
    local py=$VENV/bin/python stage=$BUILD/stage wheels=$BUILD/wheels raw=$BUILD/shiv.pyz t0
    t0=$(now_ms)
    [ -f zrepl.py ] || die "no zrepl.py in $top"
    make_venv "$VENV" "$PYTHON"
    venv_need "$VENV" "${BUILD_REQS[@]}"
    rm -rf "$stage" "$wheels" "$raw"
    mkdir -p "$stage"
    cp zrepl.py "$stage/"
    # the version lives in zrepl.VERSION; the distribution version is only a label here
    cat >"$stage/pyproject.toml" <<'EOF'
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "zrepl.py"
version = "0"
requires-python = ">=3.8"

[tool.setuptools]
py-modules = ["zrepl"]
EOF
    # Wheel first, then let shiv install it *by name* from a local find-links dir: pip records
    # a direct_url.json (holding this checkout's path) for path installs, not for named ones,
    # so the same zrepl.py gives the same .pyz bytes in any clone (given the same shiv and
    # setuptools versions, which are recorded inside). --no-index and
    # --no-build-isolation keep the build off the network.
    "$py" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$wheels" "$stage" \
        || die "building the zrepl.py wheel failed"
    # --reproducible pins zip timestamps (SOURCE_DATE_EPOCH, if set, overrides)
    "$VENV/bin/shiv" -e zrepl:_entry -p "/usr/bin/env python3" --reproducible \
        -o "$raw" -q --no-deps --no-index --find-links "$wheels" zrepl.py \
        || die "shiv failed"
    # bytecode of zrepl.py for every Python 3.8+ this host has (see the launcher below)
    local pycs=$BUILD/pycs interp tag
    rm -rf "$pycs"
    mkdir -p "$pycs"
    for interp in "$py" $(compile_pythons); do
        tag=$("$interp" -c 'import sys; print(sys.implementation.cache_tag if sys.version_info >= (3, 8) else "")' 2>/dev/null) || continue
        [ -n "$tag" ] && [ ! -e "$pycs/zrepl.$tag.pyc" ] || continue
        "$interp" -c 'import py_compile, sys
py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile="zrepl.py", doraise=True,
                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)' \
            zrepl.py "$pycs/zrepl.$tag.pyc" || die "compiling zrepl.py with $interp failed"
    done
    "$py" - "$raw" "$PYZ.tmp" "$pycs" <<'PY' || die "rewriting __main__.py failed"
# Copy shiv's archive member by member, swapping in the no-extraction launcher (see the top of
# build.sh for why) and adding the bytecode. Shebang, order and timestamps stay as shiv made
# them; the launcher and the bytecode are stored, not deflated: nothing to inflate at start.
import json, os, sys, zipfile

LAUNCHER = b"""\
# -*- coding: utf-8 -*-
# zrepl.pyz launcher, written by build.sh over shiv's "_bootstrap.bootstrap()", which would
# extract site-packages/ to ~/.shiv first (_bootstrap/ stays in the archive, unused). The
# payload is pure Python, loaded from the archive: nothing is extracted. zipimport caches no
# bytecode and would compile the source at every start, so the archive carries the module
# compiled by each Python the build host had, site-packages/__pycache__/zrepl.<tag>.pyc, and
# this Python's is run where it is there; elsewhere zipimport compiles the source.
import os, sys
from importlib import import_module

_archive = os.path.abspath(__loader__.archive)
_site = os.path.join(_archive, "site-packages")
sys.path.insert(0, _site)
_mod, _, _attr = @ENTRY_POINT@.partition(":")      # shiv's, from environment.json


def _compiled(name):
    import _imp, marshal, zipimport
    from importlib.machinery import ModuleSpec
    from importlib.util import MAGIC_NUMBER, module_from_spec
    tag = sys.implementation.cache_tag
    try:
        code = __loader__.get_data(os.path.join(__loader__.archive, "site-packages",
                                                "__pycache__", "%s.%s.pyc" % (name, tag)))
    except OSError:
        return None
    if code[:4] != MAGIC_NUMBER:
        return None
    spec = ModuleSpec(name, zipimport.zipimporter(_site), origin=os.path.join(_site, name + ".py"))
    spec.has_location = True                  # __file__, and tracebacks show the source
    mod = module_from_spec(spec)
    code = marshal.loads(memoryview(code)[16:])
    _imp._fix_co_filename(code, spec.origin)
    sys.modules[name] = mod
    try:
        exec(code, mod.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


_fn = (sys.implementation.cache_tag and _compiled(_mod)) or import_module(_mod)
for _part in _attr.split("."):
    _fn = getattr(_fn, _part)
sys.exit(_fn())
"""

src, dst, pycs = sys.argv[1:]
with open(src, "rb") as f:
    shebang = f.readline()
assert shebang.startswith(b"#!"), shebang
with zipfile.ZipFile(src) as zin, open(dst, "wb") as out:
    entry_point = json.loads(zin.read("environment.json"))["entry_point"]
    LAUNCHER = LAUNCHER.replace(b"@ENTRY_POINT@", repr(entry_point).encode())
    out.write(shebang)
    with zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "__main__.py":
                data = LAUNCHER
                info.compress_type = zipfile.ZIP_STORED    # zipimport needs no zlib then
            zout.writestr(info, data)
            if info.filename == "site-packages/zrepl.py":
                for name in sorted(os.listdir(pycs)):
                    pycinfo = zipfile.ZipInfo("site-packages/__pycache__/" + name,
                                              date_time=info.date_time)
                    pycinfo.compress_type = zipfile.ZIP_STORED   # no inflating at start-up
                    pycinfo.external_attr = info.external_attr
                    with open(os.path.join(pycs, name), "rb") as f:
                        zout.writestr(pycinfo, f.read())
os.chmod(dst, 0o755)
PY
    mv -f "$PYZ.tmp" "$PYZ"
    rm -rf "$stage" "$wheels" "$raw" "$pycs"
    printf 'built %s (%s bytes) in %ss\n' "$top/$PYZ" "$(wc -c <"$PYZ" | tr -d ' ')" "$(secs_since "$t0")"
}

zfs_answers() { zpool list -H -o name >/dev/null 2>&1; }

# ensure_zfs [install]: make ZFS answer, starting the zfs-fuse daemon (and with "install",
# installing zfs-fuse) when needed
ensure_zfs() {
    if ! command -v zfs >/dev/null 2>&1; then
        [ "${1:-}" = install ] || { say "no zfs command (./build.sh test installs zfs-fuse)"; return 1; }
        is_root || { say "no zfs command, and only root can install zfs-fuse"; return 1; }
        say "installing zfs-fuse"
        apt_install zfs-fuse || { say "apt-get install zfs-fuse failed"; return 1; }
    fi
    zfs_answers && return 0
    is_root || { say "ZFS does not answer, and only root can start zfs-fuse"; return 1; }
    # no pool arguments: start the daemon (and mount what it re-imports), make no pools
    sh tests/zfs-fuse/up.sh || { say "tests/zfs-fuse/up.sh could not start zfs-fuse"; return 1; }
}

# ensure_sshd: the ssh tests run a real sshd on 127.0.0.1 (Debian openssh-server); only
# the binaries are needed, no system service is started or configured
ensure_sshd() {
    if [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1; then
        return 0
    fi
    is_root || { say "no sshd, and only root can install openssh-server (ssh tests will skip)"; return 0; }
    say "installing openssh-server (for the ssh tests)"
    apt_install openssh-server openssh-client || { say "apt-get install openssh-server failed"; return 1; }
}

# lane_pythons: the newest 3.8.x and the newest 3.x of pyenv, oldest first, one per line
# compile_pythons: every Python 3.x interpreter this host has (pyenv's and python3.N on
# PATH), for the bytecode build() puts in the .pyz; build() skips those older than 3.8
compile_pythons() {
    local d n
    for d in "$PYENV_VERSIONS"/3.*; do
        [ -x "$d/bin/python3" ] && printf '%s\n' "$d/bin/python3"
    done
    for n in 8 9 10 11 12 13 14 15; do
        command -v "python3.$n" 2>/dev/null || true
    done
}

lane_pythons() {
    local d all=()
    for d in "$PYENV_VERSIONS"/3.*; do
        [[ -x $d/bin/python3 && ${d##*/} =~ ^3\.[0-9]+\.[0-9]+$ ]] && all+=("${d##*/}")
    done
    [ ${#all[@]} -gt 0 ] || return 0
    printf '%s\n' "${all[@]}" | sort -V | grep '^3\.8\.' | tail -n 1 || true
    printf '%s\n' "${all[@]}" | sort -V | grep -v '^3\.8\.' | tail -n 1 || true
}

# pytest_verdict RC LABEL: add LABEL to run_tests' `failed` unless pytest passed.
# Exit 5 means pytest collected nothing: a broken collection, never a pass.
pytest_verdict() {
    case $1 in
        0) ;;
        5) say "error: $2: no tests ran"; failed+=("$2: no tests ran") ;;
        *) failed+=("$2 (rc $1)") ;;
    esac
}

run_tests() {
    local t0 failed=() rc ran=() ver py lvenv out
    t0=$(now_ms)
    make_venv "$VENV" "$PYTHON"
    venv_need "$VENV" "${BUILD_REQS[@]}" "${TEST_REQS[@]}"
    ensure_zfs install || failed+=("zfs-setup")
    ensure_sshd || failed+=("sshd-setup")
    # a separate process, so that `set -e` inside build() still applies
    bash "$top/build.sh" build || failed+=("build")

    say "pytest (all tests) under $("$VENV/bin/python" -V 2>&1)"
    rc=0
    "$VENV/bin/python" -m pytest tests -ra --durations=15 || rc=$?
    pytest_verdict "$rc" "pytest"

    # the oldest and newest interpreters we promise: pure tests, plus the .pyz smoke test
    local lanes
    lanes=$(lane_pythons)
    if [ -z "$lanes" ]; then
        say "skipping the 3.8/newest lanes: no pyenv interpreters under $PYENV_VERSIONS"
    else
        # lane_pythons lists 3.8 first when there is one
        [[ $lanes == 3.8.* ]] \
            || say "skipping the 3.8 lane: no 3.8.x under $PYENV_VERSIONS"
        for ver in $lanes; do
            py=$PYENV_VERSIONS/$ver/bin/python3
            lvenv=$BUILD/venv-$ver
            say "lane $ver: pure tests"
            ( make_venv "$lvenv" "$py" && venv_need "$lvenv" pytest ) || { failed+=("lane $ver: venv"); continue; }
            ran+=("$ver")
            rc=0
            "$lvenv/bin/python" -m pytest tests -m "not zfs" -ra -q -p no:cacheprovider || rc=$?
            pytest_verdict "$rc" "lane $ver: pure tests"
            if [ -f "$PYZ" ]; then
                rc=0
                out=$("$py" "$PYZ" version 2>&1) || rc=$?
                if [ "$rc" = 0 ]; then
                    say "lane $ver: $PYZ version: ${out%%$'\n'*}"
                else
                    printf '%s\n' "$out" >&2
                    failed+=("lane $ver: $PYZ version (rc $rc)")
                fi
            else
                failed+=("lane $ver: no $PYZ to smoke-test")
            fi
        done
        echo "pure tests ran under: ${ran[*]:-none}"
    fi

    echo "total runtime: $(secs_since "$t0")s"
    if [ ${#failed[@]} -gt 0 ]; then
        echo "FAILED:"
        printf '  - %s\n' "${failed[@]}"
        return 1
    fi
    echo "all test lanes passed"
}

# test_openzfs [PYTEST ARGS...]: the suite against OpenZFS in the VM of tests/openzfs-vm/
test_openzfs() {
    local vm=tests/openzfs-vm out=$BUILD/openzfs rc=0 t0 args
    t0=$(now_ms)
    is_root || die "the OpenZFS lane needs root (debootstrap, qemu)"
    mkdir -p "$out"
    bash "$vm/build.sh" >"$out/vm-build.log" 2>&1 \
        || { tail -n 20 "$out/vm-build.log" >&2; die "building the OpenZFS VM failed (log: $out/vm-build.log)"; }
    say "OpenZFS VM image ready after $(secs_since "$t0")s; booting"
    bash "$vm/start.sh" >"$out/vm-start.log" 2>&1 \
        || { tail -n 20 "$out/vm-start.log" >&2; die "starting the OpenZFS VM failed (log: $out/vm-start.log)"; }
    grep -h '^zfs-' "$out/vm-start.log" | head -n 1 >&2 || true
    # the guest has no shiv: it gets the zrepl.pyz of this very zrepl.py
    bash "$top/build.sh" build >"$out/build.log" 2>&1 || { cat "$out/build.log" >&2; die "build failed"; }
    bash "$vm/push.sh" "$top" /root/zreplpy >/dev/null || die "copying the project into the VM failed"
    args=${*:-tests}
    say "pytest in the OpenZFS VM ($args)"
    # ZREPLPY_LANE names the ZFS whose capabilities tests/test_zfs.py must find exactly
    # PIPESTATUS must be read right after the pipeline: `|| true` would reset it
    # the cap only ends a hung lane: a TCG-emulated VM needs ~7000 s for the whole suite
    set +e
    bash "$vm/ssh.sh" "cd /root/zreplpy && ZREPLPY_LANE=openzfs timeout ${OPENZFS_LANE_TIMEOUT:-9000} python3 -m pytest \
        -ra --durations=15 -p no:cacheprovider --junitxml=/root/openzfs-junit.xml $args" \
        2>&1 | tee "$out/pytest.log"
    rc=${PIPESTATUS[0]}
    set -e
    bash "$vm/ssh.sh" cat /root/openzfs-junit.xml >"$out/junit.xml" 2>/dev/null || true
    if [ "${OPENZFS_VM_KEEP:-0}" != 1 ]; then
        bash "$vm/stop.sh" >"$out/vm-stop.log" 2>&1 || say "stopping the VM failed (see $out/vm-stop.log)"
    fi
    echo "OpenZFS lane: pytest rc $rc, results in $out/, total $(secs_since "$t0")s"
    case $rc in
        0) return 0 ;;
        5) say "error: OpenZFS lane: no tests ran"; return 1 ;;
        *) return 1 ;;
    esac
}

DEMO_DIR=/var/tmp/zreplpy-demo
DEMO_POOLS="zrdemosrc zrdemodst"

# demo: local push -> sink replication between two small file-backed pools, with pruning
demo() {
    if [ "${1:-}" = clean ]; then
        ZF_DIR=$DEMO_DIR sh tests/zfs-fuse/down.sh $DEMO_POOLS
        rm -rf "$DEMO_DIR"
        return 0
    fi
    build
    ensure_zfs install || die "ZFS is not available"
    ZF_DIR=$DEMO_DIR ZF_SIZE=128M ZF_MOUNT=none sh tests/zfs-fuse/up.sh $DEMO_POOLS \
        || die "could not make the demo pools"
    local fs
    for fs in zrdemosrc/data zrdemosrc/data/projects zrdemosrc/data/photos \
              zrdemosrc/data/scratch zrdemodst/backup; do
        zfs list -H -o name "$fs" >/dev/null 2>&1 || zfs create -o mountpoint=none "$fs"
    done
    zfs list -H -o name zrdemosrc/data@manual_before_upgrade >/dev/null 2>&1 \
        || zfs snapshot zrdemosrc/data@manual_before_upgrade
    local z="python3 $PYZ --config tests/demo.yml"
    show $z configcheck
    for _ in 1 2 3; do
        show $z once --snapshot always
        sleep 1.1     # snapshot names have one-second resolution
    done
    # a snapshot no rule keeps but not_replicated: the dry-run explains why it stays for now
    zfs list -H -o name zrdemosrc/data/projects@foreign >/dev/null 2>&1 \
        || show zfs snapshot zrdemosrc/data/projects@foreign
    show $z prune --job demo_push --side sender --dry-run
    show $z once --snapshot always
    show $z status
    show $z zfs-abstraction list --fs "zrdemosrc<:ok,zrdemodst<:ok"
    cat <<MSG

What happened: four snapshot rounds of zrdemosrc/data and its children (not
zrdemosrc/data/scratch, which the filter rejects), each replicated to
zrdemodst/backup/demohost/... (initial full sends, then incrementals, checked by GUID;
zrdemodst/backup/demohost and .../zrdemosrc are placeholders). The dry-run kept @foreign
only because it was not replicated yet (not_replicated); the last run replicated it,
and then no rule kept it, so pruning destroyed it on both sides, while the newest three
zrepl_ snapshots and @manual_before_upgrade stay. The replication cursor is a hold
(zfs-fuse has no bookmarks): see the zfs-abstraction list above.
Look at:   zfs list -t all -r -o name,zrepl:placeholder,userrefs zrdemosrc zrdemodst
           $z status --json
           $z prune --job demo_push --dry-run
Clean up:  ./build.sh demo clean
MSG
}

clean() {
    rm -rf "$BUILD" "$PYZ" "$PYZ.tmp" .pytest_cache
    find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
}

case ${1:-build} in
    build) build ;;
    test) run_tests ;;
    test-openzfs) shift; test_openzfs "$@" ;;
    demo) demo "${2:-}" ;;
    clean) clean ;;
    -h|--help|help) sed -n '2,11s/^# \{0,1\}//p' "$top/build.sh" ;;
    *) die "unknown command '$1' (build, test, test-openzfs, demo, clean)" ;;
esac
