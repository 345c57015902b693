"""`sit sweep`'s report: sweep.json (every row with its config hash), sweep.md (the table) and
sweep.png (latent FD per row, one bar colour per sampler). Each is published atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from cluster.sweep import Plan


def write_report(out: Path, args: argparse.Namespace, plan: Plan, seconds: float) -> dict:
    from cluster.plot import bar_chart
    from cluster.sweep import machine

    keys = list(plan.points[0].values)
    rows = []
    for row in plan.rows:
        r = row.result or {}
        rows.append(
            {
                **{k: row.point.values[k] for k in keys},
                "sampler": row.sampler.label,
                "latent_fd": r.get("latent_fd"),
                "fid": r.get("fid"),
                "nfe_per_sample": row.sampler.options.nfe_per_sample(),
                "status": "done" if row.result else "failed" if row.error else "pending",
                "reused": row.reused,
                "error": row.error,
                "config_hash": row.point.key,
                "eval_hash": row.key,
                "folder": str(row.dir),
            }
        )
    report = {
        "command": {
            "preset": args.preset,
            "config": args.config,
            "overrides": args.overrides,
            "data": plan.points[0].config.data.url,
            "steps": plan.points[0].config.total_steps,
            "paper": args.paper,
            "grid": {
                k: sorted({p.values[k] for p in plan.points}, key=[p.values[k] for p in plan.points].index)
                for k in keys
            },
            "samplers": [s.label for s in plan.samplers],
            "sample_steps": args.sample_steps,
            "num_samples": args.num_samples,
            "sample_seed": args.sample_seed,
            "reference": args.reference,
        },
        "machine": machine(),
        "seconds": round(seconds, 1),
        "rows": rows,
    }
    write_atomic(out / "sweep.json", json.dumps(report, indent=1) + "\n")
    write_atomic(out / "sweep.md", markdown(report, keys))
    shown = [r for r in rows if r["status"] != "pending"] or rows[:1]
    labels = [" ".join([*(r[k] for k in keys), r["sampler"]]) for r in shown]
    values = [float("nan") if r["latent_fd"] is None else r["latent_fd"] for r in shown]
    groups = [[s.label for s in plan.samplers].index(r["sampler"]) for r in shown]
    tmp = out / ".sweep.tmp.png"
    title = f"sit sweep: latent Frechet distance to the data (lower is better), {report['command']['steps']} steps"
    bar_chart(labels, values, tmp, title, "latent FD", groups)
    os.replace(tmp, out / "sweep.png")
    return report


def markdown(report: dict, keys: list[str]) -> str:
    c = report["command"]
    has_fid = any(r["fid"] is not None for r in report["rows"])
    head = [*(k.rpartition(".")[2] for k in keys), "sampler", "NFE", "latent FD", *(["FID"] * has_fid), "rank"]
    done = sorted(r["latent_fd"] for r in report["rows"] if r["latent_fd"] is not None)
    lines = [
        "# sit sweep",
        "",
        f"Base: preset `{c['preset']}`"
        + (f", config `{c['config']}`" if c["config"] else "")
        + (f", `--set {' --set '.join(c['overrides'])}`" if c["overrides"] else "")
        + f"; data `{c['data']}`; {c['steps']} training steps per point.",
        f"Sampling: {c['num_samples']} samples per row (seed {c['sample_seed']}, balanced classes), "
        f"{c['sample_steps']} steps per sampler; reference: up to {c['reference']} training latents.",
        f"Ran on {report['machine']} in {report['seconds'] / 60:.1f} min (this invocation; reused rows not counted).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in report["rows"]:
        fd = r["latent_fd"]
        cells = [*(r[k] for k in keys), r["sampler"], str(r["nfe_per_sample"] or "-")]
        cells.append(f"{fd:.3f}" if fd is not None else f"failed: {r['error']}" if r["error"] else "not run yet")
        if has_fid:
            cells.append(f"{r['fid']:.2f}" if r["fid"] is not None else "-")
        cells.append(str(done.index(fd) + 1) if fd is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each row's folder (`points/<config hash>/<eval hash>/`) holds its result.json and samples; "
        "`points/<config hash>/config.json` is the exact resolved `sit train` config.",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: never half-written under its final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
