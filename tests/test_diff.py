from hypothesis import given
from hypothesis import strategies as st

from pipeline.diff import document_chunker, plan_changes
from pipeline.sources import SourceDocument
from registry.store import DocumentState

V = "chunker-1"


def doc(doc_id: str, text: str = "t", meta: str = "m") -> SourceDocument:
    return SourceDocument(doc_id, text, "uri", "text", {}, content_hash=f"c-{text}", metadata_hash=f"m-{meta}")


def state(doc_id: str, text: str = "t", meta: str = "m", status: str = "active", chunker: str = V) -> DocumentState:
    return DocumentState(doc_id, f"c-{text}", f"m-{meta}", document_chunker(chunker, doc(doc_id)), status, 1)


def test_plan_categories():
    known = {
        "same": state("same"),
        "edited": state("edited", text="old"),
        "meta": state("meta", meta="old"),
        "gone": state("gone"),
        "gone-earlier": state("gone-earlier", status="deleted"),
        "back": state("back", status="deleted"),
        "rechunk": state("rechunk", chunker="chunker-0"),
    }
    incoming = [doc("same"), doc("edited"), doc("meta"), doc("fresh"), doc("back"), doc("rechunk")]
    plan = plan_changes(known, incoming, V)
    assert [d.doc_id for d in plan.new] == ["fresh", "back"]
    assert [d.doc_id for d in plan.changed] == ["edited", "rechunk"]
    assert [d.doc_id for d in plan.metadata_only] == ["meta"]
    assert plan.unchanged == ("same",)
    assert plan.deleted == ("gone",)
    assert not plan.is_empty


def test_format_change_rechunks_and_unreadable_documents_are_kept():
    as_rst = SourceDocument("a", "t", "uri", "rst", {}, content_hash="c-t", metadata_hash="m-m")
    assert [d.doc_id for d in plan_changes({"a": state("a")}, [as_rst], V).changed] == ["a"]
    plan = plan_changes({"a": state("a"), "b": state("b")}, [doc("a")], V, unreadable=["b", "never-seen"])
    assert plan.kept == ("b",) and plan.deleted == () and plan.is_empty


def test_plan_nothing_changed_is_empty():
    plan = plan_changes({"a": state("a")}, [doc("a")], V)
    assert plan.is_empty and plan.unchanged == ("a",)


ids = st.sampled_from([f"d{i}" for i in range(12)])
versions = st.sampled_from(["x", "y"])


@given(
    known=st.dictionaries(ids, st.tuples(versions, versions, st.sampled_from(["active", "deleted"]))),
    incoming=st.dictionaries(ids, st.tuples(versions, versions)),
)
def test_plan_partitions_input_exactly(known, incoming):
    known_states = {k: state(k, text=t, meta=m, status=s) for k, (t, m, s) in known.items()}
    docs = [doc(k, text=t, meta=m) for k, (t, m) in incoming.items()]
    plan = plan_changes(known_states, docs, V)
    groups = [
        [d.doc_id for d in plan.new],
        [d.doc_id for d in plan.changed],
        [d.doc_id for d in plan.metadata_only],
        list(plan.unchanged),
    ]
    flat = [x for g in groups for x in g]
    assert sorted(flat) == sorted(incoming)  # every incoming document exactly once
    assert set(plan.deleted) == {k for k, (_, _, s) in known.items() if s == "active"} - set(incoming)
    for d in plan.unchanged:
        assert known[d][:2] == incoming[d] and known[d][2] == "active"


def test_a_new_title_rechunks_the_document():
    """Chunks are indexed with the document's title, so a title change is a change, not metadata only."""
    before = SourceDocument("d", "t", "uri", "text", {"title": "Old"}, content_hash="c-t", metadata_hash="m-old")
    after = SourceDocument("d", "t", "uri", "text", {"title": "New"}, content_hash="c-t", metadata_hash="m-new")
    other = SourceDocument("d", "t", "uri", "text", {"title": "Old", "x": 1}, content_hash="c-t", metadata_hash="m-x")
    known = {"d": DocumentState("d", "c-t", "m-old", document_chunker(V, before), "active", 1)}
    assert [d.doc_id for d in plan_changes(known, [after], V).changed] == ["d"]
    assert [d.doc_id for d in plan_changes(known, [other], V).metadata_only] == ["d"]
