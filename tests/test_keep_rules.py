"""Keep rules and the prune decision: `decide_prune`, `Decision`, `rule_label` (pure, no ZFS).

SPEC §7.2 (decision: union of rules, holds, ordering), §7.3 (grid), §7.4 (last_n, regex,
not_replicated), §7.5 (dry-run reason texts) and §13 items 11-15. Every expectation below
was worked out by hand from the SPEC text; none is computed with the code under test.

Snapshots are plain data: `snaps(...)` builds `zrepl.Version` lists where each snapshot is
(name, age in minutes before NOW) and createtxg grows with creation, unless stated.
"""
import json
import random
import re
import sys
import time

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))

import zrepl  # noqa: E402

FS = "p/fs"
NOW = 1700000000          # a fixed wall clock (2023-11-14 22:13:20 UTC)
MIN, HOUR, DAY = 60, 3600, 86400


# --- plain-data helpers ------------------------------------------------------------------

def version(name, creation, txg, userrefs=0, guid=None, type="snapshot"):
    """One Version on FS; guid defaults to a value derived from createtxg."""
    return zrepl.Version(type, FS, name, guid if guid is not None else 0x1000 + txg,
                         txg, creation, userrefs)


def snaps(*specs):
    """specs: (name, age_minutes[, userrefs]) -> Versions, createtxg ascending with creation."""
    ordered = sorted(specs, key=lambda s: -s[1])          # oldest (largest age) first
    out = []
    for txg, spec in enumerate(ordered, 1):
        name, age = spec[0], spec[1]
        userrefs = spec[2] if len(spec) > 2 else 0
        out.append(version(name, NOW - int(age * MIN), txg * 10, userrefs))
    return out


def aged(ages_minutes, prefix="zrepl_"):
    """Snapshots named `<prefix><age>m` at the given ages (minutes before NOW)."""
    return snaps(*[("%s%dm" % (prefix, a), a) for a in ages_minutes])


def grid(spec, regex="^zrepl_"):
    return zrepl.KeepRule("grid", regex=regex, grid=spec, buckets=zrepl.parse_grid_spec(spec))


def last_n(count, regex=None):
    return zrepl.KeepRule("last_n", count=count, regex=regex)


def regex(rx, negate=False):
    return zrepl.KeepRule("regex", regex=rx, negate=negate)


def not_replicated(keep_snapshot_at_cursor=True):
    return zrepl.KeepRule("not_replicated", keep_snapshot_at_cursor=keep_snapshot_at_cursor)


def decide(snapshots, rules, **kw):
    return zrepl.decide_prune(snapshots, rules, **kw)


def by_name(decisions):
    """{short name: (action, reasons)}"""
    return {d.snapshot.name: (d.action, list(d.reasons)) for d in decisions}


def kept(decisions):
    return {d.snapshot.name for d in decisions if d.action == "keep"}


def destroyed(decisions):
    return {d.snapshot.name for d in decisions if d.action == "destroy"}


def kept_ages(decisions):
    """Ages in minutes (before NOW) of the kept snapshots."""
    return sorted((NOW - d.snapshot.creation) // MIN for d in decisions if d.action == "keep")


# --- grid (SPEC §7.3) ----------------------------------------------------------------------

GRID_CASES = [
    # §7.3's worked example and §13 item 14: bucket 0 [0,1h) keep=all -> 0, 10m, 59m;
    # bucket 1 [1h,2h) keeps its oldest 119m; bucket 2 [2h,3h) keeps 179m; 180m is outside
    pytest.param("1x1h(keep=all) | 2x1h", [0, 10, 59, 60, 90, 119, 120, 179, 180],
                 [0, 10, 59, 119, 179], id="spec-7.3-worked-example"),
    # a snapshot exactly at 1h belongs to bucket [1h,2h), not [0,1h): bucket 0 keeps 30m
    # (its oldest), bucket 1 keeps 60m; putting 60m in bucket 0 would drop 30m
    pytest.param("2x1h", [0, 30, 60], [30, 60], id="boundary-belongs-to-older-bucket"),
    # each start is inclusive: 60 and 120 both open a new bucket
    pytest.param("3x1h", [0, 59, 60, 119, 120], [59, 119, 120], id="boundary-every-start"),
    # the sum of lengths (2h) is outside; 119m is the last age inside
    pytest.param("2x1h", [0, 119, 120, 121], [0, 119], id="exactly-total-length-not-kept"),
    # keep=all in the first bucket
    pytest.param("1x1h(keep=all)", [0, 1, 30, 59, 60], [0, 1, 30, 59], id="keep-all"),
    # keep=K>1: the K oldest of each bucket
    pytest.param("1x1h(keep=2) | 1x2h(keep=3)", [0, 10, 20, 30, 60, 70, 80, 90, 100, 170],
                 [20, 30, 90, 100, 170], id="keep-K-oldest"),
    # keep=K larger than the bucket's population keeps them all
    pytest.param("1x1h(keep=5)", [0, 15, 45], [0, 15, 45], id="keep-K-more-than-present"),
    # a keep=all bucket after keep=1
    pytest.param("1x1h | 1x1h(keep=all)", [0, 30, 60, 90, 110], [30, 60, 90, 110],
                 id="keep-all-second-bucket"),
    # shorter buckets may follow keep=all buckets: [0,2h) all, [2h,2.5h), [2.5h,3h), [3h,4h)
    pytest.param("1x2h(keep=all) | 2x30m | 1x1h",
                 [0, 50, 119, 120, 135, 149, 150, 179, 180, 200, 239, 240],
                 [0, 50, 119, 149, 179, 239], id="shorter-after-keep-all"),
    # several intervals: [0,1h) 1, [1h,2h) 1, [2h,1d+2h) 1, [1d+2h, 2d+2h) 1
    pytest.param("2x1h | 2x1d", [0, 45, 61, 100, 130, 600, 1500, 1560, 2000, 2999, 3000],
                 [45, 100, 1500, 2999], id="several-intervals"),
    # buckets without snapshots keep nothing; the others still keep their oldest
    pytest.param("4x1h", [0, 200, 230], [0, 230], id="empty-buckets"),
    # a single matching snapshot is at age 0: always kept
    pytest.param("1x1h", [0], [0], id="single-snapshot"),
]


@pytest.mark.parametrize("spec, ages, expected", GRID_CASES)
def test_grid_keeps_exactly(spec, ages, expected):
    snapshots = aged(ages)
    random.Random(7).shuffle(snapshots)              # input order must not matter
    decisions = decide(snapshots, [grid(spec)])
    assert kept_ages(decisions) == sorted(expected)
    # everything not kept is destroyed with the one reason
    for d in decisions:
        if d.action == "destroy":
            assert d.reasons == ["no rule keeps it"]


def test_grid_one_year_of_15_minute_snapshots_keeps_58():
    # SPEC §13 item 14: 4 (first hour, keep=all) + 24 (hourly) + 30 (daily) = 58
    spec = "1x1h(keep=all) | 24x1h | 30x1d"
    count = 365 * 96
    snapshots = [version("zrepl_%05d" % i, NOW - (count - 1 - i) * 15 * MIN, 100 + i)
                 for i in range(count)]
    t0 = time.monotonic()
    decisions = decide(snapshots, [grid(spec)])
    elapsed = time.monotonic() - t0
    keep = [d for d in decisions if d.action == "keep"]
    assert len(keep) == 58
    assert len(decisions) == count

    per_bucket = {}
    for d in keep:
        assert len(d.reasons) == 1
        m = re.match(r"^#1 grid\(1x1h\(keep=all\) \| 24x1h \| 30x1d\): bucket (\d+) of 55, "
                     r"(all kept|oldest 1 kept)$", d.reasons[0])
        assert m, d.reasons
        b = int(m.group(1))
        per_bucket[b] = per_bucket.get(b, 0) + 1
        assert m.group(2) == ("all kept" if b == 1 else "oldest 1 kept")
    assert per_bucket == dict([(1, 4)] + [(b, 1) for b in range(2, 56)])

    # the exact survivors: ages 0,15,30,45 min; then the oldest of each hour bucket
    # [h-1, h) -> h*60-15; then the oldest of each day bucket [25h+k d, 25h+(k+1) d)
    expected = [0, 15, 30, 45] + [h * 60 - 15 for h in range(2, 26)] + \
        [25 * 60 + (k + 1) * 1440 - 15 for k in range(30)]
    assert kept_ages(decisions) == sorted(expected)
    assert elapsed < 5, "35,040 snapshots took %.1f s" % elapsed


def test_grid_regex_filters_snapshots():
    # matching zrepl_ at 0, 30, 90; manual_ at 45 and 100 are neither kept nor counted:
    # if they were counted, bucket [0,1h) would keep manual_45 (its oldest) instead of zrepl_30
    snapshots = snaps(("zrepl_0", 0), ("zrepl_30", 30), ("manual_45", 45),
                      ("zrepl_90", 90), ("manual_100", 100))
    decisions = decide(snapshots, [grid("2x1h", regex="^zrepl_")])
    assert kept(decisions) == {"zrepl_30", "zrepl_90"}
    assert destroyed(decisions) == {"zrepl_0", "manual_45", "manual_100"}


def test_grid_regex_is_unanchored_search():
    # SPEC §2.3: regexes match with search semantics
    snapshots = snaps(("a_hourly_1", 0), ("b_hourly_2", 90), ("daily_3", 30))
    decisions = decide(snapshots, [grid("2x1h", regex="hourly")])
    assert kept(decisions) == {"a_hourly_1", "b_hourly_2"}


def test_grid_anchored_at_newest_matching_snapshot():
    # newest overall is `other` (age 0, not matching). Anchored at zrepl_30 (the newest match),
    # relative ages are 0, 40, 70: bucket [0,1h) keeps zrepl_70, [1h,2h) keeps zrepl_100.
    # Anchored at the wall clock or at `other`, it would keep zrepl_30 and zrepl_100.
    snapshots = snaps(("other", 0), ("zrepl_30", 30), ("zrepl_70", 70), ("zrepl_100", 100))
    decisions = decide(snapshots, [grid("1x1h | 1x1h")])
    assert kept(decisions) == {"zrepl_70", "zrepl_100"}


def test_grid_anchor_ignores_wall_clock():
    # all matching snapshots are days old: the grid still keeps the newest (age 0 relative)
    snapshots = snaps(("zrepl_a", 10 * 1440), ("zrepl_b", 10 * 1440 + 30),
                      ("zrepl_c", 10 * 1440 + 90))
    decisions = decide(snapshots, [grid("1x1h | 1x1h")])
    assert kept(decisions) == {"zrepl_b", "zrepl_c"}


@pytest.mark.parametrize("keep, expected", [
    pytest.param("", {"zrepl_c"}, id="keep-1-lowest-createtxg"),
    pytest.param("(keep=2)", {"zrepl_c", "zrepl_b"}, id="keep-2-two-lowest-createtxg"),
])
def test_grid_ties_broken_by_createtxg(keep, expected):
    # equal creation: "oldest" = lowest createtxg (SPEC §7.2). Names and input order are
    # deliberately unrelated to createtxg.
    t = NOW - 10 * MIN
    snapshots = [version("zrepl_a", t, 12), version("zrepl_c", t, 10), version("zrepl_b", t, 11)]
    decisions = decide(snapshots, [grid("1x1h%s" % keep)])
    assert kept(decisions) == expected


def test_grid_bookmark_does_not_anchor():
    # a newer bookmark with a matching name must not move `now` (only snapshots are ruled on)
    snapshots = snaps(("zrepl_30", 30), ("zrepl_70", 70), ("zrepl_100", 100))
    snapshots.append(version("zrepl_bm", NOW, 999, type="bookmark", userrefs=None))
    decisions = decide(snapshots, [grid("1x1h | 1x1h")])
    assert kept(decisions) == {"zrepl_70", "zrepl_100"}


@pytest.mark.parametrize("spec", [
    pytest.param("1x1h | 1x30m", id="shorter-after-keep-1"),
    pytest.param("1x1h(keep=all) | 1x1h | 1x30m", id="shorter-after-mixed"),
    pytest.param("1x1h(keep=2) | 1x30m", id="shorter-after-keep-2"),
])
def test_grid_spec_rejects_shorter_bucket_unless_all_predecessors_keep_all(spec):
    with pytest.raises(ValueError):
        zrepl.parse_grid_spec(spec)


@pytest.mark.parametrize("spec, buckets", [
    pytest.param("1x1h(keep=all) | 2x30m", ((3600, None), (1800, 1), (1800, 1)),
                 id="shorter-after-keep-all"),
    pytest.param("2x1h(keep=all)|1x10m(keep=3)", ((3600, None), (3600, None), (600, 3)),
                 id="shorter-after-two-keep-all"),
])
def test_grid_spec_accepts_shorter_bucket_after_keep_all(spec, buckets):
    assert zrepl.parse_grid_spec(spec) == buckets


# --- last_n (SPEC §7.4) ----------------------------------------------------------------------

LAST_N_CASES = [
    pytest.param(last_n(2), [("a", 30), ("b", 20), ("c", 10)],
                 {"c": "1 of newest 2", "b": "2 of newest 2"}, id="no-regex"),
    pytest.param(last_n(2, "^zrepl_"),
                 [("zrepl_1", 40), ("zrepl_2", 30), ("zrepl_3", 20), ("manual_x", 0)],
                 {"zrepl_3": "1 of newest 2", "zrepl_2": "2 of newest 2"},
                 id="regex-nonmatching-not-kept"),
    pytest.param(last_n(10, "^zrepl_"), [("zrepl_1", 40), ("zrepl_2", 30), ("other", 5)],
                 {"zrepl_2": "1 of newest 10", "zrepl_1": "2 of newest 10"},
                 id="count-larger-than-available"),
    pytest.param(last_n(1, "daily"), [("x_daily_1", 40), ("x_daily_2", 30), ("hourly", 5)],
                 {"x_daily_2": "1 of newest 1"}, id="regex-unanchored"),
    pytest.param(last_n(3, "^nothing$"), [("a", 3), ("b", 2)], {}, id="regex-matches-none"),
]


@pytest.mark.parametrize("rule, specs, expected", LAST_N_CASES)
def test_last_n(rule, specs, expected):
    decisions = decide(snaps(*specs), [rule])
    got = {}
    for d in decisions:
        if d.action == "keep":
            assert len(d.reasons) == 1
            label, _, why = d.reasons[0].partition(": ")
            assert label.startswith("#1 last_n(count=%d" % rule.count)
            got[d.snapshot.name] = why
        else:
            assert d.reasons == ["no rule keeps it"]
    assert got == expected


def test_last_n_ties_broken_by_createtxg():
    t = NOW - 5 * MIN
    snapshots = [version("s_b", t, 11), version("s_c", t, 12), version("s_a", t, 10)]
    d = by_name(decide(snapshots, [last_n(2)]))
    assert d["s_c"][0] == "keep" and d["s_c"][1][0].endswith(": 1 of newest 2")
    assert d["s_b"][0] == "keep" and d["s_b"][1][0].endswith(": 2 of newest 2")
    assert d["s_a"] == ("destroy", ["no rule keeps it"])


def test_last_n_newer_means_greater_creation_not_createtxg():
    # a later creation with a lower createtxg is still the newer snapshot (SPEC §7.2)
    snapshots = [version("early_high_txg", NOW - 100, 50), version("late_low_txg", NOW, 10)]
    assert kept(decide(snapshots, [last_n(1)])) == {"late_low_txg"}


def test_last_n_ignores_bookmarks():
    snapshots = snaps(("a", 20), ("b", 10))
    snapshots.append(version("c", NOW, 999, type="bookmark", userrefs=None))
    decisions = decide(snapshots, [last_n(1)])
    assert [d.snapshot.name for d in decisions] == ["a", "b"]
    assert kept(decisions) == {"b"}


# --- regex (SPEC §7.4) -------------------------------------------------------------------------

REGEX_CASES = [
    pytest.param(regex("^manual_"), {"manual_keep"}, "matches", id="matches"),
    pytest.param(regex("^zrepl_", negate=True), {"manual_keep", "other", "x_zrepl_1"},
                 "does not match", id="negate"),
    pytest.param(regex("keep"), {"manual_keep"}, "matches", id="unanchored-search"),
    pytest.param(regex("zrepl_"), {"zrepl_1", "zrepl_2", "x_zrepl_1"}, "matches",
                 id="search-finds-inner-match"),
]


@pytest.mark.parametrize("rule, expected, why", REGEX_CASES)
def test_regex(rule, expected, why):
    snapshots = snaps(("zrepl_1", 30), ("manual_keep", 25), ("other", 20), ("x_zrepl_1", 15),
                      ("zrepl_2", 10))
    decisions = decide(snapshots, [rule])
    assert kept(decisions) == expected
    label = "#1 regex(%s%s)" % (rule.regex, ", negate" if rule.negate else "")
    for d in decisions:
        if d.action == "keep":
            assert d.reasons == ["%s: %s" % (label, why)]


# --- not_replicated (SPEC §7.4) --------------------------------------------------------------

def _replication_fixture():
    # createtxg 10 (a) .. 50 (e); the cursor is a bookmark of c (same guid and createtxg)
    snapshots = snaps(("a", 50), ("b", 40), ("c", 30), ("d", 20), ("e", 10))
    c = [s for s in snapshots if s.name == "c"][0]
    cursor = zrepl.Version("bookmark", FS, zrepl.cursor_bookmark_name(c.guid, "push"),
                           c.guid, c.createtxg, c.creation, None)
    return snapshots, cursor


NR = "#1 not_replicated: "

NOT_REPLICATED_CASES = [
    pytest.param(dict(side="sender"), True,
                 {"a": None, "b": None, "c": "at replication cursor",
                  "d": "not yet replicated", "e": "not yet replicated"},
                 id="sender-with-cursor"),
    pytest.param(dict(side="sender"), False,
                 {"a": None, "b": None, "c": None,
                  "d": "not yet replicated", "e": "not yet replicated"},
                 id="sender-cursor-keep_snapshot_at_cursor-false"),
    pytest.param(dict(side="sender", cursor=None), True,
                 {n: "no replication cursor yet" for n in "abcde"}, id="sender-no-cursor"),
    pytest.param(dict(side="receiver"), True, {n: None for n in "abcde"},
                 id="receiver-keeps-nothing"),
    pytest.param(dict(side="receiver", cursor=None), True, {n: None for n in "abcde"},
                 id="receiver-no-cursor-keeps-nothing"),
]


@pytest.mark.parametrize("kw, at_cursor, expected", NOT_REPLICATED_CASES)
def test_not_replicated(kw, at_cursor, expected):
    snapshots, cursor = _replication_fixture()
    kw = dict(kw)
    kw.setdefault("cursor", cursor)
    snapshots = snapshots + [cursor]          # the cursor bookmark is in the listing too
    got = by_name(decide(snapshots, [not_replicated(at_cursor)], **kw))
    assert set(got) == set("abcde")           # the bookmark is never decided on
    for name, why in expected.items():
        if why is None:
            assert got[name] == ("destroy", ["no rule keeps it"]), name
        else:
            assert got[name] == ("keep", [NR + why]), name


def test_not_replicated_cursor_snapshot_gone():
    # the cursor bookmark outlived its snapshot c: newer ones kept, older ones not
    snapshots, cursor = _replication_fixture()
    snapshots = [s for s in snapshots if s.name != "c"]
    got = by_name(decide(snapshots, [not_replicated()], side="sender", cursor=cursor))
    assert got == {"a": ("destroy", ["no rule keeps it"]), "b": ("destroy", ["no rule keeps it"]),
                   "d": ("keep", [NR + "not yet replicated"]),
                   "e": ("keep", [NR + "not yet replicated"])}


def test_not_replicated_cursor_hold_snapshot():
    # holds-only cursor (§3.2 replication-cursor-hold): the cursor is the held snapshot itself
    snapshots = snaps(("a", 30), ("b", 20, 1), ("c", 10))
    cursor = snapshots[1]
    got = by_name(decide(snapshots, [not_replicated()], side="sender", cursor=cursor))
    assert got == {"a": ("destroy", ["no rule keeps it"]),
                   "b": ("keep", [NR + "at replication cursor", "held (userrefs=1)"]),
                   "c": ("keep", [NR + "not yet replicated"])}


# --- union, labels, holds (SPEC §7.2, §7.5) ------------------------------------------------

def test_union_with_exact_reason_texts():
    rules = [grid("1x1h(keep=all) | 24x1h"), last_n(3, "^zrepl_"), regex("^manual_")]
    g = "#1 grid(1x1h(keep=all) | 24x1h): "
    ln = "#2 last_n(count=3, regex=^zrepl_): "
    rx = "#3 regex(^manual_): matches"
    snapshots = snaps(
        ("zrepl_new", 0), ("other", 10), ("zrepl_30", 30), ("zrepl_45", 45),
        ("manual_x", 100), ("zrepl_250", 250),     # 4h10m: bucket [4h,5h) = bucket 5 of 25
        ("zrepl_total", 1500),                     # exactly 25h: outside the grid
        ("zrepl_held", 1600, 2), ("manual_held", 2000, 1))
    decisions = decide(snapshots, rules)
    expected = [  # oldest first
        ("manual_held", "keep", [rx, "held (userrefs=1)"]),
        ("zrepl_held", "keep", ["held (userrefs=2)", "no rule keeps it"]),
        ("zrepl_total", "destroy", ["no rule keeps it"]),
        ("zrepl_250", "keep", [g + "bucket 5 of 25, oldest 1 kept"]),
        ("manual_x", "keep", [rx]),
        ("zrepl_45", "keep", [g + "bucket 1 of 25, all kept", ln + "3 of newest 3"]),
        ("zrepl_30", "keep", [g + "bucket 1 of 25, all kept", ln + "2 of newest 3"]),
        ("other", "destroy", ["no rule keeps it"]),
        ("zrepl_new", "keep", [g + "bucket 1 of 25, all kept", ln + "1 of newest 3"]),
    ]
    assert [(d.snapshot.name, d.action, d.reasons) for d in decisions] == expected


def test_union_reasons_in_rule_order_negate_and_not_replicated():
    rules = [not_replicated(), last_n(3, "^zrepl_"), regex("^zrepl_", negate=True)]
    snapshots = snaps(("zrepl_1", 40), ("mine", 30), ("zrepl_2", 20), ("zrepl_3", 10))
    cursor = [s for s in snapshots if s.name == "zrepl_2"][0]
    got = by_name(decide(snapshots, rules, side="sender", cursor=cursor))
    assert got == {
        "zrepl_1": ("keep", ["#2 last_n(count=3, regex=^zrepl_): 3 of newest 3"]),
        "mine": ("keep", ["#3 regex(^zrepl_, negate): does not match"]),
        "zrepl_2": ("keep", ["#1 not_replicated: at replication cursor",
                             "#2 last_n(count=3, regex=^zrepl_): 2 of newest 3"]),
        "zrepl_3": ("keep", ["#1 not_replicated: not yet replicated",
                             "#2 last_n(count=3, regex=^zrepl_): 1 of newest 3"]),
    }


@pytest.mark.parametrize("index, rule, label", [
    pytest.param(2, last_n(3, "^zrepl_"), "#2 last_n(count=3, regex=^zrepl_)", id="last_n"),
    pytest.param(3, regex("^manual_"), "#3 regex(^manual_)", id="regex"),
    pytest.param(3, regex("^zrepl_", negate=True), "#3 regex(^zrepl_, negate)", id="negate"),
    pytest.param(1, grid("1x1h(keep=all) | 24x1h"), "#1 grid(1x1h(keep=all) | 24x1h)",
                 id="grid"),
    pytest.param(1, not_replicated(), "#1 not_replicated", id="not_replicated"),
    pytest.param(7, not_replicated(False), "#7 not_replicated", id="not_replicated-index"),
])
def test_rule_label(index, rule, label):
    assert zrepl.rule_label(index, rule) == label


@pytest.mark.parametrize("userrefs, rules, expected", [
    pytest.param(3, [last_n(1, "^s")],
                 ["#1 last_n(count=1, regex=^s): 1 of newest 1", "held (userrefs=3)"],
                 id="kept-by-rule-and-held"),
    pytest.param(1, [regex("^nomatch")], ["held (userrefs=1)", "no rule keeps it"],
                 id="held-no-rule"),
    pytest.param(12, [regex("^nomatch")], ["held (userrefs=12)", "no rule keeps it"],
                 id="held-count-in-text"),
])
def test_held_snapshots_are_never_destroyed(userrefs, rules, expected):
    snapshots = snaps(("s", 0, userrefs))
    [d] = decide(snapshots, rules)
    assert d.action == "keep"
    assert d.reasons == expected


def test_destroy_reason_exact():
    [d] = decide(snaps(("other", 0)), [regex("^zrepl_")])
    assert (d.action, d.reasons) == ("destroy", ["no rule keeps it"])


def test_empty_rule_list_keeps_everything():
    snapshots = snaps(("zrepl_1", 30), ("other", 20), ("manual", 10))
    decisions = decide(snapshots, [])
    assert [d.action for d in decisions] == ["keep"] * 3
    for d in decisions:
        assert d.reasons and "no rule keeps it" not in d.reasons


def test_foreign_snapshot_destroyed_unless_a_regex_keeps_it():
    rules = [last_n(3, "^zrepl_")]
    d = by_name(decide(snaps(("zrepl_1", 20), ("foreign", 10)), rules))
    assert d["foreign"] == ("destroy", ["no rule keeps it"])
    d = by_name(decide(snaps(("zrepl_1", 20), ("foreign", 10)), rules + [regex("^foreign$")]))
    assert d["foreign"] == ("keep", ["#2 regex(^foreign$): matches"])


def test_acceptance_11_five_rounds():
    # SPEC §13 item 11: five `once --snapshot always` rounds 1.1 s apart; after each round the
    # pruner applies `last_n 3 ^zrepl_` and `regex ^manual_`
    rules = [last_n(3, "^zrepl_"), regex("^manual_")]
    t0 = NOW
    present = [version("manual_keep", t0 - 100, 5), version("other", t0 - 50, 6)]
    made = []
    for k in range(5):
        creation = int(t0 + 1.1 * k)
        name = "zrepl_%d" % k
        made.append(name)
        present.append(version(name, creation, 10 + k))
        decisions = decide(present, rules)
        gone = destroyed(decisions)
        present = [s for s in present if s.name not in gone]
        if k == 0:
            assert gone == {"other"}
    assert sorted(s.name for s in present) == ["manual_keep", "zrepl_2", "zrepl_3", "zrepl_4"]


def test_bookmarks_are_never_decided_on():
    snapshots = snaps(("x", 20), ("y", 10))
    # a bookmark with a snapshot's short name, and a cursor bookmark: neither is in the output
    snapshots.insert(0, version("x", NOW - 20 * MIN, 10, type="bookmark", userrefs=None))
    snapshots.append(version(zrepl.cursor_bookmark_name(0x1, "push"), NOW, 999,
                             type="bookmark", userrefs=None, guid=1))
    decisions = decide(snapshots, [regex("nomatch")])
    assert [(d.snapshot.type, d.snapshot.name, d.action) for d in decisions] == [
        ("snapshot", "x", "destroy"), ("snapshot", "y", "destroy")]


def test_output_ordered_oldest_first_creation_then_createtxg():
    snapshots = [version("A", 100, 50), version("C", 200, 11), version("B", 200, 10),
                 version("D", 50, 60), version("E", 300, 1)]
    decisions = decide(snapshots, [regex(".")])
    assert [d.snapshot.name for d in decisions] == ["D", "A", "B", "C", "E"]


def test_decision_to_json_shape():
    # SPEC §13 item 13
    [d] = decide(snaps(("other", 0)), [last_n(1, "^zrepl_")])
    doc = d.to_json()
    assert doc == {"snapshot": "other", "action": "destroy", "reasons": ["no rule keeps it"]}
    assert json.loads(json.dumps(doc)) == doc
    [k] = decide(snaps(("zrepl_1", 0, 2)), [last_n(1, "^zrepl_")])
    assert k.to_json() == {"snapshot": "zrepl_1", "action": "keep",
                           "reasons": ["#1 last_n(count=1, regex=^zrepl_): 1 of newest 1",
                                       "held (userrefs=2)"]}
