"""The `bubogpt` command line (workflows/cli.py): `workflows/` has no import cycle and nothing imports
the CLI; user errors end in one line and exit code 2 for every subcommand; a command never hangs on
a Ray address where no cluster answers; Ray's noise stays off the demo's terminal."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from workflows.cli import main

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"


# --- imports ----------------------------------------------------------------------------------------


def workflow_imports() -> dict[str, set[str]]:
    """{workflows module: the workflows modules it imports} -- top-level and function-level imports."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in WORKFLOWS.rglob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "visiting" | "done"

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "visiting"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "visiting":
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_workflows_have_no_import_cycle_and_nothing_imports_the_cli():
    graph = workflow_imports()
    assert {"workflows.cli", "workflows.train", "workflows.quickstart", "workflows.evaluate"} <= set(graph)
    assert "workflows.options" in graph["workflows.train"]  # the graph sees function-level imports too
    assert "workflows.train" in graph["workflows.quickstart"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    importers = sorted(name for name, imported in graph.items() if "workflows.cli" in imported)
    assert importers == [], f"{importers} import workflows.cli"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


# --- user errors: one line on stderr, exit code 2 ---------------------------------------------------


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(text in lines[0] for text in expected), lines[0]
    return lines[0]


def test_user_errors_without_data(tmp_path, capsys):
    missing = tmp_path / "missing"
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.json").write_text("{not json")
    one_line_error(capsys, ["train", "--out", str(tmp_path / "o"), "--stage", "stage1"], "bubogpt train:", "--data is required")
    one_line_error(capsys, ["train", "--data", str(missing), "--out", str(tmp_path / "o")], "bubogpt train:", str(missing), "not a prepared corpus")
    one_line_error(capsys, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")], "not a prepared corpus")  # a folder, but not prepared
    one_line_error(capsys, ["train", "--stage", "grounding", "--out", str(tmp_path / "g"), "--config", str(tmp_path / "bad.json")],
                   "bubogpt train:", "bad.json", "not valid JSON")  # fmt: skip
    one_line_error(capsys, ["data", "prepare", "--input", str(missing), "--out", str(tmp_path / "p")], "bubogpt data prepare:", str(missing))
    one_line_error(capsys, ["data", "synth", "--out", str(tmp_path / "file")], "bubogpt data synth:", "not a folder")
    one_line_error(capsys, ["eval", "--model", str(missing), "--data", str(missing)], "bubogpt eval:", "not a prepared corpus")
    one_line_error(capsys, ["serve", "--model", str(missing)], "bubogpt serve:", "not a BuboGPT model directory")
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()  # nothing was started


def test_user_errors_with_a_prepared_corpus(prepared_small_corpus, tmp_path, capsys):
    data = str(prepared_small_corpus.prepared_dir)
    out = str(tmp_path / "o")
    (tmp_path / "bad.json").write_text('{"stage1": {"max_steps": 3,}}')
    (tmp_path / "bad.yaml").write_text("stage1: [unclosed")
    (tmp_path / "unknown.json").write_text(json.dumps({"stage1": {"learning_rate": 1.0}}))
    (tmp_path / "wrong_type.json").write_text(json.dumps({"stage1": {"batch_size": "big"}}))
    one_line_error(capsys, ["train", "--data", data, "--out", out, "--stage", "stage3"], "bubogpt train:", "no stage 'stage3'")
    one_line_error(capsys, ["train", "--data", data, "--out", out, "--config", str(tmp_path / "bad.json")], "bad.json", "not valid JSON")
    one_line_error(capsys, ["train", "--data", data, "--out", out, "--config", str(tmp_path / "bad.yaml")], "bad.yaml", "not valid YAML")
    one_line_error(capsys, ["train", "--data", data, "--out", out, "--config", str(tmp_path / "missing.json")], "cannot read the config file")
    one_line_error(capsys, ["train", "--data", data, "--out", out, "--config", str(tmp_path / "unknown.json")], "learning_rate")
    one_line_error(capsys, ["train", "--data", data, "--out", out, "--config", str(tmp_path / "wrong_type.json")], "bad TrainConfig values")
    one_line_error(capsys, ["train", "--data", data, "--out", out, "--preset", "7b", "--stage", "stage1"], "pass --init")
    one_line_error(capsys, ["eval", "--model", str(tmp_path / "nothing"), "--data", data], "bubogpt eval:", "not a BuboGPT model directory")


# --- Ray connections: bounded, with a one-line error ------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bubogpt(*argv: str, env: dict | None = None, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "workflows.cli", *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip
    return result, time.monotonic() - started


def last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


def test_an_address_where_nothing_listens_fails_at_once(prepared_small_corpus, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = {"RAY_TMPDIR": str(tmp_path / "ray_tmp"), "RAY_ADDRESS": ""}
    result, seconds = bubogpt("data", "prepare", "--input", str(prepared_small_corpus.corpus_dir), "--out",
                              str(tmp_path / "p"), "--address", address, env=env)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith("bubogpt data prepare: no Ray cluster answers at " + address) and "--address" in line
    assert seconds < 60


def test_a_stale_address_file_is_named_with_what_to_do(prepared_small_corpus, tmp_path):
    """`ray start` left $RAY_TMPDIR/ray/ray_current_cluster for a cluster that has stopped: a plain
    command (no --address) follows it, and must not retry it for ever."""
    ray_tmp = tmp_path / "rt"  # short: Ray's socket paths live under it
    (ray_tmp / "ray").mkdir(parents=True)
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    result, seconds = bubogpt("train", "--data", str(prepared_small_corpus.prepared_dir), "--out", str(tmp_path / "t"),
                              "--stage", "stage1", "--max-steps", "1", env={"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""})  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith(f"bubogpt train: no Ray cluster answers at {dead}"), line
    assert str(ray_tmp / "ray" / "ray_current_cluster") in line and "ray stop" in line
    assert seconds < 60


def test_a_cluster_that_listens_but_never_answers_is_given_up_on(prepared_small_corpus, tmp_path):
    with socket.socket() as silent:  # accepts TCP connections (into its backlog) and never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        env = {"RAY_TMPDIR": str(tmp_path / "rt"), "RAY_ADDRESS": "", "BUBOGPT_RAY_CONNECT_TIMEOUT_S": "10"}
        result, seconds = bubogpt("data", "prepare", "--input", str(prepared_small_corpus.corpus_dir), "--out",
                                  str(tmp_path / "p"), "--address", address, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result) == (f"gave up connecting to Ray at {address} (--address) after 10 s: "
                                 "check that the cluster is up and the address is right")  # fmt: skip
    assert seconds < 90


def test_forget_cluster_removes_only_the_named_address(tmp_path, monkeypatch):
    from workflows.ray_connect import address_file, forget_cluster, resolve_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = address_file()
    assert path == tmp_path / "ray" / "ray_current_cluster"
    path.parent.mkdir()
    path.write_text("10.0.0.1:6379")
    assert resolve_address(None)[0] == "10.0.0.1:6379"
    assert not forget_cluster("10.0.0.2:6379") and path.is_file()  # another cluster's record stays
    assert forget_cluster("10.0.0.1:6379") and not path.exists()
    # `ray start --node-ip-address 127.0.0.1` records the node's IP: the same cluster for Ray.
    from ray._private.services import canonicalize_bootstrap_address

    path.write_text(canonicalize_bootstrap_address("127.0.0.1:6379"))
    assert forget_cluster("127.0.0.1:6379") and not path.exists()
    assert resolve_address(None) == (None, "a new local Ray")


# --- the demo's terminal ----------------------------------------------------------------------------


def test_ray_noise_is_filtered_from_the_terminal_only(ray_session, capsys):
    """`quiet_ray_noise` wraps Ray's own log-to-driver printer: noise is dropped, the rest printed."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from workflows.ray_connect import quiet_ray_noise

    saved = list(dispatcher.handlers)
    assert any(name == "ray_print_logs" for name, _ in saved)  # the session's Ray prints worker output
    try:
        quiet_ray_noise()
        quiet_ray_noise()  # idempotent: wraps once
        batch = {"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": 4242, "job": "01000000", "is_err": True,
                 "task_name": None, "actor_name": "PlacementGroupCleaner",
                 "lines": ["Failed to query Ray Train Controller actor state. State API may be temporarily unavailable."]}  # fmt: skip
        dispatcher.emit(batch)
        dispatcher.emit({**batch, "actor_name": "RayTrainWorker", "lines": [
            "/x/execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated",
            "  self.exclude_resources = exclude_resources",
            "[bubogpt train] stage1 step 4/4 (100%) loss 5.1658",
        ]})  # fmt: skip
        time.sleep(0.2)
        printed = capsys.readouterr()
        text = printed.out + printed.err
        assert "[bubogpt train] stage1 step 4/4" in text and text.count("[bubogpt train]") == 1
        assert "PlacementGroupCleaner" not in text and "RayDeprecationWarning" not in text
        assert "exclude_resources = exclude_resources" not in text
    finally:
        with dispatcher._lock:
            dispatcher.handlers[:] = saved


def test_quickstart_on_an_unreachable_cluster_fails_before_starting_anything(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    result, seconds = bubogpt("quickstart", "--workdir", str(tmp_path / "q"), "--address", address,
                              env={"RAY_TMPDIR": str(tmp_path / "rt"), "RAY_ADDRESS": ""})  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result).startswith(f"bubogpt quickstart: no Ray cluster answers at {address}")
    assert not (tmp_path / "q" / "mlflow").exists()  # no MLflow server was left running
    assert seconds < 60
