"""Section 14, the CLI: commands run as a user runs them, exit codes, output, no tracebacks."""
import json
import os
import re
import sys

import pytest

from conftest import REPO, assert_no_traceback, make_tree, run_cli, setpriv_pdeathsig, zfs

sys.path.insert(0, str(REPO))
import zrepl  # noqa: E402

EXAMPLE = REPO / "config.example.yml"

SNAP_JOB = """\
jobs:
  - name: snapjob
    type: snap
    filesystems: {FILTER}
    snapshotting: {{type: periodic, prefix: zrepl_, interval: 10m}}
    pruning:
      keep: [{{type: regex, regex: ".*"}}]
  - name: sinkjob
    type: sink
    root_fs: {POOL}/sink
    serve: {{type: local, listener_name: x}}
"""


# --- version -------------------------------------------------------------------------------

def test_version_text(zfs_available):
    cp = run_cli("version")
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0] == "zrepl.py " + zrepl.VERSION
    assert lines[1].startswith("python ") and " on " in lines[1]
    assert lines[2].startswith("zfs: ")
    caps = lines[3].split(" ", 1)[1].split()
    assert [c.split("=")[0] for c in caps] == list(zrepl.CAPABILITY_NAMES)
    assert all(c.split("=")[1] in ("yes", "no") for c in caps)
    # a local job's stream goes straight from send to receive where its bytes can be
    # counted without reading them (OpenZFS on Linux); a "relay" there would be a quiet loss
    # (and only where util-linux's setpriv can make the send die with zrepl.py)
    direct = lines[2].startswith("zfs: openzfs ") and sys.platform.startswith("linux") \
        and setpriv_pdeathsig()
    assert lines[4] == "local streams: direct" if direct else \
        lines[4].startswith("local streams: relay")
    if not lines[2].startswith("zfs: openzfs "):     # nothing could do better: no reason
        assert lines[4] == "local streams: relay"
    assert all(ln.startswith("pool ") for ln in lines[5:])


def test_version_json_under_empty_environment_from_readonly_dir(zfs_available, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(str(ro), 0o555)
    env = {k: None for k in os.environ}
    env.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", HOME="/nonexistent")
    cp = run_cli("version", "--json", env=env, cwd=ro)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["schema"] == "zrepl.py/version/1" and doc["version"] == zrepl.VERSION
    assert set(doc["zfs"]["capabilities"]) == set(zrepl.CAPABILITY_NAMES)
    assert doc["zfs"]["available"] is True
    assert doc["zfs"]["local_streams"] == (
        "direct" if doc["zfs"]["implementation"] == "openzfs" and
        sys.platform.startswith("linux") and setpriv_pdeathsig() else "relay")
    if doc["zfs"]["implementation"] == "zfs-fuse":   # SPEC §13 acceptance 5
        for name in ("list_p", "bookmarks", "holds_list", "multi_snapshot", "comma_destroy"):
            assert doc["zfs"]["capabilities"][name] is False
    assert os.listdir(str(ro)) == [] and not os.path.exists("/nonexistent")


# --- configcheck -----------------------------------------------------------------------------

def test_example_config_passes_configcheck():
    cp = run_cli("configcheck", "--skip-cert-check", config=EXAMPLE)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == ""
    assert_no_traceback(cp)


def test_example_config_normalized_json_and_pretty():
    cp = run_cli("configcheck", "--format", "json", "--what", "jobs", config=EXAMPLE)
    assert cp.returncode == 0, cp.stderr
    jobs = json.loads(cp.stdout)
    assert [j["name"] for j in jobs] == ["backup_sink", "tank_to_backup", "home_snapshots"]
    push = jobs[1]
    assert push["snapshotting"]["interval"] == 900
    assert push["replication"]["timeout"] == 600 and push["replication"]["batch_incrementals"]
    assert push["keep_sender"][1]["buckets"][:2] == [[3600, None], [3600, 1]]
    assert push["connect"]["dial_timeout"] == 2.0           # the local transport's default
    cp = run_cli("configcheck", "--format", "json", config=EXAMPLE)
    doc = json.loads(cp.stdout)
    assert set(doc) == {"config", "jobs", "logging"}
    assert doc["logging"] == [dict(doc["logging"][0], type="stdout", level="warn")]
    assert doc["config"]["global"]["control_sockpath"] == "/var/run/zrepl/control"
    cp = run_cli("configcheck", "--format", "pretty", "--what", "logging", config=EXAMPLE)
    assert cp.returncode == 0 and "  type: stdout\n" in cp.stdout


def test_configcheck_reports_every_error_with_position(tmp_path):
    cfg = tmp_path / "bad.yml"
    cfg.write_text("jobs:\n"
                   "  - name: a\n"
                   "    type: snap\n"
                   "    filesystems: {\"p<\": maybe}\n"
                   "    snapshotting: {type: periodic, prefix: zrepl_, interval: 10x}\n"
                   "    pruning:\n"
                   "      keep:\n"
                   "        - {type: last_n, count: 0}\n")
    cp = run_cli("configcheck", config=cfg)
    assert cp.returncode == 2 and cp.stdout == ""
    assert_no_traceback(cp)
    errors = cp.stderr.splitlines()
    assert errors[0].startswith("%s:4:25: " % cfg) and "boolean" in errors[0]
    assert errors[1].startswith("%s:5:62: " % cfg) and "invalid duration '10x'" in errors[1]
    assert errors[2].startswith("%s:8:33: " % cfg) and "at least 1" in errors[2]
    assert len(errors) == 3


def test_configcheck_finds_a_missing_execpipe_program_and_a_shell_string(tmp_path):
    cfg = tmp_path / "pipe.yml"
    base = ("jobs:\n"
            "  - name: s\n"
            "    type: sink\n"
            "    root_fs: zreplpy-nowhere/sink\n"
            "    serve: {type: local, listener_name: l}\n"
            "  - name: a\n"
            "    type: push\n"
            "    connect: {type: local, listener_name: l, client_identity: h}\n"
            "    filesystems: {\"<\": true}\n"
            "    snapshotting: {type: manual}\n"
            "    send: {execpipe: %s}\n"
            "    pruning: {keep_sender: [{type: last_n, count: 1}],"
            " keep_receiver: [{type: last_n, count: 1}]}\n")
    cfg.write_text(base % '[["gzip", "-1"], ["zreplpy-no-such-program", "-q"]]')
    cp = run_cli("configcheck", config=cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 2, cp.stderr
    assert "send.execpipe[1]: program 'zreplpy-no-such-program' not found" in cp.stderr
    assert "execpipe[0]" not in cp.stderr                    # gzip is there
    # a config meant for another host: its programs are that host's business
    assert run_cli("configcheck", "--skip-host-checks", config=cfg).returncode == 0
    # a stage given as one string would need a shell: refused, with the list it should be
    cfg.write_text(base % '["zstd -3"]')
    cp = run_cli("configcheck", "--skip-host-checks", config=cfg)
    assert cp.returncode == 2 and '["zstd", "-3"]' in cp.stderr and "no shell" in cp.stderr
    cfg.write_text(base % '[[]]')
    cp = run_cli("configcheck", "--skip-host-checks", config=cfg)
    assert cp.returncode == 2 and "is empty" in cp.stderr


def test_configcheck_warning_keeps_exit_zero(tmp_path):
    cfg = tmp_path / "warn.yml"
    cfg.write_text("jobs:\n"
                   "  - name: a\n"
                   "    type: snap\n"
                   "    filesystems: {\"<\": true}\n"
                   "    snapshotting: {type: manual}\n"
                   "    pruning: {keep: []}\n")
    cp = run_cli("configcheck", config=cfg)
    assert cp.returncode == 0, cp.stderr
    assert "%s:6:21: warning: " % cfg in cp.stderr and "keeps every snapshot" in cp.stderr


@pytest.mark.parametrize("args,env,message", [
    (["--config", "/nonexistent/zrepl.yml", "configcheck"], {},
     "configuration file /nonexistent/zrepl.yml does not exist"),
    (["configcheck"], {"ZREPL_CONFIG": "/nonexistent/env.yml"},
     "configuration file /nonexistent/env.yml does not exist"),
    (["frobnicate"], {}, "invalid choice: 'frobnicate'"),
    ([], {}, "the following arguments are required: COMMAND"),
    (["configcheck", "--what", "everything"], {}, "invalid choice: 'everything'"),
    (["test", "filesystems", "--all"], {}, "the following arguments are required: --job"),
    (["test", "placeholder", "--all", "--dataset", "x"], {}, "not allowed with argument"),
    (["version", "--jsn"], {}, "unrecognized arguments: --jsn"),
], ids=["missing-config", "missing-env-config", "unknown-command", "no-command", "bad-choice",
        "missing-required", "exclusive", "unknown-flag"])
def test_usage_errors_exit_2_without_traceback(args, env, message):
    cp = run_cli(*args, env=env)
    assert cp.returncode == 2
    assert message in cp.stderr and "zrepl.py: error: " in cp.stderr
    assert_no_traceback(cp)


@pytest.mark.parametrize("command", [["version"], ["configcheck"], ["test"],
                                     ["test", "filesystems"], ["test", "placeholder"]])
def test_help_everywhere(command):
    cp = run_cli(*command, "--help")
    assert cp.returncode == 0 and "usage: zrepl.py" in cp.stdout


# one command line per command, every option given
EVERY_COMMAND = [
    ["version", "--json"],
    ["configcheck", "--what", "jobs", "--format", "json", "--skip-cert-check"],
    ["once", "a", "b", "--json", "--dry-run", "--snapshot", "never", "--max-runtime", "30m",
     "--no-progress"],
    ["prune", "--job", "j", "--side", "sender", "--dry-run", "--json"],
    ["status", "--job", "j", "--json", "--watch"],
    ["daemon"],
    ["signal", "wakeup", "j", "--wait"],
    ["zfs-abstraction", "release-stale", "--fs", "a/b", "--job", "j", "--type", "step-hold",
     "--dry-run", "--json"],
    ["heal", "--job", "j", "--fs", "a/b", "--snapshot", "s", "--dry-run", "--json"],
    ["monitor", "--job", "j", "--prefix", "p", "--warn-age", "1h", "--crit-age", "2h",
     "--lag-warn", "3h", "--lag-crit", "4h", "--warn-count", "5", "--crit-count", "2"],
    ["restore", "--job", "j", "--fs", "a/b", "a/c", "--to", "t", "--snapshot", "s", "--json"],
    ["stdinserver", "client1"],
    ["test", "filesystems", "--job", "j", "--input", "a/b"],
    ["test", "placeholder", "--dataset", "a/b"],
]


def test_every_command_is_in_the_table():
    listed = {argv[0] for argv in EVERY_COMMAND}
    with pytest.raises(zrepl.UsageError) as e:
        zrepl.build_parser().parse_args(["no-such-command"])
    assert listed == set(re.findall(r"'([a-z-]+)'", str(e.value).split("choose from")[1]))


@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda argv: "-".join(argv[:2]))
def test_the_parser_of_one_command_parses_and_helps_as_the_whole(argv, capsys):
    """main() declares only its command's options (start-up): that command's parse, its
    --help and the command list read exactly as with every command declared."""
    for before in (["--config", "x.yml", "--debug"], ["--conf", "x.yml"], ["--config=x.yml"],
                   ["--deb", "--"]):
        assert zrepl._command_word(before + argv) == argv[0], before
    word = argv[0]
    whole, one = zrepl.build_parser(), zrepl.build_parser(word)
    assert vars(one.parse_args(argv)) == vars(whole.parse_args(argv))
    helps = []
    for parser in (whole, one):
        for line in (argv[:1], argv[:2] if argv[0] == "test" else argv[:1], []):
            with pytest.raises(SystemExit):
                parser.parse_args(line + ["--help"])
        helps.append(capsys.readouterr().out)
    assert helps[0] == helps[1] and "usage: zrepl.py " + argv[0] in helps[0]


def test_no_command_word_declares_no_options_and_helps_as_the_whole(capsys):
    assert zrepl._command_word(["--config", "x.yml", "--debug", "--help"]) is None
    for parser in (zrepl.build_parser(), zrepl.build_parser("")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--help"])
        with pytest.raises(zrepl.UsageError, match="required: COMMAND"):
            parser.parse_args([])
    whole, none = capsys.readouterr().out.split("usage: zrepl.py [-h]")[1:]
    assert whole == none


def test_help_wraps_at_the_terminal_width():
    cp = run_cli("--help", env={"COLUMNS": "50"})
    assert cp.returncode == 0 and max(map(len, cp.stdout.splitlines())) <= 48
    assert max(map(len, run_cli("--help", env={"COLUMNS": "200"}).stdout.splitlines())) > 80


def test_config_from_environment(tmp_path):
    cfg = tmp_path / "env.yml"
    cfg.write_text("jobs: []\n")
    cp = run_cli("configcheck", env={"ZREPL_CONFIG": str(cfg)})
    assert cp.returncode == 0, cp.stderr


# --- test filesystems ------------------------------------------------------------------------

def test_filesystems_table_of_spec_section_5(pools):
    # SPEC §5's example, with `tank` below our test pool and a second tree for `zroot`
    t = pools.src + "/tank"
    make_tree(t, ["bar", "foo", "foo/bar", "foo/bar/loo", "tmp", "tmp/x", "foobar"])
    make_tree(pools.src + "/zroot", [])
    flt = ('{"%s<": true, "%s/foo<": false, "%s/foo/bar": true, "%s/tmp": false}'
           % (t, t, t, t))
    cfg = SNAP_JOB.format(FILTER=flt, POOL=pools.dst)
    cp = run_cli("test", "filesystems", "--job", "snapjob", "--all", config=cfg)
    assert cp.returncode == 0, cp.stderr
    mine = [ln for ln in cp.stdout.splitlines()
            if ln.split("\t")[1].startswith((t, pools.src + "/zroot"))]
    assert mine == [
        "ACCEPT\t%s" % t,
        "ACCEPT\t%s/bar" % t,
        "REJECT\t%s/foo" % t,
        "ACCEPT\t%s/foo/bar" % t,
        "REJECT\t%s/foo/bar/loo" % t,
        "ACCEPT\t%s/foobar" % t,
        "REJECT\t%s/tmp" % t,
        "ACCEPT\t%s/tmp/x" % t,
        "REJECT\t%s/zroot" % pools.src,
    ]
    cp = run_cli("test", "filesystems", "--job", "snapjob", "--input", t + "/foo/bar",
                 config=cfg)
    assert cp.stdout == "ACCEPT\t%s/foo/bar\n" % t


@pytest.mark.parametrize("args,message", [
    (["--job", "nosuch", "--all"], "no job named 'nosuch'"),
    (["--job", "sinkjob", "--all"], "job sinkjob (type sink) has no filesystems filter"),
    (["--job", "snapjob", "--input", "bad@name"], "invalid character '@'"),
    (["--job", "snapjob", "--input", "/abs"], "must not start or end with '/'"),
])
def test_filesystems_errors(args, message):
    cfg = SNAP_JOB.format(FILTER='{"<": true}', POOL="zz")
    cp = run_cli("test", "filesystems", *args, config=cfg)
    assert cp.returncode == 2 and message in cp.stderr
    assert_no_traceback(cp)


# --- test placeholder --------------------------------------------------------------------------

def test_placeholder_all_and_one(pools):
    root = pools.dst + "/ph"
    make_tree(root, ["on", "on/child", "legacy", "off"])
    zfs("set", "zrepl:placeholder=on", root + "/on")
    legacy = zrepl.sha512_256_hex((root + "/legacy").encode())
    zfs("set", "zrepl:placeholder=" + legacy, root + "/legacy")
    zfs("set", "zrepl:placeholder=off", root + "/off")
    cp = run_cli("test", "placeholder", "--all")
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0] == "IS_PLACEHOLDER\tDATASET\tzrepl:placeholder"
    mine = [ln for ln in lines[1:] if ln.split("\t")[1].startswith(root)]
    assert mine == [
        "no\t%s\t" % root,
        "yes\t%s/legacy\t%s" % (root, legacy),
        "no\t%s/off\toff" % root,
        "yes\t%s/on\ton" % root,
        "no\t%s/on/child\t" % root,            # inherited: not a placeholder
    ]
    cp = run_cli("test", "placeholder", "--dataset", root + "/on")
    assert cp.stdout.splitlines()[1:] == ["yes\t%s/on\ton" % root]


def test_placeholder_missing_dataset_exits_1(pools):
    cp = run_cli("test", "placeholder", "--dataset", pools.dst + "/nope")
    assert cp.returncode == 1
    assert "zrepl.py: error: dataset %s/nope does not exist" % pools.dst in cp.stderr
    assert_no_traceback(cp)


# --- configcheck accepts what zrepl accepts (SPEC §2.10) ------------------------------------

RELATIVE_KEYS = """\
jobs:
  - name: push_ssh
    type: push
    connect: {type: ssh+stdinserver, host: backup, user: root, port: 22,
              identity_file: keys/id_ed25519}
    filesystems: {"pool/data<": true}
    snapshotting: {type: manual}
    pruning: {keep_sender: [{type: last_n, count: 5}], keep_receiver: [{type: last_n, count: 5}]}
  - name: pull_tls
    type: pull
    connect: {type: tls, address: "backup:8888", ca: tls/ca.crt, cert: ./tls/me.crt,
              key: ../elsewhere/me.key, server_cn: backup}
    root_fs: pool/pulled
    interval: 10m
    pruning: {keep_sender: [{type: last_n, count: 5}], keep_receiver: [{type: last_n, count: 5}]}
"""


def test_relative_key_paths_are_resolved_against_the_configuration_file(tmp_path):
    etc = tmp_path / "etc"
    for rel in ("keys/id_ed25519", "tls/ca.crt", "tls/me.crt", "../elsewhere/me.key"):
        (etc / rel).parent.mkdir(parents=True, exist_ok=True)
        (etc / rel).write_text("x")
    cfg = etc / "zrepl.yml"
    cfg.write_text(RELATIVE_KEYS)
    cp = run_cli("configcheck", "--skip-host-checks", "--format", "json", "--what", "jobs",
                 config=cfg, cwd="/")
    assert cp.returncode == 0, cp.stderr
    push, pull = json.loads(cp.stdout)
    assert push["connect"]["identity_file"] == str(etc / "keys/id_ed25519")
    assert (pull["connect"]["ca"], pull["connect"]["cert"], pull["connect"]["key"]) == (
        str(etc / "tls/ca.crt"), str(etc / "tls/me.crt"), str(tmp_path / "elsewhere/me.key"))
    (etc / "keys/id_ed25519").unlink()                  # missing: an error naming the path...
    cp = run_cli("configcheck", "--skip-host-checks", config=cfg, cwd="/")
    assert cp.returncode == 2 and str(etc / "keys/id_ed25519") in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr
    # ...that --skip-cert-check does not look for (a configuration for another host)
    cp = run_cli("configcheck", "--skip-host-checks", "--skip-cert-check", config=cfg, cwd="/")
    assert cp.returncode == 0, cp.stderr


def test_skip_host_checks_asks_nothing_of_this_hosts_zfs(tmp_path):
    """A configuration for another host: a filter of datasets that do not exist here and,
    where this ZFS lacks `send -w`, a raw send: refused or warned about without the flag."""
    cfg = tmp_path / "zrepl.yml"
    cfg.write_text("jobs:\n  - name: snapjob\n    type: snap\n"
                   "    filesystems: {\"nosuchpool/data<\": true}\n"
                   "    snapshotting: {type: periodic, prefix: zrepl_, interval: 10m}\n"
                   "    pruning: {keep: [{type: regex, regex: \".*\"}]}\n")
    cp = run_cli("configcheck", config=cfg)
    assert_no_traceback(cp)
    assert cp.returncode == 0 and "matches no dataset on this host" in cp.stderr, cp.stderr
    cp = run_cli("configcheck", "--skip-host-checks", config=cfg)
    assert cp.returncode == 0 and "matches no dataset" not in cp.stderr, cp.stderr
    raw = tmp_path / "raw.yml"
    raw.write_text(RELATIVE_KEYS.split("  - name: pull_tls")[0].replace(
        "snapshotting: {type: manual}", "snapshotting: {type: manual}\n    send: {raw: true}"))
    cp = run_cli("configcheck", "--skip-host-checks", "--skip-cert-check", config=raw)
    assert cp.returncode == 0, cp.stderr
    caps = zrepl.ZFS().capabilities()
    if caps.available and not caps["send_w"]:
        cp = run_cli("configcheck", "--skip-cert-check", config=raw)
        assert cp.returncode == 2 and "zfs send -w" in cp.stderr, cp.stderr
