"""Pure helpers of sections 2 and 4: value syntaxes (SPEC §2.3), names, cron (§6.3), snapshot
timestamps (§3.1), grid specs (§7.3), filters (§5) and placeholders (§3.3). No ZFS."""
import calendar
import hashlib
import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zrepl  # noqa: E402

MIN, HOUR, DAY, WEEK = 60, 3600, 86400, 7 * 86400


def bug(reason):
    return pytest.mark.xfail(reason="BUG: " + reason, strict=True)


def utc(*fields):
    return calendar.timegm(fields + (0,) * (6 - len(fields)))


# =====================================================================================
# durations and sizes (SPEC §2.3)
# =====================================================================================

@pytest.mark.parametrize("text,seconds", [
    ("10s", 10), ("10m", 600), ("1h", HOUR), ("1d", DAY), ("2w", 2 * WEEK), ("0", 0), ("0s", 0),
    (" 5 m ", 300), ("+3h", 3 * HOUR), ("-1s", -1), ("90m", 90 * MIN), ("007s", 7),
])
def test_parse_zrepl_duration(text, seconds):
    assert zrepl.parse_zrepl_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "10", "-5", "1.5h", "10min", "h", "", "1h30m", "10ms", "1 d x", "1y", "1H", "one h",
])
def test_parse_zrepl_duration_rejects(text):
    with pytest.raises(ValueError, match="invalid duration"):
        zrepl.parse_zrepl_duration(text)


@pytest.mark.parametrize("text,seconds", [
    ("10s", 10), ("1m30s", 90), ("500ms", 0.5), ("0", 0), ("1h", HOUR), ("1.5h", 5400),
    ("2h45m", 9900), ("1us", 1e-6), ("1\u00b5s", 1e-6), ("100ns", 1e-7), ("+5s", 5), ("-5s", -5),
    ("1.s", 1), (".5s", 0.5), ("1h0m0s", HOUR), ("0s", 0),
])
def test_parse_go_duration(text, seconds):
    assert zrepl.parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "10", "", "1d", "s", "1x", "1h 30m", ".s", "-", "1w", "ten s", "1.5",
])
def test_parse_go_duration_rejects(text):
    with pytest.raises(ValueError, match="invalid duration"):
        zrepl.parse_go_duration(text)


@pytest.mark.parametrize("text,nbytes", [
    ("23.5 MiB", 24641536), ("100 Mb", 12500000), ("-1 B", -1), ("1 B", 1), ("0 B", 0),
    ("1 KB", 1000), ("1 KiB", 1024), ("1MB", 10 ** 6), ("1 MiB", 2 ** 20), ("1 GB", 10 ** 9),
    ("2 GiB", 2 * 2 ** 30), ("1 TB", 10 ** 12), ("1 TiB", 2 ** 40), ("8 bit", 1),
    ("16 bit", 2), ("1 Kb", 125), ("1 Kib", 128), ("1.5 KiB", 1536), ("50 MiB", 50 * 2 ** 20),
    (" 3 B ", 3), ("128 KiB", 131072),
])
def test_parse_size(text, nbytes):
    assert zrepl.parse_size(text) == nbytes


@pytest.mark.parametrize("text", [
    "1.5 bit", "B", "1", "1 kB", "50 MB/s", "1 XB", "", "-", "1 bytes", "abc B", "1 iB", "1 Bit",
    "1.2.3 B",
])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        zrepl.parse_size(text)


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (2 ** 20, "1.0 MiB"), (int(1.2 * 2 ** 30), "1.2 GiB"), (int(3.4 * 2 ** 30), "3.4 GiB"),
    (2 ** 40, "1.0 TiB"), (2 ** 50, "1024.0 TiB"), (None, "-"),
    pytest.param(2 ** 20 - 1, "1.0 MiB", id="just-below-1MiB"),
])
def test_format_bytes(n, text):
    assert zrepl.format_bytes(n) == text


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (59, "59s"), (60, "1m0s"), (61, "1m1s"), (3600, "1h0m0s"), (3723, "1h2m3s"),
    (90061, "25h1m1s"), (3.4, "3s"), (-5, "-5s"), (-3723, "-1h2m3s"),
])
def test_format_duration_is_go_style(seconds, text):
    assert zrepl.format_duration(seconds) == text


def test_rfc3339():
    assert zrepl.rfc3339(0) == "1970-01-01T00:00:00Z"
    assert zrepl.rfc3339(2147483647) == "2038-01-19T03:14:07Z"


# =====================================================================================
# names (SPEC §2.3)
# =====================================================================================

@pytest.mark.parametrize("name", [
    "tank", "tank/a", "tank/a b", "tank/x.y:z-_", "t", "a" * 255, "tank/.hidden", "Tank/A",
    "tank/a/b/c/d",
])
def test_dataset_name_valid(name):
    assert zrepl.dataset_name_problem(name) is None


@pytest.mark.parametrize("name", [
    "", "/tank", "tank/", "tank//a", "tank/.", "tank/..", "tank@snap", "tank#bm", "1tank",
    "_tank", "tank/\u00e4", "a" * 256, "tank/a%b", " tank", ".tank", "tank/a*b",
])
def test_dataset_name_invalid(name):
    assert zrepl.dataset_name_problem(name)


@pytest.mark.parametrize("name", ["push_job", "a", "x.y:z-1", "a b", "A" * 200, "-rf", "0"])
def test_job_name_valid(name):
    assert zrepl.job_name_problem(name) is None


@pytest.mark.parametrize("name,why", [
    ("", "must not be empty"), ("_x", "must not start with '_'"), ("a/b", "must not contain '/'"),
    ("a@b", "must not contain '@'"), ("a#b", "must not contain '#'"),
    ("a%b", "must not contain '%'"), ("a,b", "must not contain ','"),
    ("a" * 201, "longer than 200 bytes"), (".", "not a valid name component"),
    ("..", "not a valid name component"), ("\u00e4", "invalid character"),
    ("a*", "invalid character '*'"),
])
def test_job_name_invalid(name, why):
    assert why in (zrepl.job_name_problem(name) or "")


@pytest.mark.parametrize("name,valid", [
    ("host1", True), ("a b", True), ("a.b:c-d_e", True), ("...", True), ("", False),
    (".", False), ("..", False), ("a/b", False), ("a@b", False), ("a#b", False),
    ("\u00e4", False), ("a*", False), ("a\tb", False),
])
def test_component(name, valid):
    assert (zrepl.component_problem(name) is None) is valid


@pytest.mark.parametrize("name,valid", [
    ("compression", True), ("canmount", True), ("user:prop", True), ("org.example:a-b_c", True),
    ("recordsize2", True), ("MountPoint", False), ("", False), ("a:B", False), ("1abc", False),
    ("user-prop", False), ("x:" + "a" * 254, False),
])
def test_property_name(name, valid):
    assert (zrepl.property_name_problem(name) is None) is valid


@pytest.mark.parametrize("text,host_required,expected", [
    ("host:22", True, ("host", 22)), ("[::1]:8888", True, ("::1", 8888)),
    (":8888", False, ("", 8888)), ("10.0.0.1:1", True, ("10.0.0.1", 1)),
    ("h:65535", True, ("h", 65535)), ("[fe80::1%eth0]:22", True, ("fe80::1%eth0", 22)),
    ("backup.example.com:8888", True, ("backup.example.com", 8888)),
])
def test_parse_hostport(text, host_required, expected):
    assert zrepl.parse_hostport(text, host_required=host_required) == expected


@pytest.mark.parametrize("text,host_required", [
    (":8888", True), ("host", False), ("host:0", False), ("host:65536", False),
    ("::1:22", False), ("host:abc", False), ("host:", False), ("[::1]", False), ("", False),
    ("host:-1", False),
])
def test_parse_hostport_rejects(text, host_required):
    with pytest.raises(ValueError):
        zrepl.parse_hostport(text, host_required=host_required)


# =====================================================================================
# cron (SPEC §6.3)
# =====================================================================================

@pytest.mark.parametrize("text,field,values", [
    ("*/15 * * * *", "minutes", {0, 15, 30, 45}),
    ("*/15 * * * *", "seconds", {0}),                      # 5 fields: second 0
    ("30 */5 * * * *", "seconds", {30}),                   # 6 fields: leading second
    ("30 */5 * * * *", "minutes", set(range(0, 60, 5))),
    ("0 9-17 * * *", "hours", set(range(9, 18))),
    ("0 0,12 * * *", "hours", {0, 12}),
    ("1-10/3 * * * *", "minutes", {1, 4, 7, 10}),
    ("5/20 * * * *", "minutes", {5, 25, 45}),              # N/S = N-max/S
    ("0 0 1,15 * *", "days", {1, 15}),
    ("0 0 * JAN,jul *", "months", {1, 7}),
    ("0 0 * Feb-apr *", "months", {2, 3, 4}),
    ("0 0 * * sun,SAT", "weekdays", {0, 6}),
    ("0 0 * * MON-FRI", "weekdays", {1, 2, 3, 4, 5}),
    ("0 0 * * 0-6/2", "weekdays", {0, 2, 4, 6}),
    ("? * * * *", "minutes", set(range(60))),
    ("* * ? * *", "days", set(range(1, 32))),
    ("59 23 31 12 6", "minutes", {59}),
    ("0 0 * * *", "months", set(range(1, 13))),
    pytest.param("5,10/20 * * * *", "minutes", {5, 10, 30, 50}, id="list-with-a-step-item"),
])
def test_parse_cron_fields(text, field, values):
    assert getattr(zrepl.parse_cron(text), field) == frozenset(values)


@pytest.mark.parametrize("text,days,weekdays", [
    ("0 0 * * *", False, False), ("0 0 1 * *", True, False), ("0 0 * * 1", False, True),
    ("0 0 1 * 1", True, True), ("0 0 ? * ?", False, False),
])
def test_parse_cron_restricted_flags(text, days, weekdays):
    c = zrepl.parse_cron(text)
    assert (c.days_restricted, c.weekdays_restricted) == (days, weekdays)


@pytest.mark.parametrize("text,why", [
    ("@daily", "descriptors"), ("@every 1h", "descriptors"),
    ("CRON_TZ=UTC 0 * * * *", "time zone"), ("TZ=Europe/Berlin 0 * * * *", "time zone"),
    ("* * * *", "expected 5 fields"), ("* * * * * * *", "expected 5 fields"), ("", "expected 5"),
    ("60 * * * *", "minute"), ("* 24 * * *", "hour"), ("* * 0 * *", "day-of-month"),
    ("* * 32 * *", "day-of-month"), ("* * * 13 *", "month"), ("* * * 0 *", "month"),
    ("* * * * 7", "day-of-week"), ("60 * * * * *", "second"), ("*/0 * * * *", "invalid step"),
    ("5-1 * * * *", "minute"), ("a * * * *", "'a' is not a number"),
    ("* * * FOO *", "'FOO' is not a number"), ("1,,2 * * * *", "is not a number"),
    ("* * * * MON-", "is not a number"), ("JAN * * * *", "'JAN' is not a number"),
])
def test_parse_cron_rejects(text, why):
    with pytest.raises(ValueError, match="invalid cron spec") as info:
        zrepl.parse_cron(text)
    assert why in str(info.value)


@pytest.mark.parametrize("text,field", [
    ("a * * * *", "minute"),
    ("* * * FOO *", "month"),
    ("JAN * * * *", "minute"),     # month names only in the month field
])
def test_parse_cron_names_the_field_of_a_non_number(text, field):
    with pytest.raises(ValueError) as info:
        zrepl.parse_cron(text)
    assert field + ":" in str(info.value)


# =====================================================================================
# snapshot timestamps (SPEC §3.1)
# =====================================================================================

UTC = zrepl.load_timezone("UTC")
BERLIN = zrepl.load_timezone("Europe/Berlin")
NEW_YORK = zrepl.load_timezone("America/New_York")
KOLKATA = zrepl.load_timezone("Asia/Kolkata")
Y2038 = 2147483647                               # 2038-01-19 03:14:07 UTC, a Tuesday
MAY14 = utc(2024, 5, 14, 21, 16, 23)             # SPEC's Europe/Berlin example


def by_result(cases):
    """pytest.param for each (args..., expected) case, with the expected text as its id."""
    return [pytest.param(*c, id=c[-1]) for c in cases]


@pytest.mark.parametrize("fmt,zone,epoch,text", by_result([
    ("dense", UTC, Y2038, "20380119_031407_000"),
    ("human", UTC, Y2038, "2038-01-19_03:14:07"),
    ("iso-8601", UTC, Y2038, "2038-01-19T03:14:07.000Z"),
    ("iso-8601", BERLIN, MAY14, "2024-05-14T23:16:23.000_0200"),
    ("unix-seconds", UTC, Y2038, "2147483647"),
    ("DENSE", UTC, Y2038, "20380119_031407_000"),          # names are case-insensitive
    ("ISO-8601", UTC, Y2038, "2038-01-19T03:14:07.000Z"),
    ("Unix-Seconds", UTC, 0, "0"),
    ("iso-8601", BERLIN, utc(2024, 1, 14, 21, 16, 23), "2024-01-14T22:16:23.000_0100"),
    ("iso-8601", KOLKATA, MAY14, "2024-05-15T02:46:23.000_0530"),
    ("iso-8601", NEW_YORK, MAY14, "2024-05-14T17:16:23.000-0400"),   # negative: '-' stays
    ("iso-8601", NEW_YORK, utc(2024, 1, 14, 21, 16, 23), "2024-01-14T16:16:23.000-0500"),
    ("dense", UTC, utc(2020, 6, 1), "20200601_000000_000"),
    ("dense", UTC, Y2038 + 0.999, "20380119_031407_000"),  # _000 is literal, not millis
]))
def test_format_snapshot_timestamp(fmt, zone, epoch, text):
    assert zrepl.format_snapshot_timestamp(fmt, zone, epoch) == text


@pytest.mark.parametrize("layout,zone,epoch,text", by_result([
    ("2006-01-02_15:04", UTC, Y2038, "2038-01-19_03:14"),
    ("Mon_Jan_2_15.04.05_MST", UTC, Y2038, "Tue_Jan19_03.14.07_UTC"),   # _2 = space-padded day
    ("Monday January 02 2006", UTC, Y2038, "Tuesday January 19 2038"),
    ("06-1-2", UTC, Y2038, "38-1-19"),
    ("3PM pm 03 15", UTC, Y2038, "3AM am 03 03"),
    ("3PM pm 03", UTC, utc(2024, 5, 14, 15), "3PM pm 03"),
    ("002 __2", UTC, Y2038, "019  19"),
    ("_2", UTC, utc(2024, 5, 5), " 5"),
    ("04 4 05 5", UTC, utc(2024, 5, 5, 1, 2, 3), "02 2 03 3"),
    ("05.000", UTC, Y2038 + 0.5, "07.500"),
    ("05,000", UTC, Y2038 + 0.25, "07,250"),
    ("05.999", UTC, Y2038 + 0.5, "07.5"),
    ("05.999", UTC, Y2038, "07"),                       # .999 drops the dot when all zero
    ("-0700|-07:00|-07|-070000|-07:00:00|MST", NEW_YORK, MAY14,
     "-0400|-04:00|-04|-040000|-04:00:00|EDT"),
    ("Z0700|Z07:00|Z07|Z070000|Z07:00:00", UTC, MAY14, "Z|Z|Z|Z|Z"),
    ("Z0700|-0700", UTC, MAY14, "Z|+0000"),            # '+' only at positive offsets is '_'
    ("15-07:00 -0700", BERLIN, MAY14, "23_02:00 +0200"),  # only the first '+' becomes '_'
    ("literal text", UTC, Y2038, "literal text"),
]))
def test_format_go_layouts(layout, zone, epoch, text):
    assert zrepl.format_snapshot_timestamp(layout, zone, epoch) == text


def test_format_snapshot_timestamp_after_2037_uses_the_zone_rules():
    assert zrepl.format_snapshot_timestamp("iso-8601", BERLIN, utc(2040, 7, 1, 12)) == \
        "2040-07-01T14:00:00.000_0200"


def test_load_timezone_names():
    assert zrepl.load_timezone("UTC").offset_at(Y2038) == (0, "UTC")
    assert BERLIN.offset_at(MAY14) == (7200, "CEST")
    assert BERLIN.offset_at(utc(2024, 1, 1)) == (3600, "CET")
    assert zrepl.load_timezone("Local").name == "Local"


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "../etc/passwd", "Europe/", "", "a b"])
def test_load_timezone_rejects(name):
    with pytest.raises(ValueError):
        zrepl.load_timezone(name)


# =====================================================================================
# grid specs (SPEC §7.3)
# =====================================================================================

@pytest.mark.parametrize("spec,buckets", [
    ("1x1h", ((HOUR, 1),)),
    ("2x1d(keep=3)", ((DAY, 3), (DAY, 3))),
    (" 2 x 1d ( keep = 3 ) ", ((DAY, 3), (DAY, 3))),          # whitespace between all tokens
    ("1x1h(keep=all) | 2x1h", ((HOUR, None), (HOUR, 1), (HOUR, 1))),
    ("1x1h(keep=all)|1x30m", ((HOUR, None), (30 * MIN, 1))),   # shorter only after keep=all
    ("2x1h(keep=all) | 1x30m(keep=all) | 1x10m", ((HOUR, None), (HOUR, None), (30 * MIN, None),
                                                   (10 * MIN, 1))),
    ("1x1d | 1x1w", ((DAY, 1), (WEEK, 1))),
    ("1 x 2 h", ((2 * HOUR, 1),)),
])
def test_parse_grid_spec(spec, buckets):
    assert zrepl.parse_grid_spec(spec) == buckets


def test_parse_grid_spec_sizes():
    assert len(zrepl.parse_grid_spec("1x1h(keep=all) | 24x1h | 30x1d")) == 55
    assert len(zrepl.parse_grid_spec("1x1h(keep=all) | 24x1h | 30x1d | 6x30d")) == 61
    assert zrepl.parse_grid_spec("1x1h(keep=all) | 24x1h | 30x1d | 6x30d")[-1] == (30 * DAY, 1)


@pytest.mark.parametrize("spec,why", [
    ("1x1h(keep=0)", "keep must be at least 1"),
    ("1x1h(keep=-1)", "keep must be at least 1"),
    ("0x1h", "repeat count must be at least 1"),
    ("-1x1h", "repeat count must be at least 1"),
    ("1x1h(foo=1)", "unknown parameter"),
    ("1x1h(keep=)", "unknown parameter"),
    ("1x1h(keep=some)", "unknown parameter"),
    ("24x1h | 1x30m", "must not decrease"),
    ("1x1h | 1x1h(keep=all) | 1x30m", "must not decrease"),
    ("1x1d(keep=all) | 1x1h | 1x30m", "must not decrease"),
    ("1x0s", "duration must be positive"),
    ("1x1", "invalid duration"),
    ("1x1hour", "invalid duration"),
    ("x1h", "invalid grid interval"),
    ("1x1h |", "invalid grid interval"),
    ("", "invalid grid interval"),
    ("1h", "invalid grid interval"),
])
def test_parse_grid_spec_rejects(spec, why):
    with pytest.raises(ValueError) as info:
        zrepl.parse_grid_spec(spec)
    assert why in str(info.value)


# =====================================================================================
# filters (SPEC §5)
# =====================================================================================

SPEC_FILTER = (("tank<", True), ("tank/foo<", False), ("tank/foo/bar", True), ("tank/tmp", False))


@pytest.mark.parametrize("dataset,accepted", [
    ("tank", True), ("tank/bar", True), ("tank/foo", False), ("tank/foo/bar", True),
    ("tank/foo/bar/loo", False), ("tank/tmp", False), ("tank/tmp/x", True),
    ("tank/foobar", True), ("zroot", False),
])
def test_filter_spec_table(dataset, accepted):
    # the table of SPEC §5, in every order of the patterns (order must not matter)
    for patterns in itertools.permutations(SPEC_FILTER):
        assert zrepl.filter_accepts(patterns, dataset) is accepted, patterns


@pytest.mark.parametrize("patterns,dataset,accepted", [
    ((("<", True), ("rpool/swap", False)), "rpool/swap", False),
    ((("<", True), ("rpool/swap", False)), "rpool", True),
    ((("<", True), ("rpool/swap", False)), "rpool/swap/x", True),
    ((("<", True), ("rpool/swap", False)), "anything/else", True),
    ((("<", False), ("tank<", True)), "tank/a", True),
    ((("<", False), ("tank<", True)), "zroot", False),
    ((), "tank", False),
    ((("tank", True),), "tank/a", False),                       # exact covers no children
    ((("tank<", True), ("tank/x", False)), "tank/x/y", True),
    ((("tank/a<", True),), "tank/a b", False),                   # whole components only
    ((("tank/a<", True),), "tank/a-b", False),
    ((("tank/a<", True),), "tank", False),                       # not the ancestors
    ((("tank/a<", False), ("tank/a", True)), "tank/a", True),    # exact beats subtree
    ((("tank/a/b<", True), ("tank/a<", False)), "tank/a/b/c", True),   # longest wins
    ((("tank/a/b<", False), ("tank<", True)), "tank/a/bc", True),
])
def test_filter_accepts(patterns, dataset, accepted):
    assert zrepl.filter_accepts(patterns, dataset) is accepted


@pytest.mark.parametrize("patterns,roots", [
    (SPEC_FILTER, ["tank"]),
    ((("<", True), ("rpool/swap", False)), []),                 # `<` alone: all pools
    ((("a<", True), ("b/c", True), ("b/c/d<", True)), ["a", "b/c"]),
    ((("tank/a", True), ("tank/a<", True)), ["tank/a"]),
    ((("tank/a-b<", True), ("tank/a<", True), ("tank/a/x", True)), ["tank/a", "tank/a-b"]),
    ((("zroot<", True), ("zroot/tmp", False), ("zroot/var/tmp<", False)), ["zroot"]),
    ((("tank/home<", True), ("tank/db", True)), ["tank/db", "tank/home"]),
])
def test_filter_roots(patterns, roots):
    assert zrepl.filter_roots(patterns) == roots


# =====================================================================================
# placeholders (SPEC §3.3) and SHA-512/256
# =====================================================================================

try:
    hashlib.new("sha512_256", b"")
    _HASHLIB_HAS_IT = True
except ValueError:
    _HASHLIB_HAS_IT = False

LEGACY = "c8ec7f6b11a69cb14d7ea9553fd45ed4d5adb5d5c6d2e7a1b0e6d3e1c1f5ee0f"  # nobody's digest


def legacy_value(name):
    """The zrepl 0.0.x placeholder value: hex SHA-512/256 of the full dataset name."""
    if _HASHLIB_HAS_IT:
        return hashlib.new("sha512_256", name.encode()).hexdigest()
    return zrepl.sha512_256_pure(name.encode())


@pytest.mark.parametrize("name,value,placeholder", [
    ("pool/x", "on", True),
    ("pool/x", None, False),
    ("pool/x", "off", False),
    ("pool/x", "", False),
    ("pool/x", "ON", False),
    ("pool/x", "yes", False),
    ("pool/x", LEGACY, False),
    ("pool/sink/host1/zroot", "on", True),
])
def test_is_placeholder(name, value, placeholder):
    assert zrepl.is_placeholder(name, value) is placeholder


@pytest.mark.parametrize("name", ["pool/x", "zfb/sink/host1", "tank/sp ace/a;b$(x)"])
def test_is_placeholder_legacy_value(name):
    value = legacy_value(name)
    assert zrepl.is_placeholder(name, value) is True
    assert zrepl.is_placeholder(name + "x", value) is False      # another dataset's digest
    assert zrepl.is_placeholder(name, value.upper()) is False


@pytest.mark.parametrize("data,digest", [
    (b"", "c672b8d1ef56ed28ab87c3622c5114069bdd3ad7b8f9737498d0c01ecef0967a"),
    (b"abc", "53048e2681941ef99b2e29b76b4c7dabe4c2d0c634fc6d46e0e2f13107e7af23"),
    (b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqr"
     b"lmnopqrsmnopqrstnopqrstu",
     "3928e184fb8690f840da3988121d31be65cb9d3ef83ee6146feac861e19b563a"),
], ids=["empty", "abc", "two-blocks"])
def test_sha512_256_known_vectors(data, digest):
    # FIPS 180-4 examples
    assert zrepl.sha512_256_pure(data) == digest
    assert zrepl.sha512_256_hex(data) == digest


@pytest.mark.skipif(not _HASHLIB_HAS_IT, reason="this OpenSSL has no sha512_256")
@pytest.mark.parametrize("size", [0, 1, 55, 111, 112, 113, 127, 128, 129, 239, 240, 256, 1000])
def test_sha512_256_pure_matches_hashlib(size):
    data = bytes((i * 7 + size) % 256 for i in range(size))
    assert zrepl.sha512_256_pure(data) == hashlib.new("sha512_256", data).hexdigest()


# =====================================================================================
# records: the dataclasses subset (module preamble)
# =====================================================================================

@zrepl.dataclass
class _Base:
    a: int
    b: list = zrepl.field(default_factory=list)
    c: str = "x"
    secret: dict = zrepl.field(default_factory=dict, repr=False)


@zrepl.dataclass
class _Child(_Base):
    c: str = "y"                       # redefined: keeps its place
    d: int = 4

    def __post_init__(self):
        self.d *= 2


@zrepl.dataclass(frozen=True)
class _Frozen:
    x: int
    y: frozenset = frozenset()


def test_records_fields_defaults_and_factories():
    assert [f.name for f in zrepl.dataclass_fields(_Child)] == ["a", "b", "c", "secret", "d"]
    one, two = _Base(1), _Base(2, c="z")
    assert (one.a, one.b, one.c, two.c) == (1, [], "x", "z")
    one.b.append(1)
    assert two.b == [] and _Base(3).b == []          # a fresh list per instance
    child = _Child(1, [2], "q")
    assert (child.c, child.d) == ("q", 8)            # positional order, then __post_init__
    assert _Child(0).c == "y" and _Base.c == "x" and "b" not in _Base.__dict__
    with pytest.raises(TypeError):
        _Base()
    with pytest.raises(TypeError):
        _Base(1, nope=2)
    with pytest.raises(TypeError, match="without a default follows"):
        zrepl.dataclass(type("Bad", (), {"__annotations__": {"a": int, "b": int}, "a": 1}))


def test_records_compile_their_init_at_the_first_instance():
    @zrepl.dataclass
    class Late:
        a: int = 1
    first = Late.__init__
    assert Late(2).a == 2 and Late.__init__ is not first
    assert Late.__init__.__qualname__.endswith("Late.__init__")
    assert Late(a=5).a == 5 and Late().a == 1


def test_records_repr_eq_hash_replace():
    one = _Base(1, [2], secret={"k": 1})
    assert repr(one) == "_Base(a=1, b=[2], c='x')"
    assert one == _Base(1, [2], secret={"k": 1}) and one != _Base(1, [3])
    assert one != _Child(1, [2], secret={"k": 1})     # another class is never equal
    with pytest.raises(TypeError):
        hash(one)                                      # mutable and equal by value
    other = zrepl.dataclass_replace(one, c="z")
    assert (other.a, other.b, other.c, one.c) == (1, [2], "z", "x")
    assert zrepl.is_dataclass(one) and zrepl.is_dataclass(_Base) and not zrepl.is_dataclass(1)


def test_frozen_records_refuse_assignment_and_hash_by_value():
    f = _Frozen(1)
    with pytest.raises(AttributeError, match="frozen"):
        f.x = 2
    with pytest.raises(AttributeError, match="frozen"):
        del f.x
    assert hash(f) == hash(_Frozen(1)) and {f, _Frozen(1)} == {f}
    assert zrepl.dataclass_replace(f, x=3) == _Frozen(3)
