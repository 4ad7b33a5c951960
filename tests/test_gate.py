"""The validation gate's key checks, as pure functions: a segmented version's live keys against the registry."""

import numpy as np

from pipeline.segments.gate import KeyDelta, delta_problems, key_problems


def test_the_full_check_names_keys_only_on_one_side():
    assert key_problems(np.array([1, 2, 3]), {1, 2, 3}) == []
    assert key_problems(np.array([1, 2, 4]), {1, 2, 3}) == [
        "segments and registry differ: 1 keys only in the segments, 1 only in the registry"]


def test_the_delta_check_catches_a_missed_add_a_missed_removal_and_a_wrong_count():
    parent = np.array([1, 2, 3, 4])
    good = np.array([1, 2, 4, 7])  # 3 removed, 7 added
    assert delta_problems(good, KeyDelta([7], [3], len(parent) + 1 - 1)) == []
    assert delta_problems(np.array([1, 2, 3, 4, 7]), KeyDelta([7], [3], 4)) == [
        "segments and registry differ: the segments hold 5 live chunks, the registry's changes make 4",
        "1 chunks the version removes are still live in its segments (e.g. 3)"]
    assert delta_problems(np.array([1, 2, 4]), KeyDelta([7], [3], 4)) == [
        "segments and registry differ: the segments hold 3 live chunks, the registry's changes make 4",
        "1 chunks the version adds are not live in its segments (e.g. 7)"]


def test_the_changed_segments_check_agrees_with_a_true_delta_and_names_each_disagreement(tmp_path):
    """An incremental version is checked from the segments and deletion sets it does not share with
    its parent; each way its files can disagree with the registry's changes is named."""
    from pipeline.segments.gate import changed_segment_problems
    from pipeline.segments.storage import SegmentArtifacts
    from retrieval.artifacts import ArtifactStore
    from segment_fixtures import builtin_texts, version_manifest, write_segment

    files = SegmentArtifacts(ArtifactStore(str(tmp_path / "artifacts"), tmp_path / "cache"), "docs")
    store, texts = files.local, builtin_texts()
    a = write_segment(store, list(range(0, 20)), texts[:20])
    b = write_segment(store, list(range(20, 30)), texts[20:30])
    parent = version_manifest([a, b], "v1")
    # the child removes key 3, rewrites key 25 (deleted from b, written again in c) and adds key 40
    a2 = store.with_deletions(a, np.array([3]), np.arange(20))
    b2 = store.with_deletions(b, np.array([25]), np.arange(20, 30))
    c = write_segment(store, [25, 40], [texts[25], texts[31]])
    child = version_manifest([a2, b2, c], "v2")
    assert changed_segment_problems(files, child, KeyDelta([40], [3], 30, parent)) == []

    assert changed_segment_problems(files, child, KeyDelta([40, 41], [3], 31, parent)) == [
        "segments and registry differ: the segments hold 30 live chunks, the registry's changes make 31",
        "1 chunks the version adds are not live in its segments (e.g. 41)"]
    assert changed_segment_problems(files, child, KeyDelta([40], [3, 4], 29, parent)) == [
        "segments and registry differ: the segments hold 30 live chunks, the registry's changes make 29",
        "1 chunks the version removes are still live in its segments (e.g. 4)"]
    assert changed_segment_problems(files, child, KeyDelta([], [3], 29, parent)) == [
        "segments and registry differ: the segments hold 30 live chunks, the registry's changes make 29",
        "1 chunks are live in the segments that the registry's changes do not add"]
    # key 25 live twice: b keeps it while c holds it again
    twice = version_manifest([a2, b, c], "v3")
    assert "chunk key 25 is live in two segments" in " ".join(changed_segment_problems(
        files, twice, KeyDelta([40], [3], 30, parent)))
    # a deletion set that forgets what the parent deleted brings a removed chunk back
    revived = version_manifest([a, b2, c], "v4")
    assert "segment " + a.name + ": its deletion set lacks chunk keys its parent's deleted" in \
        changed_segment_problems(files, revived, KeyDelta([40], [3], 30, version_manifest([a2, b], "v1")))
