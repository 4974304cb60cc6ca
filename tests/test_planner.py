"""The replication planner: `plan_filesystem`, `steps_along`, `validate_resume_token`,
`version_ref`, `Step`, `Conflict`, `Plan`, `Policy` (pure, no ZFS).

SPEC §8.2 (planner rules 1-10, in order), §8.3 (conflict kinds and texts), §8.5 (steps,
`batch_incrementals` with `-I`, a bookmark `from` gets its own `-i` step, protection per
step), §8.7 (resume tokens: validity) and §13 items 19-21. Every expectation below was
worked out by hand from the SPEC text; none is computed with the code under test.

The sender is `zfa/x`, the receiver its sink copy `zfb/sink/host1/zfa/x`. Versions on the two
sides are separate objects with their own fs name and their own createtxg numbering (the
receiver's createtxgs are deliberately unrelated to the sender's): only GUIDs tie them.
"""
import copy
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))

import zrepl  # noqa: E402

SFS = "zfa/x"
RFS = "zfb/sink/host1/zfa/x"
T0 = 1700000000

# GUIDs exceed 2^53, as real ones do; the same GUID on both sides = the same snapshot
GA, GB, GC, GD, GE = (0x9E3779B97F4A7C00 + i for i in range(1, 6))
GX, GY, GZ, GF = (0xC0FFEE0000000000 + i for i in range(1, 5))   # unknown to the sender

# distinct protection kinds, so that a step carrying the wrong one is visible
PI = "guarantee_nothing"          # protection.initial
PN = "guarantee_incremental"      # protection.incremental

TOKEN = "1-e604ea4bf-e0-789c63a2"   # the receiver's receive_resume_token text


# --- plain-data helpers ------------------------------------------------------------------

def sv(name, guid, txg):
    """A sender snapshot zfa/x@name."""
    return zrepl.Version("snapshot", SFS, name, guid, txg, T0 + txg, 0)


def sb(name, guid, txg):
    """A sender bookmark zfa/x#name."""
    return zrepl.Version("bookmark", SFS, name, guid, txg, T0 + txg, None)


def rv(name, guid, txg):
    """A receiver snapshot zfb/sink/host1/zfa/x@name."""
    return zrepl.Version("snapshot", RFS, name, guid, txg, T0 + txg, 0)


def rb(name, guid, txg):
    """A receiver bookmark."""
    return zrepl.Version("bookmark", RFS, name, guid, txg, T0 + txg, None)


def sender(*versions, placeholder=None):
    return zrepl.Dataset(SFS, "filesystem", 0x5E, placeholder, None, None,
                         versions=list(versions))


def receiver(*versions, placeholder=None, token=None):
    return zrepl.Dataset(RFS, "filesystem", 0x7E, placeholder, token, None,
                         versions=list(versions))


def policy(initial="most_recent", batch=True, raw=False):
    return zrepl.Policy(initial_replication=initial, protection_initial=PI,
                        protection_incremental=PN, batch_incrementals=batch, sends_raw=raw)


def tok(toname=SFS + "@c", toguid=GC, fromguid=GB, rawok=False, valid=True):
    """A decoded resume token as the planner receives it."""
    return {"valid": valid, "toname": toname, "toguid": toguid, "fromguid": fromguid,
            "rawok": rawok}


class _Anything:
    """Matches any value: for a field SPEC leaves open."""

    def __eq__(self, other):
        return True

    def __repr__(self):
        return "<any>"


ANY = _Anything()


# expected steps as (kind, from, to, protection, includes, resume_token)

def full(to):
    return ("full", None, to, PI, (), None)


def inc(frm, to):
    return ("incremental", frm, to, PN, (), None)


def batch(frm, to, *includes):
    return ("incremental_batch", frm, to, PN, tuple(includes), None)


def resume(frm, to, protection=None):
    if protection is None:
        protection = PN if frm is not None else ANY   # §8.5: a resumed full send is open
    return ("resume", frm, to, protection, (), TOKEN)


def described(step):
    return (step.kind, zrepl.version_ref(step.from_), zrepl.version_ref(step.to),
            step.protection, tuple(step.includes), step.resume_token)


def plan(steps=(), actions=()):
    return ("plan", list(steps), list(actions))


def conflict(kind, sender_newest, receiver_newest, common=None):
    return ("conflict", kind, sender_newest, receiver_newest, common)


def run(s, r, pol, token=None):
    """The planner over private copies of the inputs (it must not depend on sharing)."""
    return zrepl.plan_filesystem(copy.deepcopy(s), copy.deepcopy(r), pol, copy.deepcopy(token))


# the usual sender: @a @b @c @d, created in that order
S_ABCD = (sv("a", GA, 10), sv("b", GB, 20), sv("c", GC, 30), sv("d", GD, 40))
S_ABC = S_ABCD[:3]


def check(result, s, expected):
    if expected[0] == "conflict":
        assert isinstance(result, zrepl.Conflict), result
        assert not isinstance(result, zrepl.Plan)
        assert getattr(result, "steps", None) in (None, [], ())   # conflicts never carry steps
        got = ("conflict", result.kind, result.sender_newest, result.receiver_newest,
               result.common)
        assert got == expected
        return
    assert isinstance(result, zrepl.Plan), result
    got = ("plan", [described(st) for st in result.steps], list(result.actions))
    assert got == expected
    # every step names the sender's versions (zfs send runs there), never the receiver's
    for st in result.steps:
        assert st.to in s.versions and st.to.fs == SFS and st.to.type == "snapshot"
        assert st.from_ is None or (st.from_ in s.versions and st.from_.fs == SFS)


# --- the table: plan_filesystem over (sender, receiver, policy, token) ------------------------

CASES = [
    # rule 5: initial replication (receiver missing)
    pytest.param(sender(*S_ABC), None, policy("most_recent"), None,
                 plan([full("@c")]), id="initial-most_recent-missing"),
    pytest.param(sender(sv("c", GC, 10), sv("b", GB, 20), sv("a", GA, 30)), None,
                 policy("most_recent"), None,
                 plan([full("@a")]), id="initial-most_recent-newest-by-createtxg-not-name"),
    pytest.param(sender(sv("c", GC, 10), sv("b", GB, 20), sv("a", GA, 30)), None,
                 policy("all", batch=True), None,
                 plan([full("@c"), batch("@c", "@a", "b", "a")]),
                 id="initial-all-batched-one-I-step"),
    pytest.param(sender(sv("c", GC, 10), sv("b", GB, 20), sv("a", GA, 30)), None,
                 policy("all", batch=False), None,
                 plan([full("@c"), inc("@c", "@b"), inc("@b", "@a")]),
                 id="initial-all-unbatched-one-step-per-pair"),
    pytest.param(sender(*S_ABCD), None, policy("all", batch=True), None,
                 plan([full("@a"), batch("@a", "@d", "b", "c", "d")]),
                 id="initial-all-batched-four-snapshots"),
    pytest.param(sender(sv("a", GA, 10)), None, policy("all"), None,
                 plan([full("@a")]), id="initial-all-single-snapshot"),
    pytest.param(sender(*S_ABC), None, policy("fail"), None,
                 conflict("initial-replication-disabled", "@c", None),
                 id="initial-fail-missing"),
    # sender bookmarks are not snapshots: never the full step's `to`, skipped on the path
    pytest.param(sender(sb("old", GX, 5), sv("a", GA, 10), sv("b", GB, 20), sb("gone", GC, 30)),
                 None, policy("most_recent"), None,
                 plan([full("@b")]), id="initial-most_recent-ignores-newer-bookmark"),
    pytest.param(sender(sb("old", GX, 5), sv("a", GA, 10), sb("mid", GY, 15), sv("b", GB, 20),
                        sv("c", GC, 30)),
                 None, policy("all", batch=False), None,
                 plan([full("@a"), inc("@a", "@b"), inc("@b", "@c")]),
                 id="initial-all-ignores-bookmarks"),
    # rule 5: a placeholder without snapshots counts as missing
    pytest.param(sender(*S_ABC), receiver(placeholder="on"), policy("most_recent"), None,
                 plan([full("@c")]), id="initial-most_recent-into-empty-placeholder"),
    pytest.param(sender(*S_ABC), receiver(placeholder="on"), policy("all", batch=True), None,
                 plan([full("@a"), batch("@a", "@c", "b", "c")]),
                 id="initial-all-into-empty-placeholder"),
    pytest.param(sender(*S_ABC), receiver(placeholder="on"), policy("fail"), None,
                 conflict("initial-replication-disabled", "@c", None),
                 id="initial-fail-empty-placeholder"),
    # a placeholder with receiver bookmarks only still has no snapshots
    pytest.param(sender(*S_ABC), receiver(rb("b", GB, 7), placeholder="on"),
                 policy("most_recent"), None,
                 plan([full("@c")]), id="initial-placeholder-with-only-bookmarks"),

    # rule 6: a real receiver filesystem without snapshots
    pytest.param(sender(*S_ABC), receiver(), policy("most_recent"), None,
                 conflict("receiver-exists", "@c", None), id="receiver-exists"),
    pytest.param(sender(*S_ABC), receiver(placeholder="off"), policy("most_recent"), None,
                 conflict("receiver-exists", "@c", None), id="receiver-exists-placeholder-off"),
    pytest.param(sender(*S_ABC), receiver(rb("b", GB, 7)), policy("most_recent"), None,
                 conflict("receiver-exists", "@c", None),
                 id="receiver-exists-with-only-bookmarks"),

    # rules 7 and 10: incremental from the newest common snapshot
    pytest.param(sender(*S_ABC), receiver(rv("a", GA, 3), rv("b", GB, 5), rv("c", GC, 9)),
                 policy(), None, plan([]), id="up-to-date"),
    pytest.param(sender(*S_ABCD), receiver(rv("a", GA, 3), rv("b", GB, 5), rv("c", GC, 9)),
                 policy(batch=False), None,
                 plan([inc("@c", "@d")]), id="incremental-one-new-snapshot"),
    pytest.param(sender(*S_ABCD), receiver(rv("a", GA, 3), rv("b", GB, 5)),
                 policy(batch=True), None,
                 plan([batch("@b", "@d", "c", "d")]), id="incremental-batched"),
    pytest.param(sender(*S_ABCD), receiver(rv("a", GA, 3), rv("b", GB, 5)),
                 policy(batch=False), None,
                 plan([inc("@b", "@c"), inc("@c", "@d")]), id="incremental-unbatched"),
    pytest.param(sender(*S_ABCD), receiver(rv("a", GA, 1003), rv("b", GB, 1005)),
                 policy(batch=False), None,
                 plan([inc("@b", "@c"), inc("@c", "@d")]),
                 id="incremental-receiver-createtxg-larger-than-sender"),
    # the common ancestor is the receiver's newest snapshot known by GUID, not the oldest
    pytest.param(sender(*S_ABCD), receiver(rv("a", GA, 3), rv("b", GB, 5), rv("c", GC, 9)),
                 policy(batch=False), None,
                 plan([inc("@c", "@d")]), id="incremental-from-newest-common"),
    # GUIDs, never names
    pytest.param(sender(sv("a", GA, 10), sv("b2", GB, 20), sv("c", GC, 30)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5)), policy(batch=False), None,
                 plan([inc("@b2", "@c")]), id="common-by-guid-different-names"),
    pytest.param(sender(*S_ABC), receiver(rv("a", GX, 3), rv("b", GY, 5)), policy(), None,
                 conflict("no-common-ancestor", "@c", "@b"),
                 id="same-names-different-guids-no-common-ancestor"),
    pytest.param(sender(*S_ABC), receiver(rv("a", GA, 3), rv("c", GX, 5)), policy(), None,
                 conflict("diverged", "@c", "@c", "@a"),
                 id="same-newest-name-different-guid-diverged"),

    # rule 7: a sender bookmark as the incremental source
    pytest.param(sender(sv("a", GA, 10), sb("b", GB, 20), sv("c", GC, 30), sv("d", GD, 40),
                        sv("e", GE, 50)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5)), policy(batch=True), None,
                 plan([inc("#b", "@c"), batch("@c", "@e", "d", "e")]),
                 id="bookmark-source-then-batch"),
    pytest.param(sender(sv("a", GA, 10), sb("b", GB, 20), sv("c", GC, 30), sv("d", GD, 40),
                        sv("e", GE, 50)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5)), policy(batch=False), None,
                 plan([inc("#b", "@c"), inc("@c", "@d"), inc("@d", "@e")]),
                 id="bookmark-source-unbatched"),
    pytest.param(sender(sv("a", GA, 10), sb("b", GB, 20), sv("c", GC, 30)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5)), policy(batch=True), None,
                 plan([inc("#b", "@c")]), id="bookmark-source-single-step"),
    pytest.param(sender(sv("a", GA, 10), sb("zrepl_CURSOR_G_x_J_push", GB, 20),
                        sv("c", GC, 30)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5)), policy(batch=True), None,
                 plan([inc("#zrepl_CURSOR_G_x_J_push", "@c")]),
                 id="bookmark-source-other-name-same-guid"),
    # a snapshot is preferred over a bookmark of the same GUID, in either listing order
    pytest.param(sender(sv("a", GA, 10), sv("b", GB, 20), sb("bm", GB, 20), sv("c", GC, 30),
                        sv("d", GD, 40)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5)), policy(batch=True), None,
                 plan([batch("@b", "@d", "c", "d")]), id="snapshot-preferred-bookmark-after"),
    pytest.param(sender(sv("a", GA, 10), sb("bm", GB, 20), sv("b", GB, 20), sv("c", GC, 30),
                        sv("d", GD, 40)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5)), policy(batch=False), None,
                 plan([inc("@b", "@c"), inc("@c", "@d")]), id="snapshot-preferred-bookmark-before"),

    # receiver bookmarks are ignored for the common ancestor
    pytest.param(sender(*S_ABC), receiver(rv("a", GA, 3), rb("b", GB, 5)),
                 policy(batch=False), None,
                 plan([inc("@a", "@b"), inc("@b", "@c")]),
                 id="receiver-bookmark-ignored-for-common"),
    pytest.param(sender(*S_ABC), receiver(rv("x", GX, 3), rb("b", GB, 5)), policy(), None,
                 conflict("no-common-ancestor", "@c", "@x"),
                 id="receiver-bookmark-ignored-no-common-ancestor"),
    pytest.param(sender(*S_ABC), receiver(rv("a", GA, 3), rv("b", GB, 5), rb("later", GC, 9)),
                 policy(), None,
                 plan([inc("@b", "@c")]), id="receiver-bookmark-not-receiver-newest"),

    # rules 8 and 9
    pytest.param(sender(*S_ABC), receiver(rv("a", GA, 3), rv("b", GB, 5), rv("foreign", GF, 7)),
                 policy(), None,
                 conflict("diverged", "@c", "@foreign", "@b"), id="diverged-13.19"),
    pytest.param(sender(sv("a", GA, 10), sv("b", GB, 20)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5), rv("foreign", GF, 7)), policy(), None,
                 conflict("receiver-has-newer", "@b", "@foreign", "@b"),
                 id="receiver-has-newer-13.20"),
    pytest.param(sender(sv("a", GA, 10)), receiver(rv("a", GA, 3), rv("b", GB, 5)),
                 policy(), None,
                 conflict("receiver-has-newer", "@a", "@b", "@a"),
                 id="receiver-has-newer-sender-rolled-back"),
    pytest.param(sender(sv("a", GA, 10), sb("b", GB, 20), sv("c", GC, 30)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5), rv("foreign", GF, 7)), policy(), None,
                 conflict("diverged", "@c", "@foreign", "#b"), id="diverged-common-bookmark"),
    pytest.param(sender(sv("a", GA, 10), sb("b", GB, 20)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5), rv("foreign", GF, 7)), policy(), None,
                 conflict("receiver-has-newer", "@a", "@foreign", "#b"),
                 id="receiver-has-newer-common-bookmark"),
    pytest.param(sender(*S_ABC), receiver(rv("p", GX, 3), rv("q", GY, 5)), policy(), None,
                 conflict("no-common-ancestor", "@c", "@q"), id="no-common-ancestor-13.20"),

    # rule 2
    pytest.param(sender(), None, policy(), None,
                 conflict("sender-empty", None, None), id="sender-empty-receiver-missing"),
    pytest.param(sender(), None, policy("fail"), None,
                 conflict("sender-empty", None, None), id="sender-empty-before-initial-fail"),
    pytest.param(sender(sb("b", GB, 20)), receiver(rv("a", GA, 3), rv("b", GB, 5)), policy(),
                 None,
                 conflict("sender-empty", None, "@b"), id="sender-empty-only-bookmarks"),
    pytest.param(sender(), receiver(rv("a", GA, 3), token=TOKEN), policy(),
                 tok(toname=SFS + "@a", toguid=GA, fromguid=None),
                 conflict("sender-empty", None, "@a"), id="sender-empty-before-resume"),

    # rule 1: a placeholder on the sender
    pytest.param(sender(placeholder="on"), None, policy(), None,
                 plan([]), id="sender-placeholder-receiver-missing"),
    pytest.param(sender(*S_ABC, placeholder="on"), None, policy("all"), None,
                 plan([]), id="sender-placeholder-with-snapshots-no-initial"),
    pytest.param(sender(placeholder="on"), receiver(placeholder="on"), policy(), None,
                 plan([]), id="sender-placeholder-receiver-placeholder"),
    pytest.param(sender(placeholder="on"), receiver(rv("a", GA, 3)), policy(), None,
                 conflict("placeholder-mismatch", None, "@a"), id="placeholder-mismatch"),
    pytest.param(sender(placeholder="on"), receiver(), policy(), None,
                 conflict("placeholder-mismatch", None, None),
                 id="placeholder-mismatch-receiver-without-snapshots"),

    # rule 4: a placeholder on the receiver that already has snapshots
    pytest.param(sender(*S_ABCD), receiver(rv("a", GA, 3), rv("b", GB, 5), placeholder="on"),
                 policy(batch=True), None,
                 plan([batch("@b", "@d", "c", "d")], ["finish-placeholder-conversion"]),
                 id="finish-placeholder-conversion"),
    pytest.param(sender(*S_ABC), receiver(rv("c", GC, 5), placeholder="on"), policy(), None,
                 plan([], ["finish-placeholder-conversion"]),
                 id="finish-placeholder-conversion-up-to-date"),
    pytest.param(sender(*S_ABC), receiver(rv("renamed", GB, 5), placeholder="on"),
                 policy(batch=False), None,
                 plan([inc("@b", "@c")], ["finish-placeholder-conversion"]),
                 id="finish-placeholder-conversion-by-guid"),
    pytest.param(sender(*S_ABC), receiver(rv("a", GA, 3), rv("foreign", GF, 5),
                                          placeholder="on"), policy(), None,
                 conflict("placeholder-has-snapshots", "@c", "@foreign"),
                 id="placeholder-has-snapshots"),
    pytest.param(sender(*S_ABC), receiver(rv("b", GX, 5), placeholder="on"), policy(), None,
                 conflict("placeholder-has-snapshots", "@c", "@b"),
                 id="placeholder-has-snapshots-same-name-other-guid"),

    # rule 3 / §8.7: a valid resume token
    pytest.param(sender(*S_ABCD), receiver(token=TOKEN), policy(batch=True),
                 tok(toname=SFS + "@b", toguid=GB, fromguid=None),
                 plan([resume(None, "@b"), batch("@b", "@d", "c", "d")]),
                 id="resume-full-then-batch"),
    pytest.param(sender(*S_ABC), receiver(token=TOKEN), policy(),
                 tok(toname=SFS + "@c", toguid=GC, fromguid=None),
                 plan([resume(None, "@c")]), id="resume-full-to-newest"),
    pytest.param(sender(*S_ABCD), receiver(rv("a", GA, 3), rv("b", GB, 5), token=TOKEN),
                 policy(batch=False), tok(),
                 plan([resume("@b", "@c"), inc("@c", "@d")]),
                 id="resume-incremental-then-path"),
    pytest.param(sender(sv("a", GA, 10), sb("b", GB, 20), sv("c", GC, 30), sv("d", GD, 40),
                        sv("e", GE, 50)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5), token=TOKEN), policy(batch=True),
                 tok(),
                 plan([resume("#b", "@c"), batch("@c", "@e", "d", "e")]),
                 id="resume-from-bookmark-guid"),
    pytest.param(sender(*S_ABCD), receiver(rv("a", GA, 3), rv("b", GB, 5), token=TOKEN),
                 policy(batch=False, raw=True), tok(rawok=True),
                 plan([resume("@b", "@c"), inc("@c", "@d")]), id="resume-raw-with-raw-job"),
]

# §8.7: invalid tokens -> abort-partial-receive, then plan as if there were no token
INVALID_TOKENS = [
    pytest.param(tok(toname="zfa/other@c"), False, id="other-fs"),
    pytest.param(tok(toname="zfa/x/child@c"), False, id="child-fs"),
    pytest.param(tok(toname="zfa/xy@c"), False, id="fs-name-prefix"),
    pytest.param(tok(toguid=GZ), False, id="toguid-gone"),
    pytest.param(tok(toguid=GY), False, id="toguid-only-a-bookmark"),
    pytest.param(tok(fromguid=GZ), False, id="fromguid-gone"),
    pytest.param(tok(rawok=True), False, id="rawok-but-job-sends-plain"),
    pytest.param(tok(rawok=False), True, id="not-rawok-but-job-sends-raw"),
    pytest.param(tok(valid=False), False, id="does-not-decode"),
    pytest.param(None, False, id="no-decoded-token"),
]


@pytest.mark.parametrize("s, r, pol, token, expected", CASES)
def test_plan(s, r, pol, token, expected):
    check(run(s, r, pol, token), s, expected)


@pytest.mark.parametrize("token, raw", INVALID_TOKENS)
def test_invalid_token_aborts_then_plans_incremental(token, raw):
    # sender has a bookmark with GY (never a resume target) and @a..@d
    s = sender(sv("a", GA, 10), sv("b", GB, 20), sb("y", GY, 25), sv("c", GC, 30),
               sv("d", GD, 40))
    r = receiver(rv("a", GA, 3), rv("b", GB, 5), token=TOKEN)
    check(run(s, r, policy(batch=True, raw=raw), token), s,
          plan([batch("@b", "@d", "c", "d")], ["abort-partial-receive"]))


@pytest.mark.parametrize("token, raw", INVALID_TOKENS)
def test_invalid_token_on_snapshotless_receiver_is_initial(token, raw):
    # the receiver held only the partial state: after the abort it is missing (zrepl.py
    # chooses), so this is an initial replication, not `receiver-exists`
    s = sender(sv("a", GA, 10), sv("b", GB, 20), sb("y", GY, 25), sv("c", GC, 30),
               sv("d", GD, 40))
    check(run(s, receiver(token=TOKEN), policy("most_recent", raw=raw), token), s,
          plan([full("@d")], ["abort-partial-receive"]))


@pytest.mark.parametrize("token, raw", INVALID_TOKENS)
def test_invalid_token_on_empty_placeholder_is_initial(token, raw):
    s = sender(sv("a", GA, 10), sv("b", GB, 20), sb("y", GY, 25), sv("c", GC, 30),
               sv("d", GD, 40))
    r = receiver(placeholder="on", token=TOKEN)
    check(run(s, r, policy("all", batch=False, raw=raw), token), s,
          plan([full("@a"), inc("@a", "@b"), inc("@b", "@c"), inc("@c", "@d")],
               ["abort-partial-receive"]))


def test_invalid_token_then_conflict_carries_no_steps():
    # abort, then rule 9 finds a diverged receiver: the result is the conflict alone
    s = sender(*S_ABC)
    r = receiver(rv("a", GA, 3), rv("foreign", GF, 5), token=TOKEN)
    check(run(s, r, policy(), tok(toguid=GZ)), s, conflict("diverged", "@c", "@foreign", "@a"))


def test_resume_step_carries_the_receivers_token_text():
    s = sender(*S_ABCD)
    r = receiver(rv("a", GA, 3), rv("b", GB, 5), token="1-abcdef-0123")
    result = run(s, r, policy(batch=False), tok())
    assert isinstance(result, zrepl.Plan)
    assert [st.kind for st in result.steps] == ["resume", "incremental"]
    assert result.steps[0].resume_token == "1-abcdef-0123"
    assert result.steps[0].to.guid == GC and result.steps[0].from_.guid == GB
    assert result.steps[1].resume_token is None
    assert result.actions == []


@pytest.mark.parametrize("token, raw", [
    pytest.param(tok(toname=SFS + "@c", toguid=GC, fromguid=None), False, id="full"),
    pytest.param(tok(), False, id="incremental"),
    pytest.param(tok(rawok=True), True, id="raw"),
    pytest.param(tok(fromguid=GY), False, id="from-bookmark"),
])
def test_validate_resume_token_valid(token, raw):
    s = sender(sv("a", GA, 10), sv("b", GB, 20), sb("y", GY, 25), sv("c", GC, 30))
    assert zrepl.validate_resume_token(token, s, policy(raw=raw)) is None


@pytest.mark.parametrize("token, raw", INVALID_TOKENS)
def test_validate_resume_token_invalid(token, raw):
    s = sender(sv("a", GA, 10), sv("b", GB, 20), sb("y", GY, 25), sv("c", GC, 30),
               sv("d", GD, 40))
    why = zrepl.validate_resume_token(token, s, policy(raw=raw))
    assert isinstance(why, str) and why.strip()


# --- protections (§8.5) --------------------------------------------------------------------

@pytest.mark.parametrize("pi, pn", [
    ("guarantee_resumability", "guarantee_nothing"),
    ("guarantee_nothing", "guarantee_incremental"),
    ("guarantee_incremental", "guarantee_resumability"),
])
def test_full_steps_carry_initial_protection_others_incremental(pi, pn):
    s = sender(sv("a", GA, 10), sv("b", GB, 20), sv("c", GC, 30), sv("d", GD, 40))
    for batched in (True, False):
        pol = zrepl.Policy(initial_replication="all", protection_initial=pi,
                           protection_incremental=pn, batch_incrementals=batched)
        result = run(s, None, pol)
        assert [st.protection for st in result.steps] == \
            [pi] + [pn] * (1 if batched else 3)
        assert result.steps[0].kind == "full"
    pol = zrepl.Policy(initial_replication="most_recent", protection_initial=pi,
                       protection_incremental=pn, batch_incrementals=True)
    result = run(s, receiver(rv("a", GA, 1), rv("b", GB, 2)), pol)
    assert [(st.kind, st.protection) for st in result.steps] == [("incremental_batch", pn)]
    result = run(s, receiver(rv("a", GA, 1), rv("b", GB, 2), token=TOKEN), pol, tok())
    assert [(st.kind, st.protection) for st in result.steps] == \
        [("resume", pn), ("incremental", pn)]


# --- steps_along (§8.5) ----------------------------------------------------------------------

def test_steps_along_bookmark_gets_its_own_i_step():
    path = [sb("b", GB, 20), sv("c", GC, 30), sv("d", GD, 40), sv("e", GE, 50)]
    got = [described(st) for st in zrepl.steps_along(path, policy(batch=True))]
    assert got == [inc("#b", "@c"), batch("@c", "@e", "d", "e")]
    got = [described(st) for st in zrepl.steps_along(path, policy(batch=False))]
    assert got == [inc("#b", "@c"), inc("@c", "@d"), inc("@d", "@e")]


def test_steps_along_batch_includes_in_order():
    path = [sv("a", GA, 10), sv("b", GB, 20), sv("c", GC, 30), sv("d", GD, 40), sv("e", GE, 50)]
    steps = zrepl.steps_along(path, policy(batch=True))
    assert [described(st) for st in steps] == [batch("@a", "@e", "b", "c", "d", "e")]
    assert steps[0].from_.guid == GA and steps[0].to.guid == GE


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_steps_along_single_version_path_is_nothing(batched):
    assert zrepl.steps_along([sv("a", GA, 10)], policy(batch=batched)) == []


# --- Step, Conflict, version_ref -------------------------------------------------------------

@pytest.mark.parametrize("step, expected", [
    pytest.param(zrepl.Step("full", None, sv("c", GC, 30), PI),
                 {"kind": "full", "from": None, "to": "@c", "resumed": False}, id="full"),
    pytest.param(zrepl.Step("incremental", sv("a", GA, 10), sv("c", GC, 30), PN),
                 {"kind": "incremental", "from": "@a", "to": "@c", "resumed": False},
                 id="incremental-from-snapshot"),
    pytest.param(zrepl.Step("incremental", sb("b", GB, 20), sv("c", GC, 30), PN),
                 {"kind": "incremental", "from": "#b", "to": "@c", "resumed": False},
                 id="incremental-from-bookmark"),
    pytest.param(zrepl.Step("incremental_batch", sv("a", GA, 10), sv("c", GC, 30), PN,
                            includes=("b", "c")),
                 {"kind": "incremental_batch", "from": "@a", "to": "@c", "resumed": False},
                 id="batch"),
    pytest.param(zrepl.Step("resume", sv("b", GB, 20), sv("c", GC, 30), PN, resume_token=TOKEN),
                 {"kind": "resume", "from": "@b", "to": "@c", "resumed": True}, id="resume"),
])
def test_step_report(step, expected):
    got = step.report()
    want = dict(expected, state="planned", bytes_expected=None, bytes_replicated=0)
    assert got == want
    got = step.report(state="done", bytes_expected=4096, bytes_replicated=4000)
    assert (got["state"], got["bytes_expected"], got["bytes_replicated"]) == ("done", 4096, 4000)


@pytest.mark.parametrize("step, expected", [
    pytest.param(zrepl.Step("full", None, sv("c", GC, 30), PI), True, id="full"),
    pytest.param(zrepl.Step("incremental", sv("a", GA, 10), sv("c", GC, 30), PN), False,
                 id="incremental"),
    pytest.param(zrepl.Step("incremental", sb("b", GB, 20), sv("c", GC, 30), PN), False,
                 id="incremental-from-bookmark"),
    pytest.param(zrepl.Step("incremental_batch", sv("a", GA, 10), sv("c", GC, 30), PN,
                            includes=("b", "c")), False, id="batch"),
    pytest.param(zrepl.Step("resume", None, sv("c", GC, 30), PI, resume_token=TOKEN), True,
                 id="resume-of-full"),
    pytest.param(zrepl.Step("resume", sv("b", GB, 20), sv("c", GC, 30), PN, resume_token=TOKEN),
                 False, id="resume-of-incremental"),
])
def test_step_is_initial(step, expected):
    assert step.is_initial is expected


def test_planned_steps_to_json_end_to_end():
    s = sender(sv("a", GA, 10), sb("b", GB, 20), sv("c", GC, 30), sv("d", GD, 40),
               sv("e", GE, 50))
    result = run(s, receiver(rv("a", GA, 3), rv("b", GB, 5)), policy(batch=True))
    assert [(j["kind"], j["from"], j["to"]) for j in (st.report() for st in result.steps)] == \
        [("incremental", "#b", "@c"), ("incremental_batch", "@c", "@e")]
    assert [st.is_initial for st in result.steps] == [False, False]
    result = run(s, None, policy("most_recent"))
    assert [st.report()["from"] for st in result.steps] == [None]
    assert [st.is_initial for st in result.steps] == [True]


@pytest.mark.parametrize("v, expected", [
    pytest.param(sv("zrepl_20380119_031407_000", GA, 1), "@zrepl_20380119_031407_000",
                 id="snapshot"),
    pytest.param(sb("zrepl_CURSOR_G_00000000000000a1_J_push", GA, 1),
                 "#zrepl_CURSOR_G_00000000000000a1_J_push", id="bookmark"),
    pytest.param(None, None, id="none"),
])
def test_version_ref(v, expected):
    assert zrepl.version_ref(v) == expected


# --- §8.3: conflict texts --------------------------------------------------------------------

# (sender, receiver, policy, phrases the message must contain, phrases the hint must contain)
CONFLICT_TEXTS = [
    pytest.param(sender(*S_ABC), receiver(rv("p", GX, 3)), policy(), "no-common-ancestor",
                 ["none with a GUID the sender has"],
                 ["destroy or rename the receiver filesystem to start over"],
                 id="no-common-ancestor"),
    pytest.param(sender(*S_ABC), receiver(rv("a", GA, 3), rv("b", GB, 5), rv("y", GF, 7)),
                 policy(), "diverged",
                 ["receiver's newest snapshot @y is not on the sender",
                  "both sides have snapshots after common @b"],
                 ["roll the receiver back to @b", "zfs rollback -r",
                  "after checking what @y holds"],
                 id="diverged"),
    pytest.param(sender(sv("a", GA, 10), sv("b", GB, 20)),
                 receiver(rv("a", GA, 3), rv("b", GB, 5), rv("y", GF, 7)), policy(),
                 "receiver-has-newer",
                 ["receiver has snapshots after @b that the sender does not have"], [],
                 id="receiver-has-newer"),
    pytest.param(sender(), None, policy(), "sender-empty", ["has no snapshots"], ["take one"],
                 id="sender-empty"),
    pytest.param(sender(*S_ABC), None, policy("fail"), "initial-replication-disabled",
                 ["receiver has nothing", "initial_replication", "fail"], [],
                 id="initial-replication-disabled"),
    pytest.param(sender(*S_ABC), receiver(), policy(), "receiver-exists",
                 ["exists without snapshots and is not a placeholder"], [],
                 id="receiver-exists"),
    pytest.param(sender(placeholder="on"), receiver(rv("a", GA, 3)), policy(),
                 "placeholder-mismatch",
                 ["is a placeholder but the receiver has a real filesystem"], [],
                 id="placeholder-mismatch"),
    pytest.param(sender(*S_ABC), receiver(rv("y", GF, 3), placeholder="on"), policy(),
                 "placeholder-has-snapshots",
                 ["placeholder", "has snapshots the sender does not have"], [],
                 id="placeholder-has-snapshots"),
]


@pytest.mark.parametrize("s, r, pol, kind, in_message, in_hint", CONFLICT_TEXTS)
def test_conflict_texts(s, r, pol, kind, in_message, in_hint):
    c = run(s, r, pol)
    assert isinstance(c, zrepl.Conflict) and c.kind == kind
    for phrase in in_message:
        assert phrase in c.message
    assert c.hint                       # §8.3: each conflict is reported with a hint
    for phrase in in_hint:
        assert phrase in c.hint
    j = c.to_json()
    assert j == {"kind": kind, "message": c.message, "sender_newest": c.sender_newest,
                 "receiver_newest": c.receiver_newest, "common": c.common, "hint": c.hint}


def test_planner_does_not_change_its_inputs():
    s = sender(sv("a", GA, 10), sb("b", GB, 20), sv("c", GC, 30), sv("d", GD, 40))
    r = receiver(rv("a", GA, 3), rv("b", GB, 5), token=TOKEN)
    s0, r0 = copy.deepcopy(s), copy.deepcopy(r)
    token = tok(toguid=GZ)
    zrepl.plan_filesystem(s, r, policy(batch=False), token)
    assert (s, r, token) == (s0, r0, tok(toguid=GZ))


def test_legacy_placeholder_value_on_receiver_counts_as_placeholder():
    # §3.3: the zrepl 0.0.x value (SHA-512/256 of the full dataset name) marks a placeholder,
    # so rule 5 applies (initial replication), not rule 6 (`receiver-exists`)
    import hashlib
    try:
        legacy = hashlib.new("sha512_256", RFS.encode()).hexdigest()
    except ValueError:
        pytest.skip("this OpenSSL has no sha512_256")
    s = sender(*S_ABC)
    check(run(s, receiver(placeholder=legacy), policy("most_recent"), None), s,
          plan([full("@c")]))
    check(run(s, receiver(placeholder=legacy.upper()), policy("most_recent"), None), s,
          conflict("receiver-exists", "@c", None))
