"""run_all's markdown summary: the machine, the commit, and each benchmark's
headline numbers with links to its JSON and plot."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

from benchmarks.lib.output import fmt

REPO = Path(__file__).resolve().parents[2]


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """CPU, cores, memory, kernel, QEMU version and what /dev/kvm is."""
    kvm = Path("/dev/kvm").exists()
    return {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
            "kernel": platform.release(),
            "qemu": _first_line(["qemu-system-x86_64", "--version"]),
            "kvm": "present" if kvm else "absent"}


def commit() -> dict[str, Any]:
    head = _first_line(["git", "rev-parse", "HEAD"])
    # Results of earlier runs are tracked: they are not a change to what is measured.
    dirty = _first_line(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                         ":(exclude)benchmarks/results"])
    return {"commit": head, "dirty": dirty not in ("", "unknown")}


# -- headline numbers per benchmark ----------------------------------------------------

def _median(d: dict[str, Any] | None, key: str) -> str:
    s = (d or {}).get(key) or {}
    return fmt(s.get("median")) if isinstance(s, dict) else "n/a"


def boot_lines(r: dict[str, Any]) -> list[str]:
    return [f"cold boot to agent ready: median {_median(r, 'cold_boot_ms')} ms over {r['n']} "
            f"VMs; PSS per VM {_median(r, 'pss_mib')} MiB"]


def template_lines(r: dict[str, Any]) -> list[str]:
    pss = r.get("pss_mib", {}).get("clone", {})
    top = max(pss, key=int) if pss else None
    return [f"cold boot {_median(r, 'cold_ms')} ms vs clone {_median(r, 'clone_ms')} ms "
            f"(ratio {r.get('ratio_cold_over_clone')}); PSS per clone at N={top}: "
            f"{fmt(pss.get(top)) if top else 'n/a'} MiB"]


def pool_lines(r: dict[str, Any]) -> list[str]:
    warm, cmp_ = r.get("warm_get_ms", {}), r.get("comparison_ms", {})
    one = warm.get("1") or {}
    cyc = r.get("cycles") or {}
    return [f"warm get (1 client): median {fmt(one.get('median'))} ms, p99 "
            f"{fmt(one.get('p99'))} ms; a miss: clone {_median(cmp_, 'clone_hotplug_384')} ms, "
            f"boot {_median(cmp_, 'cold_boot')} ms",
            f"{cyc.get('count', 'n/a')} get/release cycles at 32 clients: "
            f"{cyc.get('errors', 'n/a')} errors, {cyc.get('throughput_per_s', 'n/a')}/s; "
            f"leaked {r.get('leaked_total')}"]


def recovery_lines(r: dict[str, Any]) -> list[str]:
    return [f"{r['recovered']} of {r['vms_alive']} VMs ({r['leased']} leased) re-adopted in "
            f"{r['recovery_s']} s; serving again {r['restart_to_serving_s']} s after restart"]


def run_lines(r: dict[str, Any]) -> list[str]:
    fb = r.get("first_byte_ms", {})
    return ["first stdout byte of `echo first`: " + ", ".join(
        f"{src} {_median(fb, src)} ms" for src in ("cold", "clone", "pool"))]


def sizing_lines(r: dict[str, Any]) -> list[str]:
    lines = ["| trace | policy | requests | hit ratio | p50 ms | p99 ms | idle VM-s | "
             "mean target |", "|---|---|---|---|---|---|---|---|"]
    for trace, cells in r.get("traces", {}).items():
        for policy, c in cells.items():
            lines.append(f"| {trace} | {policy} | {c.get('requests', 'n/a')} | "
                         f"{fmt(c.get('hit_ratio'), 3)} | {fmt(c.get('p50_ms'))} | "
                         f"{fmt(c.get('p99_ms'))} | {fmt(c.get('idle_vm_s'))} | "
                         f"{fmt(c.get('mean_target'), 2)} |")
    t = r.get("target", {})
    verdict = {True: "holds", False: "does not hold", None: "n/a"}[t.get("pass")]
    lines += ["", f"Bursty trace, adaptive vs the best fixed size ({t.get('best_fixed')}): "
              f"hit ratio {t.get('adaptive_hit_ratio')} vs {t.get('best_fixed_hit_ratio')}, "
              f"idle VM-s {t.get('adaptive_idle_vm_s')} vs {t.get('best_fixed_idle_vm_s')}: "
              f"the target {verdict}."]
    return lines


def engines_lines(r: dict[str, Any]) -> list[str]:
    lines = []
    for command, by in (r.get("commands") or {}).items():
        runc, vmf = by.get("runc", {}), by.get("vmfactory", {})
        gap = ((r.get("target") or {}).get(command) or {}).get("gap_ms")
        lines.append(f"`podman run --rm IMAGE {command}`: runc {_median(runc, 'wall_ms')} ms, "
                     f"vmfactory-oci {_median(vmf, 'wall_ms')} ms (gap {fmt(gap)} ms, "
                     f"target <= {fmt(r.get('target_gap_ms'))} ms)")
    return lines


def refill_lines(r: dict[str, Any]) -> list[str]:
    return ["agent ping on a VM just handed out, while its pool refills: " + ", ".join(
        f"{label} {_median(s, 'ping_ms')} ms" for label, s in r.get("settings", {}).items())]


HEADLINES = {"boot": boot_lines, "template": template_lines, "pool": pool_lines,
             "recovery": recovery_lines, "run": run_lines, "sizing": sizing_lines,
             "engines": engines_lines, "refill": refill_lines}


def section(name: str, run: dict[str, Any], out: Path) -> list[str]:
    lines = [f"## {name}", "",
             f"`{' '.join(run['argv'])}`: exit code {run['exit_code']}, {run['wall_s']:.0f} s", ""]
    result = run.get("result")
    if result is None:
        return lines + [f"No result: {run.get('error', 'see the log')}", ""]
    try:
        body = HEADLINES[name](result)
    except (KeyError, TypeError, ValueError) as exc:
        body = [f"(headline numbers unavailable: {type(exc).__name__}: {exc})"]
    lines += [ln if ln.startswith("|") or not ln else f"- {ln}" for ln in body]
    files = [f"[{p.name}]({p.name})" for p in (out / f"{name}.json", out / f"{name}.png")
             if p.exists()]
    lines += ["", "Files: " + ", ".join(files), ""]
    if (out / f"{name}.png").exists():
        lines += [f"![{name}]({name}.png)", ""]
    return lines


def markdown(runs: dict[str, dict[str, Any]], info: dict[str, Any], out: Path) -> str:
    m, c = info["machine"], info["commit"]
    accels = sorted({str(r["result"]["accel"]) for r in runs.values()
                     if isinstance(r.get("result"), dict) and "accel" in r["result"]})
    lines = ["# Benchmark summary", "",
             f"{'Quick (smoke) run' if info['quick'] else 'Full run'} of "
             f"`benchmarks/run_all.py`, {info['started']} UTC, {info['wall_s'] / 60:.1f} min.", "",
             f"- Machine: {m['host']}: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
             f"kernel {m['kernel']}",
             f"- QEMU: {m['qemu']}; accelerator: {', '.join(accels) or 'n/a'} (/dev/kvm "
             f"{m['kvm']}; where present here it is a nested KVM slower than TCG)",
             f"- Commit: `{c['commit']}`{' with local changes' if c['dirty'] else ''}",
             "- Timings differ about 2x between machines of this kind and from run to run: "
             "compare numbers within one summary.", ""]
    for name, run in runs.items():
        lines += section(name, run, out)
    return "\n".join(lines)
