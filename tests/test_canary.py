"""Gradual rollout against real PostgreSQL and real retrievers: routing by key, promote and abort,
guards, warm versions and instant rollback (in two serving processes too), statistics in
``ragpipe versions list``."""

import json
import subprocess
import sys
import time

import pytest

from conftest import REPO, write_tree
from pipeline import cli
from pipeline.config import IndexConfig
from pipeline.runner import run_index
from registry import AliasError, Guard
from retrieval import Retriever

pytestmark = pytest.mark.db

QUERIES = ["wing lift pressure", "heat shield reentry", "boundary layer stall", "shock wave inlet",
           "flutter of panels", "engine nozzle thrust"]


@pytest.fixture
def two_versions(tmp_path, registry, embedder):
    """Alias docs on v1; v2 (published once, with other documents) is retained beside it."""
    src = tmp_path / "src"
    write_tree(src, {f"a{i}.txt": f"{q} explained in note {i}.\n" for i, q in enumerate(QUERIES)})
    v1 = run_index(str(src), registry, embedder, IndexConfig(lock_timeout=5)).version
    for i in range(len(QUERIES)):
        (src / f"a{i}.txt").unlink()
    write_tree(src, {f"b{i}.txt": f"Unrelated text number {i} about {QUERIES[-1 - i]}.\n" for i in range(len(QUERIES))})
    v2 = run_index(str(src), registry, embedder, IndexConfig(lock_timeout=5)).version
    registry.swap_alias("docs", v1)
    return v1, v2


def open_retriever(registry_config, embedder, **kw):
    kw.setdefault("follow", False)
    kw.setdefault("stats_interval", 0)
    return Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder, **kw)


def ragpipe(registry_config, capsys, *args):
    code = cli.main([*args, "--database-url", registry_config.database_url, "--home", str(registry_config.home)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_canary_routes_by_key_and_says_which_version_served(two_versions, registry, registry_config, embedder):
    v1, v2 = two_versions
    registry.start_canary("docs", v2, 30.0)
    with open_retriever(registry_config, embedder) as r:
        assert r.rollout_state()["canary"] == v2 and r.loads == 2
        routes = {}
        for i in range(400):
            hits = r.search(QUERIES[i % len(QUERIES)], k=3, route_key=f"user-{i}")
            assert hits.version == (v2 if hits.route == "canary" else v1)
            assert {h.index_version for h in hits} == {hits.version}
            routes[f"user-{i}"] = hits.route
            assert r.route(f"user-{i}") == (hits.version, hits.route)
        share = sum(route == "canary" for route in routes.values()) / len(routes)
        assert 0.22 < share < 0.38
        for key, route in list(routes.items())[:50]:  # stable per key, also from the caches
            assert r.search("flutter of panels", k=3, route_key=key).route == route
        assert {r.search("heat shield reentry", k=3).route for _ in range(60)} == {"live", "canary"}  # no key: random
        batch = r.search_many(QUERIES, k=3, route_key="user-7")  # one key routes the whole batch
        assert {b.version for b in batch} == {r.route("user-7")[0]} and {b.route for b in batch} == {routes["user-7"]}
        registry.start_canary("docs", v2, 100.0)  # the same canary at another share
        r.refresh()
        assert all(r.search(q, k=3, route_key="anyone").version == v2 for q in QUERIES)


def test_canary_refuses_what_it_cannot_serve(two_versions, registry):
    v1, v2 = two_versions
    with pytest.raises(AliasError, match="already alias 'docs'"):
        registry.start_canary("docs", v1, 10)
    with pytest.raises(AliasError, match="within \\[0, 100\\]"):
        registry.start_canary("docs", v2, 120)
    with pytest.raises(AliasError, match="does not exist"):
        registry.start_canary("docs", "docs_nope", 10)
    with pytest.raises(AliasError, match="no canary to abort"):
        registry.abort_canary("docs")
    with pytest.raises(AliasError, match="no canary to promote"):
        registry.promote_canary("docs")


def test_promote_and_abort_move_the_alias_from_the_command_line(two_versions, registry, registry_config, capsys):
    v1, v2 = two_versions
    code, out, _ = ragpipe(registry_config, capsys, "alias", "canary", "docs", v2, "--percent", "10", "--json")
    assert code == 0 and json.loads(out) == {"alias": "docs", "version": v2, "previous": v1, "action": "canary"}
    code, out, _ = ragpipe(registry_config, capsys, "alias", "list", "--json")
    assert [(a["version"], a["canary_version"], a["canary_percent"]) for a in json.loads(out)] == [(v1, v2, 10.0)]
    code, out, _ = ragpipe(registry_config, capsys, "alias", "abort", "docs", "--reason", "too slow")
    assert code == 0 and registry.canary_of("docs") is None and registry.list_aliases()[0].version == v1
    assert registry.alias_history("docs")[0][2:4] == ("abort", "too slow")
    ragpipe(registry_config, capsys, "alias", "canary", "docs", v2, "--percent", "25")
    code, out, _ = ragpipe(registry_config, capsys, "alias", "promote", "docs", "--json")
    assert code == 0 and json.loads(out)["action"] == "promote"
    assert registry.list_aliases()[0].version == v2 and registry.canary_of("docs") is None
    code, _, err = ragpipe(registry_config, capsys, "alias", "canary", "docs", v1, "--percent", "5", "--guard", "recall<1")
    assert code == 1 and "guard 'recall<1' is not METRIC<NUMBER" in err and registry.canary_of("docs") is None


def test_a_guard_aborts_the_canary_on_the_written_statistics(two_versions, registry, registry_config, embedder):
    v1, v2 = two_versions
    registry.start_canary("docs", v2, 100.0, [Guard.parse("p95_ms>100000"), Guard.parse("overlap@10<0.6")],
                          min_queries=12)
    with open_retriever(registry_config, embedder, canary_compare_fraction=1.0, result_cache_size=0) as r:
        for q in QUERIES:  # 6 compared queries: fewer than the guards' minimum
            assert r.search(q, k=5, route_key="k").route == "canary"
        assert r.write_stats() is None and registry.canary_of("docs") is not None
        for q in QUERIES:
            r.search(q + " again", k=5, route_key="k")
        reason = r.write_stats()
        assert reason is not None and reason.startswith("guard overlap@10<0.6 breached: overlap@10 ")
        assert registry.canary_of("docs") is None and registry.list_aliases()[0].version == v1
        assert registry.alias_history("docs")[0][2:4] == ("abort", reason)
        assert r.rollout_state()["canary"] is None and v2 in r.rollout_state()["warm"]
        assert r.search(QUERIES[0], k=5, route_key="k").version == v1


def test_statistics_appear_in_versions_list(two_versions, registry, registry_config, embedder, capsys):
    v1, v2 = two_versions
    registry.start_canary("docs", v2, 50.0)
    with open_retriever(registry_config, embedder, canary_compare_fraction=1.0, result_cache_size=0) as r:
        served = [r.search(q, k=5, route_key=f"s{i}").route for i in range(40) for q in QUERIES[:1]]
        r.write_stats()
    with open_retriever(registry_config, embedder, canary_compare_fraction=1.0, result_cache_size=0,
                        stats_interval=60) as r:  # another process's statistics add up; close writes them
        served += [r.search(QUERIES[1], k=5, route_key=f"s{i}").route for i in range(10)]
    code, out, _ = ragpipe(registry_config, capsys, "versions", "list", "--json")
    rows = {row["version"]: row for row in json.loads(out)}
    canary, live = rows[v2]["stats"]["canary"], rows[v1]["stats"]["live"]
    assert canary["queries"] == canary["compared"] == served.count("canary") > 0
    assert live["queries"] == served.count("live") > 0
    assert 0.0 <= canary["overlap@10"] < 0.6 and canary["p95_ms"] > 0 and live["overlap@10"] is None
    assert rows[v2]["role"] == "canary,head" and rows[v1]["role"] == "live"
    code, out, _ = ragpipe(registry_config, capsys, "versions", "list")
    assert f"canary {served.count('canary')}q overlap@10" in out


def test_the_previous_version_stays_warm_and_rollback_loads_nothing(two_versions, registry, registry_config, embedder):
    v1, v2 = two_versions
    with open_retriever(registry_config, embedder, warm_seconds=1.0) as r:
        registry.start_canary("docs", v2, 10.0)
        r.refresh()
        assert r.loads == 2  # live and canary
        registry.promote_canary("docs")
        assert r.refresh() and r.version == v2 and r.loads == 2  # the canary was loaded already
        assert r.rollout_state()["warm"] == [v1]
        registry.rollback_alias("docs")
        assert r.refresh() and r.version == v1 and r.loads == 2  # instant: the warm version serves again
        assert r.search(QUERIES[0], k=3).version == v1
        time.sleep(1.1)
        r.refresh()
        assert r.rollout_state()["warm"] == []  # v2 went cold after warm_seconds
        registry.swap_alias("docs", v2)
        assert r.refresh() and r.loads == 3


def _reader(registry_config):
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "rollout_reader.py"), registry_config.database_url,
                             str(registry_config.home), "docs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert json.loads(proc.stdout.readline())["ready"]
    return proc


def _ask(proc, command):
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def _until(procs, check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        states = [_ask(p, "state") for p in procs]
        if all(check(s) for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.1)


@pytest.mark.slow
def test_every_serving_process_follows_and_rolls_back_without_loading(two_versions, registry, registry_config):
    v1, v2 = two_versions
    procs = [_reader(registry_config), _reader(registry_config)]
    try:
        registry.start_canary("docs", v2, 50.0)
        states = _until(procs, lambda s: s["canary"] == v2)
        assert all(s["canary"] == v2 and s["loads"] == 2 for s in states)
        answers = [[_ask(p, f"search user-{i} wing lift") for i in range(40)] for p in procs]
        assert answers[0] == answers[1]  # both processes route each key to the same version
        assert {a["version"] for a in answers[0]} == {v1, v2}
        registry.promote_canary("docs")
        states = _until(procs, lambda s: s["live"] == v2 and s["canary"] is None)
        assert all(s["live"] == v2 and s["warm"] == [v1] and s["loads"] == 2 for s in states)
        registry.rollback_alias("docs")
        states = _until(procs, lambda s: s["live"] == v1)
        assert all(s["live"] == v1 and s["loads"] == 2 for s in states)  # rolled back without loading
        assert all(_ask(p, "search anyone wing lift")["version"] == v1 for p in procs)
    finally:
        for p in procs:
            p.stdin.write("quit\n")
            p.stdin.flush()
            p.wait(timeout=30)
