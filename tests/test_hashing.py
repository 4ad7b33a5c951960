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


def test_fast_paths_match_the_general_forms():
    import json

    from pipeline.hashing import _TRAILING_WS, sha256_hex

    for text in ["a \nb", "a\t\nb", "a\fb \n", "plain\ntext", "end ", "x\v\ny"]:
        assert normalize_text(text) == _TRAILING_WS.sub("", text).rstrip("\n")
    uri = "file:///tmp/ä b.md"
    general = json.dumps([uri, {}], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert metadata_hash({}, uri) == sha256_hex(general)
