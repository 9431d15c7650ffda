"""The pool benchmark's result: the phases assembled into pool.json's object, the
issue's targets checked, and the text report."""

from __future__ import annotations

from typing import Any

from benchmarks.lib.daemon import MEM_FLOOR_MIB
from benchmarks.lib.output import fmt, table, verdict
from benchmarks.lib.pool_phases import IDLE_WINDOW_S
from benchmarks.lib.pool_traffic import SWEEP_HOLD_MEAN_S, SWEEP_SEED

TARGET_WARM_MEDIAN_MS = 10.0
TARGET_WARM_P99_MS = 50.0
TARGET_HOT_MEDIAN_MS = 3.0
TARGET_CONCURRENCY = 32
TARGET_CYCLES = 1000
REFILL_CONCURRENCY = 2   # the daemon's default
# The comparison's rows: (report label, plot label, key in comparison_ms, plot colour).
COMPARISON = (("pool hit (paused, C=1)", "pool hit\n(paused)", "pool_hit_paused", "C0"),
              ("pool hit (running, C=1)", "pool hit\n(running)", "pool_hit_running", "C1"),
              ("template clone + hot-plug 384 MiB", "clone +\nhot-plug", "clone_hotplug_384",
               "C2"),
              ("cold boot (base=direct)", "cold boot", "cold_boot", "C3"))


# -- assembling ------------------------------------------------------------------

def cycles_leaked(cyc: dict[str, Any]) -> int | None:
    """QEMU processes untracked before or left after the stop, run/ entries, mounts,
    leases: what the cycles phase leaked (None if its daemon never stopped)."""
    if "daemon" not in cyc:
        return None
    d = cyc["daemon"]
    untracked = set(cyc.get("untracked_qemu_before_stop", [])) | set(d["leftover_qemu"])
    return (len(untracked) + len(d["leftover_run_entries"]) + len(d["leftover_mounts"])
            + cyc.get("leases_left", 0))


def cycles_result(cyc: dict[str, Any], requested: int) -> dict[str, Any]:
    out = {"count": cyc.get("count", 0), "requested": requested,
           "concurrency": TARGET_CONCURRENCY, "errors": cyc.get("errors"),
           "leaked": cycles_leaked(cyc), "wall_s": cyc.get("wall_s"),
           **{k: cyc.get(k) for k in ("throughput_per_s", "get_ms", "server_get_ms", "sources",
                                      "error_kinds",
                                      "leases_left", "untracked_qemu_before_stop",
                                      "pool_counters", "stopped_early")}}
    if "error" in cyc:
        out["phase_error"] = cyc["error"]
    return out


def phase_records(phases: dict[str, Any]) -> dict[str, Any]:
    """Each phase (each sweep size apart) without its measurements."""
    records = {k: {kk: vv for kk, vv in v.items() if kk not in ("concurrency", "samples", "cells")}
               for k, v in phases.items() if k != "sweep"}
    return records | {f"sweep_size_{k}": {kk: vv for kk, vv in v.items() if kk != "cells"}
                      for k, v in phases["sweep"].items()}


def assemble(quick: bool, p: dict[str, Any], phases: dict[str, Any],
             host: dict[str, Any]) -> dict[str, Any]:
    warm, hot, comp, cyc = (phases[k] for k in ("warm", "hot", "comparison", "cycles"))
    all_phases = [warm, hot, comp, cyc, *phases["sweep"].values()]
    result: dict[str, Any] = {
        "benchmark": "pool", "quick": quick, "accel": "tcg",
        "refill_concurrency": REFILL_CONCURRENCY, "mem_floor_mib": MEM_FLOOR_MIB,
        "warm_get_ms": warm.get("concurrency", {}), "hot_get_ms": hot.get("concurrency", {}),
        "idle_cpu_percent": {"paused": warm.get("idle_cpu"), "running": hot.get("idle_cpu")},
        "comparison_ms": {
            "pool_hit_paused": warm.get("concurrency", {}).get("1"),
            "pool_hit_running": hot.get("concurrency", {}).get("1"),
            "clone_hotplug_384": comp.get("clone_hotplug"), "cold_boot": comp.get("cold_boot")},
        "cycles": cycles_result(cyc, p["cycles"]),
        "sweep": {"rates": p["rates"], "sizes": p["sizes"], "duration_s": p["duration"],
                  "hold_mean_s": SWEEP_HOLD_MEAN_S, "seed": SWEEP_SEED,
                  "cells": [c for ph in phases["sweep"].values() for c in ph.get("cells", [])]},
        "leaked_total": sum(ph["daemon"]["leaked"] for ph in all_phases if "daemon" in ph),
        "phases": phase_records(phases),
        "host": host,
        "samples_ms": {"warm": warm.get("samples", {}), "hot": hot.get("samples", {})},
    }
    result["targets"] = evaluate_targets(result)
    return result


# -- targets -----------------------------------------------------------------------

def target(description: str, value: Any, ok: bool | None, goal: str) -> dict[str, Any]:
    return {"description": description, "value": value, "goal": goal, "pass": ok}


def at_top(d: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The highest concurrency measured and its summary."""
    keys = sorted((k for k, v in d.items() if v and "median" in v), key=int)
    return (keys[-1], d[keys[-1]]) if keys else (None, None)


def scope(c: str | None) -> str:
    return "" if c == str(TARGET_CONCURRENCY) else f" [measured at C={c}, not 32]"


def cycles_target(cy: dict[str, Any]) -> dict[str, Any]:
    n_ok = (cy["count"] == cy["requested"] and cy["errors"] == 0 and cy["leaked"] == 0
            if cy["errors"] is not None and cy["leaked"] is not None else None)
    cycles_scope = "" if cy["requested"] >= TARGET_CYCLES else \
        f" [{cy['requested']} cycles, not {TARGET_CYCLES}]"
    return target(f"{TARGET_CYCLES} cycles at concurrency {TARGET_CONCURRENCY}{cycles_scope}",
                  f"{cy['count']}/{cy['requested']} done, {cy['errors']} errors, "
                  f"{cy['leaked']} leaked", n_ok, "all done, 0 errors, 0 leaked")


def evaluate_targets(result: dict[str, Any]) -> dict[str, Any]:
    wc, w = at_top(result["warm_get_ms"])
    hc, h = at_top(result["hot_get_ms"])
    at = f"at {TARGET_CONCURRENCY} clients"
    return {
        "warm_median": target(f"warm get median {at}{scope(wc)}", w and w["median"],
                              w and w["median"] < TARGET_WARM_MEDIAN_MS,
                              f"< {TARGET_WARM_MEDIAN_MS:g} ms"),
        "warm_p99": target(f"warm get p99 {at}{scope(wc)}", w and w["p99"],
                           w and w["p99"] < TARGET_WARM_P99_MS, f"< {TARGET_WARM_P99_MS:g} ms"),
        "hot_median": target(f"hot (keep_running) get median {at}{scope(hc)}",
                             h and h["median"], h and h["median"] < TARGET_HOT_MEDIAN_MS,
                             f"< {TARGET_HOT_MEDIAN_MS:g} ms"),
        "cycles": cycles_target(result["cycles"]),
    }


# -- the report -----------------------------------------------------------------------

def latency_section(result: dict[str, Any]) -> list[str]:
    rows = []
    for kind, key in (("warm (paused)", "warm_get_ms"), ("hot (running)", "hot_get_ms")):
        for c, s in sorted(result[key].items(), key=lambda kv: int(kv[0])):
            if not s or "median" not in s:
                rows.append([kind, c, "n/a", "n/a", "n/a", "n/a", "n/a", s and s.get("errors")])
                continue
            rows.append([kind, c, s["n"], fmt(s["median"], 2), fmt(s["p99"], 2),
                         fmt(s["server_median"], 2), f"{100 * s['hit_fraction']:.0f}%",
                         s["errors"]])
    return ["get latency from a full pool (client side, ms)",
            table(["pool", "C", "n", "median", "p99", "daemon median", "hits", "errors"], rows)]


def idle_section(result: dict[str, Any]) -> list[str]:
    rows = [[k, v["vms"], fmt(v["total_percent"]), fmt(v["per_vm_percent"], 2),
             fmt(v["host_busy_percent"])]
            for k, v in result["idle_cpu_percent"].items() if v]
    return [f"idle CPU of the full pool over {IDLE_WINDOW_S:g} s (100% = one core)",
            table(["pool", "VMs", "total %", "per VM %", "host busy %"], rows)]


def comparison_section(result: dict[str, Any]) -> list[str]:
    rows = []
    for label, _, key, _ in COMPARISON:
        s = result["comparison_ms"].get(key)
        if s and "median" in s:
            rows.append([label, s["n"], fmt(s["median"], 2), fmt(s["min"], 2), fmt(s["max"], 2),
                         ",".join(f"{k}:{v}" for k, v in s["sources"].items())])
        else:
            rows.append([label, 0, "n/a", "n/a", "n/a", ""])
    return ["a get: pool hit vs miss (client side, ms)",
            table(["get", "n", "median", "min", "max", "source"], rows)]


def cycles_section(result: dict[str, Any]) -> list[str]:
    cy = result["cycles"]
    get = cy["get_ms"]
    out = [f"cycles: {cy['count']}/{cy['requested']} get/release cycles at concurrency "
           f"{cy['concurrency']} (pool 8..16, empty=wait) in {fmt(cy['wall_s'])} s = "
           f"{fmt(cy['throughput_per_s'], 2)} cycles/s; {cy['errors']} errors, "
           f"{cy['leaked']} leaked; get median {fmt(get and get['median'])} ms, "
           f"p90 {fmt(get and get['p90'])} ms; sources {cy['sources']}"]
    if cy.get("error_kinds"):
        out.append(f"  errors: {cy['error_kinds']}")
    if cy.get("phase_error"):
        out.append(f"  phase failed: {cy['phase_error'][:300]}")
    return out


def sweep_section(result: dict[str, Any]) -> list[str]:
    sw = result["sweep"]
    rows = [[c["pool_size"], f"{c['rate_per_s']:g}", c["requests"],
             "n/a" if c["hit_ratio"] is None else f"{100 * c['hit_ratio']:.0f}%",
             fmt(c["median_ms"]), fmt(c["p90_ms"]), fmt(c["hit_median_ms"]),
             fmt(c["miss_median_ms"]), c["errors"], c["dropped"]]
            for c in sw["cells"]]
    return [f"sweep: Poisson arrivals, hold ~exp(mean {sw['hold_mean_s']:g} s), "
            f"{sw['duration_s']:g} s per cell, empty=fallback (latency in ms)",
            table(["pool", "rate/s", "reqs", "hit ratio", "median", "p90", "hit med",
                   "miss med", "errors", "dropped"], rows)]


def phase_row(name: str, ph: dict[str, Any]) -> list[Any]:
    dd = ph.get("daemon", {})
    lg = dd.get("log", {})
    return [name, fmt(ph.get("phase_s")), fmt(ph.get("fill_s")), dd.get("exit_code"),
            fmt(dd.get("stop_s")), dd.get("leaked"), lg.get("warnings"), lg.get("errors"),
            lg.get("grpc_core"), lg.get("vm_starts"), fmt(lg.get("vm_start_ms_median")),
            fmt(lg.get("vm_start_ms_max")), len(lg.get("slow_vm_starts", [])),
            (ph.get("error") or ph.get("stopped_early") or "")[:60]]


def phases_section(result: dict[str, Any]) -> list[str]:
    return ["phases (one daemon each; VM starts = clones/boots from the daemon log, "
            "agent ready ms; slow = over 10 s, cold boots included)",
            table(["phase", "wall s", "fill s", "exit", "stop s", "leaked", "log warn",
                   "log err", "grpc core", "VM starts", "median", "max", "slow", "problem"],
                  [phase_row(name, ph) for name, ph in result["phases"].items()])]


def targets_section(result: dict[str, Any]) -> list[str]:
    host, rt = result["host"], result["runtime_s"]
    return ["targets",
            table(["target", "measured", "goal", "result"],
                  [[t["description"], fmt(t["value"], 2), t["goal"], verdict(t)]
                   for t in result["targets"].values()]),
            f"host: load {host['loadavg_start'][0]} -> {host['loadavg_end'][0]}, other QEMU "
            f"processes {host['other_qemu_start']} -> {host['other_qemu_end']}, lowest "
            f"available memory {host['available_mib_min']} MiB",
            f"runtime {int(rt // 60)} min {rt % 60:.0f} s"]


def report(result: dict[str, Any]) -> str:
    out = [f"pool benchmark ({'quick' if result['quick'] else 'full'} run), accel tcg, "
           f"refill_concurrency {result['refill_concurrency']}"]
    for section in (latency_section, idle_section, comparison_section, cycles_section,
                    sweep_section, phases_section):
        out += section(result) + [""]
    return "\n".join(out + targets_section(result))
