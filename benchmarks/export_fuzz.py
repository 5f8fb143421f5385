r"""Fuzzing the export: hundreds of random graphs through the whole chain, measured.

Each seed is one `tf_pfq.testing.random_graph` (random composition of every layer the
export supports, random widths, strides, bit widths 2..8, weight grids, planted dead
channels) run through prune -> stage A -> short fine-tuning -> strip -> prune -> fold
-> stage W -> short fine-tuning -> to_tflite (`tf_pfq.testing.run_random_graph`), and
its file measured against the Keras QAT model on XNNPACK in int8 output steps.

A graph is "exact" when p99 <= 0.5 and max <= 1 output step, "inexact" otherwise,
"refused" when the export refused it with a ValueError (which names the layer),
"failed" when an earlier stage raised, "crashed" when the process died (a
segmentation fault in the converter) and "timeout" when it ran too long.

Seeds run in a worker process, so a crash costs one seed, not the run; each seed's
row is written to --workdir as soon as it is done and a rerun skips finished seeds
(resumable). Writes --results.{md,json}; with --baseline (an earlier results json,
e.g. before a fix) the table shows both.

  nice python benchmarks/export_fuzz.py --seeds=500
  nice python benchmarks/export_fuzz.py --seeds=500 --workdir=runs/fuzz_before \
      --results=benchmarks/results/export_fuzz_before
"""

from __future__ import annotations

import collections
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import itertools

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 500, "Number of graphs (seeds first_seed .. first_seed + seeds - 1).")
flags.DEFINE_integer("first_seed", 0, "The first seed.")
flags.DEFINE_integer("epochs", 1, "Epochs of each short fine-tuning.")
flags.DEFINE_string("workdir", "runs/export_fuzz", "Per-seed rows (resume).")
flags.DEFINE_string(
    "results", os.path.join(os.path.dirname(__file__), "results", "export_fuzz"), "Output prefix."
)
flags.DEFINE_string("baseline", None, "An earlier results .json to show beside this run.")
flags.DEFINE_string("title", "", "What this run measures (e.g. the commit), for the table.")
flags.DEFINE_integer("chunk", 20, "Seeds per worker process.")
flags.DEFINE_integer("seed_timeout", 600, "Seconds one seed may take before it is killed.")
flags.DEFINE_list("worker", None, "Internal: run these seeds in this process.")
flags.DEFINE_bool("report", False, "Only write the tables from the rows finished so far.")
flags.DEFINE_bool(
    "more_activations",
    False,
    "Blocks also draw LeakyReLU, PReLU and max/min with numbers (other graphs per seed; "
    "use its own --workdir and --results).",
)

EXACT_P99, EXACT_MAX = 0.5, 1.0
# The Keras logits are float32: half a step reads 0.5000003 (`compare.NOISE_STEPS`).
NOISE_STEPS = 1e-3
CATEGORIES = ("exact", "inexact", "refused", "failed", "crashed", "timeout")
BINS = (0.5, 1.0, 2.0, 5.0, 20.0)


def _row_path(seed: int) -> str:
    return os.path.join(FLAGS.workdir, f"seed_{seed}.json")


def _write_row(row: dict) -> None:
    path = _row_path(row["seed"])
    with open(f"{path}.tmp", "w") as f:
        json.dump(row, f, indent=1)
    os.replace(f"{path}.tmp", path)


def is_exact(p99: float, worst: float) -> bool:
    return p99 <= EXACT_P99 + NOISE_STEPS and worst <= EXACT_MAX + NOISE_STEPS


def category(result) -> str:
    """The row's category (module docstring) from a `ChainResult`."""
    if result.ok:
        return "exact" if is_exact(result.p99_steps, result.max_steps) else "inexact"
    if result.failed_stage == "tflite" and isinstance(result.error, ValueError):
        return "refused"
    return "failed"


def run_seed(seed: int) -> dict:
    """One seed through the chain; never raises."""
    import dataclasses

    from tf_pfq import testing

    started = time.time()
    try:
        activations = testing.graphs.ACTIVATIONS
        if FLAGS.more_activations:
            activations += testing.graphs.MORE_ACTIVATIONS
        result = testing.run_random_graph(seed, epochs=FLAGS.epochs, activations=activations)
    except Exception as e:  # the graph could not even be built: a generator bug
        return {"seed": seed, "category": "failed", "stage": "build", "error": repr(e)[:400]}
    row: dict = {"seed": seed, "category": category(result)}
    if result.description is not None:
        row["description"] = str(result.description)
        row["setting"] = result.description.settings()
        row["blocks"] = list(dataclasses.asdict(result.description)["blocks"])
    stage = result.failed_stage
    if stage is not None:
        row["stage"] = stage
        row["error"] = f"{type(result.error).__name__}: {result.error}"[:1000]
    for key in ("p99_steps", "max_steps", "agreement"):
        row[key] = getattr(result, key)
    row["seconds"] = round(time.time() - started, 1)
    row["commit"] = _commit()
    return row


def _commit() -> str:
    """The commit of the tf_pfq this row measured (rows of one run may span commits)."""
    import tf_pfq

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(tf_pfq.__file__),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def worker(seeds: list[int]) -> None:
    from tf_pfq.compat import keras

    for seed in seeds:
        keras.backend.clear_session()  # fresh layer names: a seed's graph is its own
        row = run_seed(seed)
        _write_row(row)
        logging.info("seed %d: %s %s", seed, row["category"], row.get("max_steps"))


def _done(seed: int) -> bool:
    return os.path.exists(_row_path(seed))


def _run_chunk(seeds: list[int]) -> None:
    """Runs `seeds` in worker processes until each has a row (crashes recorded)."""
    pending = [s for s in seeds if not _done(s)]
    while pending:
        command = [sys.argv[0], f"--worker={','.join(map(str, pending))}"]
        command += [f"--workdir={FLAGS.workdir}", f"--epochs={FLAGS.epochs}"]
        command += [f"--more_activations={FLAGS.more_activations}"]
        started = time.time()
        try:
            code = subprocess.run(
                [sys.executable, *command], timeout=FLAGS.seed_timeout * len(pending)
            ).returncode
            status = "crashed" if code != 0 else None
        except subprocess.TimeoutExpired:
            code, status = None, "timeout"
        left = [s for s in pending if not _done(s)]
        if left and status is not None:
            # The worker runs its seeds in order: the first without a row killed it.
            _write_row(
                {
                    "seed": left[0],
                    "category": status,
                    "error": f"worker exit code {code}" if code is not None else "timeout",
                    "seconds": round(time.time() - started, 1),
                }
            )
            left = left[1:]
        pending = left


def _load_rows(seeds) -> list[dict]:
    rows = []
    for seed in seeds:
        if _done(seed):
            with open(_row_path(seed)) as f:
                row = json.load(f)
            if row.get("max_steps") is not None:  # the thresholds of this script
                exact = is_exact(row["p99_steps"], row["max_steps"])
                row["category"] = "exact" if exact else "inexact"
            rows.append(row)
    return rows


def statistics(rows: list[dict]) -> dict:
    """Counts by category, the distribution of p99/max steps, the worst seeds, time."""
    measured = [r for r in rows if r.get("max_steps") is not None]
    p99 = np.array([r["p99_steps"] for r in measured])
    worst = np.array([r["max_steps"] for r in measured])

    def histogram(values):
        edges = [0.0, *BINS, np.inf]
        return {
            f"({lo:g}, {hi:g}]" if lo else f"[0, {hi:g}]": int(
                np.sum((values > lo) & (values <= hi)) + (np.sum(values == 0) if not lo else 0)
            )
            for lo, hi in itertools.pairwise(edges)
        }

    bad = [r for r in rows if r["category"] != "exact"]
    bad.sort(key=lambda r: (r["category"] == "inexact", -(r.get("max_steps") or 0.0)))
    seconds = [r.get("seconds", 0.0) for r in rows]
    return {
        "graphs": len(rows),
        "categories": {c: sum(r["category"] == c for r in rows) for c in CATEGORIES},
        "p99_quantiles": _quantiles(p99),
        "max_quantiles": _quantiles(worst),
        "p99_histogram": histogram(p99) if len(p99) else {},
        "max_histogram": histogram(worst) if len(worst) else {},
        "worst": [r["seed"] for r in bad],
        "seconds_total": round(float(np.sum(seconds)), 1),
        "seconds_median": round(float(np.median(seconds)), 1) if seconds else 0.0,
    }


def _quantiles(values) -> dict:
    if not len(values):
        return {}
    return {
        q: round(float(np.percentile(values, float(q[1:]))), 3)
        for q in ("p50", "p90", "p99", "p100")
    }


def _stats_lines(label: str, stats: dict) -> list[str]:
    cats = ", ".join(f"{c} {n}" for c, n in stats["categories"].items() if n)
    return [
        f"### {label}",
        "",
        (
            f"{stats['graphs']} graphs: {cats}. "
            f"Time {stats['seconds_total'] / 60:.0f} min summed over graphs "
            f"(median {stats['seconds_median']:.1f} s per graph)."
        ),
        "",
        "| | " + " | ".join(stats["max_histogram"]) + " |",
        "|---" * (len(stats["max_histogram"]) + 1) + "|",
        "| graphs by p99 steps | " + " | ".join(map(str, stats["p99_histogram"].values())) + " |",
        "| graphs by max steps | " + " | ".join(map(str, stats["max_histogram"].values())) + " |",
        "",
        "Quantiles over graphs: p99 steps "
        + ", ".join(f"{k} {v}" for k, v in stats["p99_quantiles"].items())
        + "; max steps "
        + ", ".join(f"{k} {v}" for k, v in stats["max_quantiles"].items())
        + ".",
        "",
    ]


def _worst_lines(rows: list[dict], stats: dict, limit: int = 25) -> list[str]:
    by_seed = {r["seed"]: r for r in rows}
    lines = [
        "| seed | category | p99 | max | setting | stage: error / blocks |",
        "|---|---|---|---|---|---|",
    ]
    for seed in stats["worst"][:limit]:
        r = by_seed[seed]
        detail = r.get("error") or "; ".join(r.get("blocks", []))
        if r.get("stage"):
            detail = f"{r['stage']}: {detail}"
        detail = detail.replace("|", "\\|").replace("\n", " ")[:300]
        p99 = f"{r['p99_steps']:.2f}" if r.get("p99_steps") is not None else "-"
        worst = f"{r['max_steps']:.2f}" if r.get("max_steps") is not None else "-"
        lines.append(
            f"| {seed} | {r['category']} | {p99} | {worst} | {r.get('setting', '-')} | {detail} |"
        )
    return lines


def write(rows: list[dict], elapsed: float) -> None:
    stats = statistics(rows)
    stats["elapsed_seconds"] = round(elapsed, 1)
    lines = [
        "# Export fuzzing: random graphs through the whole chain",
        "",
        (
            "Each seed: `tf_pfq.testing.random_graph(seed)` (random compositions of every "
            "layer the export supports; random widths, strides, A/W bits 2..8, per-tensor "
            "or per-channel, both weight schemes; live BN statistics with planted dead "
            "channels), run through prune -> stage A -> "
            f"{FLAGS.epochs} epoch of fine-tuning on random labels -> strip -> prune -> "
            "fold -> stage W -> fine-tuning -> to_tflite; |XNNPACK - Keras QAT| over 16 "
            "inputs in int8 output steps. Exact: p99 <= 0.5 and max <= 1 step. "
            f"Generated by `{_command()}` on {platform.machine()}, {os.cpu_count()} CPU "
            "cores (shared)."
        ),
        "",
    ]
    if FLAGS.title:
        lines += [FLAGS.title, ""]
    commits = collections.Counter(row.get("commit", "not recorded") for row in rows)
    lines += [
        "Rows by the commit that measured them: "
        + ", ".join(f"{c} ({n})" for c, n in sorted(commits.items())),
        "",
    ]
    if FLAGS.baseline:
        with open(FLAGS.baseline) as f:
            baseline = json.load(f)
        lines += _stats_lines(
            f"Before ({baseline.get('title') or FLAGS.baseline})", baseline["stats"]
        )
        lines += ["Worst seeds before:", ""]
        lines += [*_worst_lines(baseline["rows"], baseline["stats"], limit=15), ""]
        lines += _stats_lines("After (this run)", stats)
    else:
        lines += _stats_lines("This run", stats)
    lines += ["Worst seeds (every graph that is not exact, then the largest max):", ""]
    lines += _worst_lines(rows, stats)
    os.makedirs(os.path.dirname(FLAGS.results) or ".", exist_ok=True)
    with open(FLAGS.results + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(FLAGS.results + ".json", "w") as f:
        json.dump({"title": FLAGS.title, "stats": stats, "rows": rows}, f, indent=1)


def _command() -> str:
    parts = ["python benchmarks/export_fuzz.py"]
    for name in ("seeds", "first_seed", "epochs", "more_activations"):
        if FLAGS[name].value != FLAGS[name].default:
            parts.append(f"--{name}={FLAGS[name].value}")
    if FLAGS.results != FLAGS["results"].default:
        parts.append(f"--results={os.path.relpath(FLAGS.results)}")
    if FLAGS.baseline:
        parts.append(f"--baseline={os.path.relpath(FLAGS.baseline)}")
    return " ".join(parts)


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    if FLAGS.worker is not None:
        worker([int(s) for s in FLAGS.worker])
        return
    started = time.time()
    seeds = list(range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds))
    if FLAGS.report:
        write(_load_rows(seeds), 0.0)
        with open(FLAGS.results + ".md") as f:
            print(f.read())
        return
    for start in range(0, len(seeds), FLAGS.chunk):
        _run_chunk(seeds[start : start + FLAGS.chunk])
        rows = _load_rows(seeds)
        write(rows, time.time() - started)
        logging.info("%d/%d seeds: %s", len(rows), len(seeds), statistics(rows)["categories"])
    with open(FLAGS.results + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
