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
