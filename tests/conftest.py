"""Shared fixtures and helpers: real ZFS pools, and zrepl.py run as a subprocess.

ZFS tests run against the real `zfs`/`zpool` (zfs-fuse on the CI machine, OpenZFS works too).
Any test that uses a ZFS fixture (`zfs_available`, `pools`, `pool`) or carries the `zfs` marker
is marked `zfs` and is skipped, with the reason, when ZFS does not answer. So
`pytest -m "not zfs"` runs exactly the pure tests.

Fixtures
    pools          module-scoped: two fresh file-backed pools, `.src` and `.dst` (names)
    pool           function-scoped: one fresh pool (name), for tests that need isolation
    zfs_available  session-scoped: skips the test unless ZFS answers
Pool size: 256M, or `@pytest.mark.poolsize("1G")` (for `pools` only at module level,
`pytestmark = pytest.mark.poolsize("1G")`, because that fixture is shared by the module).

Helpers (`from conftest import zfs, make_tree, snap, state, ...`)
    zfs / zpool(*args, check=True, input=None)   real command, LC_ALL=C, CompletedProcess
    make_tree, snap, write_data, state, names, hold, release
    run_cli(*args, config=None, env=None, cwd=None), assert_no_traceback(cp)
"""
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ZREPL_PY = REPO / "zrepl.py"
UP_SH = REPO / "tests" / "zfs-fuse" / "up.sh"
POOL_DIR = Path("/var/tmp/zreplpy-test")
DEFAULT_POOL_SIZE = "256M"
ZFS_FIXTURES = frozenset({"zfs_available", "pools", "pool"})

# Debian keeps zfs/zpool in /sbin, which a non-login root shell may not have in PATH;
# LC_ALL=C because tests compare zfs's English messages and plain number formats
_ZFS_ENV = dict(os.environ, LC_ALL="C")
_ZFS_ENV["PATH"] = os.pathsep.join(
    [_ZFS_ENV.get("PATH", "/usr/bin:/bin"), "/usr/local/sbin", "/usr/sbin", "/sbin"])


class ZFSCommandFailed(subprocess.CalledProcessError):
    """A zfs/zpool call that exited non-zero; unlike its base class, str() shows stderr."""

    def __str__(self):
        return "%s exited %d: %s" % (" ".join(self.cmd), self.returncode,
                                     (self.stderr or "").strip() or "(no stderr)")


def _run(argv, check=True, input=None, text=None):
    # send streams are bytes: default to text mode only when the input is not bytes
    if text is None:
        text = not isinstance(input, (bytes, bytearray))
    cp = subprocess.run([str(a) for a in argv], input=input, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, universal_newlines=text, env=_ZFS_ENV)
    if check and cp.returncode != 0:
        stderr = cp.stderr if text else cp.stderr.decode("utf-8", "replace")
        raise ZFSCommandFailed(cp.returncode, cp.args, cp.stdout, stderr)
    return cp


def zfs(*args, check=True, input=None, text=None):
    """Run the real `zfs ARGS...`; raise ZFSCommandFailed on non-zero exit if `check`.

    Text mode unless `input` is bytes or `text=False` (e.g. to capture a `zfs send` stream).
    """
    return _run(["zfs", *args], check=check, input=input, text=text)


def zpool(*args, check=True, input=None, text=None):
    """Run the real `zpool ARGS...`, like zfs()."""
    return _run(["zpool", *args], check=check, input=input, text=text)


# --- is there a ZFS? -------------------------------------------------------------------

_unavailable = None  # None: not probed yet; "": ZFS answers; otherwise the skip reason


def _probe():
    """Return "" if `zpool list` answers, else why not."""
    try:
        cp = zpool("list", "-H", "-o", "name", check=False)
    except OSError as e:
        return "no zpool command (%s)" % e
    if cp.returncode == 0:
        return ""
    return "zpool list exited %d: %s" % (cp.returncode, " / ".join(cp.stderr.strip().splitlines()[:2]))


def zfs_unavailable_reason():
    """"" if ZFS answers (starting zfs-fuse once if we may), else the reason to skip."""
    global _unavailable
    if _unavailable is not None:
        return _unavailable
    why = _probe()
    if why:
        if shutil.which("zfs-fuse", path=_ZFS_ENV["PATH"]) is None:
            # up.sh would apt-get install it; a test run should not install packages
            why = "ZFS unavailable: %s; zfs-fuse is not installed (./build.sh test installs it)" % why
        elif not UP_SH.exists():
            why = "ZFS unavailable: %s; and no %s to start zfs-fuse" % (why, UP_SH.relative_to(REPO))
        elif os.geteuid() != 0:
            why = "ZFS unavailable: %s; not root, so %s was not tried" % (why, UP_SH.relative_to(REPO))
        else:
            cp = subprocess.run(["sh", str(UP_SH)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True, env=_ZFS_ENV)
            again = _probe()
            if again:
                tail = " / ".join(cp.stdout.strip().splitlines()[-3:])
                why = ("ZFS unavailable: zfs-fuse daemon not running and could not be started: "
                       "%s exited %d: %s; %s" % (UP_SH.name, cp.returncode, tail, again))
            else:
                why = ""
    if not why:
        _reap_stale_pools()
    _unavailable = why
    return why


# --- pools -------------------------------------------------------------------------------

def _new_pool_name(suffix):
    return "zt" + "".join(random.choice(string.ascii_lowercase) for _ in range(6)) + suffix


def _create_pool(name, size):
    POOL_DIR.mkdir(parents=True, exist_ok=True)
    img = POOL_DIR / (name + ".img")
    # the pid file lets a later session reap this pool if our process dies before teardown
    (POOL_DIR / (name + ".pid")).write_text("%d\n" % os.getpid())
    try:
        subprocess.run(["truncate", "-s", size, str(img)], check=True)
        zpool("create", "-m", "none", name, img)
    except BaseException:
        _destroy_pool(name)
        raise
    return name


def _destroy_pool(name):
    """zpool destroy -f, retried because zfs-fuse may call the pool busy; then its files."""
    err = None
    for _ in range(5):
        if zpool("list", "-H", "-o", "name", name, check=False).returncode != 0:
            err = None  # gone, or never made
            break
        cp = zpool("destroy", "-f", name, check=False)
        if cp.returncode == 0:
            err = None
            break
        err = cp.stderr.strip()
        time.sleep(0.5)
    if err:
        # keep the file: deleting the vdev of a live pool leaves it FAULTED in the pool cache
        raise RuntimeError("could not destroy test pool %s: %s" % (name, err))
    for ext in (".img", ".pid"):
        try:
            (POOL_DIR / (name + ext)).unlink()
        except FileNotFoundError:
            pass


def _reap_stale_pools():
    """Destroy test pools whose creating process is gone (a run killed before teardown)."""
    if not POOL_DIR.is_dir():
        return
    for pidfile in POOL_DIR.glob("zt*.pid"):
        name = pidfile.stem
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, 0)
            continue  # still running: another session's pool
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        try:
            _destroy_pool(name)
        except RuntimeError as e:
            sys.stderr.write("conftest: %s\n" % e)


def _pool_size(request):
    mark = request.node.get_closest_marker("poolsize")
    return str(mark.args[0]) if mark else DEFAULT_POOL_SIZE


class Pools:
    """Two pool names for a module: `src` to replicate from, `dst` to replicate to."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst

    def __repr__(self):
        return "Pools(src=%r, dst=%r)" % (self.src, self.dst)


@pytest.fixture(scope="session")
def zfs_available():
    why = zfs_unavailable_reason()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def pools(zfs_available, request):
    size, made = _pool_size(request), []
    try:
        stem = _new_pool_name("")
        made.append(_create_pool(stem + "a", size))
        made.append(_create_pool(stem + "b", size))
        yield Pools(*made)
    finally:
        for name in made:
            _destroy_pool(name)


@pytest.fixture
def pool(zfs_available, request):
    name = _create_pool(_new_pool_name("a"), _pool_size(request))
    try:
        yield name
    finally:
        _destroy_pool(name)


# --- dataset helpers -------------------------------------------------------------------

def make_tree(root, rel_names, mountpoint="none"):
    """Create `root` (if missing) and `root/<rel>` for each of rel_names, in order.

    mountpoint "none" (default): every created dataset gets mountpoint=none, because mounted
    datasets cause `dataset is busy` and atime writes on zfs-fuse; None: inherit; any other
    string is a directory prefix: `<prefix>/<rel>` (root itself gets `<prefix>`).
    Returns the full names created, root first.
    """
    def opts(rel):
        if mountpoint is None:
            return []
        if mountpoint == "none":
            return ["-o", "mountpoint=none"]
        return ["-o", "mountpoint=" + os.path.join(str(mountpoint), rel).rstrip("/")]

    created = []
    if zfs("list", "-H", "-o", "name", root, check=False).returncode != 0:
        zfs("create", "-p", *opts(""), root)
        created.append(root)
    for rel in rel_names:
        name = root + "/" + rel
        zfs("create", "-p", *opts(rel), name)
        created.append(name)
    return created


def snap(fs, name, recursive=False):
    """`zfs snapshot [-r] fs@name`; returns "fs@name"."""
    full = "%s@%s" % (fs, name)
    zfs("snapshot", *(["-r"] if recursive else []), full)
    return full


def pid_alive(pid):
    """Is process pid running (not gone, not a zombie)? Linux's /proc."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def setpriv_pdeathsig():
    """Has this host util-linux's `setpriv --pdeathsig` (the direct pipe's send guard)?"""
    path = shutil.which("setpriv")
    return path is not None and b"--pdeathsig" in subprocess.run(
        [path, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout


def write_data(fs, nbytes, name=None):
    """Write `nbytes` random bytes into a new file on `fs`; returns the file's name.

    Mounts `fs` at a temporary directory just for the write, then unmounts it and restores
    the mountpoint property (local value or inheritance), so the dataset is left unmounted.
    Children that inherit the mountpoint would be mounted too: give them mountpoint=none
    (make_tree's default).
    """
    got = zfs("get", "-H", "-o", "value,source", "mountpoint", fs).stdout.rstrip("\n").split("\t")
    old_value, old_source = got[0], got[1]
    name = name or "data-%08x" % random.getrandbits(32)
    mnt = tempfile.mkdtemp(prefix="zreplpy-mnt-")
    try:
        zfs("set", "mountpoint=" + mnt, fs)
        if zfs("get", "-H", "-o", "value", "mounted", fs).stdout.strip() != "yes":
            zfs("mount", fs)
        with open(os.path.join(mnt, name), "wb") as f:
            left = nbytes
            while left > 0:
                chunk = os.urandom(min(left, 1 << 20))
                f.write(chunk)
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
    finally:
        for attempt in range(5):
            if zfs("get", "-H", "-o", "value", "mounted", fs).stdout.strip() != "yes":
                break
            if zfs("unmount", fs, check=False).returncode == 0:
                break
            time.sleep(0.2 * (attempt + 1))
        if old_source == "local":
            zfs("set", "mountpoint=" + old_value, fs)
        else:
            zfs("inherit", *(["-S"] if old_source == "received" else []), "mountpoint", fs)
        try:
            os.rmdir(mnt)
        except OSError:
            pass
    return name


def state(root):
    """Exact guid/createtxg/userrefs of root and everything under it.

    Returns {name: {"guid": int, "createtxg": int, "userrefs": int or None}} (userrefs is
    None for filesystems), from one `zfs get -Hp -r` (plain `zfs list` rounds these numbers).
    """
    out = zfs("get", "-Hp", "-r", "-o", "name,property,value", "guid,createtxg,userrefs", root).stdout
    result = {}
    for line in out.splitlines():
        name, prop, value = line.split("\t")
        result.setdefault(name, {})[prop] = None if value == "-" else int(value)
    return result


def names(root):
    """Sorted names of root and every filesystem, volume and snapshot under it."""
    out = zfs("list", "-H", "-o", "name", "-t", "filesystem,volume,snapshot", "-r", root).stdout
    return sorted(out.splitlines())


def hold(snapshot, tag):
    """`zfs hold TAG SNAPSHOT`."""
    return zfs("hold", tag, snapshot)


def release(snapshot, tag):
    """`zfs release TAG SNAPSHOT`."""
    return zfs("release", tag, snapshot)


def wipe(root):
    """Destroy `root` and everything below it, releasing every hold first: for modules
    whose tests each write a lot into the module's shared pools."""
    if zfs("list", "-H", "-o", "name", root, check=False).returncode != 0:
        return
    snaps = zfs("list", "-H", "-o", "name", "-t", "snapshot", "-r", root).stdout.split()
    if snaps:
        for line in zfs("holds", "-H", *snaps).stdout.splitlines():
            name, tag = line.split("\t")[:2]
            zfs("release", tag, name, check=False)
    zfs("destroy", "-r", root)


# --- zrepl.py as a subprocess ------------------------------------------------------------

def run_cli(*args, config=None, env=None, cwd=None, input=None, timeout=300):
    """Run `<this python> zrepl.py [--config FILE] ARGS...`; CompletedProcess with text output.

    config: a pathlib.Path is passed as it is; a str is YAML text, written to a temporary
    file for this call. env: entries laid over os.environ (a None value removes the name).
    The interpreter is the one running pytest, so each test lane exercises its own Python.
    """
    run_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            run_env.pop(key, None)
        else:
            run_env[key] = str(value)
    tmpdir = None
    argv = [sys.executable, str(ZREPL_PY)]
    try:
        if isinstance(config, str):
            tmpdir = tempfile.mkdtemp(prefix="zreplpy-cfg-")
            path = os.path.join(tmpdir, "zrepl.yml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(config)
            argv += ["--config", path]
        elif config is not None:
            argv += ["--config", str(config)]
        argv += [str(a) for a in args]
        return subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, env=run_env,
                              cwd=None if cwd is None else str(cwd), timeout=timeout)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def assert_no_traceback(cp):
    """Fail if a Python traceback reached stderr (SPEC §1.4: users never see one)."""
    assert "Traceback" not in (cp.stderr or ""), "traceback on stderr:\n" + cp.stderr


# --- hooks -------------------------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "zfs: needs a real ZFS (set automatically by the ZFS fixtures)")
    config.addinivalue_line("markers", "poolsize(size): size of the test pools, e.g. \"1G\" (default 256M)")


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection sees the items
def pytest_collection_modifyitems(config, items):
    for item in items:
        if ZFS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.zfs)


def pytest_runtest_setup(item):
    # a test marked `zfs` by hand, without a ZFS fixture, is skipped the same way
    if item.get_closest_marker("zfs") is not None:
        why = zfs_unavailable_reason()
        if why:
            pytest.skip(why)


# --- a real sshd on 127.0.0.1 with forced commands (SPEC §9.5) ------------------------------

SSHD = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin:/usr/bin")
SSH = shutil.which("ssh")
SSH_IDENTITIES = ("host1", "host2")


class SSHBed:
    """An sshd of the test session, as users deploy it: its own host key, one key per
    client identity, each authorized only with `command="…stdinserver IDENTITY",restrict`.
    The forced command is a small script that runs this checkout's zrepl.py with the
    configuration (and environment) the running test set with use(): the test bed serves
    one test's configuration at a time, like a host serves its one /etc/zrepl/zrepl.yml."""

    def __init__(self, base, port):
        self.base = Path(base)
        self.port = port
        self.known_hosts = self.base / "known_hosts"
        self.forced = self.base / "stdinserver.sh"

    def key(self, identity):
        return self.base / ("id_" + identity)

    def use(self, config, env=None):
        """Serve `config` (a path) from now on, with env's entries laid over sshd's."""
        (self.base / "config").write_text(str(config))
        lines = ["export %s=%s" % (k, shlex_quote(str(v))) for k, v in (env or {}).items()
                 if v is not None]
        (self.base / "env").write_text("\n".join(lines) + "\n")

    def authorize(self, identity, options=None):
        """Set identity's authorized_keys line: its key with `options` before it (None: the
        standard forced command, "": none at all); options=False removes the key."""
        keys = {}
        path = self.base / "authorized_keys"
        for ln in path.read_text().splitlines():
            keys[ln.rsplit(" ", 1)[-1]] = ln
        pub = self.key(identity).with_suffix(".pub").read_text().split()
        if options is None:
            options = 'command="%s %s",restrict' % (self.forced, identity)
        if options is False:
            keys.pop(identity, None)
        else:
            keys[identity] = ("%s %s %s %s" % (options, pub[0], pub[1], identity)).strip()
        path.write_text("\n".join(keys.values()) + "\n")

    def connect_yaml(self, identity="host1", **over):
        """The `connect:` of an active job reaching this bed as `identity`."""
        fields = {"type": "ssh+stdinserver", "host": "127.0.0.1", "user": "root",
                  "port": self.port, "identity_file": str(self.key(identity)),
                  "options": ["UserKnownHostsFile=%s" % self.known_hosts,
                              "StrictHostKeyChecking=yes"]}
        fields.update(over)
        return "{%s}" % ", ".join(
            "%s: %s" % (k, json_dumps(v) if not isinstance(v, int) else v)
            for k, v in fields.items())


def shlex_quote(s):
    import shlex
    return shlex.quote(s)


def json_dumps(v):
    import json
    return json.dumps(v)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ssh_bed():
    """Start the session's sshd -> SSHBed; skips (with the reason) where it cannot run."""
    if SSHD is None or SSH is None:
        pytest.skip("no sshd/ssh (Debian openssh-server; ./build.sh test installs it)")
    if os.geteuid() != 0:
        pytest.skip("the ssh test bed logs in as root (ZFS needs it); run as root")
    base = Path(tempfile.mkdtemp(prefix="zreplpy-sshd-"))
    os.chmod(str(base), 0o700)
    port = _free_port()
    bed = SSHBed(base, port)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "host_key")],
                   check=True)
    for ident in SSH_IDENTITIES:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", ident,
                        "-f", str(bed.key(ident))], check=True)
    hostpub = (base / "host_key.pub").read_text().split()
    bed.known_hosts.write_text("[127.0.0.1]:%d %s %s\n" % (port, hostpub[0], hostpub[1]))
    bed.forced.write_text(
        "#!/bin/sh\n"
        "# the test bed's forced command: this checkout's zrepl.py, the running test's config\n"
        'dir=$(dirname "$0")\n'
        '. "$dir/env"\n'
        'exec %s %s --config "$(cat "$dir/config")" stdinserver "$1"\n'
        % (shlex_quote(sys.executable), shlex_quote(str(ZREPL_PY))))
    bed.forced.chmod(0o755)
    bed.use("/nonexistent")
    (base / "authorized_keys").write_text("")
    for ident in SSH_IDENTITIES:
        bed.authorize(ident)
    (base / "sshd_config").write_text(
        "ListenAddress 127.0.0.1\nPort %d\nHostKey %s\nAuthorizedKeysFile %s\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\nPidFile %s\n"
        "MaxStartups 100:30:200\nMaxSessions 100\nLogLevel ERROR\n"
        % (port, base / "host_key", base / "authorized_keys", base / "sshd.pid"))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)      # its privilege separation dir
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(base / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(str(base / "sshd.log"), "w"))
    deadline = time.monotonic() + 15
    import socket
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("sshd did not start: %s" % (base / "sshd.log").read_text()[-500:])
            time.sleep(0.1)
    yield bed
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(str(base), ignore_errors=True)


# --- TLS certificates made with openssl (the tcp/tls listener tests) ----------------------

class Certs:
    """A CA, certificates it signed for the server CN and client CNs, and a stranger's CA
    with a client certificate of its own: path(cn) -> (cert, key)."""

    CLIENTS = ("host1", "host2", "src1", "outsider")

    def __init__(self, base):
        self.base = base
        self.ca = str(base / "ca.crt")
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt",
                      "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(base / "ca.key"),
                      "-out", self.ca, "-days", "3", "-subj", "/CN=zreplpy-test-ca")
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt",
                      "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                      str(base / "rogue-ca.key"), "-out", str(base / "rogue-ca.crt"), "-days",
                      "3", "-subj", "/CN=rogue-ca")
        for cn in ("backup",) + self.CLIENTS:
            self._leaf(cn, "ca")
        self._leaf("host1", "rogue-ca", name="rogue-host1")

    def _openssl(self, *args):
        subprocess.run(["openssl", *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    def _leaf(self, cn, ca, name=None):
        b, name = self.base, name or cn
        self._openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", str(b / (name + ".key")), "-out",
                      str(b / (name + ".csr")), "-subj", "/CN=" + cn)
        self._openssl("x509", "-req", "-in", str(b / (name + ".csr")), "-CA",
                      str(b / (ca + ".crt")), "-CAkey", str(b / (ca + ".key")),
                      "-CAcreateserial", "-out", str(b / (name + ".crt")), "-days", "2")

    def path(self, name):
        return str(self.base / (name + ".crt")), str(self.base / (name + ".key"))


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (the tls tests make their certificates with it)")
    return Certs(tmp_path_factory.mktemp("certs"))


def free_port():
    return _free_port()
