"""Model and names: snapshot names, due-ness, cron fire times, `snapshot -r` grouping,
zrepl's abstraction names and placeholders (pure, no ZFS).

SPEC §3.1 (snapshot names), §3.2 (abstraction names), §3.3 (placeholders), §6.2 (recursive
snapshot roots), §6.3 (cron), §6.6 (due). Expectations are worked out by hand from the SPEC;
epochs come from `calendar.timegm`, never from the code under test.
"""
import calendar
import sys
import time

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))

import zrepl  # noqa: E402

UTC = zrepl.load_timezone("UTC")


def utc(y, mo, d, h=0, mi=0, s=0):
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))


def zone(name):
    return UTC if name == "UTC" else zrepl.load_timezone(name)


def periodic(interval, prefix="zrepl_"):
    return zrepl.Snapshotting("periodic", prefix=prefix, interval=interval)


def cron(text, prefix="zrepl_"):
    return zrepl.Snapshotting("cron", prefix=prefix, cron=zrepl.parse_cron(text))


def snapshot(name, txg, creation=1000, fs="p/fs", type="snapshot"):
    return zrepl.Version(type, fs, name, 0x100 + txg, txg, creation, 0 if type == "snapshot"
                         else None)


# --- snapshot names (SPEC §3.1) --------------------------------------------------------------

Y2038 = 2147483647           # 2038-01-19 03:14:07 UTC
BERLIN_SUMMER = utc(2024, 5, 14, 21, 16, 23)
WINTER = utc(2024, 12, 1)


@pytest.mark.parametrize("fmt, location, epoch, expected", [
    pytest.param("dense", "UTC", Y2038, "zrepl_20380119_031407_000", id="dense"),
    pytest.param("human", "UTC", Y2038, "zrepl_2038-01-19_03:14:07", id="human"),
    pytest.param("iso-8601", "UTC", Y2038, "zrepl_2038-01-19T03:14:07.000Z", id="iso-8601-utc"),
    pytest.param("unix-seconds", "UTC", Y2038, "zrepl_2147483647", id="unix-seconds"),
    pytest.param("iso-8601", "Europe/Berlin", BERLIN_SUMMER,
                 "zrepl_2024-05-14T23:16:23.000_0200",
                 id="iso-8601-berlin-summer-plus-to-underscore"),
    pytest.param("iso-8601", "Europe/Berlin", WINTER,
                 "zrepl_2024-12-01T01:00:00.000_0100", id="iso-8601-berlin-winter"),
    pytest.param("iso-8601", "America/New_York", WINTER,
                 "zrepl_2024-11-30T19:00:00.000-0500", id="iso-8601-negative-offset-keeps-minus"),
    pytest.param("DENSE", "UTC", Y2038, "zrepl_20380119_031407_000",
                 id="format-name-case-insensitive"),
    pytest.param("Iso-8601", "UTC", Y2038, "zrepl_2038-01-19T03:14:07.000Z",
                 id="iso-case-insensitive"),
    # the dense `_000` is literal text, not milliseconds
    pytest.param("dense", "UTC", Y2038 + 0.789, "zrepl_20380119_031407_000",
                 id="dense-000-is-literal"),
    pytest.param("unix-seconds", "UTC", 1700000000, "zrepl_1700000000", id="unix-seconds-other"),
    # custom Go layouts
    pytest.param("2006-01-02_15-04", "UTC", Y2038, "zrepl_2038-01-19_03-14",
                 id="go-layout-numeric"),
    pytest.param("Mon_Jan-2_15h04m05s", "UTC", Y2038, "zrepl_Tue_Jan-19_03h14m07s",
                 id="go-layout-names"),
    # `_2` is Go's space-padded day token
    pytest.param("Jan_2", "UTC", utc(2024, 1, 5), "zrepl_Jan 5", id="go-layout-underscore-day"),
    pytest.param("2006-01-02T15:04:05-07:00", "Europe/Berlin", BERLIN_SUMMER,
                 "zrepl_2024-05-14T23:16:23_02:00", id="go-layout-colon-offset"),
    # only the first `+` becomes `_`
    pytest.param("15:04-0700-07", "Europe/Berlin", BERLIN_SUMMER, "zrepl_23:16_0200+02",
                 id="go-layout-only-first-plus"),
    pytest.param("060102_3PM", "UTC", utc(2024, 7, 4, 15, 0, 0), "zrepl_240704_3PM",
                 id="go-layout-12h"),
])
def test_snapshot_name(fmt, location, epoch, expected):
    s = zrepl.Snapshotting("periodic", prefix="zrepl_", interval=600, timestamp_format=fmt,
                           timestamp_location=location)
    assert zrepl.snapshot_name(s, zone(location), epoch) == expected


def test_snapshot_name_uses_the_prefix():
    s = zrepl.Snapshotting("cron", prefix="auto-", cron=zrepl.parse_cron("0 * * * *"))
    assert zrepl.snapshot_name(s, UTC, Y2038) == "auto-20380119_031407_000"


# --- newest_prefixed (SPEC §6.4/§6.6: newest by createtxg among prefixed) --------------------

def test_newest_prefixed_picks_highest_createtxg_among_prefixed():
    ds = zrepl.Dataset("p/fs", "filesystem", versions=[
        snapshot("zrepl_a", 10, creation=3000),   # newest creation, lower createtxg
        snapshot("zrepl_b", 20, creation=1000),   # <- highest createtxg among prefixed
        snapshot("manual_x", 30, creation=4000),  # not prefixed
        snapshot("x_zrepl_c", 40, creation=5000),  # contains but does not start with prefix
        snapshot("zrepl_bm", 50, creation=6000, type="bookmark"),  # a bookmark
    ])
    assert zrepl.newest_prefixed(ds, "zrepl_").name == "zrepl_b"


def test_newest_prefixed_none_without_prefixed_snapshots():
    ds = zrepl.Dataset("p/fs", "filesystem", versions=[
        snapshot("manual_x", 30), snapshot("zrepl_bm", 50, type="bookmark")])
    assert zrepl.newest_prefixed(ds, "zrepl_") is None
    assert zrepl.newest_prefixed(zrepl.Dataset("p/e", "filesystem"), "zrepl_") is None


# --- snapshot_due (SPEC §6.6) -------------------------------------------------------------------

NOW = utc(2024, 1, 15, 12, 0, 0)   # a Monday


@pytest.mark.parametrize("s", [
    pytest.param(zrepl.Snapshotting("manual"), id="manual"),
])
@pytest.mark.parametrize("newest", [None, NOW - 10 * 86400], ids=["no-snapshot", "old-snapshot"])
def test_manual_is_never_due(s, newest):
    assert zrepl.snapshot_due(s, newest, NOW, UTC) is False


@pytest.mark.parametrize("s", [
    pytest.param(periodic(600), id="periodic"),
    pytest.param(cron("0 0 1 1 *"), id="cron"),
])
def test_no_prefixed_snapshot_is_due(s):
    assert zrepl.snapshot_due(s, None, NOW, UTC) is True


@pytest.mark.parametrize("interval, age, due", [
    # interval 10m: slack min(60, 60) = 60 s -> due iff age >= 540 s
    pytest.param(600, 541, True, id="10m-9m01s-due"),
    pytest.param(600, 540, True, id="10m-9m00s-due"),
    pytest.param(600, 539, False, id="10m-8m59s-not-due"),
    pytest.param(600, 480, False, id="10m-8m-not-due"),
    pytest.param(600, 3600, True, id="10m-1h-due"),
    # interval 5m: slack min(60, 30) = 30 s -> due iff age >= 270 s
    pytest.param(300, 270, True, id="5m-4m30s-due"),
    pytest.param(300, 269, False, id="5m-4m29s-not-due"),
    pytest.param(300, 245, False, id="5m-4m05s-not-due-slack-is-not-60"),
    # interval 1h: slack 60 s -> due iff age >= 3540 s
    pytest.param(3600, 3540, True, id="1h-59m-due"),
    pytest.param(3600, 3539, False, id="1h-58m59s-not-due"),
    # interval 15 s: slack 1.5 s -> due iff age >= 13.5 s
    pytest.param(15, 14, True, id="15s-14s-due"),
    pytest.param(15, 13, False, id="15s-13s-not-due"),
    # a newest snapshot from the future is not due
    pytest.param(600, -5, False, id="future-not-due"),
])
def test_periodic_due(interval, age, due):
    assert zrepl.snapshot_due(periodic(interval), NOW - age, NOW, UTC) is due


def hm(h, m, s=0, day=15, month=1, year=2024):
    return utc(year, month, day, h, m, s)


CRON_DUE_CASES = [
    # `*/15`: due iff some fire F with C < F <= now + 60 s
    pytest.param("*/15 * * * *", hm(12, 0), hm(12, 13, 59), False, id="quarter-slack-not-reached"),
    pytest.param("*/15 * * * *", hm(12, 0), hm(12, 14, 0), True, id="quarter-slack-reaches-fire"),
    pytest.param("*/15 * * * *", hm(12, 0), hm(12, 15, 0), True, id="quarter-at-fire"),
    pytest.param("*/15 * * * *", hm(12, 15), hm(12, 15, 5), False,
                 id="fire-equal-to-C-does-not-count"),
    pytest.param("*/15 * * * *", hm(12, 15), hm(12, 28, 59), False, id="after-fire-not-reached"),
    pytest.param("*/15 * * * *", hm(12, 15), hm(12, 29, 0), True, id="after-fire-reached"),
    pytest.param("*/15 * * * *", hm(12, 14, 30), hm(12, 14, 31), True, id="C-just-before-fire"),
    pytest.param("*/15 * * * *", hm(11, 0), hm(12, 0), True, id="missed-fires"),
    # day-of-month AND day-of-week restricted: a day matching either fires (OR)
    # C = Mon Jan 15 12:00; next Friday Jan 19 00:00; next 13th Feb 13 (Tuesday)
    pytest.param("0 0 13 * FRI", hm(12, 0), hm(23, 58, 59, day=18), False, id="or-before-friday"),
    pytest.param("0 0 13 * FRI", hm(12, 0), hm(23, 59, 0, day=18), True, id="or-friday-fires"),
    pytest.param("0 0 13 * 5", hm(12, 0), hm(23, 59, 0, day=18), True, id="or-numeric-dow"),
    # day-of-week `*`: only the 13th (AND)
    pytest.param("0 0 13 * *", hm(12, 0), hm(0, 0, 0, day=19), False, id="and-dom-only-friday-no"),
    pytest.param("0 0 13 * *", hm(12, 0), hm(23, 58, 59, day=12, month=2), False,
                 id="and-dom-only-before-13th"),
    pytest.param("0 0 13 * *", hm(12, 0), hm(23, 59, 0, day=12, month=2), True,
                 id="and-dom-only-13th"),
    # day-of-month `?`: only Fridays
    pytest.param("0 0 ? * FRI", hm(12, 0), hm(23, 58, 59, day=18), False, id="dom-question-before"),
    pytest.param("0 0 ? * FRI", hm(12, 0), hm(23, 59, 0, day=18), True, id="dom-question-friday"),
    # month names (case-insensitive) and ranges; 2024 is a leap year
    pytest.param("0 0 1 MAR *", hm(12, 0), hm(23, 58, 59, day=29, month=2), False,
                 id="month-name-before"),
    pytest.param("0 0 1 MAR *", hm(12, 0), hm(23, 59, 0, day=29, month=2), True,
                 id="month-name-fires"),
    pytest.param("0 0 1 mar *", hm(12, 0), hm(23, 59, 0, day=29, month=2), True,
                 id="month-name-lowercase"),
    pytest.param("0 0 1 apr-jun *", hm(12, 0), hm(23, 58, 59, day=31, month=3), False,
                 id="month-range-before"),
    pytest.param("0 0 1 apr-jun *", hm(12, 0), hm(23, 59, 0, day=31, month=3), True,
                 id="month-range-fires"),
    pytest.param("0 9 * JAN-FEB mon-fri", hm(12, 0), hm(8, 58, 59, day=16), False,
                 id="weekday-names-before"),
    pytest.param("0 9 * JAN-FEB mon-fri", hm(12, 0), hm(8, 59, 0, day=16), True,
                 id="weekday-names-tuesday"),
    pytest.param("0 9 * JAN-FEB mon-fri", hm(12, 0, day=19), hm(9, 0, 0, day=21), False,
                 id="weekday-names-skip-weekend"),
    pytest.param("0 9 * JAN-FEB mon-fri", hm(12, 0, day=19), hm(8, 59, 0, day=22), True,
                 id="weekday-names-monday"),
    # 6 fields: a leading second. Fires at :00:30, :15:30, ...
    pytest.param("30 */15 * * * *", hm(12, 0, 31), hm(12, 14, 29), False, id="seconds-before"),
    pytest.param("30 */15 * * * *", hm(12, 0, 31), hm(12, 14, 30), True, id="seconds-fires"),
    pytest.param("*/15 * * * *", hm(12, 0, 31), hm(12, 14, 0), True, id="five-fields-second-0"),
    # `N/S` means `N-max/S`
    pytest.param("10/20 * * * *", hm(12, 10), hm(12, 28, 59), False, id="n-slash-s-before"),
    pytest.param("10/20 * * * *", hm(12, 10), hm(12, 29, 0), True, id="n-slash-s-fires"),
]


@pytest.mark.parametrize("text, newest, now, due", CRON_DUE_CASES)
def test_cron_due(text, newest, now, due):
    assert zrepl.snapshot_due(cron(text), newest, now, UTC) is due


def test_cron_comma_list_plain_value_next_to_stepped_value():
    # SPEC §6.3: `5,30/15` = {5} ∪ {30, 45}. C = 12:05; next fire 12:30.
    spec = zrepl.parse_cron("5,30/15 * * * *")
    assert spec.minutes == frozenset({5, 30, 45})
    assert zrepl.snapshot_due(cron("5,30/15 * * * *"), hm(12, 5), hm(12, 6), UTC) is False


def test_cron_comma_list_plain_values():
    assert zrepl.parse_cron("5,30 * * * *").minutes == frozenset({5, 30})
    assert zrepl.parse_cron("0 0 * * *").minutes == frozenset({0})
    assert zrepl.parse_cron("10/20 * * * *").minutes == frozenset({10, 30, 50})


# --- cron_fires_between: long gaps, impossible dates, local time --------------------------

@pytest.mark.parametrize("text, after, until, expected", [
    pytest.param("0 0 30 2 *", utc(2024, 1, 1), utc(2028, 1, 1), False, id="feb-30-never-4-years"),
    pytest.param("0 0 31 4,6,9,11 *", utc(2024, 1, 1), utc(2025, 1, 1), False,
                 id="31st-of-30-day-months-never"),
    pytest.param("0 0 29 2 *", utc(2025, 3, 1), utc(2028, 2, 28, 23, 59, 59), False,
                 id="feb-29-not-before-leap-day"),
    pytest.param("0 0 29 2 *", utc(2025, 3, 1), utc(2028, 2, 29), True, id="feb-29-leap-day"),
    pytest.param("59 59 23 31 12 *", utc(2024, 1, 1), utc(2024, 12, 31, 23, 59, 58), False,
                 id="seconds-once-a-year-before"),
    pytest.param("59 59 23 31 12 *", utc(2024, 1, 1), utc(2024, 12, 31, 23, 59, 59), True,
                 id="seconds-once-a-year-fires"),
    pytest.param("0 12 * * SUN", utc(2024, 1, 15), utc(2024, 1, 21, 11, 59, 59), False,
                 id="sunday-is-0-before"),
    pytest.param("0 12 * * 0", utc(2024, 1, 15), utc(2024, 1, 21, 12), True, id="sunday-is-0"),
])
def test_cron_fires_between_fast(text, after, until, expected):
    spec = zrepl.parse_cron(text)
    t0 = time.monotonic()
    got = zrepl.cron_fires_between(spec, after, until, UTC)
    elapsed = time.monotonic() - t0
    assert got is expected
    assert elapsed < 1.0, "took %.2f s" % elapsed


def test_cron_fires_between_bounds_exclusive_inclusive():
    spec = zrepl.parse_cron("0 * * * *")
    five, six = utc(2024, 1, 1, 5), utc(2024, 1, 1, 6)
    assert zrepl.cron_fires_between(spec, five, six - 1, UTC) is False   # after < F
    assert zrepl.cron_fires_between(spec, five, six, UTC) is True        # F <= until
    assert zrepl.cron_fires_between(spec, five - 1, five, UTC) is True


def test_cron_evaluated_in_the_given_zone():
    # 02:30 in Berlin (CEST, +2) is 00:30 UTC
    berlin = zrepl.load_timezone("Europe/Berlin")
    spec = zrepl.parse_cron("30 2 * * *")
    after = utc(2024, 4, 1, 22)            # 2024-04-02 00:00 CEST
    assert zrepl.cron_fires_between(spec, after, utc(2024, 4, 2, 0, 29, 59), berlin) is False
    assert zrepl.cron_fires_between(spec, after, utc(2024, 4, 2, 0, 30), berlin) is True


def test_cron_monday_after_an_ordinary_sunday():
    # control for the DST case below: the same spec in a week without a DST change.
    # Monday 2024-03-25 00:30 CET = 2024-03-24 23:30 UTC
    berlin = zrepl.load_timezone("Europe/Berlin")
    spec = zrepl.parse_cron("30 0 * * MON")
    after = utc(2024, 3, 23, 23)           # Sunday 00:00 CET
    assert zrepl.cron_fires_between(spec, after, utc(2024, 3, 24, 23, 29, 59), berlin) is False
    assert zrepl.cron_fires_between(spec, after, utc(2024, 3, 24, 23, 30), berlin) is True


def test_cron_wall_clock_time_skipped_by_dst_does_not_fire():
    # 2024-03-31: Berlin jumps from 02:00 CET to 03:00 CEST; 02:30 does not exist that day
    berlin = zrepl.load_timezone("Europe/Berlin")
    spec = zrepl.parse_cron("30 2 * * *")
    after, until = utc(2024, 3, 30, 23), utc(2024, 3, 31, 10)   # 00:00 CET .. 12:00 CEST
    assert zrepl.cron_fires_between(spec, after, until, berlin) is False


def test_cron_fire_right_after_a_23_hour_day():
    # Sunday 2024-03-31 is 23 hours long in Berlin. `30 0 * * MON` fires on Monday
    # 2024-04-01 00:30 CEST = 2024-03-31 22:30 UTC, a time that exists.
    berlin = zrepl.load_timezone("Europe/Berlin")
    spec = zrepl.parse_cron("30 0 * * MON")
    after = utc(2024, 3, 30, 23)           # Sunday 00:00 CET
    until = utc(2024, 3, 31, 22, 45)       # Monday 00:45 CEST
    assert zrepl.cron_fires_between(spec, after, until, berlin) is True


# --- recursive_snapshot_roots (SPEC §6.2) --------------------------------------------------------

TREE = ["p/a", "p/a/b", "p/a/b/c", "p/d"]


@pytest.mark.parametrize("listed, round_fs, roots, singles", [
    pytest.param(TREE, TREE, ["p/a", "p/d"], [], id="all-in-round"),
    pytest.param(TREE, ["p/a", "p/a/b", "p/d"], ["p/d"], ["p/a", "p/a/b"], id="leaf-excluded"),
    pytest.param(TREE, ["p/a", "p/a/b/c", "p/d"], ["p/a/b/c", "p/d"], ["p/a"],
                 id="middle-excluded"),
    pytest.param(TREE, ["p/a/b", "p/a/b/c", "p/d"], ["p/a/b", "p/d"], [], id="top-excluded"),
    pytest.param(TREE, ["p/a/b"], [], ["p/a/b"], id="only-middle"),
    pytest.param(["p", "p/a", "p/a/b", "p/c"], ["p", "p/a", "p/a/b", "p/c"], ["p"], [],
                 id="whole-pool"),
    pytest.param(["p", "p/a", "p/a/b", "p/c"], ["p", "p/a", "p/c"], ["p/c"], ["p", "p/a"],
                 id="pool-with-excluded-grandchild"),
    pytest.param(["p", "p/a", "p/a/b", "p/c"], ["p/a", "p/a/b", "p/c"], ["p/a", "p/c"], [],
                 id="pool-excluded"),
    # p/ab is not a child of p/a
    pytest.param(["p/a", "p/a/x", "p/ab"], ["p/a", "p/ab"], ["p/ab"], ["p/a"],
                 id="name-prefix-is-not-a-child"),
    pytest.param(["p/a", "p/a/x", "p/ab"], ["p/a", "p/a/x", "p/ab"], ["p/a", "p/ab"], [],
                 id="name-prefix-siblings-both-roots"),
    # root p/a must not swallow p/ab, which is incomplete (p/ab/x excluded)
    pytest.param(["p/a", "p/ab", "p/ab/x"], ["p/a", "p/ab"], ["p/a"], ["p/ab"],
                 id="root-does-not-cover-name-prefix"),
    pytest.param([], [], [], [], id="empty"),
])
def test_recursive_snapshot_roots(listed, round_fs, roots, singles):
    got_roots, got_singles = zrepl.recursive_snapshot_roots(round_fs, listed)
    assert sorted(got_roots) == roots
    assert sorted(got_singles) == singles


# --- abstraction names (SPEC §3.2) ---------------------------------------------------------------

@pytest.mark.parametrize("func, args, expected", [
    pytest.param(zrepl.step_hold_tag, ("push",), "zrepl_STEP_J_push", id="step-hold"),
    pytest.param(zrepl.last_received_hold_tag, ("sink",), "zrepl_last_received_J_sink",
                 id="last-received-hold"),
    pytest.param(zrepl.cursor_hold_tag, ("push",), "zrepl_CURSOR_J_push", id="cursor-hold"),
    pytest.param(zrepl.cursor_bookmark_name, (0xAB, "push"),
                 "zrepl_CURSOR_G_00000000000000ab_J_push", id="cursor-bookmark-zero-padded"),
    pytest.param(zrepl.cursor_bookmark_name, (0xFEDCBA9876543210, "my-job"),
                 "zrepl_CURSOR_G_fedcba9876543210_J_my-job", id="cursor-bookmark-lowercase"),
    pytest.param(zrepl.cursor_bookmark_name, (2 ** 64 - 1, "j"),
                 "zrepl_CURSOR_G_ffffffffffffffff_J_j", id="cursor-bookmark-max-guid"),
    pytest.param(zrepl.tentative_cursor_bookmark_name, (0x1234, "push"),
                 "zrepl_CURSORTENTATIVE__G_0000000000001234_J_push",
                 id="tentative-double-underscore"),
])
def test_abstraction_names(func, args, expected):
    assert func(*args) == expected


G = 0x0123456789ABCDEF
GH = "0123456789abcdef"


@pytest.mark.parametrize("name, guid, expected", [
    pytest.param("zrepl_CURSOR_G_%s_J_push" % GH, G, ("replication-cursor-bookmark-v2", "push"),
                 id="cursor-v2"),
    pytest.param("zrepl_CURSORTENTATIVE__G_%s_J_push" % GH, G,
                 ("tentative-replication-cursor-bookmark-v2", "push"), id="tentative"),
    pytest.param("zrepl_CURSOR_G_%s_J_a_J_b" % GH, G, ("replication-cursor-bookmark-v2", "a_J_b"),
                 id="job-containing-_J_"),
    pytest.param("zrepl_CURSOR_G_%s_J_push" % GH, G + 1, None, id="wrong-guid-encoded"),
    pytest.param("zrepl_replication_cursor", 42, ("replication-cursor-bookmark-v1", None),
                 id="v1-cursor"),
    pytest.param("my_bookmark", G, None, id="not-ours"),
    pytest.param("zrepl_OTHER_G_%s_J_push" % GH, G, None, id="unknown-prefix"),
    pytest.param("xzrepl_CURSOR_G_%s_J_push" % GH, G, None, id="prefix-not-exact"),
    pytest.param("zrepl_CURSORTENTATIVE_G_%s_J_push" % GH, G, None,
                 id="tentative-single-underscore"),
    pytest.param("zrepl_CURSOR_G_%s_J_push" % GH.upper(), G, None, id="uppercase-hex"),
    pytest.param("zrepl_CURSOR_G_%s_J_push" % GH[1:], G, None, id="15-hex-digits"),
    pytest.param("zrepl_CURSOR_G_%s_J__reserved" % GH, G, None, id="job-starting-underscore"),
    pytest.param("zrepl_CURSOR_G_%s_J_a,b" % GH, G, None, id="job-with-comma"),
    pytest.param("zrepl_CURSOR_G_%s_J_%s" % (GH, "j" * 201), G, None, id="job-too-long"),
    pytest.param("zrepl_CURSOR_G_%s_J_" % GH, G, None, id="empty-job"),
])
def test_parse_abstraction_bookmark(name, guid, expected):
    assert zrepl.parse_abstraction_bookmark(name, guid) == expected


@pytest.mark.parametrize("tag, expected", [
    pytest.param("zrepl_STEP_J_push", ("step-hold", "push"), id="step"),
    pytest.param("zrepl_last_received_J_sink", ("last-received-hold", "sink"), id="last-received"),
    pytest.param("zrepl_CURSOR_J_push", ("replication-cursor-hold", "push"), id="cursor-hold"),
    pytest.param("mine", None, id="not-ours"),
    pytest.param("zrepl_STEP_J_", None, id="empty-job"),
    pytest.param("zrepl_STEP_J__x", None, id="job-starting-underscore"),
    pytest.param("zrepl_CURSOR_G_%s_J_push" % GH, None, id="bookmark-name-is-not-a-hold"),
    pytest.param("zrepl_step_J_push", None, id="case-sensitive"),
])
def test_parse_abstraction_hold(tag, expected):
    assert zrepl.parse_abstraction_hold(tag) == expected


# --- placeholders (SPEC §3.3) ----------------------------------------------------------------

# SHA-512/256 of b"pool/legacy" (computed with OpenSSL's sha512_256, hard-coded here)
LEGACY = "abd3659acedc8b4999dca65e771658597e64d5e5cc8617f0cf83cd93756e0f4d"


@pytest.mark.parametrize("name, local_value, expected", [
    pytest.param("pool/x", "on", True, id="on"),
    pytest.param("pool/x", "off", False, id="off"),
    pytest.param("pool/x", None, False, id="not-set-locally"),
    pytest.param("pool/x", "yes", False, id="other-value"),
    pytest.param("pool/legacy", LEGACY, True, id="legacy-digest-of-own-name"),
    pytest.param("pool/other", LEGACY, False, id="legacy-digest-of-another-name"),
    pytest.param("pool/legacy", LEGACY.upper(), False, id="legacy-digest-uppercase"),
])
def test_is_placeholder(name, local_value, expected):
    assert zrepl.is_placeholder(name, local_value) is expected
    ds = zrepl.Dataset(name, "filesystem", placeholder_value=local_value)
    assert ds.is_placeholder is expected


def test_sha512_256_pure_known_vectors():
    # FIPS 180-4 example: SHA-512/256("abc")
    assert zrepl.sha512_256_pure(b"abc") == \
        "53048e2681941ef99b2e29b76b4c7dabe4c2d0c634fc6d46e0e2f13107e7af23"
    assert zrepl.sha512_256_pure(b"pool/legacy") == LEGACY


# --- the daemon's schedules (SPEC §6.4 periodic sync-up, §6.5 cron), pure -------------------

def test_next_cron_fire_is_the_first_fire_after():
    spec = zrepl.parse_cron("*/15 * * * *")
    t = utc(2024, 1, 1, 5, 7)
    assert zrepl.next_cron_fire(spec, t, UTC) == utc(2024, 1, 1, 5, 15)
    assert zrepl.next_cron_fire(spec, utc(2024, 1, 1, 5, 15), UTC) == utc(2024, 1, 1, 5, 30)
    berlin = zrepl.load_timezone("Europe/Berlin")          # 02:30 Berlin = 00:30 UTC (CEST)
    assert zrepl.next_cron_fire(zrepl.parse_cron("30 2 * * *"), utc(2024, 4, 1, 22),
                                berlin) == utc(2024, 4, 2, 0, 30)
    t0 = time.monotonic()
    assert zrepl.next_cron_fire(zrepl.parse_cron("0 0 30 2 *"), utc(2024, 1, 1), UTC) is None
    assert time.monotonic() - t0 < 1.0


def test_periodic_sync_up_takes_the_earliest_candidate():
    now = 100_000
    newest = {"p/a": now - 600, "p/b": now - 100, "p/c": None}
    assert zrepl.periodic_sync_point(newest, 900, now) == (now + 300, [])
    # a candidate in the past: at once
    assert zrepl.periodic_sync_point({"p/a": now - 5000}, 900, now) == (now, [])
    # no prefixed snapshot anywhere: now
    assert zrepl.periodic_sync_point({"p/a": None}, 900, now) == (now, [])
    # a snapshot from the future is that filesystem's error; the others still sync up
    assert zrepl.periodic_sync_point({"p/a": now + 50, "p/b": now - 100}, 900, now) == (
        now + 800, ["p/a"])
    # every filesystem from the future: wait one interval and sync up again
    assert zrepl.periodic_sync_point({"p/a": now + 50}, 900, now) == (now + 900, ["p/a"])


@pytest.mark.parametrize("now, want", [
    (1000, (1000, 0)),             # the sync point itself
    (500, (1000, 0)),              # before it
    (1001, (1600, 0)),             # a round that started at 1000: the next grid point
    (1599, (1600, 0)),
    (1600, (1600, 0)),
    (2300, (2800, 2)),             # a round that overran 1600 and 2200: both skipped
    (4000, (4000, 4)),             # exactly on a grid point after a very long round
])
def test_periodic_rounds_keep_to_the_grid(now, want):
    assert zrepl.next_periodic_round(1000, 600, now) == want
