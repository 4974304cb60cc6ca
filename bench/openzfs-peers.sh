#!/usr/bin/env bash
# openzfs-peers.sh — give the OpenZFS VM (tests/openzfs-vm/, no network) the peers that
# bench/replication.py compares with, copied from this host (Debian 12, like the guest):
# pyznap's package (pure Python) and syncoid with the one Perl module the guest lacks
# (Capture::Tiny, pure Perl). Run bench/replication.py once on the host first: it installs
# them (`apt-get install sanoid`, pyznap in its venv). Then, with the VM running:
#
#   bench/openzfs-peers.sh
#   tests/openzfs-vm/ssh.sh 'cd /root/zreplpy && PATH=/root/peers/bin:$PATH \
#       python3 bench/replication.py --venv /root/peers --no-install --only b'
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
vm=$top/tests/openzfs-vm
venv=${BENCH_VENV:-/var/tmp/zreplpy-bench-venv}
die() { echo "openzfs-peers.sh: $*" >&2; exit 1; }

site=$(echo "$venv"/lib/python3*/site-packages)
[ -d "$site/pyznap" ] || die "no pyznap in $venv: run bench/replication.py on the host first"
syncoid=$(command -v syncoid || true)
[ -n "$syncoid" ] || die "no syncoid on this host: apt-get install -y sanoid"
tiny=$(perl -MCapture::Tiny -e 'print $INC{"Capture/Tiny.pm"}') \
    || die "no Capture::Tiny on this host (it comes with sanoid)"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/site" "$stage/perl5/Capture"
cp -a "$site/pyznap" "$stage/site/"
cp "$tiny" "$stage/perl5/Capture/Tiny.pm"
cp "$syncoid" "$stage/bin/syncoid.pl"
# the guest's python3 runs pyznap from the copied package; syncoid finds the copied module
cat >"$stage/bin/pyznap" <<'EOF'
#!/bin/sh
PYTHONPATH=/root/peers/site exec python3 -c 'import sys; from pyznap.main import main; sys.exit(main())' "$@"
EOF
cat >"$stage/bin/syncoid" <<'EOF'
#!/bin/sh
PERL5LIB=/root/peers/perl5 exec perl /root/peers/bin/syncoid.pl "$@"
EOF
chmod 755 "$stage/bin/pyznap" "$stage/bin/syncoid"
bash "$vm/push.sh" "$stage" /root/peers
bash "$vm/ssh.sh" '/root/peers/bin/pyznap --help >/dev/null && /root/peers/bin/syncoid --version' \
    || die "the copied peers do not run in the guest"
