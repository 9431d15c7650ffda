"""The benchmarks' own arithmetic, on made-up inputs: the sizing traces, the idle
VM-seconds integral, the bursty verdict and run_all's summary."""

from __future__ import annotations

import random
from pathlib import Path

from benchmarks.lib.sizing_replay import Replay
from benchmarks.lib.sizing_report import best_fixed, bursty_target
from benchmarks.lib.summary import markdown
from benchmarks.lib.traces import Trace, bursty, diurnal, traces


def test_traces_are_the_same_for_every_policy_and_shaped_as_named() -> None:
    spans = {"steady": 120.0, "bursty": 160.0, "diurnal": 180.0}
    one, two = traces(7, 30.0, spans), traces(7, 30.0, spans)
    assert one == two and [t.name for t in one] == list(spans)
    assert traces(8, 30.0, spans)[0] != one[0]
    b = bursty(random.Random(1), 30.0, 160.0, size=6, every=20.0, spread=0.3)
    times = [a.at for a in b.arrivals]
    assert times == sorted(times) and all(0 <= t < 190 for t in times)
    dense = [t for t in times if sum(abs(u - t) <= 0.3 for u in times) >= 6]
    assert len(dense) >= 6 * 8  # a burst of 6 within 0.3 s every ~20 s
    d = diurnal(random.Random(1), 30.0, 1800.0)
    noon = sum(30 + 600 <= a.at < 30 + 1200 for a in d.arrivals)
    night = sum(a.at < 30 + 300 or a.at >= 30 + 1500 for a in d.arrivals)
    assert noon > 5 * night


def test_idle_vm_seconds_integrate_ready_over_the_measured_span_only() -> None:
    trace = Trace("t", warmup_s=10.0, measured_s=20.0, arrivals=[], shape="")
    run = Replay(trace, [], None)  # type: ignore[arg-type]
    run.series = [(0.0, 5, 0, 5), (10.0, 2, 0, 2), (20.0, 4, 0, 4), (30.0, 9, 0, 9),
                  (40.0, 9, 0, 9)]
    assert run.idle_vm_s() == 2 * 10 + 4 * 10


def test_the_bursty_verdict_compares_with_the_smallest_best_fixed_size() -> None:
    cells = {"fixed-1": {"hit_ratio": 0.4, "idle_vm_s": 100.0},
             "fixed-4": {"hit_ratio": 1.0, "idle_vm_s": 400.0},
             "fixed-8": {"hit_ratio": 1.0, "idle_vm_s": 800.0},
             "adaptive": {"hit_ratio": 1.0, "idle_vm_s": 500.0}}
    assert best_fixed(cells) == "fixed-4"
    assert bursty_target(cells)["pass"] is False  # more idle than fixed-4
    cells["adaptive"]["idle_vm_s"] = 300.0
    assert bursty_target(cells)["pass"] is True
    cells["adaptive"]["hit_ratio"] = 0.99
    assert bursty_target(cells)["pass"] is False
    assert bursty_target({"adaptive": {"error": "x"}})["pass"] is None


def test_the_summary_names_the_machine_and_survives_a_failed_benchmark(tmp_path: Path) -> None:
    (tmp_path / "sizing.png").write_bytes(b"png")
    sizing = {"accel": "tcg", "traces": {"bursty": {
        "fixed-8": {"requests": 60, "hit_ratio": 1.0, "p50_ms": 15.0, "p99_ms": 40.0,
                    "idle_vm_s": 1200.0, "mean_target": 8.0},
        "adaptive": {"requests": 60, "hit_ratio": 1.0, "p50_ms": 14.0, "p99_ms": 45.0,
                     "idle_vm_s": 1000.0, "mean_target": 6.9}}},
        "target": {"pass": True, "best_fixed": "fixed-8"}}
    runs = {"sizing": {"argv": ["benchmarks/sizing.py"], "exit_code": 0, "wall_s": 60.0,
                       "result": sizing},
            "boot": {"argv": ["benchmarks/boot.py"], "exit_code": 1, "wall_s": 3.0,
                     "error": "exit code 1"}}
    info = {"quick": False, "started": "2026-12-03 17:00", "wall_s": 63.0,
            "machine": {"host": "h", "cpu": "AMD EPYC", "cores": 2, "memory_gib": 23.5,
                        "kernel": "6", "qemu": "QEMU emulator version 7.2.22", "kvm": "present"},
            "commit": {"commit": "abc123", "dirty": False}}
    text = markdown(runs, info, tmp_path)
    assert "AMD EPYC, 2 cores, 23.5 GiB" in text and "QEMU emulator version 7.2.22" in text
    assert "accelerator: tcg" in text and "`abc123`" in text
    assert "| bursty | adaptive | 60 | 1.000 |" in text and "the target holds" in text
    assert "![sizing](sizing.png)" in text
    assert "## boot" in text and "No result: exit code 1" in text
