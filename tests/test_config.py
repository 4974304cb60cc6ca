"""Configuration: the corpus of valid and invalid configs, the schema's typing, cross-checks.

SPEC §2 (configuration), §2.10 (cross-checks), §3.1 (timestamp formats), §5 (filters),
§6.3 (cron), §7.3 (grid). Pure: no ZFS is touched, except by the one test marked `zfs`.

tests/configs/valid/*.yml     every file must load (`load_config(path, skip_cert_check=True)`);
                              SPOT_CHECKS below pins typed values and defaults per file.
tests/configs/invalid/*.yml   every file breaks exactly one rule; INVALID_CASES says where
                              (file, line, column or None) and what (a message substring).
Files under include_dir/ are only reached through `include:`; they are not corpus entries.
"""
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import zrepl  # noqa: E402
from conftest import assert_no_traceback, run_cli  # noqa: E402

CONFIGS = REPO / "tests" / "configs"
VALID = CONFIGS / "valid"
INVALID = CONFIGS / "invalid"


def load(path, skip_cert_check=True):
    return zrepl.load_config(str(path), skip_cert_check=skip_cert_check)


def load_text(tmp_path, text, name="zrepl.yml"):
    path = tmp_path / name
    path.write_text(text)
    return load(path)


def problems_of(path, skip_cert_check=True):
    with pytest.raises(zrepl.ConfigError) as info:
        load(path, skip_cert_check=skip_cert_check)
    return info.value.problems


def errors_of(path, skip_cert_check=True):
    return [p for p in problems_of(path, skip_cert_check) if not p.warning]


def show(problems):
    return "\n".join(str(p) for p in problems) or "(no problems)"


def bug(reason):
    """zrepl.py contradicts SPEC here: the test states SPEC's rule and is expected to fail."""
    return pytest.mark.xfail(reason="BUG: " + reason, strict=True)


# =====================================================================================
# valid corpus
# =====================================================================================

VALID_FILES = sorted(p.name for p in VALID.glob("*.yml"))


def test_corpus_sizes():
    assert len(VALID_FILES) >= 25
    assert len(list(INVALID.glob("*.yml"))) >= 40


@pytest.mark.parametrize("name", VALID_FILES)
def test_valid_config_loads(name):
    config = load(VALID / name)
    assert isinstance(config, zrepl.Config)
    assert all(p.warning for p in config.warnings)


def pick(config, where, path):
    """`where` is "global", "jobs" (the job list) or a job name; `path` is dotted, with list
    indexes and dict keys in brackets: `keep_sender.1.count`, `serve.clients[10.0.0.5]`."""
    if where == "global":
        obj = config.global_
    elif where == "jobs":
        obj = config.jobs
    else:
        obj = config.job(where)
        assert obj is not None, "no job %r in %s" % (where, [j.name for j in config.jobs])
    if not path:
        return obj
    for part in path.split("."):
        key = None
        if part.endswith("]"):
            part, key = part[:-1].split("[", 1)
        if part:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        if key is not None:
            obj = obj[key]
    return obj


HOUR, DAY, WEEK = 3600, 86400, 7 * 86400
REPLICATION_DEFAULTS = zrepl.ReplicationOptions()

# (file, job name | "global" | "jobs", attribute path, expected value)
SPOT_CHECKS = [
    # --- push / local: defaults of the local transport and of replication
    ("push_local.yml", "home_to_usb", "connect.type", "local"),
    ("push_local.yml", "home_to_usb", "connect.listener_name", "usb_disk"),
    ("push_local.yml", "home_to_usb", "connect.client_identity", "laptop"),
    ("push_local.yml", "home_to_usb", "connect.dial_timeout", 2.0),      # local default 2s
    ("push_local.yml", "home_to_usb", "filesystems",
     (("tank/home<", True), ("tank/home/cache", False))),
    ("push_local.yml", "home_to_usb", "snapshotting.interval", 30 * 60),
    ("push_local.yml", "home_to_usb", "snapshotting.timestamp_format", "dense"),
    ("push_local.yml", "home_to_usb", "snapshotting.timestamp_location", "UTC"),
    ("push_local.yml", "home_to_usb", "snapshotting.hooks", []),
    ("push_local.yml", "home_to_usb", "keep_sender.1.count", 10),
    ("push_local.yml", "home_to_usb", "keep_sender.1.regex", None),
    ("push_local.yml", "home_to_usb", "keep_receiver.0.buckets.0", (HOUR, None)),
    ("push_local.yml", "home_to_usb", "keep_receiver.0.buckets.1", (HOUR, 1)),
    ("push_local.yml", "home_to_usb", "keep_receiver.0.buckets.38", (DAY, 1)),
    ("push_local.yml", "home_to_usb", "replication", REPLICATION_DEFAULTS),
    ("push_local.yml", "home_to_usb", "replication.protection_initial", "guarantee_resumability"),
    ("push_local.yml", "home_to_usb", "replication.protection_incremental",
     "guarantee_resumability"),
    ("push_local.yml", "home_to_usb", "replication.concurrency_steps", None),
    ("push_local.yml", "home_to_usb", "replication.concurrency_size_estimates", 4),
    ("push_local.yml", "home_to_usb", "replication.timeout", 600),             # 10m
    ("push_local.yml", "home_to_usb", "replication.batch_incrementals", True),
    ("push_local.yml", "home_to_usb", "initial_replication", "most_recent"),
    ("push_local.yml", "home_to_usb", "send.compressed", False),
    ("push_local.yml", "home_to_usb", "send.bandwidth_limit.max", -1),
    ("listener_served_twice.yml", "sink_two", "serve.listener_name", "disk"),
    ("push_local.yml", "home_to_usb", "send.bandwidth_limit.bucket_capacity", 128 * 1024),
    ("push_local.yml", "usb_sink", "serve.listener_name", "usb_disk"),
    ("push_local.yml", "usb_sink", "root_fs", "usb/zrepl"),
    ("push_local.yml", "usb_sink", "recv.placeholder_encryption", "unspecified"),
    # --- push / ssh+stdinserver
    ("push_ssh.yml", "fileserver_offsite", "connect.port", 2222),
    ("push_ssh.yml", "fileserver_offsite", "connect.user", "root"),
    ("push_ssh.yml", "fileserver_offsite", "connect.host", "offsite.example.net"),
    ("push_ssh.yml", "fileserver_offsite", "connect.identity_file",
     "/etc/zrepl/ssh/offsite_ed25519"),
    ("push_ssh.yml", "fileserver_offsite", "connect.options",
     ["Compression=yes", "ServerAliveInterval=30"]),
    ("push_ssh.yml", "fileserver_offsite", "connect.dial_timeout", 30.0),
    ("push_ssh.yml", "fileserver_offsite", "filesystems",
     (("data<", True), ("data/scratch<", False))),
    ("push_ssh.yml", "fileserver_offsite", "keep_receiver.0.buckets.47", (HOUR, 1)),
    ("push_ssh.yml", "fileserver_offsite", "keep_receiver.0.buckets.48", (DAY, 1)),
    ("push_ssh.yml", "global", "logging.0.level", "info"),
    ("push_ssh.yml", "global", "logging.0.time", True),
    ("push_ssh.yml", "global", "logging.0.color", True),
    # --- push / tcp, tls
    ("push_tcp.yml", "db_to_backup", "connect.address", "backup.storage.lan:8888"),
    ("push_tcp.yml", "db_to_backup", "connect.dial_timeout", 5.0),
    ("push_tcp.yml", "db_to_backup", "keep_receiver.0.count", 96),
    ("push_tls.yml", "web_push", "connect.server_cn", "backup"),
    ("push_tls.yml", "web_push", "connect.ca", "/etc/zrepl/tls/ca.crt"),
    ("push_tls.yml", "web_push", "connect.key", "/etc/zrepl/tls/web01.key"),
    ("push_tls.yml", "web_push", "connect.dial_timeout", 10.0),              # default
    ("push_tls.yml", "web_push", "keep_receiver.0.regex", "^zrepl_"),
    # --- pull over every transport
    ("pull_tcp.yml", "pull_nas", "interval", 600),
    ("pull_tcp.yml", "pull_nas", "root_fs", "vault/nas"),
    ("pull_tcp.yml", "pull_nas", "keep_receiver.0.buckets.39", (WEEK, 1)),
    ("pull_tcp.yml", "pull_nas", "recv.bandwidth_limit.max", -1),
    ("pull_tls.yml", "pull_dc2", "interval", None),                          # manual
    ("pull_tls.yml", "pull_dc2", "connect.address", "[2001:db8::10]:8888"),
    ("pull_tls.yml", "pull_dc2", "connect.dial_timeout", 20.0),
    ("pull_tls.yml", "pull_dc2", "keep_sender.0.keep_snapshot_at_cursor", False),
    ("pull_ssh.yml", "pull_vps", "interval", DAY),
    ("pull_ssh.yml", "pull_vps", "initial_replication", "all"),
    ("pull_ssh.yml", "pull_vps", "connect.options", ["IdentitiesOnly=yes"]),
    ("pull_local.yml", "local_pull", "connect.dial_timeout", 0.0),         # wait forever
    ("pull_local.yml", "local_pull", "keep_sender.1.count", 3),
    ("pull_local.yml", "local_source", "serve.listener_name", "src"),
    ("pull_local.yml", "local_source", "send", zrepl.SendOptions()),
    # --- sink over every transport
    ("sink_stdinserver.yml", "laptops_sink", "serve.client_identities",
     ["alice-laptop", "bob-laptop"]),
    ("sink_tcp.yml", "lan_sink", "serve.listen", ":8888"),
    ("sink_tcp.yml", "lan_sink", "serve.listen_freebind", True),
    ("sink_tcp.yml", "lan_sink", "serve.clients",
     {"192.168.1.10": "nas", "192.168.1.11": "desktop", "10.20.0.0/16": "branch-*",
      "fd00::/64": "v6-*"}),
    ("sink_tls.yml", "tls_sink", "serve.client_cns", ["web01", "web02", "db-01"]),
    ("sink_tls.yml", "tls_sink", "serve.handshake_timeout", 15.0),
    ("sink_tls.yml", "tls_sink", "serve.listen_freebind", False),
    ("sink_tls.yml", "tls_sink", "recv.placeholder_encryption", "inherit"),
    ("sink_local.yml", "local_only_sink", "serve.type", "local"),
    # --- source over every transport
    ("source_tcp.yml", "tcp_source", "serve.clients", {"127.0.0.1": "backup"}),
    ("source_tcp.yml", "tcp_source", "filesystems",
     (("tank<", True), ("tank/swap", False), ("tank/tmp<", False))),
    ("source_tls.yml", "tls_source", "serve.handshake_timeout", 10.0),       # default
    ("source_tls.yml", "tls_source", "snapshotting.type", "cron"),
    ("source_tls.yml", "tls_source", "snapshotting.cron.minutes", frozenset([0, 15, 30, 45])),
    ("source_tls.yml", "tls_source", "snapshotting.cron.seconds", frozenset([0])),
    ("source_stdinserver.yml", "ssh_source", "snapshotting.type", "manual"),
    ("source_stdinserver.yml", "ssh_source", "snapshotting.prefix", None),
    ("source_stdinserver.yml", "ssh_source", "send.send_properties", True),
    ("source_stdinserver.yml", "ssh_source", "send.raw", False),
    ("source_local.yml", "local_only_source", "snapshotting.interval", HOUR),
    # --- snap jobs, cron, hooks
    ("snap_periodic.yml", "snap_tank", "keep.0.buckets.3", (15 * 60, None)),
    ("snap_periodic.yml", "snap_tank", "keep.0.buckets.4", (HOUR, 1)),
    ("snap_periodic.yml", "snap_tank", "keep.1.negate", True),
    ("snap_periodic.yml", "snap_tank", "keep.1.regex", "^auto_"),
    ("snap_cron.yml", "nightly", "snapshotting.cron.minutes", frozenset([30])),
    ("snap_cron.yml", "nightly", "snapshotting.cron.hours", frozenset([2])),
    ("snap_cron.yml", "nightly", "snapshotting.cron.weekdays", frozenset([1, 2, 3, 4, 5])),
    ("snap_cron.yml", "nightly", "snapshotting.cron.days_restricted", False),
    ("snap_cron.yml", "nightly", "snapshotting.cron.weekdays_restricted", True),
    ("snap_cron.yml", "office_hours", "snapshotting.cron.seconds", frozenset([0])),
    ("snap_cron.yml", "office_hours", "snapshotting.cron.minutes",
     frozenset(range(0, 60, 5))),
    ("snap_cron.yml", "office_hours", "snapshotting.cron.hours", frozenset(range(8, 19))),
    ("snap_cron.yml", "office_hours", "snapshotting.cron.days", frozenset(range(1, 32))),
    ("snap_cron.yml", "office_hours", "snapshotting.cron.days_restricted", False),
    ("hooks.yml", "db_snap", "snapshotting.hooks.0.path", "/bin/true"),
    ("hooks.yml", "db_snap", "snapshotting.hooks.0.timeout", 90.0),
    ("hooks.yml", "db_snap", "snapshotting.hooks.0.err_is_fatal", True),
    ("hooks.yml", "db_snap", "snapshotting.hooks.0.filesystems",
     (("tank/db<", True), ("tank/db/wal", False))),
    ("hooks.yml", "db_snap", "snapshotting.hooks.1.path", "/usr/bin/env"),
    ("hooks.yml", "db_snap", "snapshotting.hooks.1.timeout", 0.5),
    ("hooks.yml", "db_snap", "snapshotting.hooks.1.err_is_fatal", False),
    ("hooks.yml", "db_snap", "snapshotting.hooks.1.filesystems", (("<", True),)),  # default
    ("hooks.yml", "db_snap", "snapshotting.hooks.2.timeout", 30.0),                 # default
    ("hooks.yml", "db_snap", "snapshotting.hooks.2.filesystems", (("tank/logs", True),)),
    # --- include: main file's jobs first, then included files in order
    ("include_main.yml", "web01_push", "connect.address", "backup:8888"),
    ("include_main.yml", "db01_snap", "snapshotting.interval", 300),
    ("include_main.yml", "extra_sink", "serve.client_identities", ["extra"]),
    # --- every keep rule
    ("keep_rules.yml", "keep_everything_kind", "keep_sender.0.type", "not_replicated"),
    ("keep_rules.yml", "keep_everything_kind", "keep_sender.0.keep_snapshot_at_cursor", True),
    ("keep_rules.yml", "keep_everything_kind", "keep_sender.1.count", 5),
    ("keep_rules.yml", "keep_everything_kind", "keep_sender.1.regex", None),
    ("keep_rules.yml", "keep_everything_kind", "keep_sender.2.regex", "^manual_"),
    ("keep_rules.yml", "keep_everything_kind", "keep_sender.3.negate", False),
    ("keep_rules.yml", "keep_everything_kind", "keep_sender.4.negate", True),
    ("keep_rules.yml", "keep_everything_kind", "keep_receiver.0.grid",
     "1x1h(keep=all) | 24x1h | 30x1d | 6x30d"),
    ("keep_rules.yml", "keep_everything_kind", "keep_receiver.1.buckets",
     ((DAY, 3), (DAY, 3), (WEEK, 2), (WEEK, 2), (WEEK, 2), (WEEK, 2))),
    ("keep_rules.yml", "keep_everything_kind", "keep_receiver.2.type", "not_replicated"),
    # --- send and recv options, bandwidth limits (SPEC §2.3 sizes)
    ("send_recv_options.yml", "all_send_flags", "send.encrypted", True),
    ("send_recv_options.yml", "all_send_flags", "send.raw", True),
    ("send_recv_options.yml", "all_send_flags", "send.send_properties", True),
    ("send_recv_options.yml", "all_send_flags", "send.backup_properties", False),
    ("send_recv_options.yml", "all_send_flags", "send.large_blocks", True),
    ("send_recv_options.yml", "all_send_flags", "send.compressed", True),
    ("send_recv_options.yml", "all_send_flags", "send.embedded_data", True),
    ("send_recv_options.yml", "all_send_flags", "send.saved", False),
    ("send_recv_options.yml", "all_send_flags", "send.bandwidth_limit.max", 24641536),
    ("send_recv_options.yml", "all_send_flags", "send.bandwidth_limit.bucket_capacity",
     1048576),
    ("send_recv_options.yml", "all_recv_options", "recv.properties_inherit",
     ["mountpoint", "user:backup-tag"]),
    ("send_recv_options.yml", "all_recv_options", "recv.properties_override",
     {"canmount": "off", "compression": "zstd", "org.example:role": "replica"}),
    ("send_recv_options.yml", "all_recv_options", "recv.placeholder_encryption", "off"),
    ("send_recv_options.yml", "all_recv_options", "recv.bandwidth_limit.max", 12500000),
    ("send_recv_options.yml", "all_recv_options", "recv.bandwidth_limit.bucket_capacity",
     131072),
    ("send_recv_options.yml", "unlimited_bw", "send.bandwidth_limit.max", -1),
    # --- replication, conflict resolution
    ("replication_options.yml", "tuned_push", "replication.protection_initial",
     "guarantee_incremental"),
    ("replication_options.yml", "tuned_push", "replication.protection_incremental",
     "guarantee_nothing"),
    ("replication_options.yml", "tuned_push", "replication.concurrency_steps", 4),
    ("replication_options.yml", "tuned_push", "replication.concurrency_size_estimates", 8),
    ("replication_options.yml", "tuned_push", "replication.timeout", 2 * HOUR),
    ("replication_options.yml", "tuned_push", "replication.batch_incrementals", False),
    ("replication_options.yml", "tuned_push", "initial_replication", "fail"),
    ("replication_options.yml", "tuned_push", "connect.dial_timeout", 60.0),
    ("replication_options.yml", "tuned_pull", "replication.timeout", DAY),
    ("replication_options.yml", "tuned_pull", "replication.batch_incrementals", True),
    ("replication_options.yml", "tuned_pull", "replication.concurrency_steps", None),
    ("replication_options.yml", "tuned_pull", "initial_replication", "most_recent"),
    ("replication_options.yml", "tuned_pull", "keep_sender", []),
    # --- global: logging outlets, monitoring, control, rundir
    ("global_logging.yml", "global", "logging.0.type", "stdout"),
    ("global_logging.yml", "global", "logging.0.time", False),
    ("global_logging.yml", "global", "logging.0.color", False),
    ("global_logging.yml", "global", "logging.1.type", "syslog"),
    ("global_logging.yml", "global", "logging.1.facility", "daemon"),
    ("global_logging.yml", "global", "logging.1.retry_interval", 30.0),
    ("global_logging.yml", "global", "logging.1.format", "logfmt"),
    ("global_logging.yml", "global", "logging.2.address", "logs.example.com:5140"),
    ("global_logging.yml", "global", "logging.2.net", "tcp6"),
    ("global_logging.yml", "global", "logging.2.retry_interval", 60.0),
    ("global_logging.yml", "global", "logging.2.level", "debug"),
    ("global_logging.yml", "global", "logging.2.tls",
     {"ca": "/etc/zrepl/log-ca.crt", "cert": "/etc/zrepl/log.crt", "key": "/etc/zrepl/log.key"}),
    ("global_logging.yml", "global", "logging.3.type", "file"),
    ("global_logging.yml", "global", "logging.3.path", "/var/log/zrepl/error.log"),
    ("global_logging.yml", "global", "logging.3.level", "error"),
    ("global_logging.yml", "global", "monitoring", []),
    ("global_logging.yml", "global", "rundir", "/var/run/zrepl"),
    ("global_logging.yml", "global", "control_sockpath", "/var/run/zrepl/control"),
    ("global_logging.yml", "jobs", "", []),
    ("monitoring.yml", "global", "rundir", "/run/zrepl-test"),
    ("monitoring.yml", "global", "control_sockpath", "/run/zrepl-test/ctl.sock"),
    ("monitoring.yml", "global", "stdinserver_sockdir", "/run/zrepl-test/stdinserver"),
    ("monitoring.yml", "global", "monitoring.0.type", "prometheus"),
    ("monitoring.yml", "global", "monitoring.0.listen", "127.0.0.1:9811"),
    ("monitoring.yml", "global", "monitoring.0.listen_freebind", False),
    ("monitoring.yml", "global", "monitoring.1.type", "prometheus_textfile"),
    ("monitoring.yml", "global", "monitoring.1.path", "/tmp/zrepl-test.prom"),
    ("monitoring.yml", "global", "monitoring.2.path", "/tmp/zrepl-second.prom"),
    # --- timestamp formats and locations (SPEC §3.1)
    ("timestamps.yml", "ts_dense", "snapshotting.timestamp_format", "dense"),
    ("timestamps.yml", "ts_human", "snapshotting.timestamp_format", "human"),
    ("timestamps.yml", "ts_iso", "snapshotting.timestamp_format", "ISO-8601"),
    ("timestamps.yml", "ts_iso", "snapshotting.timestamp_location", "Europe/Berlin"),
    ("timestamps.yml", "ts_unix", "snapshotting.timestamp_format", "unix-seconds"),
    ("timestamps.yml", "ts_custom", "snapshotting.timestamp_format",
     "2006-01-02_Mon_15.04.05.000-0700"),
    ("timestamps.yml", "ts_custom", "snapshotting.timestamp_location", "America/New_York"),
    ("timestamps.yml", "ts_custom", "snapshotting.interval", DAY),
    ("timestamps.yml", "ts_local", "snapshotting.timestamp_location", "Local"),
    # --- manual snapshotting
    ("manual_snapshotting.yml", "replicate_sanoid", "snapshotting.type", "manual"),
    ("manual_snapshotting.yml", "replicate_sanoid", "snapshotting.prefix", None),
    ("manual_snapshotting.yml", "replicate_sanoid", "snapshotting.interval", None),
    ("manual_snapshotting.yml", "replicate_sanoid", "keep_sender.0.regex", ".*"),
    # --- YAML spellings
    ("yaml_style.yml", "global", "logging.0.level", "info"),
    ("yaml_style.yml", "global", "logging.0.format", "human"),
    ("yaml_style.yml", "global", "logging.0.time", True),        # yes
    ("yaml_style.yml", "global", "logging.0.color", False),      # Off
    ("yaml_style.yml", "style_push", "connect.address", "backup.example.com:8888"),
    ("yaml_style.yml", "style_push", "filesystems",
     (("pool/a<", True), ("pool/a/tmp", False), ("pool/b", True), ("pool/c<", False))),
    ("yaml_style.yml", "style_push", "replication.batch_incrementals", True),   # Y
    ("yaml_style.yml", "style_push", "send.compressed", False),                 # n
    ("yaml_style.yml", "style_push", "send.large_blocks", True),                # TRUE
    ("yaml_style.yml", "style_push", "keep_sender.1.count", 5),                 # +5
    ("yaml_style.yml", "style_push", "keep_sender.1.regex", "^zrepl_"),         # |-
    ("yaml_style.yml", "style_push", "keep_receiver.0.grid", "1x1h(keep=all) | 24x1h | 30x1d"),
    ("yaml_style.yml", "style_push", "keep_receiver.1.regex", "^manual#1"),
    ("yaml_style.yml", "style_push", "keep_receiver.2.regex", "^zrepl_|^don't_"),
    ("yaml_style.yml", "style_sink", "serve.client_identities", ["host a", "host-b"]),
    # --- an empty file: no jobs, every default
    ("empty.yml", "jobs", "", []),
    ("empty.yml", "global", "rundir", "/var/run/zrepl"),
    ("empty.yml", "global", "control_sockpath", "/var/run/zrepl/control"),
    ("empty.yml", "global", "stdinserver_sockdir", "/var/run/zrepl/stdinserver"),
    ("empty.yml", "global", "monitoring", []),
    ("empty.yml", "global", "logging",
     [zrepl.LogOutlet("stdout", "warn", "human", time=True, color=True)]),
    # --- SPEC §2.12, verbatim but for the hook path and the textfile directory
    ("spec_push_ssh_and_sink.yml", "global", "logging.0.type", "file"),
    ("spec_push_ssh_and_sink.yml", "global", "logging.0.path", "/var/log/zrepl.log"),
    ("spec_push_ssh_and_sink.yml", "global", "logging.0.time", True),
    ("spec_push_ssh_and_sink.yml", "global", "monitoring.0.path", "/tmp/zrepl.prom"),
    ("spec_push_ssh_and_sink.yml", "laptop_to_backup", "connect.options", ["Compression=no"]),
    ("spec_push_ssh_and_sink.yml", "laptop_to_backup", "connect.dial_timeout", 10.0),
    ("spec_push_ssh_and_sink.yml", "laptop_to_backup", "send.compressed", True),
    ("spec_push_ssh_and_sink.yml", "laptop_to_backup", "filesystems",
     (("zroot<", True), ("zroot/tmp", False), ("zroot/var/tmp<", False))),
    ("spec_push_ssh_and_sink.yml", "laptop_to_backup", "snapshotting.hooks.0.err_is_fatal", True),
    ("spec_push_ssh_and_sink.yml", "laptop_to_backup", "snapshotting.hooks.0.filesystems",
     (("zroot/db", True),)),
    ("spec_push_ssh_and_sink.yml", "laptop_to_backup", "replication.protection_incremental",
     "guarantee_incremental"),
    ("spec_push_ssh_and_sink.yml", "laptop_to_backup", "replication.timeout", 15 * 60),
    ("spec_push_ssh_and_sink.yml", "laptop_to_backup", "keep_receiver.0.buckets.0",
     (HOUR, None)),
    ("spec_push_ssh_and_sink.yml", "backup_sink", "serve.client_identities",
     ["laptop1", "laptop2"]),
    ("spec_push_ssh_and_sink.yml", "backup_sink", "recv.properties_override",
     {"canmount": "off"}),
    ("spec_push_ssh_and_sink.yml", "backup_sink", "recv.properties_inherit", ["mountpoint"]),
    ("spec_push_ssh_and_sink.yml", "backup_sink", "recv.placeholder_encryption", "inherit"),
    ("spec_pull_tls_and_source.yml", "pull_prod", "interval", 15 * 60),
    ("spec_pull_tls_and_source.yml", "pull_prod", "initial_replication", "all"),
    ("spec_pull_tls_and_source.yml", "pull_prod", "replication.concurrency_steps", 2),
    ("spec_pull_tls_and_source.yml", "pull_prod", "replication.concurrency_size_estimates", 4),
    ("spec_pull_tls_and_source.yml", "pull_prod", "recv.bandwidth_limit.max", 50 * 2 ** 20),
    ("spec_pull_tls_and_source.yml", "pull_prod", "keep_receiver.0.buckets.59", (DAY, 1)),
    ("spec_pull_tls_and_source.yml", "prod_source", "send.encrypted", True),
    ("spec_pull_tls_and_source.yml", "prod_source", "serve.listen", ":8888"),
    ("spec_pull_tls_and_source.yml", "prod_source", "serve.client_cns", ["backup"]),
    ("spec_pull_tcp_variant.yml", "prod_source_tcp", "serve.clients",
     {"10.0.0.5": "backup", "10.1.0.0/16": "host-*"}),
    ("spec_pull_tcp_variant.yml", "pull_prod_tcp", "connect.address", "prod:8888"),
    ("spec_snap.yml", "snap_home", "snapshotting.timestamp_format", "iso-8601"),
    ("spec_snap.yml", "snap_home", "snapshotting.timestamp_location", "Europe/Berlin"),
    ("spec_snap.yml", "snap_home", "snapshotting.interval", HOUR),
    ("spec_snap.yml", "snap_home", "keep.0.buckets",
     ((DAY, None),) + ((DAY, 1),) * 7 + ((WEEK, 1),) * 4),
    ("spec_local.yml", "to_backup_disk", "connect.client_identity", "host1"),
    ("spec_local.yml", "to_backup_disk", "snapshotting.type", "manual"),
    ("spec_local.yml", "local_sink", "root_fs", "backup/zrepl"),
]


def _spot_id(case):
    name, where, path, _ = case
    return "%s:%s.%s" % (name[:-4], where, path)


@pytest.mark.parametrize("name,where,path,expected", SPOT_CHECKS,
                         ids=[_spot_id(c) for c in SPOT_CHECKS])
def test_valid_config_typed_values(name, where, path, expected):
    assert pick(load(VALID / name), where, path) == expected


def test_every_valid_file_has_spot_checks():
    checked = {c[0] for c in SPOT_CHECKS}
    assert sorted(set(VALID_FILES) - checked) == []


@pytest.mark.parametrize("name,types", [
    ("push_local.yml", ["sink", "push"]),
    ("pull_local.yml", ["source", "pull"]),
    ("send_recv_options.yml", ["push", "sink", "source"]),
    ("timestamps.yml", ["snap"] * 6),
    ("spec_push_ssh_and_sink.yml", ["push", "sink"]),
    ("spec_pull_tls_and_source.yml", ["pull", "source"]),
])
def test_job_types_in_order(name, types):
    assert [j.type for j in load(VALID / name).jobs] == types


def test_include_order_and_directory_expansion():
    # SPEC §2.2: main file's jobs first, then each include entry in order; a directory
    # contributes its *.yml files in name order (README.txt is not one of them)
    config = load(VALID / "include_main.yml")
    assert [j.name for j in config.jobs] == ["main_snap", "web01_push", "db01_snap",
                                            "extra_sink"]


def test_include_is_relative_to_the_including_file(monkeypatch):
    # SPEC §13 #3: `include: [jobs.d]` in DIR/zrepl.yml, run from `/`
    monkeypatch.chdir("/")
    config = load(VALID / "include_dir" / "zrepl.yml")
    assert [j.name for j in config.jobs] == ["web01_push", "db01_snap"]


def test_include_global_in_included_file_is_ignored_with_a_warning(tmp_path):
    (tmp_path / "more.yml").write_text(
        "global:\n  rundir: /elsewhere\n"
        "jobs:\n  - {name: s, type: sink, root_fs: b/s, serve: {type: local, listener_name: l}}\n")
    config = load_text(tmp_path, "include: [more.yml]\n")
    assert config.global_.rundir == "/var/run/zrepl"
    assert [j.name for j in config.jobs] == ["s"]
    warnings = [p for p in config.warnings if "ignored" in p.message]
    assert len(warnings) == 1
    assert os.path.basename(warnings[0].file) == "more.yml"


def test_logging_outlet_defaults(tmp_path):
    config = load_text(tmp_path, "global:\n  logging:\n"
                                 "    - {type: syslog, level: info, format: logfmt}\n"
                                 "    - {type: tcp, level: info, format: json, address: \"l:1\"}\n"
                                 "    - {type: file, level: info, format: json, path: /var/log/z}\n")
    syslog, tcp, file_ = config.global_.logging
    assert (syslog.facility, syslog.retry_interval) == ("local0", 10.0)
    assert (tcp.net, tcp.retry_interval, tcp.tls) == ("tcp", 10.0, None)
    assert (file_.path, file_.time) == ("/var/log/z", True)


# -- warnings (SPEC §2.8, §2.10): reported, but the file still loads ------------------------

@pytest.mark.parametrize("name,line,substring", [
    ("replication_options.yml", 32, "is empty: it keeps every snapshot"),
    ("keep_rules.yml", 29, "not_replicated keeps nothing on the receiver"),
    ("push_local.yml", 31, "pruning.keep_receiver: no rule keeps snapshots whose names do not "
                           "start with 'zrepl_'"),
    ("listener_served_twice.yml", 10, "listener_name 'disk' is already served by job "
                                      "'sink_one'; local connections go to that job"),
])
def test_valid_config_warnings(name, line, substring):
    config = load(VALID / name)
    assert any(p.line == line and substring in p.message for p in config.warnings), \
        show(config.warnings)


def test_warnings_are_rendered_as_warnings():
    w = load(VALID / "replication_options.yml").warnings[0]
    assert str(w).startswith("%s:%d:%d: warning: " % (w.file, w.line, w.col))


# =====================================================================================
# invalid corpus: (file, line, column or None, message substring)
# =====================================================================================

def case(name, line, col, substring, where=None, skip_cert_check=True, marks=(),
         count_marks=None):
    """One invalid file. `where`: the file the problem is reported in (default: `name`),
    relative to tests/configs/invalid. `marks` apply to the position test, `count_marks`
    (default: the same) to the test that exactly one error is reported."""
    return dict(name=name, line=line, col=col, substring=substring, where=where or name,
                skip_cert_check=skip_cert_check, marks=marks,
                count_marks=marks if count_marks is None else count_marks)



INVALID_CASES = [
    # --- unknown keys: at the key
    case("unknown_key_top.yml", 4, 1, "unknown key 'job'"),
    case("unknown_key_job.yml", 8, 5, "unknown key 'intervall'"),
    case("unknown_key_nested.yml", 9, 7, "unknown key 'concurency'"),
    # --- wrong types: at the value
    case("wrong_type_jobs_mapping.yml", 3, 3, "jobs must be a list"),
    case("wrong_type_global_list.yml", 3, 3, "global must be a mapping"),
    case("wrong_type_filesystems_list.yml", 5, 18, "must be a mapping of dataset patterns"),
    case("wrong_type_scalar_for_mapping.yml", 5, 14, "connect must be a mapping"),
    case("wrong_type_list_for_scalar.yml", 5, 14, "root_fs must be a single value"),
    # --- missing required keys: at the first key of the mapping
    case("missing_job_name.yml", 3, 5, "'name' is required"),
    case("missing_job_type.yml", 3, 5, "'type' is required"),
    case("missing_connect.yml", 3, 5, "'connect' is required"),
    case("missing_serve.yml", 3, 5, "'serve' is required"),
    case("missing_filesystems.yml", 3, 5, "'filesystems' is required"),
    case("missing_snapshotting.yml", 3, 5, "'snapshotting' is required"),
    case("missing_pruning.yml", 3, 5, "'pruning' is required"),
    case("missing_keep_receiver.yml", 9, 7, "'keep_receiver' is required"),
    case("missing_root_fs.yml", 3, 5, "'root_fs' is required"),
    case("missing_interval.yml", 3, 5, "'interval' is required"),
    case("missing_prefix.yml", 7, 7, "'prefix' is required"),
    case("missing_snapshot_interval.yml", 7, 7, "'interval' is required"),
    case("missing_count.yml", 9, 11, "'count' is required"),
    case("missing_count_flow.yml", 8, 15, "'count' is required",
         count_marks=()),
    case("missing_grid.yml", 9, 11, "'grid' is required"),
    case("missing_grid_regex.yml", 9, 11, "'regex' is required"),
    case("missing_regex.yml", 9, 11, "'regex' is required"),
    case("null_required_root_fs.yml", 3, 5, "'root_fs' is required"),
    # --- value syntaxes (SPEC §2.3): at the value
    case("bad_duration.yml", 9, 17, "invalid duration '10 minutes'"),
    case("bad_duration_no_unit.yml", 7, 15, "invalid duration '600'"),
    case("bad_duration_not_positive.yml", 6, 62, "must be positive"),
    case("bad_go_duration.yml", 8, 21, "invalid duration '10'"),
    case("bad_go_duration_days.yml", 13, 20, "invalid duration '1d'"),
    case("bad_size.yml", 10, 14, "invalid size '50 MB/s'"),
    case("bad_size_zero.yml", 8, 30, "must be -1 B (unlimited) or at least 1 B"),
    case("invalid_port.yml", 5, 35, "invalid port 88888"),
    case("connect_address_without_host.yml", 5, 35, "needs a host"),
    case("ssh_port_out_of_range.yml", 9, 13, "port must be at least 1"),
    case("enum_bad_value.yml", 9, 28, "must be one of most_recent, all, fail"),
    case("rundir_relative.yml", 3, 11, "must be an absolute path"),
    case("root_fs_invalid.yml", 5, 14, "must not start or end with '/'"),
    case("prefix_invalid_chars.yml", 6, 44, "invalid character '@'"),
    case("recv_property_invalid.yml", 9, 19, "invalid property name 'MountPoint'"),
    case("regex_invalid.yml", 10, 18, "invalid regular expression"),
    case("last_n_count_zero.yml", 10, 18, "must be at least 1, got 0"),
    case("last_n_count_quoted.yml", 10, 18, "must be a whole number"),
    # --- grid specs (SPEC §7.3)
    case("grid_keep_zero.yml", 10, 17, "keep must be at least 1"),
    case("grid_keep_negative.yml", 10, 17, "keep must be at least 1"),
    case("grid_count_zero.yml", 10, 17, "repeat count must be at least 1"),
    case("grid_unknown_param.yml", 10, 17, "unknown parameter 'max=3'"),
    case("grid_non_monotonic.yml", 10, 17, "bucket lengths must not decrease"),
    case("grid_bad_duration.yml", 10, 17, "invalid duration '1hour'"),
    # --- jobs: names and types
    case("duplicate_job_name.yml", 7, 5, "duplicate job name 'backup' (first defined at "),
    case("duplicate_job_name.yml", 7, 5, "duplicate_job_name.yml:3)"),
    case("duplicate_job_name_include.yml", 6, 5, "duplicate_job_name_include.yml:4",
         where="include_dir/dup_job.yml"),
    case("job_name_underscore.yml", 3, 11, "must not start with '_'"),
    case("job_name_slash.yml", 3, 11, "must not contain '/'"),
    case("job_name_at.yml", 3, 11, "must not contain '@'"),
    case("job_type_local.yml", 4, 11, "unknown job type 'local'"),
    case("job_type_wrong_case.yml", 4, 11, "unknown job type 'Sink'"),
    # --- hooks
    case("hook_postgres.yml", 11, 17,
         "hook type 'postgres-checkpoint' is not supported by zrepl.py; use a `command` hook"),
    case("hook_mysql.yml", 11, 17, "hook type 'mysql-lock-tables' is not supported"),
    case("hook_relative_path.yml", 12, 17, "must be an absolute path"),
    case("hook_not_executable.yml", 12, 17, "/etc/passwd is not an executable file"),
    case("hook_err_is_fatal_quoted.yml", 13, 25, "must be a boolean"),
    # --- cron (SPEC §6.3) and timestamps (SPEC §3.1)
    case("cron_bad_minute.yml", 9, 13, "minute: '61' is outside 0-59"),
    case("cron_daily.yml", 9, 13, "descriptors (@daily)"),
    case("cron_four_fields.yml", 9, 13, "expected 5 fields"),
    case("timestamp_utc_only.yml", 11, 27, "'dense' is UTC-only"),
    case("timestamp_unknown_zone.yml", 11, 27, "time zone 'Mars/Olympus_Mons' not found"),
    case("timestamp_invalid_name.yml", 10, 25, "timestamp format gives invalid snapshot names"),
    case("timestamp_plus.yml", 10, 25, "must not contain '+'"),
    case("not_replicated_in_snap.yml", 9, 11, "not_replicated needs a replication cursor"),
    # --- filters (SPEC §5)
    case("filter_double_lt.yml", 7, 7, "'<' may appear only once, at the end"),
    case("filter_snapshot.yml", 7, 7, "names a snapshot or bookmark"),
    case("filter_invalid_chars.yml", 7, 7, "invalid character '$'"),
    case("filter_value_yes_please.yml", 7, 19, "must be a boolean (true or false), got 'yes please'"),
    case("filter_value_quoted_true.yml", 7, 19, "must be a boolean"),
    # --- cross-checks (SPEC §2.10)
    case("connect_local_unserved.yml", 9, 43, "no sink or source job serves listener_name 'backup_dsk'"),
    case("stdinserver_identity_clash.yml", 11, None, "client identity 'laptop' is already served"),
    case("tcp_listen_clash.yml", 14, 15, "listen address ':8888' is already used by job 'sink_tcp'"),
    case("tcp_cidr_without_star.yml", 11, 25, "must contain exactly one '*'"),
    case("tcp_ip_with_star.yml", 10, 21, "single IP must not contain '*'"),
    case("tcp_bad_ip.yml", 10, 9, "'10.0.0.300' is not an IP address or CIDR"),
    case("tls_cert_missing.yml", 11, 12, "cannot read /nonexistent/zrepl/sink.key",
         skip_cert_check=False),
    # --- includes (SPEC §2.2): at the entry
    case("include_missing.yml", 3, 5, "does not exist"),
    case("include_not_yml.yml", 3, 5, "must be a .yml file or a directory"),
    case("include_nested.yml", 1, None, "include inside an included file is not allowed",
         where="include_dir/nested.yml"),
    # --- global
    case("logging_missing_level.yml", 4, 7, "'level' is required"),
    case("logging_two_stdout.yml", 5, 7, "at most one stdout logging outlet"),
    case("textfile_dir_missing.yml", 5, 13, "directory '/nonexistent/node_exporter' does not exist"),
    # --- the YAML reader (SPEC §2.1)
    case("yaml_anchor.yml", 8, 13, "anchors (&name) are not supported"),
    case("yaml_alias.yml", 8, 13, "aliases (*name) are not supported"),
    case("yaml_alias_in_flow.yml", 7, 21, "aliases (*name) are not supported"),
    case("yaml_tag.yml", 8, 15, "tags (!tag) are not supported"),
    case("yaml_tag_in_flow.yml", 6, 49, "tags (!tag) are not supported"),
    case("yaml_merge_key.yml", 5, 5, "merge keys (<<) are not supported"),
    case("yaml_tab_indent.yml", 5, 1, "tab character in indentation"),
    case("yaml_duplicate_key.yml", 7, 5, "duplicate key 'type' (first defined at line 4)"),
    case("yaml_duplicate_flow_key.yml", 6, 19, "duplicate key 'tank<' (first defined at line 5)"),
    case("yaml_second_document.yml", 3, 1, "multiple YAML documents are not supported"),
    case("yaml_multiline_plain.yml", 11, 13, "multi-line plain scalars are not supported"),
    case("yaml_unclosed_flow.yml", 5, 18, "unclosed flow collection (missing '}')"),
    case("yaml_unterminated_quote.yml", 6, 44, "unterminated quoted string"),
    case("yaml_top_level_list.yml", 2, 1, "top level of a configuration must be a mapping"),
    case("yaml_top_level_scalar.yml", 2, 1, "top level of a configuration must be a mapping"),
    case("yaml_inconsistent_indent.yml", 4, 4, "inconsistent indentation"),
    case("yaml_block_seq_on_key_line.yml", 2, 7, "a sequence cannot start on the same line"),
]


def _case_id(c):
    return c["name"][:-4]


def _params(marks_key):
    seen, out = {}, []
    for c in INVALID_CASES:
        n = seen[c["name"]] = seen.get(c["name"], 0) + 1
        cid = _case_id(c) + ("" if n == 1 else "#%d" % n)
        out.append(pytest.param(c, id=cid, marks=list(c[marks_key])))
    return out


def test_every_invalid_file_has_a_case():
    covered = {c["name"] for c in INVALID_CASES} | {"several_errors.yml"}
    assert sorted(p.name for p in INVALID.glob("*.yml") if p.name not in covered) == []


@pytest.mark.parametrize("c", _params("marks"))
def test_invalid_config_problem_position(c):
    problems = errors_of(INVALID / c["name"], c["skip_cert_check"])
    where = os.path.realpath(str(INVALID / c["where"]))
    hits = [p for p in problems
            if os.path.realpath(p.file) == where and p.line == c["line"]
            and (c["col"] is None or p.col == c["col"])]
    assert any(c["substring"] in p.message for p in hits), \
        "expected %s:%s:%s: ...%s...\ngot:\n%s" % (
            c["where"], c["line"], c["col"], c["substring"], show(problems))


@pytest.mark.parametrize("c", [p for p in _params("count_marks") if "#" not in p.id])
def test_invalid_config_reports_exactly_one_error(c):
    # each file of the corpus breaks exactly one rule; one rule is one error line
    problems = errors_of(INVALID / c["name"], c["skip_cert_check"])
    assert len(problems) == 1, show(problems)


def test_tls_files_are_not_opened_with_skip_cert_check():
    load(INVALID / "tls_cert_missing.yml", skip_cert_check=True)


def test_several_errors_are_all_reported_at_once():
    path = INVALID / "several_errors.yml"
    problems = errors_of(path)
    got = sorted((p.line, p.col) for p in problems)
    assert got == [(3, 11), (7, 28), (8, 62), (10, 36), (17, 40), (19, 5), (24, 11)], \
        show(problems)
    messages = {p.line: p.message for p in problems}
    assert "must be an absolute path" in messages[3]
    assert "must be a boolean" in messages[7]
    assert "invalid duration '10'" in messages[8]
    assert "must be at least 1, got 0" in messages[10]
    assert "keep must be at least 1" in messages[17]
    assert "duplicate job name 'first'" in messages[19]
    assert "unknown job type 'frobnicate'" in messages[24]


def test_config_error_renders_file_line_col_message():
    path = str(INVALID / "yaml_anchor.yml")
    with pytest.raises(zrepl.ConfigError) as info:
        zrepl.load_config(path, skip_cert_check=True)
    assert str(info.value) == (
        path + ":8:13: anchors (&name) are not supported by zrepl.py's config reader")
    assert info.value.exit_code == 2


# -- the CLI: configcheck prints FILE:LINE:COL: message, exit 2, never a traceback ------------

CLI_CASES = [
    ("yaml_anchor.yml", ":8:13: anchors (&name) are not supported"),
    ("yaml_duplicate_key.yml", ":7:5: duplicate key 'type' (first defined at line 4)"),
    ("yaml_tab_indent.yml", ":5:1: tab character in indentation"),
    ("last_n_count_zero.yml", ":10:18: job 'snap_count_zero' pruning.keep #1 last_n count must "
                              "be at least 1, got 0"),
    ("hook_postgres.yml", ":11:17: hook type 'postgres-checkpoint' is not supported by "
                          "zrepl.py; use a `command` hook"),
    ("job_type_local.yml", ":4:11: unknown job type 'local'"),
    ("connect_local_unserved.yml", ":9:43: no sink or source job serves listener_name"),
]


@pytest.mark.parametrize("name,expected", CLI_CASES, ids=[n[:-4] for n, _ in CLI_CASES])
def test_cli_configcheck_reports_position(name, expected):
    path = INVALID / name
    cp = run_cli("configcheck", "--skip-cert-check", config=path)
    assert_no_traceback(cp)
    assert cp.returncode == 2, cp.stderr
    assert (str(path) + expected) in cp.stderr
    assert cp.stdout == ""


def test_cli_configcheck_reports_every_error():
    path = INVALID / "several_errors.yml"
    cp = run_cli("configcheck", config=path)
    assert_no_traceback(cp)
    assert cp.returncode == 2
    lines = [ln for ln in cp.stderr.splitlines() if ln.startswith(str(path) + ":")
             and ": warning: " not in ln]
    assert sorted(int(ln[len(str(path)) + 1:].split(":")[0]) for ln in lines) == \
        [3, 7, 8, 10, 17, 19, 24]


def test_cli_configcheck_without_skip_cert_check_opens_key_files():
    path = INVALID / "tls_cert_missing.yml"
    cp = run_cli("configcheck", config=path)
    assert_no_traceback(cp)
    assert cp.returncode == 2
    assert str(path) + ":11:12: " in cp.stderr and "sink.key" in cp.stderr


@pytest.mark.zfs
def test_cli_configcheck_refuses_send_compressed_without_send_c(tmp_path):
    # SPEC §13 #4: on zfs-fuse `send: {compressed: true}` fails configcheck naming `zfs send -c`
    version = run_cli("version", "--json")
    assert version.returncode == 0, version.stderr
    zfs = json.loads(version.stdout)["zfs"]
    if not zfs["available"] or zfs["capabilities"].get("send_c", True):
        pytest.skip("needs a ZFS without `zfs send -c` (zfs-fuse)")
    text = ("jobs:\n"
            "  - name: compressed_push\n"
            "    type: push\n"
            "    connect: {type: tcp, address: \"backup:8888\"}\n"
            "    filesystems: {\"tank<\": true}\n"
            "    send: {compressed: true}\n"
            "    snapshotting: {type: manual}\n"
            "    pruning: {keep_sender: [{type: regex, regex: \".*\"}], keep_receiver: []}\n")
    path = tmp_path / "zrepl.yml"
    path.write_text(text)
    cp = run_cli("configcheck", config=path)
    assert_no_traceback(cp)
    assert cp.returncode == 2, cp.stderr
    assert "%s:6:" % path in cp.stderr
    assert "`zfs send -c`" in cp.stderr


# =====================================================================================
# schema typing (SPEC §2.1): scalars are typed by the schema, never by the reader
# =====================================================================================

SNAP_WITH_HOOK = """jobs:
  - name: s
    type: snap
    filesystems: {"tank<": true}
    snapshotting:
      type: periodic
      prefix: zrepl_
      interval: 10m
      hooks:
        - type: command
          path: /bin/true
          err_is_fatal: %s
    pruning: {keep: []}
"""


@pytest.mark.parametrize("spelling,value", [(s, True) for s in (
    "y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")] + [(s, False) for s in (
        "n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")])
def test_yaml11_booleans(tmp_path, spelling, value):
    config = load_text(tmp_path, SNAP_WITH_HOOK % spelling)
    assert config.jobs[0].snapshotting.hooks[0].err_is_fatal is value


@pytest.mark.parametrize("spelling", ['"true"', "'yes'", "1", "0", "enabled", "tRUE",
                                      "yes please"])
def test_not_booleans(tmp_path, spelling):
    path = tmp_path / "zrepl.yml"
    path.write_text(SNAP_WITH_HOOK % spelling)
    problems = errors_of(path)
    assert [(p.line, p.col) for p in problems] == [(12, 25)], show(problems)
    assert "must be a boolean" in problems[0].message


SINK = """jobs:
  - name: sink
    type: sink
    root_fs: %s
    serve: {type: tls, listen: ":8443", ca: /c, cert: /c, key: /k, client_cns: [%s]}
    recv: {properties: {override: {compression: %s}}}
"""


@pytest.mark.parametrize("root_fs,cn,override,expected", [
    ("pool/2024", "yes", "on", ("pool/2024", ["yes"], "on")),    # as written, not True
    ("'pool/b'", "'no'", '"off"', ("pool/b", ["no"], "off")),
    ("pool/x", "1.5", "0755", ("pool/x", ["1.5"], "0755")),
])
def test_strings_are_used_as_written(tmp_path, root_fs, cn, override, expected):
    job = load_text(tmp_path, SINK % (root_fs, cn, override)).jobs[0]
    assert (job.root_fs, job.serve.client_cns, job.recv.properties_override["compression"]) \
        == expected


@pytest.mark.parametrize("null", ["~", "null"])
def test_null_override_value_is_not_given(tmp_path, null):
    job = load_text(tmp_path, SINK % ("pool/x", "cn", null)).jobs[0]
    assert "compression" not in job.recv.properties_override


@pytest.mark.parametrize("count,expected", [("5", 5), ("+5", 5), ("007", 7)])
def test_integers(tmp_path, count, expected):
    text = SNAP_WITH_HOOK.replace("keep: []", "keep: [{type: last_n, count: %s}]" % count)
    assert load_text(tmp_path, text % "no").jobs[0].keep[0].count == expected


@pytest.mark.parametrize("count", ["5.0", "0x10", "'5'", "five", "1e3", "-3"])
def test_not_integers(tmp_path, count):
    text = SNAP_WITH_HOOK.replace("keep: []", "keep: [{type: last_n, count: %s}]" % count)
    path = tmp_path / "zrepl.yml"
    path.write_text(text % "no")
    problems = errors_of(path)
    assert len(problems) == 1 and problems[0].line == 13, show(problems)
    assert "count must be" in problems[0].message


@pytest.mark.parametrize("null", ["", "~", "null", "Null", "NULL"])
def test_null_means_not_given(tmp_path, null):
    text = ("jobs:\n"
            "  - name: p\n"
            "    type: push\n"
            "    connect: {type: tcp, address: \"b:1\", dial_timeout: %s}\n"
            "    filesystems: {\"tank<\": true}\n"
            "    snapshotting: {type: periodic, prefix: z_, interval: 1h, timestamp_format: %s}\n"
            "    replication:\n"
            "      timeout: %s\n"
            "    pruning: {keep_sender: [], keep_receiver: []}\n") % (null, null, null)
    job = load_text(tmp_path, text).jobs[0]
    assert job.connect.dial_timeout == 10.0
    assert job.snapshotting.timestamp_format == "dense"
    assert job.replication.timeout == 600


# -- durations, sizes, addresses where the schema uses them ---------------------------------

PULL = """jobs:
  - name: p
    type: pull
    connect: {type: tcp, address: "%s", dial_timeout: %s}
    root_fs: pool/p
    interval: %s
    recv: {bandwidth_limit: {max: "%s"}}
    pruning: {keep_sender: [], keep_receiver: []}
"""


@pytest.mark.parametrize("address,dial,interval,size,expected", [
    ("b:8888", "0", "manual", "-1 B", ("b:8888", 0.0, None, -1)),
    ("[::1]:22", "1m30s", "1w", "1 KiB", ("[::1]:22", 90.0, 7 * DAY, 1024)),
    ("10.0.0.1:1", "500ms", "2d", "8 bit", ("10.0.0.1:1", 0.5, 2 * DAY, 1)),
    ("h:65535", "1.5h", " 5 m ", "1 KB", ("h:65535", 5400.0, 300, 1000)),
])
def test_value_syntaxes_in_context(tmp_path, address, dial, interval, size, expected):
    job = load_text(tmp_path, PULL % (address, dial, interval, size)).jobs[0]
    assert (job.connect.address, job.connect.dial_timeout, job.interval,
            job.recv.bandwidth_limit.max) == expected


# =====================================================================================
# cross_check_jobs and capability_problems (pure)
# =====================================================================================

def test_cross_check_of_no_jobs_is_empty():
    assert zrepl.cross_check_jobs([]) == []


def test_cross_check_tls_and_tcp_share_listen_addresses(tmp_path):
    text = ("jobs:\n"
            "  - {name: a, type: sink, root_fs: b/a,\n"
            "     serve: {type: tcp, listen: \":9000\", clients: {\"10.0.0.1\": x}}}\n"
            "  - {name: b, type: sink, root_fs: b/b,\n"
            "     serve: {type: tls, listen: \":9000\", ca: /c, cert: /c, key: /k, client_cns: [y]}}\n")
    path = tmp_path / "zrepl.yml"
    path.write_text(text)
    problems = errors_of(path)
    assert [(p.line, p.col) for p in problems] == [(5, 33)], show(problems)
    assert "already used by job 'a'" in problems[0].message


ALL_CAPS = dict.fromkeys(["send_w", "send_p", "send_b", "send_L", "send_c", "send_e", "send_S",
                          "recv_o", "recv_x"], True)


def test_capability_problems_none_when_zfs_has_everything():
    config = load(VALID / "send_recv_options.yml")
    assert zrepl.capability_problems(config, ALL_CAPS) == []


@pytest.mark.parametrize("missing,line,flag", [
    ("send_w", 10, "send.encrypted needs `zfs send -w`"),
    ("send_w", 11, "send.raw needs `zfs send -w`"),
    ("send_p", 12, "send.send_properties needs `zfs send -p`"),
    ("send_L", 14, "send.large_blocks needs `zfs send -L`"),
    ("send_c", 15, "send.compressed needs `zfs send -c`"),
    ("send_e", 16, "send.embedded_data needs `zfs send -e`"),
    ("recv_x", 31, "recv.properties.inherit needs `zfs receive -x`"),
    ("recv_o", 34, "recv.properties.override needs `zfs receive -o`"),
])
def test_capability_problems_name_the_flag_at_the_option(missing, line, flag):
    config = load(VALID / "send_recv_options.yml")
    caps = dict(ALL_CAPS)
    caps[missing] = False
    problems = zrepl.capability_problems(config, caps)
    assert any(p.line == line and flag in p.message and not p.warning for p in problems), \
        show(problems)


def test_capability_problems_ignore_flags_that_are_off():
    # backup_properties and saved are `false` in the file: no -b / -S needed
    config = load(VALID / "send_recv_options.yml")
    caps = dict(ALL_CAPS, send_b=False, send_S=False)
    assert zrepl.capability_problems(config, caps) == []


# =====================================================================================
# more schema rules, one inline snippet each: (yaml, line, column, message substring)
# =====================================================================================

def _sink(serve):
    return "jobs:\n  - name: s\n    type: sink\n    root_fs: b/s\n    serve: %s\n" % serve


def _snap(snapshotting="{type: periodic, prefix: z_, interval: 1h}", keep="[]"):
    return ("jobs:\n  - name: s\n    type: snap\n    filesystems: {\"t<\": true}\n"
            "    snapshotting: %s\n    pruning: {keep: %s}\n" % (snapshotting, keep))


def _push(extra):
    return ("jobs:\n  - name: p\n    type: push\n    connect: {type: tcp, address: \"b:1\"}\n"
            "    filesystems: {\"t<\": true}\n    snapshotting: {type: manual}\n"
            "    pruning: {keep_sender: [], keep_receiver: []}\n" + extra)


def _global(text):
    return "global:\n" + text + "jobs: []\n"


SCHEMA_CASES = [
    # (yaml, line, the text the problem must point at on that line, message substring)
    pytest.param(_sink("{type: stdinserver, client_identities: [laptop, pc, laptop]}"),
                 5, "laptop]", "'laptop' is listed twice (first at line 5)", id="identity-twice"),
    pytest.param(_sink("{type: stdinserver, client_identities: []}"),
                 5, "[]", "must list at least one identity", id="no-identities"),
    pytest.param(_sink("{type: tls, listen: \":1\", ca: /c, cert: /c, key: /k, client_cns: []}"),
                 5, "[]", "must list at least one client CN", id="no-client-cns"),
    pytest.param(_sink("{type: tcp, listen: \":1\", clients: {}}"),
                 5, "{}", "must map at least one IP or CIDR", id="no-clients"),
    pytest.param(_sink("{type: tcp, listen: \":1\", clients: {\"10.0.0.0/8\": \"a-*-*\"}}"),
                 5, "\"a-*-*\"", "exactly one '*'", id="cidr-two-stars"),
    pytest.param(_sink("{type: tcp, listen: \":1\", clients: {\"10.0.0.0/8\": \"a/*\"}}"),
                 5, "\"a/*\"", "invalid character '/'", id="cidr-identity-not-a-component"),
    pytest.param(_sink("{type: tcp, listen: \"localhost\", clients: {\"10.0.0.1\": a}}"),
                 5, "\"localhost\"", "invalid address 'localhost'", id="listen-without-port"),
    pytest.param(_sink("{type: tls, listen: \":1\", ca: /c, cert: /c, key: /k, client_cns: [a],"
                       " handshake_timeout: 0s}"),
                 5, "0s", "must be positive", id="handshake-timeout-zero"),
    pytest.param(_sink("{type: ssh+stdinserver, client_identities: [a]}"),
                 5, "ssh+stdinserver", "unknown job 's' serve type 'ssh+stdinserver'",
                 id="serve-ssh"),
    pytest.param(_sink("{type: stdinserver, client_identities: [a], listen: \":1\"}"),
                 5, "listen", "unknown key 'listen'", id="serve-unknown-key"),
    pytest.param(_sink("\n      client_identities: [a]"), 6, "client_identities",
                 "'type' is required", id="serve-without-type"),
    pytest.param(_sink("{type: local, listener_name: a}") + "    pruning: {keep: []}\n",
                 6, "pruning", "unknown key 'pruning'", id="sink-has-no-pruning"),
    pytest.param(_push("    interval: 10m\n"), 8, "interval", "unknown key 'interval'",
                 id="push-has-no-interval"),
    pytest.param(_push("    send: {bandwidth_limit: {bucket_capacity: 0 B}}\n"),
                 8, "0 B", "must be positive", id="bucket-capacity-zero"),
    pytest.param(_push("    replication: {timeout: 0s}\n"), 8, "0s", "must be positive",
                 id="replication-timeout-zero"),
    pytest.param(_push("    replication: {concurrency: {steps: 0}}\n"), 8, "0}",
                 "must be at least 1, got 0", id="concurrency-zero"),
    pytest.param(_push("    replication: {protection: {initial: best_effort}}\n"), 8, "best_effort",
                 "must be one of guarantee_resumability, guarantee_incremental, guarantee_nothing",
                 id="protection-enum"),
    pytest.param(_push("    replication: {batch_incrementals: maybe}\n"), 8, "maybe",
                 "must be a boolean", id="batch-incrementals-not-bool"),
    pytest.param(_push("    conflict_resolution: {initial_replication: newest}\n"), 8, "newest",
                 "must be one of most_recent, all, fail", id="initial-replication-enum"),
    pytest.param(_push("").replace("address: \"b:1\"", "address: \"b:1\", dial_timeout: -1s"),
                 4, "-1s", "must not be negative", id="dial-timeout-negative"),
    pytest.param(_push("").replace("{type: tcp, address: \"b:1\"}",
                                   "{type: local, listener_name: l, client_identity: a/b}")
                 + "  - {name: s, type: sink, root_fs: b/s, serve: {type: local, listener_name: l}}\n",
                 4, "a/b", "invalid character '/'", id="client-identity-not-a-component"),
    pytest.param(_push("").replace("{type: tcp, address: \"b:1\"}", "{type: ssh, host: h}"),
                 4, "ssh", "unknown job 'p' connect type 'ssh'", id="connect-ssh"),
    pytest.param(_snap(keep="[last_n]"), 6, "last_n]", "keep rule must be a mapping with a type",
                 id="keep-rule-not-a-mapping"),
    pytest.param(_snap(keep="[{type: last, count: 1}]"), 6, "last,",
                 "unknown keep rule type 'last'", id="keep-rule-unknown-type"),
    pytest.param(_snap(keep="[{type: regex, regex: a, negate: yes please}]"), 6, "yes please",
                 "must be a boolean", id="negate-not-bool"),
    pytest.param(_snap(keep="[{type: grid, grid: 1x1h, regex: \"\"}]"), 6, "\"\"",
                 "must not be empty", id="grid-regex-empty"),
    pytest.param(_snap(keep="{type: last_n, count: 1}"), 6, "{type", "must be a list",
                 id="keep-is-a-mapping"),
    pytest.param(_snap("{type: periodic, prefix: \"\", interval: 1h}"), 5, "\"\"",
                 "must not be empty", id="prefix-empty"),
    pytest.param(_snap("{type: hourly, prefix: z_}"), 5, "hourly",
                 "unknown job 's' snapshotting type 'hourly'", id="snapshotting-unknown-type"),
    pytest.param(_snap("{type: manual, prefix: z_}"), 5, "prefix", "unknown key 'prefix'",
                 id="manual-has-no-prefix"),
    pytest.param(_snap("{type: periodic, prefix: z_, interval: 1h, hooks: [{type: command, "
                       "path: /bin/true, timeout: 0s}]}"), 5, "0s", "must be positive",
                 id="hook-timeout-zero"),
    pytest.param(_snap("{type: periodic, prefix: z_, interval: 1h, hooks: [{type: command, "
                       "path: /bin/true, args: [x]}]}"), 5, "args", "unknown key 'args'",
                 id="hook-args"),
    pytest.param(_snap("\n      type: periodic\n      prefix: z_\n      interval: 1h\n"
                       "      hooks:\n        - type: command\n          timeout: 1s"),
                 10, "type: command", "'path' is required", id="hook-without-path"),
    pytest.param(_snap("{type: periodic, prefix: z_, interval: 1h, hooks: [{type: command, "
                       "path: /tmp}]}"), 5, "/tmp", "/tmp is not an executable file",
                 id="hook-path-is-a-directory"),
    pytest.param(_snap("{type: periodic, prefix: z_, interval: 1h, hooks: [{type: command, "
                       "path: /bin/true, filesystems: {\"t@x\": true}}]}"), 5, "\"t@x\"",
                 "names a snapshot or bookmark", id="hook-filter-bad-pattern"),
    pytest.param(_global("  logging: [{type: stdout, level: warning, format: human}]\n"),
                 2, "warning", "must be one of debug, info, warn, error", id="log-level"),
    pytest.param(_global("  logging: [{type: stdout, level: info, format: text}]\n"),
                 2, "text", "must be one of human, logfmt, json", id="log-format"),
    pytest.param(_global("  logging: [{type: stdout, level: info, format: json, facility: x}]\n"),
                 2, "facility", "unknown key 'facility'", id="stdout-has-no-facility"),
    pytest.param(_global("  logging: [{type: syslog, level: info, format: json, facility: "
                         "local9}]\n"), 2, "local9", "must be one of kern", id="syslog-facility"),
    pytest.param(_global("  logging: [{type: syslog, level: info, format: json, retry_interval: "
                         "0s}]\n"), 2, "0s", "must be positive", id="retry-interval-zero"),
    pytest.param(_global("  logging:\n    - type: tcp\n      level: info\n      format: json\n"),
                 3, "type", "'address' is required", id="tcp-outlet-address"),
    pytest.param(_global("  logging:\n    - type: tcp\n      level: info\n      format: json\n"
                         "      address: \"logs:514\"\n      tls:\n        ca: /c\n"
                         "        cert: /c\n"), 8, "ca", "'key' is required",
                 id="tcp-outlet-tls-key"),
    pytest.param(_global("  logging: [{type: file, level: info, format: json, path: log}]\n"),
                 2, "log}", "must be an absolute path", id="file-outlet-relative"),
    pytest.param(_global("  logging: [{type: journald, level: info, format: json}]\n"),
                 2, "journald", "unknown logging outlet type 'journald'", id="outlet-unknown-type"),
    pytest.param(_global("  logging:\n    - level: info\n      format: json\n"),
                 3, "level", "'type' is required", id="outlet-without-type"),
    pytest.param(_global("  monitoring: [{type: prometheus, listen: \":9811\"},\n"
                         "               {type: prometheus, listen: \":9812\"}]\n"),
                 3, "{type", "at most one prometheus monitoring entry", id="two-prometheus"),
    pytest.param(_global("  monitoring: [{type: prometheus_textfile, path: zrepl.prom}]\n"),
                 2, "zrepl.prom", "must be an absolute path", id="textfile-relative"),
    pytest.param(_global("  control: {sockpath: ctl}\n"), 2, "ctl", "must be an absolute path",
                 id="sockpath-relative"),
    pytest.param(_global("  serve: {stdinserver: {sockdir: x}}\n"), 2, "x}",
                 "must be an absolute path", id="sockdir-relative"),
    pytest.param(_global("  rundir: /run/z\n  color: true\n"), 3, "color",
                 "unknown key 'color' in global", id="global-unknown-key"),
    pytest.param("include: jobs.d\n", 1, "jobs.d", "include must be a list", id="include-scalar"),
    pytest.param("include: [[a.yml]]\n", 1, "[a.yml]", "include entry must be a single value",
                 id="include-entry-list"),
    pytest.param("jobs:\n  - sink\n", 2, "sink", "jobs entry 1 must be a mapping",
                 id="job-not-a-mapping"),
    pytest.param("jobs:\n  - {name: s, type: [sink]}\n", 2, "[sink]", "type must be a single value",
                 id="job-type-list"),
]


@pytest.mark.parametrize("text,line,at,substring", SCHEMA_CASES)
def test_schema_rules(tmp_path, text, line, at, substring):
    path = tmp_path / "zrepl.yml"
    path.write_text(text)
    problems = errors_of(path)
    col = text.splitlines()[line - 1].index(at) + 1
    assert len(problems) == 1, show(problems)
    p = problems[0]
    assert (p.line, p.col) == (line, col) and substring in p.message, \
        "expected %d:%d ...%s...\n%s" % (line, col, substring, show(problems))


def test_ignored_ssh_keys_are_warnings(tmp_path):
    text = _push("").replace(
        "{type: tcp, address: \"b:1\"}",
        "{type: ssh+stdinserver, host: h, user: u, port: 22, identity_file: /k,\n"
        "              transport_open_command: [ssh, x], ssh_command: /usr/bin/ssh}")
    config = load_text(tmp_path, text)
    ignored = sorted((p.line, p.col) for p in config.warnings if "is ignored" in p.message)
    line5 = text.splitlines()[4]
    assert ignored == [(5, line5.index("[ssh") + 1), (5, line5.index("/usr") + 1)], \
        show(config.warnings)


def test_connect_local_may_be_served_from_an_included_file(tmp_path):
    (tmp_path / "sink.yml").write_text(_sink("{type: local, listener_name: disk}"))
    text = _push("").replace("{type: tcp, address: \"b:1\"}",
                             "{type: local, listener_name: disk, client_identity: me}")
    config = load_text(tmp_path, "include: [sink.yml]\n" + text)
    assert [j.name for j in config.jobs] == ["p", "s"]


def test_invalid_names_in_two_files_are_not_duplicates(tmp_path):
    (tmp_path / "more.yml").write_text(_sink("{type: local, listener_name: b}")
                                       .replace("name: s", "name: a/b"))
    path = tmp_path / "zrepl.yml"
    path.write_text("include: [more.yml]\n" + _sink("{type: local, listener_name: a}")
                    .replace("name: s", "name: _x"))
    problems = errors_of(path)
    assert sorted(p.message.split(": ", 1)[1] for p in problems) == [
        "job name '_x' must not start with '_' (reserved)", "job name 'a/b' must not contain '/'"]


# -- key and certificate files are opened unless skip_cert_check (SPEC §1.5.5, §2.10) ---------

@pytest.mark.parametrize("name,lines", [
    ("push_ssh.yml", [17]),                       # identity_file
    ("push_tls.yml", [8, 9, 10]),                 # ca, cert, key
    ("sink_tls.yml", [9, 10, 11]),
    ("global_logging.yml", [21, 22, 23]),         # tcp outlet tls
    ("spec_pull_tls_and_source.yml", [4, 5, 5, 17, 17, 18]),
])
def test_valid_configs_need_their_key_files_without_skip_cert_check(name, lines):
    problems = errors_of(VALID / name, skip_cert_check=False)
    assert sorted(p.line for p in problems) == lines, show(problems)
    assert all("cannot read" in p.message and "--skip-cert-check" in p.message
               for p in problems)
