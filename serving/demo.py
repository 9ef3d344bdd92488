"""Demo step: start the real server, show recommendations, post an event, show its effect."""
from __future__ import annotations

from typing import Any


def step_serve(settings: Any, state: Any) -> str:
    """Start the API on a free loopback port (1 worker), print real recommendations for a few
    users and a cold-start user, post an event (read-your-writes) and show that the user's next
    recommendations exclude the item, then stop the server."""
    import secrets

    import httpx

    from core.lake import Lake
    from serving.server import ServerProcess

    key = settings.serving.api_key or secrets.token_hex(8)
    s = settings.model_copy(update={"serving": settings.serving.model_copy(update={"api_key": key, "registry_poll_s": 0})})
    events = Lake(s.paths.lake_dir).read_events()
    users = events["user_id"].value_counts().index[:3].astype(str).tolist() if len(events) else ["demo-user"]
    lines = []
    with ServerProcess(s, workers=1) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        ready = c.get("/readyz").json()
        lines.append(f"server at {srv.url} ({ready['status']}; models {ready['detail']['model_versions'] or 'none'})")
        first = None
        for u in users + ["brand-new-user"]:
            r = c.get(f"/v1/recommendations/{u}", params={"k": 5}).json()
            first = first or r
            lines.append(f"  {u}: {[it['item_id'] for it in r['items']]} "
                         f"(fallback: {r['fallback_reason']}, {r['timings_ms'].get('total', 0):.1f} ms)")
        item = first["items"][0]["item_id"] if first and first["items"] else None
        if item is not None:
            ack = c.post("/v1/events", params={"sync_features": "true"}, headers={s.serving.api_key_header: key},
                         json={"user_id": users[0], "item_id": item, "event_type": "purchase"})
            after = c.get(f"/v1/recommendations/{users[0]}", params={"k": 5}).json()
            still = item in [it["item_id"] for it in after["items"]]
            lines.append(f"  POST /v1/events {users[0]} purchased {item}: {ack.status_code} {ack.json()}; "
                         f"next list {[it['item_id'] for it in after['items']]} "
                         f"({'still contains' if still else 'no longer contains'} {item})")
    if isinstance(getattr(state, "values", None), dict):
        state.values["serve"] = lines
    print("\n".join(lines))
    return lines[0] + f"; {len(users) + 1} users served, one event took effect"
