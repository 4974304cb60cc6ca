"""The YAML-subset reader, `zrepl.YAMLReader(text, filename).read()` (SPEC §2.1).

Pure: text in, nodes (Mapping / Sequence / Scalar, each with line and col) or a ConfigError
with exactly one Problem out. `data()` turns nodes into plain Python values so the
structure tests read like the YAML they check; scalars stay text (the schema types them).
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zrepl  # noqa: E402


def read(text):
    return zrepl.YAMLReader(text, "t.yml").read()


def data(node):
    """Nodes -> dict / list / str (scalars stay text)."""
    if isinstance(node, zrepl.Mapping):
        return {k.text: data(v) for k, v in node.items}
    if isinstance(node, zrepl.Sequence):
        return [data(v) for v in node.items]
    return node.text


def parse(text):
    return data(read(text))


def error(text):
    with pytest.raises(zrepl.ConfigError) as info:
        read(text)
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert problems[0].file == "t.yml" and not problems[0].warning
    return problems[0]


def bug(reason):
    return pytest.mark.xfail(reason="BUG: " + reason, strict=True)


# =====================================================================================
# structure
# =====================================================================================

@pytest.mark.parametrize("text,expected", [
    pytest.param("a: 1\nb: two words\n", {"a": "1", "b": "two words"}, id="block-mapping"),
    pytest.param("a:\n  b:\n    c: d\n  e: f\n", {"a": {"b": {"c": "d"}, "e": "f"}},
                 id="nested-mappings"),
    pytest.param("a:\n  - x\n  - y\n", {"a": ["x", "y"]}, id="indented-sequence"),
    pytest.param("jobs:\n- name: x\n  type: push\n- name: y\nnext: 1\n",
                 {"jobs": [{"name": "x", "type": "push"}, {"name": "y"}], "next": "1"},
                 id="sequence-at-parent-key-indent"),
    pytest.param("jobs:\n  - name: x\n    type: sink\n    serve:\n      type: local\n",
                 {"jobs": [{"name": "x", "type": "sink", "serve": {"type": "local"}}]},
                 id="item-mapping-with-aligned-keys"),
    pytest.param("a:\n  -   b: 1\n      c: 2\n", {"a": [{"b": "1", "c": "2"}]},
                 id="item-mapping-after-extra-spaces"),
    pytest.param("a:\n- - x\n  - y\n- - z\n", {"a": [["x", "y"], ["z"]]}, id="nested-dash-dash"),
    pytest.param("a:\n  - - - deep\n", {"a": [[["deep"]]]}, id="triple-nesting"),
    pytest.param("a:\n  -\n    b: 1\n  -\n  - c\n", {"a": [{"b": "1"}, "", "c"]},
                 id="item-on-next-line-and-empty-item"),
    pytest.param("a:\n- [x, y]\n- {k: v}\n- 'q'\n", {"a": [["x", "y"], {"k": "v"}, "q"]},
                 id="items-flow-and-quoted"),
    pytest.param("p:\n  keep:\n  - type: a\n    x: 1\n  - type: b\nq: 2\n",
                 {"p": {"keep": [{"type": "a", "x": "1"}, {"type": "b"}]}, "q": "2"},
                 id="sequence-ends-at-dedent"),
    pytest.param("a:\nb: ~\nc: null\n", {"a": "", "b": "~", "c": "null"}, id="null-spellings-stay-text"),
    pytest.param("my key: 1\n'quoted key': 2\n\"dq key\" : 3\nk :   4   \n",
                 {"my key": "1", "quoted key": "2", "dq key": "3", "k": "4"},
                 id="keys-with-spaces-and-space-before-colon"),
    pytest.param("a: 1\r\nb:\r\n  - x\r\n", {"a": "1", "b": ["x"]}, id="crlf-line-ends"),
    pytest.param("a: 1\n\n\n   \nb: 2\n", {"a": "1", "b": "2"}, id="blank-lines"),
])
def test_block_structure(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text,expected", [
    pytest.param("a: [1, 2]\n", {"a": ["1", "2"]}, id="flow-sequence"),
    pytest.param("a: {k: v, \"k2\" : v2}\n", {"a": {"k": "v", "k2": "v2"}}, id="flow-mapping"),
    pytest.param("a: {k : v, 'k2'  :  v2}\n", {"a": {"k": "v", "k2": "v2"}},
                 id="whitespace-before-flow-colon"),
    pytest.param("a: {b: [1, {c: d}], e: {f: [g]}}\n",
                 {"a": {"b": ["1", {"c": "d"}], "e": {"f": ["g"]}}}, id="nested-flow"),
    pytest.param("a: [1, 2,]\nb: {k: v,}\n", {"a": ["1", "2"], "b": {"k": "v"}},
                 id="trailing-comma"),
    pytest.param("a: []\nb: {}\n", {"a": [], "b": {}}, id="empty-flow"),
    pytest.param("a: [\n  1,\n  2\n]\n", {"a": ["1", "2"]}, id="spanning-lines-close-at-col-0"),
    pytest.param("a:\n  b: {x: 1,\n      y: 2}\n  c: 3\n", {"a": {"b": {"x": "1", "y": "2"}, "c": "3"}},
                 id="spanning-lines-nested"),
    pytest.param("a: {\n  \"p<\": true,   # comment inside\n  # a whole comment line\n  \"q\": false\n}\n",
                 {"a": {"p<": "true", "q": "false"}}, id="comments-inside-flow"),
    pytest.param("a: [two words, 'q, uoted', \"d]q\"]\n", {"a": ["two words", "q, uoted", "d]q"]},
                 id="flow-scalars"),
    pytest.param("a: {k}\n", {"a": {"k": ""}}, id="flow-key-without-value"),
    pytest.param("a: {k: }\n", {"a": {"k": ""}}, id="flow-key-with-empty-value"),
    pytest.param("a: [a#b, c]\n", {"a": ["a#b", "c"]}, id="hash-inside-flow-scalar"),
    pytest.param('a: {"pool/a<": true, "pool/a/tmp": false}\n',
                 {"a": {"pool/a<": "true", "pool/a/tmp": "false"}}, id="filter-map"),
    pytest.param("a: {host: backup:8888, u: http://x/y}\n",
                 {"a": {"host": "backup:8888", "u": "http://x/y"}}, id="colon-without-space-in-flow"),
])
def test_flow_collections(text, expected):
    assert parse(text) == expected


# =====================================================================================
# scalars
# =====================================================================================

@pytest.mark.parametrize("text,expected", [
    pytest.param("a: 1x1h(keep=all) | 24x1h | 30x1d\n", "1x1h(keep=all) | 24x1h | 30x1d", id="grid"),
    pytest.param("a: tank/a<\n", "tank/a<", id="less-than"),
    pytest.param("a: x=y (z)\n", "x=y (z)", id="equals-parens"),
    pytest.param("a: x|y\n", "x|y", id="pipe-inside"),
    pytest.param("a: backup:8888\n", "backup:8888", id="colon-without-space"),
    pytest.param("a: a#b\n", "a#b", id="hash-without-space-is-text"),
    pytest.param("a: a #b\n", "a", id="space-hash-is-comment"),
    pytest.param("a: value\t# tab before hash\n", "value", id="tab-hash-is-comment"),
    pytest.param("a: -1\n", "-1", id="minus-number"),
    pytest.param("a: -x\n", "-x", id="dash-without-space"),
    pytest.param("a: 'it''s'\n", "it's", id="single-quote-doubled"),
    pytest.param("a: ''\n", "", id="empty-single"),
    pytest.param("a: \"\"\n", "", id="empty-double"),
    pytest.param("a: '#not a comment'\n", "#not a comment", id="hash-in-single-quotes"),
    pytest.param("a: \"x # y\" # z\n", "x # y", id="hash-in-double-quotes"),
    pytest.param("a: 'back\\slash'\n", "back\\slash", id="no-escapes-in-single-quotes"),
    pytest.param("a: \"line one\n  line two\"\n", "line one line two", id="double-quote-folding"),
    pytest.param("a: \"para one\n\n  para two\"\n", "para one\npara two", id="double-quote-blank-line"),
    pytest.param("a: 'one\n  two'\n", "one two", id="single-quote-folding"),
    pytest.param("a: \"joined\\\n   here\"\n", "joinedhere", id="escaped-line-break"),
])
def test_scalars(text, expected):
    assert parse(text)["a"] == expected


ESCAPES = [
    ("\\\\", "\\"), ('\\"', '"'), ("\\/", "/"), ("\\0", "\0"), ("\\a", "\a"), ("\\b", "\b"),
    ("\\t", "\t"), ("\\n", "\n"), ("\\v", "\v"), ("\\f", "\f"), ("\\r", "\r"), ("\\e", "\x1b"),
    ("\\ ", " "), ("\\N", "\x85"), ("\\_", "\xa0"), ("\\L", "\u2028"), ("\\P", "\u2029"),
    ("\\x41", "A"), ("\\xe9", "\xe9"), ("\\u00e9", "\xe9"), ("\\u20AC", "\u20ac"),
    ("\\U0001F600", "\U0001F600"),
]


@pytest.mark.parametrize("escape,char", ESCAPES, ids=[e for e, _ in ESCAPES])
def test_double_quote_escapes(escape, char):
    assert parse('a: "<%s>"\n' % escape)["a"] == "<%s>" % char


@pytest.mark.parametrize("text,expected", [
    pytest.param("a: |\n  l1\n  l2\nb: x\n", "l1\nl2\n", id="literal"),
    pytest.param("a: |-\n  l1\n  l2\nb: x\n", "l1\nl2", id="literal-strip"),
    pytest.param("a: >\n  l1\n  l2\n\n  l3\nb: x\n", "l1 l2\nl3\n", id="folded"),
    pytest.param("a: >-\n  1x1h(keep=all) |\n  24x1h\nb: x\n", "1x1h(keep=all) | 24x1h",
                 id="folded-strip-grid"),
    pytest.param("a: |\n  l1\n    indented\n  l3\n", "l1\n  indented\nl3\n", id="literal-keeps-indent"),
    pytest.param("a: |\n  # not a comment\n  x: y\n", "# not a comment\nx: y\n",
                 id="literal-content-is-text"),
    pytest.param("a: |   # a comment after the indicator\n  x\n", "x\n", id="comment-after-indicator"),
    pytest.param("a: |\n  x\n\n\nb: 1\n", "x\n", id="trailing-blank-lines-clipped"),
    pytest.param("a: |\n    deep\n    er\n", "deep\ner\n", id="any-indent"),
])
def test_block_scalars(text, expected):
    node = read(text)
    value = node.items[0][1]
    assert (value.text, value.style) == (expected, "block")
    if "b: " in text:
        assert data(node)["b"] in ("x", "1")


def test_keep_chomping_is_refused_or_honoured():
    try:
        node = read("a: |+\n  x\n\n\nb: 1\n")
    except zrepl.ConfigError as e:
        assert "block scalar" in e.problems[0].message
    else:
        assert node.items[0][1].text == "x\n\n\n"


def test_block_scalar_as_sequence_item():
    assert parse("a:\n  - |-\n    one\n    two\n  - next\n") == {"a": ["one\ntwo", "next"]}


@pytest.mark.parametrize("text,style", [
    ("a: x\n", "plain"), ("a: 'x'\n", "single"), ("a: \"x\"\n", "double"), ("a: |\n  x\n", "block"),
    ("a: [x]\n", None),
])
def test_scalar_style_is_recorded(text, style):
    value = read(text).items[0][1]
    if style is None:
        assert isinstance(value, zrepl.Sequence)
    else:
        assert value.style == style


@pytest.mark.parametrize("text,is_null", [
    ("a:\n", True), ("a: ~\n", True), ("a: null\n", True), ("a: Null\n", True), ("a: NULL\n", True),
    ("a: nULL\n", False), ("a: '~'\n", False), ("a: \"null\"\n", False), ("a: ''\n", False),
    ("a: x\n", False),
])
def test_null_scalars(text, is_null):
    assert read(text).items[0][1].is_null is is_null


# =====================================================================================
# documents and comments
# =====================================================================================

@pytest.mark.parametrize("text", [
    "", "\n\n", "# only a comment\n", "# one\n\n   # two indented\n", "---\n", "--- # marker\n",
    "---\n# nothing\n",
])
def test_empty_documents_are_empty_mappings(text):
    node = read(text)
    assert isinstance(node, zrepl.Mapping) and node.items == []


def test_optional_leading_document_marker():
    assert parse("# header\n---\njobs: []\n") == {"jobs": []}
    assert parse("--- \njobs: []\n") == {"jobs": []}


def test_comments_everywhere():
    text = ("# top\n"
            "jobs:   # after a key\n"
            "# between\n"
            "  - name: x   # after a value\n"
            "# at column 0 inside the sequence\n"
            "    type: y\n"
            "  - name: z\n")
    assert parse(text) == {"jobs": [{"name": "x", "type": "y"}, {"name": "z"}]}


def test_key_containing_hash():
    assert parse("a#b: 1\n") == {"a#b": "1"}


# =====================================================================================
# positions: every node knows its line and column (1-based)
# =====================================================================================

POSITIONS_DOC = (
    "global:\n"                              # 1
    "  rundir: /run/z\n"                     # 2
    "jobs:\n"                                # 3
    "- name: a\n"                            # 4
    "  filesystems: {\"t<\": true,\n"        # 5
    "                x : no}\n"              # 6
    "  keep: [one, 'two']\n"                 # 7
    "  grid: |\n"                            # 8
    "    text\n"                             # 9
)


def test_positions():
    root = read(POSITIONS_DOC)
    (k_global, v_global), (k_jobs, v_jobs) = root.items
    assert (root.line, root.col) == (1, 1)
    assert (k_global.line, k_global.col) == (1, 1)
    assert (v_global.line, v_global.col) == (2, 3)            # a mapping: its first key
    k_rundir, v_rundir = v_global.items[0]
    assert (k_rundir.line, k_rundir.col, v_rundir.line, v_rundir.col) == (2, 3, 2, 11)
    assert (k_jobs.line, k_jobs.col) == (3, 1)
    assert (v_jobs.line, v_jobs.col) == (4, 1)                # a block sequence: its first dash
    job = v_jobs.items[0]
    assert (job.line, job.col) == (4, 3)                      # the item mapping: its first key
    fs = job.get("filesystems")
    assert (fs.line, fs.col) == (5, 16)                       # a flow mapping: its brace
    (k1, v1), (k2, v2) = fs.items
    assert [(n.line, n.col) for n in (k1, v1, k2, v2)] == [(5, 17), (5, 23), (6, 17), (6, 21)]
    keep = job.get("keep")
    assert (keep.line, keep.col) == (7, 9)
    assert [(n.line, n.col) for n in keep.items] == [(7, 10), (7, 15)]
    grid = job.get("grid")
    assert (grid.line, grid.col, grid.text) == (8, 9, "text\n")


def test_mapping_get():
    node = read("a: 1\nb: 2\n")
    assert node.get("b").text == "2"
    assert node.get("c") is None


# =====================================================================================
# errors: one Problem at the offending position
# =====================================================================================



@pytest.mark.parametrize("text,line,col,substring", [
    # tabs
    pytest.param("a:\n\tb: 1\n", 2, 1, "tab character in indentation", id="tab-in-mapping"),
    pytest.param("a:\n  - x\n \t- y\n", 3, 2, "tab character in indentation", id="tab-after-spaces"),
    # anchors, aliases, tags, merge keys, complex keys, directives
    pytest.param("a: &x 1\n", 1, 4, "anchors (&name) are not supported", id="anchor-value"),
    pytest.param("a:\n  - &x 1\n", 2, 5, "anchors (&name) are not supported", id="anchor-item"),
    pytest.param("a: &x\n  b: 1\n", 1, 4, "anchors (&name) are not supported", id="anchor-on-mapping"),
    pytest.param("a: [&x 1]\n", 1, 5, "anchors (&name) are not supported", id="anchor-flow-seq"),
    pytest.param("a: {&x k: 1}\n", 1, 5, "anchors (&name) are not supported", id="anchor-flow-key"),
    pytest.param("&x a: 1\n", 1, 1, "anchors (&name) are not supported", id="anchor-block-key"),
    pytest.param("a: *x\n", 1, 4, "aliases (*name) are not supported", id="alias-value"),
    pytest.param("a:\n- *x\n", 2, 3, "aliases (*name) are not supported", id="alias-item"),
    pytest.param("a: [1, *x]\n", 1, 8, "aliases (*name) are not supported", id="alias-flow-seq"),
    pytest.param("a: !x 1\n", 1, 4, "tags (!tag) are not supported", id="tag"),
    pytest.param("a: !!str 1\n", 1, 4, "tags (!tag) are not supported", id="tag-double-bang"),
    pytest.param("a: [!!int 1]\n", 1, 5, "tags (!tag) are not supported", id="tag-flow-seq"),
    pytest.param("a:\n  <<: {b: 1}\n", 2, 3, "merge keys (<<) are not supported", id="merge-key"),
    pytest.param("? a\n: b\n", 1, 1, "complex keys (? key) are not supported", id="complex-key"),
    pytest.param("a: {? b: 1}\n", 1, 5, "complex keys (? key) are not supported", id="complex-flow-key"),
    pytest.param("%YAML 1.1\n---\na: 1\n", 1, 1, "directives (%) are not supported", id="directive"),
    # documents
    pytest.param("a: 1\n---\nb: 2\n", 2, 1, "multiple YAML documents are not supported", id="second-doc"),
    pytest.param("a: 1\n...\n", 2, 1, "multiple YAML documents are not supported", id="doc-end-marker"),
    pytest.param("---\na: 1\n---\n", 3, 1, "multiple YAML documents are not supported",
                 id="second-doc-after-first-marker"),
    # plain scalars
    pytest.param("a: one\n  two\n", 2, 3, "multi-line plain scalars are not supported", id="multiline-plain"),
    pytest.param("a:\n  - one\n    two\n", 3, 5, "multi-line plain scalars are not supported",
                 id="multiline-plain-item"),
    pytest.param("a: b: c\n", 1, 5, "unexpected ':' in a plain value", id="colon-space-in-value"),
    # flow collections: unclosed is reported at the opening bracket
    pytest.param("a: [1, 2\n", 1, 4, "unclosed flow collection (missing ']')", id="unclosed-at-eof"),
    pytest.param("a: {b: 1,\n    c: 2\n", 1, 4, "unclosed flow collection (missing '}')",
                 id="unclosed-mapping-at-eof"),
    pytest.param("a: [1, 2\nb: 3\n", 1, 4, "unclosed flow collection (missing ']')",
                 id="unclosed-at-dedent"),
    pytest.param("x:\n  a: [1,\n  2]\n", 2, 6, "unclosed flow collection (missing ']')",
                 id="unclosed-at-owner-indent"),
    pytest.param("a: {b: [1, 2}\n", 1, 13, "expected ',' or ']'", id="wrong-closing-bracket"),
    pytest.param("a: [1, 2] x\n", 1, 11, "unexpected text after the value", id="text-after-flow"),
    # quotes: unterminated is reported at the opening quote
    pytest.param("a: 'abc\n", 1, 4, "unterminated quoted string (missing closing ')",
                 id="unterminated-single"),
    pytest.param("a: \"abc\n  def\nb: 1\n", 1, 4, "unterminated quoted string (missing closing \")",
                 id="unterminated-double-multiline"),
    pytest.param("a: [\"x, y]\n", 1, 5, "unterminated quoted string", id="unterminated-in-flow"),
    pytest.param("a: 'x' y\n", 1, 8, "unexpected text after the value", id="text-after-quote"),
    pytest.param("a: \"\\q\"\n", 1, 5, "invalid escape sequence \\q", id="bad-escape"),
    pytest.param("a: \"\\x4\"\n", 1, 5, "invalid escape sequence \\x", id="short-hex-escape"),
    # indentation
    pytest.param("a:\n    b: 1\n  c: 2\n", 3, 3, "inconsistent indentation", id="dedent-to-nowhere"),
    pytest.param("  a: 1\nb: 2\n", 2, 1, "inconsistent indentation", id="indented-first-key"),
    pytest.param("a:\n  b: 1\n  - x\n", 3, 3, "found a sequence entry", id="sequence-in-mapping"),
    pytest.param("a: - x\n", 1, 4, "a sequence cannot start on the same line", id="seq-on-key-line"),
    # duplicate keys: at the second key, naming the first's line
    pytest.param("a: 1\nb: 2\na: 3\n", 3, 1, "duplicate key 'a' (first defined at line 1)",
                 id="duplicate-key"),
    pytest.param("x:\n  a: 1\n\n  a: 2\n", 4, 3, "duplicate key 'a' (first defined at line 2)",
                 id="duplicate-nested-key"),
    pytest.param("a: 1\n'a': 2\n", 2, 1, "duplicate key 'a'", id="duplicate-quoted-key"),
    pytest.param("a: {k: 1,\n    k: 2}\n", 2, 5, "duplicate key 'k' (first defined at line 1)",
                 id="duplicate-flow-key"),
    # block scalar headers
    pytest.param("a: |2\n  x\n", 1, 5, "unsupported block scalar header", id="block-indent-indicator"),
])
def test_reader_errors(text, line, col, substring):
    p = error(text)
    assert (p.line, p.col) == (line, col), str(p)
    assert substring in p.message, str(p)


@pytest.mark.parametrize("text,line", [
    pytest.param("- a\n- b\n", 1, id="sequence"),
    pytest.param("just text\n", 1, id="scalar"),
    pytest.param("[a, b]\n", 1, id="flow-sequence"),
])
def test_top_level_must_be_a_mapping(text, line):
    p = error(text)
    assert p.line == line and "top level of a configuration must be a mapping" in p.message


def test_top_level_error_points_at_the_node():
    p = error("# my config\n\n- a\n")
    assert (p.line, p.col) == (3, 1), str(p)


@pytest.mark.parametrize("text,col,substring", [
    pytest.param("a: {b: &x 1}\n", 8, "anchors", id="anchor"),
    pytest.param("a: {b: *x}\n", 8, "aliases", id="alias"),
    pytest.param("a: {b: !!str 1}\n", 8, "tags", id="tag"),
    pytest.param("a: {<<: {b: 1}}\n", 5, "merge keys", id="merge-key"),
])
def test_flow_mapping_values_are_checked_like_block_values(text, col, substring):
    p = error(text)
    assert (p.line, p.col) == (1, col) and substring in p.message, str(p)


def test_multiline_plain_in_flow_says_quote_this_value():
    p = error("a: [one\n  two]\n")
    assert "multi-line plain scalars are not supported" in p.message, str(p)


def test_reader_stops_at_the_first_error_with_one_problem():
    with pytest.raises(zrepl.ConfigError) as info:
        zrepl.YAMLReader("a: &x 1\nb: *y\nc: !z\n", "/etc/zrepl/zrepl.yml").read()
    assert [str(p) for p in info.value.problems] == [
        "/etc/zrepl/zrepl.yml:1:4: anchors (&name) are not supported by zrepl.py's config reader"]
