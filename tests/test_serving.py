"""The real API in a subprocess on a loopback port, over real HTTP (httpx), with a two-tower
model and a DLRM ranker trained by the real training code and registered in MLflow, and a real
(SQLite) Feast online store.

Cost control: one tiny world (lake, models, features) and ONE two-worker server for the
module; the tests that need a different start (no model, SIGKILL, restart with the registry
down) share one sequence of two single-worker servers. The hot-swap test moves the alias, so it
runs last on the shared server."""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "test-key"
H = {"X-API-Key": KEY}


def _settings(root: Path, **serving):
    from core.config import load_settings

    # generous budgets: tests check behaviour, not speed (a loaded CI machine must not turn
    # model answers into timeout fallbacks). Cache TTL 0: every request reads the online store,
    # so killing the store is seen at once.
    srv = {"api_key": KEY, "registry_poll_s": 1.0, "total_budget_ms": 20_000, "model_budget_ms": 15_000,
           "features_budget_ms": 5_000, "candidates": 50, **serving}
    return load_settings(root=root, environ={}, overrides={"environment": "test", "serving": srv,
                                                           "features": {"online_cache_ttl_s": 0.0}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Lake + registered two-tower and ranker (version 1 @champion each) + online features."""
    from serving import fixtures as F

    root = tmp_path_factory.mktemp("serving")
    s = _settings(root)
    ds = F.synthetic_lake(s, n_users=120, n_items=60, n_events=2_500, n_days=8)
    model = F.train_two_tower(ds, epochs=1)
    version = F.register_two_tower(s, model)
    ranker = F.train_register_ranker(s, ds)
    F.online_features(s)
    return {"root": root, "settings": s, "dataset": ds, "model": model, "version": version, "ranker": ranker,
            "versions": {"two_tower": version, "ranker": ranker}}


@pytest.fixture(scope="module")
def server(world):
    from serving.server import ServerProcess

    with ServerProcess(world["settings"], workers=2) as srv:
        yield srv


def _client(srv) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=60.0)


def _thread_sched(pids: list[int]) -> list[tuple[str, tuple[int, int]]]:
    """(OS thread name, (scheduling policy, nice)) of every thread of the worker processes; a
    worker's main thread (its event loop) is named ``event-loop`` (Linux ``/proc``)."""
    from core.threads import thread_proc_files

    out = []
    for label, text in thread_proc_files(pids, "stat"):
        fields = text.rsplit(")", 1)[1].split()  # fields 3.. of proc(5): nice is 19, policy 41
        out.append((label, (int(fields[38]), int(fields[16]))))
    return out


def _known_user(world) -> str:
    return str(world["dataset"].events["user_id"].iloc[0])


def test_ready_happy_path_ranked_by_dlrm_and_metrics(world, server) -> None:
    c = _client(server)
    ready = c.get("/readyz")
    assert ready.status_code == 200, ready.text
    detail = ready.json()["detail"]
    assert detail["model_versions"] == world["versions"] and detail["ranker"] == "ok"
    assert detail["features"]["loaded"] and detail["eventlog"]["durable"]
    user = _known_user(world)
    r = c.get(f"/v1/recommendations/{user}", params={"k": 7})
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) == 7 and [it["position"] for it in body["items"]] == list(range(7))
    assert body["model_versions"] == world["versions"] and body["fallback_reason"] is None
    assert body["variant"] is None and len(body["request_id"]) == 32
    assert {"features", "retrieval", "filter", "ranking", "diversity", "total"} <= set(body["timings_ms"])
    catalog = set(world["dataset"].items["item_id"])
    assert {it["item_id"] for it in body["items"]} <= catalog
    # the served list is the two-stage pipeline's: the same artifacts and online history, run
    # in this process, give the same items with the same DLRM scores
    from models.artifacts import load_from_registry
    from pipelines.features import OnlineFeatureClient
    from serving.engine import build_engine

    s = world["settings"]
    recent = [str(i) for i in (OnlineFeatureClient(s, load_items=False).user_features(user)["recent_items"] or [])]
    engine = build_engine(load_from_registry("models:/two_tower@champion", s),
                          load_from_registry("models:/ranker@champion", s), n_candidates=s.serving.candidates,
                          precision=s.serving.ranker_precision)
    assert engine.pipeline is not None and engine.versions == world["versions"]
    detail = c.get("/readyz").json()["detail"]
    assert r.json()["items"] and detail["ranker_precision"] == engine.pipeline.ranker.precision
    assert set(detail["ranker_mlp_backends"]) == {"dense", "over"}
    assert all(re.fullmatch(r"onednn|mkl|mkl<\d+", b) for b in detail["ranker_mlp_backends"].values())
    [(want_items, want_scores)], _ = engine.recommend([user], k=7, histories=[recent])
    assert [it["item_id"] for it in body["items"]] == want_items
    assert [it["score"] for it in body["items"]] == pytest.approx(want_scores, abs=1e-5)
    # ranked by the DLRM: its calibrated probabilities, not the two-tower's retrieval scores
    assert all(0.0 <= x <= 1.0 for x in want_scores) and want_scores == sorted(want_scores, reverse=True)
    retrieval_only, _ = build_engine(load_from_registry("models:/two_tower@champion", s), None).recommend(
        [user], k=7, histories=[recent])
    assert retrieval_only[0][1] != pytest.approx(want_scores, abs=1e-5)
    # the user's recent items (online features) are not recommended again
    assert not set(recent) & {it["item_id"] for it in body["items"]}
    sim = c.get(f"/v1/items/{body['items'][0]['item_id']}/similar", params={"k": 5})
    assert sim.status_code == 200 and len(sim.json()["items"]) == 5
    assert body["items"][0]["item_id"] not in {it["item_id"] for it in sim.json()["items"]}
    # many connections so both workers answer, then /metrics aggregates them
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda _: httpx.get(f"{server.url}/v1/recommendations/{user}", timeout=60), range(32)))
    if sys.platform.startswith("linux"):  # serving.model_thread_nice: the model threads yield the CPU to the event loops
        sched = _thread_sched(server.child_pids())
        mine = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))  # what the workers inherit
        model = [v for name, v in sched if name == "model"]
        assert model and all(v == (os.SCHED_BATCH, max(s.serving.model_thread_nice, mine[1])) for v in model), sched
        assert all(v == mine for name, v in sched if name == "event-loop"), sched
    text = c.get("/metrics").text
    for needle in ('recsys_stage_seconds_bucket{le="0.005",stage="features"}', 'stage="retrieval"', 'stage="ranking"',
                   'stage="total"', f'recsys_model_info{{alias="champion",model="two_tower",version="{world["version"]}"}} 1.0',
                   f'recsys_model_info{{alias="champion",model="ranker",version="{world["ranker"]}"}} 1.0',
                   'recsys_http_requests_total{endpoint="recommendations",status="200"}'):
        assert needle in text, needle
    assert c.get("/docs").status_code == 200
    spec = c.get("/openapi.json").json()["paths"]["/v1/recommendations/{user_id}"]["get"]
    assert {p["name"] for p in spec["parameters"]} == {"user_id", "k", "context"}  # hand-parsed, still documented


def test_cold_start_gets_popular_items_in_context(world, server) -> None:
    c = _client(server)
    web = c.get("/v1/recommendations/brand-new-user", params={"k": 10, "context": "device:web"}).json()
    tv = c.get("/v1/recommendations/brand-new-user", params={"k": 10, "context": '{"device": "tv"}'}).json()
    anywhere = c.get("/v1/recommendations/brand-new-user", params={"k": 10}).json()
    assert web["fallback_reason"] == tv["fallback_reason"] == anywhere["fallback_reason"] == "cold_start"
    assert len(web["items"]) == len(tv["items"]) == 10
    assert web["context"] == '{"device": "web"}'
    from serving.popularity import popularity_from_events

    pop = popularity_from_events(world["dataset"].events, days=world["settings"].serving.popularity_days)
    assert [it["item_id"] for it in web["items"]] == pop.top(10, context='{"device": "web"}')[0]
    assert [it["item_id"] for it in anywhere["items"]] == pop.top(10)[0]
    assert 'recsys_fallbacks_total{reason="cold_start"}' in c.get("/metrics").text


@pytest.mark.parametrize("method,path,kwargs,status,needle", [
    ("get", "/v1/recommendations/u1", {"params": {"k": 0}}, 422, "k"),
    ("get", "/v1/recommendations/u1", {"params": {"k": 10_000}}, 422, "k"),
    ("get", "/v1/recommendations/u1", {"params": {"k": "many"}}, 422, "k"),
    ("get", "/v1/recommendations/" + "x" * 300, {}, 422, "user_id"),
    ("get", "/v1/recommendations/u1", {"params": {"context": "{not json"}}, 422, "context"),
    ("get", "/v1/recommendations/u1", {"params": {"context": "nocolon"}}, 422, "context"),
    ("get", "/v1/items/no-such-item/similar", {}, 404, "unknown item_id"),
    ("post", "/v1/events", {"content": b"{broken", "headers": H}, 400, "malformed JSON"),
    ("post", "/v1/events", {"content": b"", "headers": H}, 400, "empty body"),
    ("post", "/v1/events", {"json": {"user_id": "u1"}, "headers": H}, 422, "item_id"),
    ("post", "/v1/events", {"json": {"user_id": "u1", "item_id": "i1", "value": "high"}, "headers": H}, 422, "value"),
    ("post", "/v1/events", {"json": {"user_id": "u1", "item_id": "i1", "event_type": "teleport"}, "headers": H}, 422, "event_type"),
    ("post", "/v1/events", {"json": {"user_id": "u1", "item_id": "i1", "extra": 1}, "headers": H}, 422, "extra"),
    ("post", "/v1/events", {"json": {"user_id": "u1", "item_id": "not-in-catalog"}, "headers": H}, 422, "unknown item_id"),
    ("post", "/v1/events", {"json": [], "headers": H}, 422, "no events"),
    ("post", "/v1/events", {"json": [{"user_id": "u", "item_id": "i1"}] * 1001, "headers": H}, 413, "limit"),
    ("post", "/v1/events", {"content": b"[" + b" " * 1_100_000 + b"]", "headers": H}, 413, "larger than"),
    ("post", "/v1/events", {"json": {"user_id": "u1", "item_id": "i1"}}, 401, "missing API key"),
    ("post", "/v1/events", {"json": {"user_id": "u1", "item_id": "i1"}, "headers": {"X-API-Key": "wrong"}}, 403, "invalid API key"),
    ("post", "/admin/reload", {}, 401, "missing API key"),
    ("get", "/nowhere", {}, 404, "Not Found"),
])
def test_bad_input_gets_a_clear_4xx(server, method, path, kwargs, status, needle) -> None:
    r = getattr(_client(server), method)(path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert needle.lower() in (body["error"] + str(body.get("detail"))).lower()
    assert "Traceback" not in r.text


def test_events_are_durable_update_features_and_log_impressions(world, server) -> None:
    from pipelines.features import OnlineFeatureClient
    from serving.eventlog import read_events, read_records

    c = _client(server)
    user = "events-user-1"
    item = str(world["dataset"].items["item_id"].iloc[5])
    r = c.post("/v1/events", params={"sync_features": "true"}, headers=H,
               json={"events": [{"user_id": user, "item_id": item, "event_type": "purchase", "event_id": "evt-dur-1",
                                 "context": {"device": "tv"}}]})
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1, "event_ids": ["evt-dur-1"], "durable": True, "features_updated": True}
    # on disk before the 202: readable by another process right away
    frame, _ = read_events(world["settings"])
    row = frame[frame["event_id"] == "evt-dur-1"]
    assert len(row) == 1 and row["item_id"].iloc[0] == item and row["context"].iloc[0] == '{"device": "tv"}'
    # the online features saw it: the user is no longer cold and the item is excluded
    feats = OnlineFeatureClient(world["settings"], load_items=False).user_features(user)
    assert item in (feats["recent_items"] or [])
    after = c.get(f"/v1/recommendations/{user}", params={"k": 5}).json()
    assert after["fallback_reason"] is None and item not in {it["item_id"] for it in after["items"]}
    # a batch without sync: acknowledged once durable, client event ids kept, generated ids unique
    batch = [{"user_id": f"batch-user-{i}", "item_id": item, "event_type": "view"} for i in range(20)]
    batch[3]["event_id"] = "evt-batch-3"
    r = c.post("/v1/events", headers=H, json=batch)
    assert r.status_code == 202 and r.json()["accepted"] == 20 and r.json()["durable"] is True
    ids = r.json()["event_ids"]
    assert ids[3] == "evt-batch-3" and len(set(ids)) == 20
    assert set(ids) <= set(read_events(world["settings"])[0]["event_id"])
    # impressions of served requests are logged (asynchronously)
    c.get(f"/v1/recommendations/{_known_user(world)}", params={"k": 3})
    deadline = time.time() + 10
    while time.time() < deadline:
        imps = read_records(world["settings"], "impressions").records
        if imps:
            break
        time.sleep(0.2)
    assert imps and {"request_id", "items", "scores", "positions", "propensities", "model_versions", "variant"} <= set(imps[-1])


def test_an_event_on_one_worker_reaches_the_other_workers_cache_at_once(world) -> None:
    """A one-hour feature cache in both workers: after one worker applies a user's event, the next
    request on either worker already filters the item it names (the host's change stamps made
    the other worker's cached history a miss: ``outcome="changed"`` in the metrics)."""
    from serving.metrics import counter_by_label
    from serving.server import ServerProcess

    s = world["settings"]
    s = s.model_copy(update={"features": s.features.model_copy(update={"online_cache_ttl_s": 3600.0})})
    user = _known_user(world)

    def answers(n: int) -> list[tuple[str, list[str]]]:
        """(worker, top items) of ``n`` requests on fresh connections (SO_REUSEPORT spreads them
        over the workers that are listening); a request id starts with its worker's prefix."""
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            bodies = list(ex.map(lambda _: httpx.get(f"{srv.url}/v1/recommendations/{user}", params={"k": 5},
                                                     timeout=60).json(), range(n)))
        assert all(b["fallback_reason"] is None for b in bodies), bodies
        return [(b["request_id"][:16], [it["item_id"] for it in b["items"]]) for b in bodies]

    def until_both_workers_answered() -> list[tuple[str, list[str]]]:
        # the kernel hashes each fresh connection to a worker: a round of 8 may all land on one
        seen: list[tuple[str, list[str]]] = []
        for _ in range(60):
            seen += answers(8)
            if len({w for w, _ in seen}) == 2:
                return seen
            time.sleep(0.25)
        raise AssertionError(f"one worker answered every request: {lookups()}")

    def lookups() -> dict[str, float]:
        return counter_by_label(httpx.get(srv.url + "/metrics", timeout=60).text, "recsys_feature_cache_lookups", "outcome")

    with ServerProcess(s, workers=2) as srv:
        before = until_both_workers_answered()          # each worker has read the user and cached it
        assert lookups().get("changed", 0) == 0, lookups()
        # an item every answer held (lists may differ slightly with how requests were batched)
        item = next((i for i in before[0][1] if all(i in items for _, items in before)), None)
        assert item is not None, before
        r = httpx.post(srv.url + "/v1/events", params={"sync_features": "true"}, headers=H, timeout=60,
                       json={"user_id": user, "item_id": item, "event_type": "purchase"})
        assert r.status_code == 202 and r.json()["features_updated"] is True, r.text
        after = until_both_workers_answered()
        assert not [items for _, items in after if item in items]  # no worker served the old history
        # the worker that did not apply the event found its cached entry changed and re-read it
        assert lookups().get("changed", 0) >= 1, lookups()


def test_online_store_down_still_serves(world, server) -> None:
    """Kill the online store under the running server (its SQLite file replaced by garbage):
    requests keep getting 200s, marked features_unavailable, ranked with the models' own history."""
    from pipelines.features import feature_paths

    c = _client(server)
    online = feature_paths(world["settings"]).online_db
    # the store is SQLite in WAL mode: recent pages live in -wal/-shm, so all three go
    files = [p for p in (online, online.with_name(online.name + "-wal"), online.with_name(online.name + "-shm")) if p.exists()]
    backups = {p: p.read_bytes() for p in files}
    user = _known_user(world)
    assert c.get(f"/v1/recommendations/{user}").json()["fallback_reason"] is None
    try:
        for p in files:
            p.write_bytes(b"this is not a database" * 2000)
        for _ in range(4):  # both workers
            r = c.get(f"/v1/recommendations/{user}", params={"k": 5})
            assert r.status_code == 200
            assert r.json()["fallback_reason"] == "features_unavailable" and len(r.json()["items"]) == 5
            assert r.json()["model_versions"] == world["versions"]
    finally:
        for p, data in backups.items():
            p.write_bytes(data)
    assert c.get(f"/v1/recommendations/{user}").json()["fallback_reason"] is None


def test_no_model_then_kill_9_then_restart_with_registry_down(world) -> None:
    """Three starts in one (server starts dominate this module's time):

    1. No model (alias of a name never registered, no local copy): popularity answers, /readyz
       is 503 naming the model, and events are still accepted durably.
    2. SIGKILL right after the acks: every acknowledged event is in the log (202 = on disk).
    3. Restart with the registry unreachable: the last loaded artifacts on local disk serve."""
    from serving.eventlog import read_events
    from serving.server import ServerProcess

    s = world["settings"]
    item = str(world["dataset"].items["item_id"].iloc[1])
    no_model = s.model_copy(update={"registry": s.registry.model_copy(update={"retrieval_model": "no_such_model"})})
    ids = [f"crash-{i}" for i in range(40)]
    srv = ServerProcess(no_model, workers=1).start()
    try:
        c = _client(srv)
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "no_such_model" in ready.json()["detail"]["model_error"]
        r = c.get(f"/v1/recommendations/{_known_user(world)}", params={"k": 5})
        assert r.status_code == 200 and r.json()["fallback_reason"] == "model_unavailable" and len(r.json()["items"]) == 5
        assert r.json()["model_versions"] == {}
        assert c.get(f"/v1/items/{world['dataset'].items['item_id'].iloc[0]}/similar").json()["fallback_reason"] == "model_unavailable"
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(lambda e: httpx.post(f"{srv.url}/v1/events", headers=H, timeout=60,
                                                     json={"user_id": "crash-user", "item_id": item, "event_id": e}).status_code, ids))
        assert codes == [202] * len(ids)
    finally:
        srv.kill()
    frame, _ = read_events(s)
    assert set(ids) <= set(frame["event_id"])
    down = s.model_copy(update={"mlflow": s.mlflow.model_copy(update={"tracking_uri": "http://127.0.0.1:9/unreachable"})})
    with ServerProcess(down, workers=1) as again:
        c = _client(again)
        detail = c.get("/readyz").json()["detail"]
        assert detail["model_versions"] == world["versions"] and detail["model_source"] == "local-copy", detail
        r = c.get(f"/v1/recommendations/{_known_user(world)}").json()
        assert r["model_versions"] == world["versions"] and r["fallback_reason"] is None
        assert c.post("/v1/events", headers=H, json={"user_id": "crash-user", "item_id": item}).status_code == 202


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes in LISTEN state on ``port`` (Linux /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.add(f[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[len("socket:["):-1])
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_each_worker_listens_on_its_own_socket_and_a_dead_worker_is_replaced(world, server) -> None:
    """``serving.reuse_port``: each worker has its own listening socket in the port's SO_REUSEPORT
    group (the kernel spreads connections over them; one shared socket let one worker take a whole
    burst of connections); the supervisor keeps no copy, so a killed worker's socket leaves the
    group and new connections all reach the survivor until the supervisor's replacement listens."""
    import os
    import signal as sig

    from serving.server import ReusePortSupervisor, reuse_port_supported

    if not reuse_port_supported():
        pytest.skip("SO_REUSEPORT spreading is Linux-only")
    user = _known_user(world)

    def listeners() -> dict[int, set[str]]:
        inodes = _listening_inodes(server.port)
        return {pid: _socket_inodes(pid) & inodes for pid in [server.proc.pid, *server.child_pids()]}

    by_pid = listeners()
    workers = [pid for pid in by_pid if pid != server.proc.pid and by_pid[pid]]
    assert len(workers) == 2 and not by_pid[server.proc.pid], by_pid  # one each; none in the supervisor
    assert len(by_pid[workers[0]] | by_pid[workers[1]]) == 2 and not by_pid[workers[0]] & by_pid[workers[1]]
    # another server cannot join this port's group
    from uvicorn import Config

    with pytest.raises(SystemExit, match=f"cannot serve on 127.0.0.1:{server.port}"):
        ReusePortSupervisor(Config("serving.app:create_app", factory=True, host="127.0.0.1", port=server.port, workers=2))

    os.kill(workers[0], sig.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and len(_listening_inodes(server.port)) > 1:
        time.sleep(0.05)
    codes = [httpx.get(f"{server.url}/v1/recommendations/{user}", params={"k": 3}, timeout=60).status_code for _ in range(10)]
    assert codes == [200] * 10  # fresh connections, all to the surviving worker
    deadline = time.time() + 120
    while time.time() < deadline:
        by_pid = listeners()
        live = [pid for pid in by_pid if pid != server.proc.pid and by_pid[pid]]
        if len(live) == 2:
            break
        time.sleep(0.5)
    assert len(live) == 2 and workers[0] not in live and workers[1] in live, by_pid  # replaced, with a socket of its own
    assert not by_pid[server.proc.pid]
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(lambda _: httpx.get(f"{server.url}/v1/recommendations/{user}", timeout=60).status_code, range(16)))
    assert codes == [200] * 16


def test_hot_swap_under_load_fails_no_request(world, server) -> None:
    """Move the two-tower alias to a new version while clients hammer the shared server: every
    request succeeds and the new version takes over without a restart. (Runs last: it moves
    the alias the other tests expect.)"""
    from serving import fixtures as F

    s = world["settings"]
    user = _known_user(world)
    stop = threading.Event()
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = c.get(f"/v1/recommendations/{user}", params={"k": 5})
                v = r.json().get("model_versions", {}).get("two_tower", "") if r.status_code == 200 else ""
                with lock:
                    results.append((r.status_code, v))

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        new_version = F.register_two_tower(s, world["model"])  # a new version; the alias moves to it
        deadline = time.time() + 90
        while time.time() < deadline:
            with lock:
                tail = [v for _, v in results[-30:]]
            if tail and all(v == new_version for v in tail):
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    codes = {code for code, _ in results}
    versions = [v for _, v in results]
    assert codes == {200}, f"failed requests during the swap: {codes}"
    assert world["version"] in versions and versions[-1] == new_version, set(versions)
    text = httpx.get(server.url + "/metrics").text
    assert 'recsys_model_swaps_total{model="two_tower",outcome="swapped"}' in text
    after = httpx.get(f"{server.url}/v1/recommendations/{user}").json()
    assert after["model_versions"] == {"two_tower": new_version, "ranker": world["ranker"]}
    assert after["fallback_reason"] is None


def test_reads_can_require_the_key_and_k_is_checked_in_process(tmp_path) -> None:
    """The recommendations route parses ``k``/``context`` and checks the read key itself (no
    FastAPI parameter solving on the hot path): same rules, same clear 4xx messages. No models
    here: the popularity fallback answers."""
    from fastapi.testclient import TestClient

    from core.config import load_settings
    from serving.app import create_app

    s = load_settings(root=tmp_path, environ={}, overrides={"environment": "test", "serving": {
        "api_key": "secret", "require_key_for_reads": True, "registry_poll_s": 0, "max_k": 50}})
    import gc
    import sys

    switch = sys.getswitchinterval()
    with TestClient(create_app(s)) as c:
        # serving.gc_freeze: the start-up heap is out of the cyclic collector's reach
        assert gc.get_freeze_count() > 0 and sys.getswitchinterval() == pytest.approx(s.serving.gil_switch_interval_ms / 1000)
        assert c.get("/v1/recommendations/u1").status_code == 401
        assert c.get("/v1/recommendations/u1", headers={"X-API-Key": "nope"}).status_code == 403
        ok = c.get("/v1/recommendations/u1", params={"k": 3}, headers={"X-API-Key": "secret"})
        assert ok.status_code == 200 and ok.json()["fallback_reason"] == "model_unavailable"
        for k, msg in (("0", "k must be in 1..50"), ("51", "k must be in 1..50"), ("x", "k must be an integer")):
            r = c.get("/v1/recommendations/u1", params={"k": k}, headers={"X-API-Key": "secret"})
            assert r.status_code == 422 and msg in r.json()["error"], r.json()
            assert r.json()["detail"][0]["loc"] == ["query", "k"]
        r = c.get("/v1/recommendations/u1", params={"context": "x" * 600}, headers={"X-API-Key": "secret"})
        assert r.status_code == 422 and "context" in r.json()["error"]
    assert gc.get_freeze_count() == 0 and sys.getswitchinterval() == switch  # shutdown gives the process back


def test_fast_path_and_framework_route_answer_alike(tmp_path) -> None:
    """The middleware's fast path for ``GET /v1/recommendations/{user_id}`` and the framework's
    route (the same handler behind FastAPI's routing) give the same statuses, bodies and headers:
    auth, bad k/context, long ids, percent-encoded ids, repeated query keys (last wins), extra path
    segments (404 from the router) and the happy path (no models: the popularity fallback)."""
    from fastapi.testclient import TestClient

    from core.config import load_settings
    from serving.app import LimitsAndMetrics, create_app

    s = load_settings(root=tmp_path, environ={}, overrides={"environment": "test", "serving": {
        "api_key": "secret", "require_key_for_reads": True, "registry_poll_s": 0, "max_k": 50}})
    framework_only = create_app(s)
    for mw in framework_only.user_middleware:
        if mw.cls is LimitsAndMetrics:
            mw.kwargs["fast_get"] = None
    key = {"X-API-Key": "secret"}
    cases = [("/v1/recommendations/u1", {}, {}), ("/v1/recommendations/u1", {}, {"X-API-Key": "nope"}),
             ("/v1/recommendations/u1", {"k": "3"}, key), ("/v1/recommendations/u1", {"k": "0"}, key),
             ("/v1/recommendations/u1", {"k": "x"}, key), ("/v1/recommendations/u1", {"context": "x" * 600}, key),
             ("/v1/recommendations/u1", {"context": "nocolon"}, key), ("/v1/recommendations/" + "x" * 300, {}, key),
             ("/v1/recommendations/a%20b", {"k": "2"}, key), ("/v1/recommendations/u1?k=2&k=4", {}, key),
             ("/v1/recommendations/u1?k=2&k=51", {}, key),
             ("/v1/recommendations/u1/more", {}, key), ("/v1/recommendations/", {}, key)]
    with TestClient(create_app(s)) as fast, TestClient(framework_only) as slow:
        for path, params, headers in cases:
            a, b = fast.get(path, params=params, headers=headers), slow.get(path, params=params, headers=headers)
            assert a.status_code == b.status_code, (path, params, a.text, b.text)
            assert a.headers.get("content-type") == b.headers.get("content-type")
            ja, jb = a.json(), b.json()
            if a.status_code == 200:
                for volatile in ("request_id", "timings_ms"):
                    ja.pop(volatile), jb.pop(volatile)
            assert ja == jb, (path, params)
        assert fast.get("/v1/recommendations/u1?k=2&k=51", headers=key).status_code == 422  # the last k counts


def test_model_stage_over_budget_falls_back_to_popular(world) -> None:
    """A model stage that overruns its deadline hands the request to the popularity fallback:
    a 200 marked ``timeout`` with k items, never a 5xx (in-process app on the same registry)."""
    from fastapi.testclient import TestClient

    from serving.app import create_app

    s = _settings(world["root"], model_budget_ms=0.001, registry_poll_s=0)
    with TestClient(create_app(s)) as c:
        assert c.get("/readyz").json()["detail"]["models_loaded"] is True
        r = c.get(f"/v1/recommendations/{_known_user(world)}", params={"k": 6})
        assert r.status_code == 200
        body = r.json()
        assert body["fallback_reason"] == "timeout" and len(body["items"]) == 6 and body["model_versions"] == {}
