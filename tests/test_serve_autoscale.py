"""Autoscaling observed: under load the LLM deployment scales from 1 to 2 replicas, and after the load
it returns to 1, with no failed request in between.

The application is deployed beside `serve_app` (its own name and route prefix, on the session's
Serve), with serve/config.yaml's options except: the LLM's autoscaling delays and target are the
test's own (seconds, not minutes), and its replicas reserve a quarter CPU each (fractional, so two
fit beside the rest of the session on 2 CPUs). The load is text-only, greedy: every answer must
equal its request's answer alone.
"""

import threading
import time
from collections import Counter

from serve.loadgen import run_load
from serve_harness import API_KEY, deploy_beside, deployment_options_for_tests

APP = "autoscale"
SCALING = {
    "min_replicas": 1, "max_replicas": 2,
    "target_ongoing_requests": 2,  # 8 clients keep ~8 requests at the LLM: 2 replicas wanted
    "metrics_interval_s": 0.5, "look_back_period_s": 2,
    "upscale_delay_s": 2, "downscale_delay_s": 5,
}  # fmt: skip
CLIENTS = 8


def llm_replicas() -> Counter:
    """The LLM deployment's replicas by state (RUNNING, STARTING, STOPPING, ...), from the controller."""
    from ray import serve

    # Keys are ReplicaState (a str enum) or, as Ray 2.60's serve.status() returns them, plain str.
    return Counter({getattr(state, "value", state): n for state, n in
                    serve.status().applications[APP].deployments["LLM"].replica_states.items()})  # fmt: skip


def wait_for(condition, timeout_s: float, what: str, on_timeout=lambda: "") -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what} did not happen within {timeout_s} s: {llm_replicas()} {on_timeout()}")
        time.sleep(0.25)
    return time.monotonic() - start


def test_the_llm_deployment_scales_up_under_load_and_back_down_after_it(serve_app):
    from serve.settings import ServeSettings

    options = deployment_options_for_tests()
    options["LLM"].pop("num_replicas")
    options["LLM"] |= {"autoscaling_config": SCALING, "graceful_shutdown_timeout_s": 30,
                       "ray_actor_options": {**options["LLM"]["ray_actor_options"], "num_cpus": 0.25}}  # fmt: skip
    app, delete = deploy_beside(serve_app, APP, ServeSettings.from_dict(serve_app.settings), options)
    try:
        payloads = [{"message": f"Tell me something, number {i}.", "max_new_tokens": 24, "temperature": 0}
                    for i in range(6)]  # fmt: skip
        alone = [app.chat(**payload)["answer"] for payload in payloads]  # one at a time, one replica
        assert llm_replicas() == {"RUNNING": 1}

        stop, reports = threading.Event(), []
        load = threading.Thread(target=lambda: reports.append(run_load(
            app.url, payloads, CLIENTS, seconds=300, api_key=API_KEY, stop=stop)))
        load.start()
        try:
            up_s = wait_for(lambda: llm_replicas()["RUNNING"] == 2, 120, "scaling up to 2 LLM replicas")
            time.sleep(3)  # requests reach the new replica too
            assert llm_replicas()["RUNNING"] == 2  # the load keeps both
        finally:
            stop.set()
            load.join(150)
        [report] = reports
        down_s = wait_for(lambda: llm_replicas() == {"RUNNING": 1}, 90, "scaling back down to 1 LLM replica")
        print(f"\nscaled up after {up_s:.1f} s of load, back down {down_s:.1f} s after it\n{report.table()}")

        assert report.failures == [], report.failures[:3]  # every request got an HTTP answer ...
        assert dict(report.statuses) == {200: report.ok} and report.ok >= CLIENTS  # ... and it was a 200
        wrong = [(i, answer) for i, answer in report.answers if answer != alone[i]]
        assert not wrong, f"{len(wrong)} answers differ from the request's answer alone: {wrong[:3]}"
        # and the application still answers on the one replica left
        assert app.chat(**payloads[0])["answer"] == alone[0]
    finally:
        delete()
