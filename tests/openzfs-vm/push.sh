#!/usr/bin/env bash
# push.sh — copy a project directory into the running OpenZFS VM (replacing an earlier copy).
#
#   push.sh DIR [GUEST_DIR]      GUEST_DIR defaults to /root/<name of DIR>
#
# Leaves out .git, virtualenvs and caches.  Then run its tests in the guest, e.g.
#   ./ssh.sh 'cd /root/proj && python3 -m pytest -q tests'
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"

[ $# -ge 1 ] && [ $# -le 2 ] && [ -d "$1" ] || die "usage: push.sh DIR [GUEST_DIR]"
src=$(cd "$1" && pwd)
dest=${2:-/root/$(basename "$src")}
case "$dest" in
    /|/root|/root/|/src|/dst|/etc*|/usr*|/bin*|/lib*|/sbin*|/boot*) die "refusing GUEST_DIR $dest" ;;
    /?*) ;;
    *) die "GUEST_DIR must be an absolute path" ;;
esac
vm_pid >/dev/null || die "VM is not running: start.sh first"
[ -f "$SSH_CONFIG" ] || write_ssh_config

q=$(printf %q "$dest")
tar -C "$src" --exclude=.git --exclude=.build --exclude=.venv --exclude=venv --exclude=.tox --exclude=.nox \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.mypy_cache --exclude='*.pyc' -cf - . \
  | vm_ssh "rm -rf $q && mkdir -p $q && tar -C $q --no-same-owner -xf - && echo \"pushed to $q (\$(du -sh $q | cut -f1))\""
