"""The Locust user that benchmarks.load starts headless for the soak and the fault runs.

It sends the plan's bodies in the plan's order (photos with bad inputs mixed in) as fast as the
server answers (a closed loop of ``--users`` clients), renews the inference key when TorchServe
refuses it (a plan for the app has no key file: the app holds the key), and on exit writes one record
per request (kind, expected and actual status, start time, latency; whether an error's body was
JSON {"error"}, a 503's Retry-After) so that the driver can judge every request, not only Locust's aggregates. With the
plan's ``wait_on_503`` a client that got a 503 waits its Retry-After first. The last client to find
the plan exhausted stops the run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

from handlers.settings import RETRY_AFTER_S
from handlers.tokens import Keys, refused

PLAN = json.loads(Path(os.environ["LANDMARK_LOAD_PLAN"]).read_text(encoding="utf-8"))
ITEMS = [{**item, "body": Path(item["file"]).read_bytes()} for item in PLAN["items"]]
SCHEDULE = iter(enumerate(PLAN["schedule"]))
KEYS = Keys(Path(PLAN["key_file"]), PLAN["management_url"]) if PLAN["key_file"] else None
RECORDS: list[dict] = []
IN_FLIGHT = 0  # greenlets switch only at I/O, so plain counters are safe


def json_error(text: str) -> bool:
    """Whether an answer's body is a JSON object with an "error" (the handler's and the app's error format)."""
    try:
        return "error" in json.loads(text)
    except (ValueError, TypeError):
        return False


class PlanUser(FastHttpUser):
    wait_time = constant(0)

    def post(self, item: dict, headers: dict[str, str]):
        with self.client.post(PLAN["path"], data=item["body"], headers=headers, name=item["kind"],
                              catch_response=True) as r:
            text = (r.text or "") if r.status_code else ""
            if r.status_code == item["expect"] or refused(r.status_code, text):
                r.success()
            else:
                r.failure(f"HTTP {r.status_code}, expected {item['expect']}")
            return r, text

    @task
    def send_next(self) -> None:
        global IN_FLIGHT
        try:
            seq, index = next(SCHEDULE)
        except StopIteration:
            if IN_FLIGHT == 0:
                gevent.spawn(self.environment.runner.quit)
            raise StopUser() from None
        item = ITEMS[index]
        IN_FLIGHT += 1
        start, t = time.time(), time.perf_counter()
        try:
            headers = {**(KEYS.inference_headers() if KEYS else {}), "Content-Type": item["content_type"]}
            r, text = self.post(item, headers)
            if KEYS and refused(r.status_code, text):
                stale = headers["Authorization"].removeprefix("Bearer ")
                r, text = self.post(item, {**headers, "Authorization": f"Bearer {KEYS.renew('inference', stale)}"})
        finally:
            IN_FLIGHT -= 1
        record = {"seq": seq, "kind": item["kind"], "expect": item["expect"], "status": r.status_code,
                  "start": start, "ms": (time.perf_counter() - t) * 1e3}
        if r.status_code != item["expect"]:
            record["error"] = (text or str(getattr(r, "error", "")))[:300]
        if r.status_code != 200:  # an error must say what went wrong, as JSON {"error": ...}
            record["json_error"] = json_error(text)
        if r.status_code == 503:
            record["retry_after"] = r.headers.get("Retry-After")
        RECORDS.append(record)
        if r.status_code == 503 and PLAN["wait_on_503"]:
            after = record["retry_after"]
            gevent.sleep(float(after) if after and after.isdigit() else RETRY_AFTER_S)


@events.quitting.add_listener
def write_records(environment, **_) -> None:
    Path(PLAN["records"]).write_text(json.dumps(sorted(RECORDS, key=lambda r: r["seq"])), encoding="utf-8")
