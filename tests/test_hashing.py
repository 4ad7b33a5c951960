from pipeline.hashing import chunk_id_for, content_hash, metadata_hash, normalize_text


def test_normalize_line_endings_and_trailing_whitespace():
    assert normalize_text("a  \r\nb\t\rc \n\n\n") == "a\nb\nc"
    assert normalize_text("\ufeffhello") == "hello"
    assert normalize_text("  indented\n") == "  indented"


def test_content_hash_ignores_only_normalized_differences():
    assert content_hash(normalize_text("x \r\ny")) == content_hash(normalize_text("x\ny"))
    assert content_hash(normalize_text("x y")) != content_hash(normalize_text("x  y"))


def test_metadata_hash_is_key_order_independent():
    assert metadata_hash({"a": 1, "b": [1, 2]}, "u") == metadata_hash({"b": [1, 2], "a": 1}, "u")
    assert metadata_hash({"a": 1}, "u") != metadata_hash({"a": 2}, "u")
    assert metadata_hash({"a": 1}, "u") != metadata_hash({"a": 1}, "v")


def test_chunk_id_depends_on_every_field():
    base = ("d", 0, ("A",), 0, 10, "h")
    ids = {chunk_id_for(*base)}
    for i, other in enumerate(["e", 1, ("B",), 1, 11, "g"]):
        changed = list(base)
        changed[i] = other
        ids.add(chunk_id_for(*changed))
    assert len(ids) == 7
