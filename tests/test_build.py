"""The built zrepl.pyz (pure tests; skipped until ./build.sh has made it).

SPEC §0.1: the .pyz runs as `python3 zrepl.pyz` with an empty environment, an unwritable HOME
and a read-only working directory, and carries nothing but zrepl.py and shiv's own files.
"""
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYZ = REPO / "zrepl.pyz"
BARE_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
NO_HOME = "/nonexistent"
# the wire's version, read from the source the archive is built of (not imported: the
# archive's own copy is what runs)
PROTOCOL_VERSION = int(re.search(r"^PROTOCOL_VERSION = (\d+)", (REPO / "zrepl.py").read_text(),
                                 re.M).group(1))

# shiv's launcher files and zrepl.py with its own metadata; nothing else may be in the archive
ALLOWED_MEMBER = re.compile(r"^(__main__\.py|environment\.json|_bootstrap/\w+\.py"
                            r"|site-packages/zrepl\.py|site-packages/__pycache__/zrepl\.cpython-3\d+\.pyc"
                            r"|site-packages/zrepl[._-]py-[^/]+\.dist-info/[^/]+)$")

pytestmark = pytest.mark.skipif(not PYZ.exists(), reason="zrepl.pyz is not built (run ./build.sh)")


def test_runs_with_empty_env_from_readonly_dir(tmp_path):
    python3 = shutil.which("python3", path=BARE_PATH)
    if python3 is None:
        pytest.skip("no python3 in " + BARE_PATH)
    assert not os.path.exists(NO_HOME), "%s exists before the run (left by an extraction?)" % NO_HOME
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        cp = subprocess.run(
            ["env", "-i", "PATH=" + BARE_PATH, "HOME=" + NO_HOME, "python3", str(PYZ), "version", "--json"],
            cwd=str(ro), stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            timeout=120)
        leftovers = sorted(p.name for p in ro.iterdir())
    finally:
        ro.chmod(0o755)
    assert cp.returncode == 0, "rc %d, stderr:\n%s" % (cp.returncode, cp.stderr)
    assert json.loads(cp.stdout)["schema"] == "zrepl.py/version/1"
    # root may write into a 0555 directory, so prove that nothing was extracted
    assert leftovers == [], "the .pyz wrote into the working directory: %s" % leftovers
    assert not os.path.exists(NO_HOME), "the .pyz created HOME=%s (shiv extraction?)" % NO_HOME


def test_holds_only_zrepl_and_shiv_bootstrap():
    with open(str(PYZ), "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"
    with zipfile.ZipFile(str(PYZ)) as z:
        members = z.namelist()
    extra = [m for m in members if not ALLOWED_MEMBER.match(m)]
    assert not extra, "zrepl.pyz carries more than zrepl.py and shiv's bootstrap: %s" % extra
    assert "site-packages/zrepl.py" in members and "__main__.py" in members


def test_runs_the_bytecode_of_its_python_else_the_source(tmp_path):
    """zipimport caches no bytecode, so the archive carries zrepl.py compiled by each Python
    the build host had, and the launcher runs this Python's: told apart here by copies of
    the archive whose bytecode for this Python was compiled from a changed source. Where
    there is none, or one of another bytecode version under this Python's name, the source
    runs."""
    import importlib.util
    import py_compile
    import sys
    member = "site-packages/__pycache__/zrepl.%s.pyc" % sys.implementation.cache_tag
    with zipfile.ZipFile(str(PYZ)) as z:
        shipped = [m for m in z.namelist() if m.startswith("site-packages/__pycache__/")]
        if member in shipped:
            assert z.read(member)[:4] == importlib.util.MAGIC_NUMBER
    assert shipped, "zrepl.pyz carries no bytecode: every start compiles zrepl.py"
    changed = tmp_path / "zrepl.py"
    changed.write_text((REPO / "zrepl.py").read_text().replace(
        '    """Console entry point of the zipapp."""\n',
        '    """Console entry point of the zipapp."""\n    print("ran the bytecode")\n'))
    pyc = py_compile.compile(str(changed), cfile=str(tmp_path / "changed.pyc"), doraise=True)
    good = Path(pyc).read_bytes()

    def run_copy(name, bytecode):
        path = tmp_path / name
        with zipfile.ZipFile(str(PYZ)) as zin, open(str(path), "wb") as out:
            out.write(b"#!/usr/bin/env python3\n")
            with zipfile.ZipFile(out, "w") as zout:
                for info in zin.infolist():
                    if info.filename != member:
                        zout.writestr(info, zin.read(info))
                if bytecode is not None:
                    zout.writestr(member, bytecode)
        cp = subprocess.run([sys.executable, str(path), "version"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
        return cp.stdout.splitlines()[0]

    assert run_copy("bytecode.pyz", good) == "ran the bytecode"
    assert run_copy("none.pyz", None).startswith("zrepl.py ")
    assert run_copy("other.pyz", b"\0\0\r\n" + good[4:]).startswith("zrepl.py ")


def test_is_built_from_the_current_zrepl_py():
    with zipfile.ZipFile(str(PYZ)) as z:
        packed = z.read("site-packages/zrepl.py")
    assert packed == (REPO / "zrepl.py").read_bytes(), "zrepl.pyz is stale: run ./build.sh"


def test_serves_stdinserver_as_an_ssh_forced_command_runs_it(tmp_path):
    """The .pyz as the passive side's forced command (SPEC §9.5): preamble, an answer to
    our HELLO (the sink's, or its error where this host has no ZFS), a clean end at EOF."""
    cfg = tmp_path / "zrepl.yml"
    cfg.write_text("global: {rundir: %s}\njobs:\n  - name: sink\n    type: sink\n"
                   "    root_fs: smokepool/sink\n"
                   "    serve: {type: stdinserver, client_identities: [host1]}\n" % (tmp_path / "run"))
    hello = json.dumps({"protocol": PROTOCOL_VERSION, "software": "test", "job": "push",
                        "mode": "replicate"}).encode()
    frame = len(hello).to_bytes(4, "big") + bytes((1,)) + hello
    cp = subprocess.run(["env", "-i", "PATH=" + BARE_PATH, "HOME=" + NO_HOME, "python3", str(PYZ),
                         "--config", str(cfg), "stdinserver", "host1"], input=frame,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    err = cp.stderr.decode("utf-8", "replace")
    assert b"Traceback" not in cp.stderr and cp.returncode in (0, 1), (cp.returncode, err)
    out = cp.stdout
    assert out.startswith(b"ZREPLPY1"), out[:200]
    n, kind = int.from_bytes(out[8:12], "big"), out[12]
    assert kind == 1, out[:200]                                  # HELLO
    doc = json.loads(out[13:13 + n].decode())
    assert doc.get("job_type") == "sink" or "error" in doc, doc


# what `--help` must not import: each was measured in its start-up (bench/startup.py)
NOT_AT_START = {"dataclasses", "inspect", "typing", "json", "socket", "subprocess", "threading",
                "selectors", "shutil", "hashlib", "ipaddress", "platform", "zlib"}


def test_help_starts_without_importing_what_it_does_not_use():
    """The start-up diet (bench/startup.py): standard modules a command may not need are
    imported at their first use, the launcher and the bytecode are stored, not deflated."""
    import sys
    cp = subprocess.run([sys.executable, "-X", "importtime", str(PYZ), "--help"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                        timeout=120)
    assert cp.returncode == 0 and "usage: zrepl.py" in cp.stdout, cp.stderr
    imported = {line.split("|")[-1].strip() for line in cp.stderr.splitlines()
                if line.startswith("import time:")}
    assert "argparse" in imported                      # the measurement sees imports
    # what argparse itself brings on this Python (3.8's imports shutil, with zlib, bz2, ...)
    theirs = set(subprocess.run([sys.executable, "-c", "import sys, argparse, runpy; "
                                 "print(' '.join(sys.modules))"], stdout=subprocess.PIPE,
                                universal_newlines=True, check=True).stdout.split())
    assert not (imported - theirs) & NOT_AT_START, sorted((imported - theirs) & NOT_AT_START)
    with zipfile.ZipFile(str(PYZ)) as z:
        for info in z.infolist():
            if info.filename == "__main__.py" or info.filename.endswith(".pyc"):
                assert info.compress_type == zipfile.ZIP_STORED, info.filename
