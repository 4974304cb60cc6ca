"""The shape of the product (pure, no ZFS): repo layout, one stdlib-only Python 3.8 module, and
the edge line: nothing above the "ZFS adapter" section starts a process, opens a socket,
starts a thread or reads the clock (STYLE.md, "a pure upper half").
"""
import ast
import importlib.util
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ZREPL_PY = REPO / "zrepl.py"

ALLOWED_TOP = {"zrepl.py", "build.sh", "tests", "config.example.yml", "LICENSE", "README.md",
               ".ci", "bench", ".gitignore", ".git"}
# .git is absent where the tree was copied without it (the OpenZFS lane's VM)
OPTIONAL_TOP = {"bench", ".git"}
# build and test by-products, all in .gitignore (__pycache__ appears when a test imports zrepl,
# .benchmarks when the interpreter running pytest has pytest-benchmark)
IGNORABLE_TOP = {".build", "zrepl.pyz", ".pytest_cache", "__pycache__", ".benchmarks"}

BANNER_RULE = re.compile(r"^#{20,}\s*$")
BANNER_TITLE = re.compile(r"^# (\d+)\. (.+)$")
EDGE_SECTION = "ZFS adapter"

# Names (after resolving import aliases) that pure code must not touch: processes, sockets,
# threads, the clock.
FORBIDDEN = [re.compile(p) for p in (
    r"^(subprocess|socket|threading|_thread|select|selectors|multiprocessing|asyncio"
    r"|concurrent\.futures)(\.|$)",
    r"^os\.(fork|forkpty|system|popen|exec\w*|spawn\w*|posix_spawn\w*)$",
    r"^time\.(time|time_ns|monotonic|monotonic_ns|perf_counter|perf_counter_ns|sleep)$",
    r"(^|\.)(datetime\.(now|utcnow|today)|date\.today)$",
)]
# these read the clock only when called without the time argument
CLOCK_WITHOUT_ARG = {"time.localtime": 1, "time.gmtime": 1, "time.ctime": 1, "time.asctime": 1,
                     "time.strftime": 2}


def read_source():
    if not ZREPL_PY.exists():
        pytest.fail("zrepl.py does not exist yet")
    return ZREPL_PY.read_text(encoding="utf-8")


def stdlib_names():
    names = getattr(sys, "stdlib_module_names", None)  # Python 3.10+
    if names:
        return set(names)
    # 3.8/3.9: what the interpreter's own library directories hold
    stdlib = sysconfig.get_paths()["stdlib"]
    found = {m.name for m in pkgutil.iter_modules([stdlib, os.path.join(stdlib, "lib-dynload")])}
    return found | set(sys.builtin_module_names) | {"__future__"}


def sections(src):
    """[(line number, section number, title)] of the numbered banners, in file order."""
    lines = src.splitlines()
    found = []
    for i in range(1, len(lines)):
        m = BANNER_TITLE.match(lines[i])
        if m and BANNER_RULE.match(lines[i - 1]):
            found.append((i + 1, int(m.group(1)), m.group(2).strip()))
    return found


def edge_line(src):
    for lineno, _, title in sections(src):
        if title.startswith(EDGE_SECTION):
            return lineno
    pytest.fail('zrepl.py has no "# N. %s" banner section' % EDGE_SECTION)


def import_aliases(tree):
    """Map each name bound by an import to the dotted module path it stands for."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = node.module + "." + a.name
    return aliases


def dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def impure_uses(src, below_line):
    """["line N: name"] for every forbidden name used on a line before `below_line`."""
    tree = ast.parse(src)
    aliases = import_aliases(tree)
    inner = set()  # the .value of an Attribute: part of a longer chain, reported with it
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            inner.add(id(node.value))

    def resolve(expr):
        name = dotted(expr)
        if name is None:
            return None
        head, _, rest = name.partition(".")
        if head not in aliases:  # a local name, not a module we imported
            return None
        return aliases[head] + ("." + rest if rest else "")

    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", below_line) >= below_line:
            continue
        if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in inner:
            name = resolve(node)
            if name and any(p.search(name) for p in FORBIDDEN):
                found.append((node.lineno, name))
        elif isinstance(node, ast.Call):
            name = resolve(node.func)
            if name in CLOCK_WITHOUT_ARG and len(node.args) < CLOCK_WITHOUT_ARG[name]:
                found.append((node.lineno, name + "() without a time argument"))
    return ["line %d: %s" % f for f in sorted(set(found))]


# --- tests -----------------------------------------------------------------------------

def test_top_level_entries():
    present = {p.name for p in REPO.iterdir()} - IGNORABLE_TOP
    unexpected = sorted(present - ALLOWED_TOP)
    missing = sorted(ALLOWED_TOP - OPTIONAL_TOP - present)
    assert not unexpected and not missing, "unexpected: %s; missing: %s" % (unexpected, missing)


def test_parses_as_python_38():
    src = read_source()
    try:
        ast.parse(src, filename="zrepl.py", feature_version=(3, 8))
    except SyntaxError as e:
        pytest.fail("zrepl.py is not Python 3.8 syntax: line %s: %s" % (e.lineno, e.msg))


def test_imports_only_stdlib():
    std = stdlib_names()
    bad = []
    for node in ast.walk(ast.parse(read_source())):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mods = [("." * node.level) + (node.module or "")]
        else:
            continue
        for mod in mods:
            if mod.startswith(".") or mod.split(".")[0] not in std:
                bad.append("line %d: %s" % (node.lineno, mod))
    assert not bad, "non-stdlib imports in zrepl.py:\n" + "\n".join(bad)


def test_vermin_minimum_version_3_8():
    if importlib.util.find_spec("vermin") is not None:
        # vermin has no __main__; call its console-script function in this interpreter
        cmd = [sys.executable, "-c", "import sys; from vermin.main import main; sys.exit(main())"]
    elif shutil.which("vermin"):
        cmd = [shutil.which("vermin")]
    else:
        pytest.skip("vermin is not installed here (./build.sh test runs it in .build/venv)")
    read_source()
    cp = subprocess.run(cmd + ["--no-tips", "--violations", "--no-config-file", "-t=3.8-",
                               str(ZREPL_PY)],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert cp.returncode == 0, "vermin: zrepl.py needs more than Python 3.8:\n" + cp.stdout


def test_sections_numbered_in_order():
    found = sections(read_source())
    assert found, "zrepl.py has no numbered banner sections"
    numbers = [n for _, n, _ in found]
    backwards = ["line %d: section %d after %d" % (line, n, prev)
                 for (line, n, _), prev in zip(found[1:], numbers) if n <= prev]
    assert not backwards, "section numbers must increase:\n" + "\n".join(backwards)


def test_edge_line_keeps_the_upper_half_pure():
    src = read_source()
    edge = edge_line(src)
    bad = impure_uses(src, edge)
    assert not bad, ("process/socket/thread/clock use above the %r section (line %d):\n%s"
                     % (EDGE_SECTION, edge, "\n".join(bad)))


def test_edge_checker_catches_what_it_should():
    # the checker guards the design, so it is checked itself
    rule = "#" * 79
    src = "\n".join([
        "import subprocess, time as t, datetime",
        "from threading import Thread",
        "from time import monotonic as mono",
        rule, "# 1. Pure", rule,
        "def f(socket, now):",
        "    subprocess.run(['x'])",   # 8
        "    t.sleep(1)",              # 9
        "    Thread()",                # 10
        "    datetime.datetime.now()",  # 11
        "    mono()",                  # 12
        "    t.gmtime()",              # 13
        "    t.gmtime(0)",             # fine: converts a given time
        "    socket.recv(now)",        # fine: a parameter, not the module
        rule, "# 7. ZFS adapter — runs zfs", rule,
        "subprocess.run(['zfs'])",
    ])
    assert [s[1:] for s in sections(src)] == [(1, "Pure"), (7, "ZFS adapter — runs zfs")]
    assert impure_uses(src, edge_line(src)) == [
        "line 8: subprocess.run", "line 9: time.sleep", "line 10: threading.Thread",
        "line 11: datetime.datetime.now", "line 12: time.monotonic",
        "line 13: time.gmtime() without a time argument",
    ]


def _readme_block(lang, must_contain):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```%s\n(.*?)```" % re.escape(lang), text, re.S)
    found = [b for b in blocks if must_contain in b]
    assert len(found) == 1, "README.md: one ```%s block with %r" % (lang, must_contain)
    return found[0]


def test_the_service_files_in_the_readme_are_well_formed(tmp_path):
    """The shape has no room for a contrib/ directory: the systemd unit, the FreeBSD rc.d
    script and the illumos SMF manifest live in README.md, and each must be usable as is."""
    import configparser
    import xml.etree.ElementTree as ET
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str
    unit.read_string(_readme_block("ini", "[Service]"))
    assert unit["Service"]["ExecStart"].endswith(" daemon")
    assert unit["Service"]["KillMode"] == "mixed" and "HUP" in unit["Service"]["ExecReload"]
    rc = tmp_path / "zrepl_py"
    rc.write_text(_readme_block("sh", "run_rc_command"))
    assert subprocess.run(["sh", "-n", str(rc)]).returncode == 0
    assert 'sig_reload="HUP"' in rc.read_text() and " daemon\"" in rc.read_text()
    manifest = ET.fromstring(_readme_block("xml", "service_bundle").split("\n", 2)[2])
    methods = {m.get("name"): m.get("exec") for m in manifest.iter("exec_method")}
    assert methods["start"].endswith(" daemon &") and methods["refresh"] == ":kill -HUP"
