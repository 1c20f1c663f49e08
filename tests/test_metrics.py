"""The Prometheus exporter: families over real HTTP on 127.0.0.1, both stages of a Ray run scraped mid-run, the
Grafana dashboard against what the exporter emits, and a real Prometheus (Debian's) scraping a run."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import _free_port
from prometheus_client.parser import text_string_to_metric_families

from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.memory.tiers import TierSet
from flexgen_dist.observability.metrics import RunMetrics, serve
from flexgen_dist.runtime.stage_snapshot import StageSnapshot, take_snapshot

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
STAGE_SAMPLES = ("flexgen_stage_compute_seconds_total", "flexgen_stage_idle_seconds_total",
                 "flexgen_stage_io_seconds_total", "flexgen_stage_io_wait_seconds_total", "flexgen_io_bytes_total",
                 "flexgen_memory_bytes")
NO_PROMETHEUS = ("prometheus/promtool not installed: `apt-get install prometheus` (launch/setup_prometheus.sh does it "
                 "as root, as launch/test.sh runs it in CI)")


def _snapshot(compute_s: float, idle_s: float = 1.0) -> StageSnapshot:
    return StageSnapshot(compute_s=compute_s, io_wait_s={"weights": 0.5}, io_s={"weights": 2.0},
                         io_bytes={("disk", "gpu"): 4096}, idle_s=idle_s, memory_bytes={"gpu": 100, "cpu": 0, "disk": 7})


def _fed_metrics() -> RunMetrics:
    """A RunMetrics with every family fed: one prefill and one decode step (one row of it a stopped sequence's), two
    sequences finished of four, two error records, stage 1 restarted once."""
    metrics = RunMetrics()
    metrics.set_budget(MemoryBudget(gpu=1000))
    metrics.run_started(4)
    metrics.prefill_done(prompt_tokens=10, new_tokens=4)
    metrics.decode_done(new_tokens=4, finished_rows=1, latency_s=0.05)
    metrics.sequences_finished(["eos", "length"])
    metrics.requests_refused(2)
    metrics.stage_restarted(1)
    return metrics


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label items: value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def _stages(samples: dict[str, dict[tuple, float]], name: str) -> set[str]:
    return {dict(labels)["stage"] for labels in samples.get(name, {})}


def test_exporter_serves_every_family_over_http():
    metrics = _fed_metrics()
    answers = [[_snapshot(3.0), _snapshot(1.0)], [_snapshot(2.5), None]]  # then: stage 0 lower, stage 1 silent
    port = _free_port()
    with serve(metrics, "127.0.0.1", port) as url, metrics.stages.reading(lambda: answers.pop(0)):
        assert url == f"http://127.0.0.1:{port}/metrics"
        first, second = _scrape(url), _scrape(url)
    assert first["flexgen_generated_tokens_total"][()] == 8
    assert first["flexgen_prompt_tokens_total"][()] == 10
    assert first["flexgen_requests_total"] == {(("status", "eos"),): 1, (("status", "stop"),): 0,
                                               (("status", "length"),): 1, (("status", "error"),): 2}
    assert first["flexgen_pending_sequences"][()] == 2
    assert first["flexgen_decode_row_steps_total"] == {(("state", "live"),): 4, (("state", "finished"),): 1}
    assert first["flexgen_time_per_output_token_seconds_count"][()] == 1
    assert first["flexgen_time_per_output_token_seconds_sum"][()] == pytest.approx(0.05)
    assert first["flexgen_generation_throughput_tokens_per_second"][()] > 0
    assert first["flexgen_memory_budget_bytes"] == {(("tier", "gpu"),): 1000}
    assert first["flexgen_stage_compute_seconds_total"] == {(("stage", "0"),): 3.0, (("stage", "1"),): 1.0}
    assert first["flexgen_stage_io_seconds_total"][(("kind", "weights"), ("stage", "1"))] == 2.0
    assert first["flexgen_io_bytes_total"][(("dst", "gpu"), ("src", "disk"), ("stage", "0"))] == 4096
    assert first["flexgen_memory_bytes"][(("stage", "1"), ("tier", "disk"))] == 7
    # A counter never goes down, and a stage that did not answer keeps its last figures.
    assert second["flexgen_stage_compute_seconds_total"] == first["flexgen_stage_compute_seconds_total"]
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)  # the server is gone after the block


def test_linger_serves_until_a_scrape_has_read_the_final_figures():
    metrics = _fed_metrics()
    port = _free_port()
    done = threading.Event()

    def run() -> None:
        with serve(metrics, "127.0.0.1", port, linger_s=60):
            metrics.finish()
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert not done.wait(1.0), "the server must stay up until it is scraped"
        _scrape(f"http://127.0.0.1:{port}/metrics")
        assert done.wait(10), "a scrape after the end must release the linger"
    finally:
        thread.join(70)


def test_a_stalled_client_does_not_hold_the_exit(monkeypatch):
    from flexgen_dist.observability import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "REQUEST_TIMEOUT_S", 1.0)
    port = _free_port()
    with serve(RunMetrics(), "127.0.0.1", port):
        stalled = socket.create_connection(("127.0.0.1", port))  # connects, never sends a request
        time.sleep(0.2)
        start = time.monotonic()
    elapsed = time.monotonic() - start
    stalled.close()
    assert elapsed < 10, f"closing the server waited {elapsed:.1f} s for a client that sent nothing"


def _generate_argv(model_dir: Path, tmp_path: Path, *flags: str, sequences: int = 12) -> list[str]:
    """A run slow enough to be scraped a few times: the tiny model, one sequence per batch, weights read from disk."""
    return [sys.executable, "-m", "flexgen_dist", "generate", "--model", str(model_dir), "--synthetic", str(sequences),
            "--prompt-len", "8", "--max-new-tokens", "64", "--ignore-eos", "--gpu-batch-size", "1",
            "--percent", "0", "0", "100", "0", "100", "0", "--dtype", "float32", "--device", "cpu",
            "--offload-dir", str(tmp_path / "offload"), "--output", str(tmp_path / "out.jsonl"), "--quiet", *flags]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_port_in_use_is_one_line_and_exit_2(tmp_path, opt_preln_dir, capsys):
    from flexgen_dist.cli import main

    argv = _generate_argv(opt_preln_dir, tmp_path, "--executor", "local")[3:]  # in-process: the `generate ...` part
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = main([*argv, "--metrics-port", str(port)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"--metrics-port {port}" in err and "in use" in err, err
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--metrics-port", "70000"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "0-65535" in err, err
    assert not (tmp_path / "out.jsonl").exists(), "the port is checked before anything is written"


def test_two_stage_ray_run_shows_both_stages_mid_run(tmp_path, ray_cluster, opt_preln_dir):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    proc = subprocess.Popen(_generate_argv(opt_preln_dir, tmp_path, "--stages", "2", "--ray-address",
                                           ray_cluster["address"], "--metrics-port", str(port), sequences=6),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen, deadline = None, time.monotonic() + 120
        while seen is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                samples = _scrape(url)
            except OSError:  # not serving yet
                time.sleep(0.2)
                continue
            running = samples["flexgen_pending_sequences"][()] > 0 and samples["flexgen_generated_tokens_total"][()] > 0
            if running and all(_stages(samples, name) == {"0", "1"} for name in STAGE_SAMPLES):
                seen = samples
            time.sleep(0.2)
        out, err = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err[-2000:]
    assert seen is not None, "no scrape during the run showed every per-stage family for stages 0 and 1"
    for stage in ("0", "1"):
        assert seen["flexgen_stage_compute_seconds_total"][(("stage", stage),)] > 0
        assert seen["flexgen_io_bytes_total"][(("dst", "gpu"), ("src", "disk"), ("stage", stage))] > 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert seen["flexgen_generated_tokens_total"][()] < summary["generated_tokens"]


# Words in PromQL expressions that are not metric names.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "inf", "nan"}


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: legends, label values, regexes
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        followed_by_call = expr[m.end():].lstrip().startswith("(")
        if not followed_by_call and m.group() not in _PROMQL_WORDS and not m.group().startswith("$"):
            names.add(m.group())
    return names


def test_dashboard_queries_name_only_metrics_the_exporter_emits():
    metrics = _fed_metrics()
    port = _free_port()
    with serve(metrics, "127.0.0.1", port) as url, metrics.stages.reading(lambda: [_snapshot(1.0)]):
        emitted = set(_scrape(url))
    dashboard = json.loads((MONITORING / "grafana" / "flexgen-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    # Grafana's label_values(SERIES, LABEL) is not PromQL: its first argument is.
    queries += [re.fullmatch(r"label_values\((.+),\s*\w+\)", v["definition"]).group(1)
                for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(dashboard["panels"]) >= 7 and all(p["targets"] for p in dashboard["panels"])
    used = set()
    for query in queries:
        names = _metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= emitted, f"{query!r} names {sorted(names - emitted)}, which the exporter does not emit"
        used |= names
    # Each family the issue asks for is on the dashboard.
    for family in ("flexgen_generated_tokens_total", "flexgen_prompt_tokens_total", "flexgen_requests_total",
                   "flexgen_generation_throughput_tokens_per_second", "flexgen_time_per_output_token_seconds_bucket",
                   "flexgen_stage_compute_seconds_total", "flexgen_stage_io_seconds_total", "flexgen_io_bytes_total",
                   "flexgen_memory_bytes", "flexgen_stage_idle_seconds_total", "flexgen_pending_sequences"):
        assert family in used, family


def test_metric_name_extraction_sees_through_promql():
    assert _metric_names('histogram_quantile(0.9, sum by (le, instance) (rate(a_bucket{x=~"$i"}[5m])))') == {"a_bucket"}
    assert _metric_names("b / on (tier) group_left c > 0.95 and d") == {"b", "c", "d"}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_monitoring_files_pass_promtool():
    if shutil.which("promtool") is None:
        pytest.skip(NO_PROMETHEUS)
    for args in (("check", "config", str(MONITORING / "prometheus.yml")),
                 ("check", "rules", str(MONITORING / "alerts.yml")),
                 ("test", "rules", str(MONITORING / "alerts_test.yml"))):
        result = _promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def _api(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def _query(prometheus: str, query: str) -> list[dict]:
    return _api(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": query}))["result"]


SCRAPED_SEQUENCES = 48


def _scrape_config(target: str, tmp_path: Path) -> Path:
    """The shipped config with this run as the flexgen target, scraped every second; Ray's job left out."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / name) for name in config["rule_files"]]
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "flexgen"]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start_prometheus(config: Path, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    with open(tmp_path / "prometheus.log", "w") as log:
        proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                return proc, url
        except OSError:
            if time.monotonic() > deadline:
                _stop(proc)
                pytest.fail("prometheus was not ready within 60 s")
            time.sleep(0.2)


def test_prometheus_scrapes_a_run(tmp_path, opt_preln_dir):
    if shutil.which("prometheus") is None:
        pytest.skip(NO_PROMETHEUS)
    port = _free_port()
    prometheus, api = _start_prometheus(_scrape_config(f"127.0.0.1:{port}", tmp_path), tmp_path)
    run = None
    try:
        groups = _api(f"{api}/api/v1/rules")["groups"]  # the shipped alert rules load
        assert {r["name"] for g in groups for r in g["rules"]} == {"FlexgenGenerationStalled", "FlexgenTierNearBudget",
                                                               "FlexgenStageRestarted"}
        # 48 sequences: ~10 s on the AVX-512 development machine, where 12 (2.4 s) ended before Prometheus's first
        # scrape of the new target.
        run = subprocess.Popen(_generate_argv(opt_preln_dir, tmp_path, "--executor", "local", "--metrics-port",
                                              str(port), "--metrics-linger", "30", sequences=SCRAPED_SEQUENCES),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        tokens = sum(len(r["output_ids"]) for r in records)
        assert tokens == json.loads(out.strip().splitlines()[-1])["generated_tokens"] == SCRAPED_SEQUENCES * 64

        series = _query(api, 'flexgen_generated_tokens_total{job="flexgen"}[10m]')
        assert len(series) == 1, series
        values = [float(v) for _, v in series[0]["values"]]
        print(f"scraped flexgen_generated_tokens_total: {values}; tokens in the output file: {tokens}")
        assert values == sorted(values), "a counter must not go down"
        assert any(0 < v < tokens for v in values), "no scrape saw the counter mid-run"
        assert values[-1] == tokens
        # The run is over and its target stale: ask for the last value scraped.
        compute = _query(api, "last_over_time(flexgen_stage_compute_seconds_total[10m])")
        assert [s["metric"]["stage"] for s in compute] == ["0"] and float(compute[0]["value"][1]) > 0
    finally:
        if run is not None:
            _stop(run)
        _stop(prometheus)


def test_known_kinds_are_exported_at_zero_before_any_transfer():
    """A resident run moves nothing between tiers; its stages still show every transfer and stall kind, at 0."""
    tiers = TierSet(torch.device("cpu"), None)
    metrics = RunMetrics()
    with serve(metrics, "127.0.0.1", _free_port()) as url, \
            metrics.stages.reading(lambda: [take_snapshot(tiers, busy_s=1.0, span_s=1.5, overlap=True)]):
        samples = _scrape(url)
    assert samples["flexgen_stage_io_seconds_total"] == {(("kind", k), ("stage", "0")): 0.0
                                                         for k in ("weights", "cache", "dequantize")}
    assert samples["flexgen_stage_io_wait_seconds_total"] == {(("kind", k), ("stage", "0")): 0.0
                                                              for k in ("weights", "cache", "drain")}
    assert samples["flexgen_stage_compute_seconds_total"] == {(("stage", "0"),): 1.0}


def test_decode_row_steps_are_exported_at_zero_before_any_step():
    with serve(RunMetrics(), "127.0.0.1", _free_port()) as url:
        samples = _scrape(url)
    assert samples["flexgen_decode_row_steps_total"] == {(("state", "live"),): 0.0, (("state", "finished"),): 0.0}


def test_each_stage_placement_is_a_gauge_per_tensor_and_tier():
    metrics = RunMetrics()
    metrics.set_stage_placement(0, {"weights": (100.0, 0.0, 0.0), "cache": (50.0, 25.0, 25.0)})
    metrics.set_stage_placement(1, {"weights": (40.0, 60.0, 0.0)})
    with serve(metrics, "127.0.0.1", _free_port()) as url:
        samples = _scrape(url)["flexgen_stage_placement_percent"]
    assert samples[(("stage", "0"), ("tensor", "cache"), ("tier", "disk"))] == 25.0
    assert samples[(("stage", "1"), ("tensor", "weights"), ("tier", "cpu"))] == 60.0
    assert len(samples) == 9
