"""Tables, claims and curves of `benchmarks/accuracy.py`, from whatever runs are recorded.

Every number comes from the recorded runs; a comparison lacking pairs says so. The
claims are paired differences (same pretrained model, same fine-tuning seed and
subset) in top-1 points with a 95 % interval; the verdicts are Holm-corrected over
every claim of the table (`tf_pfq.stats.verdicts`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict

import numpy as np
from accuracy_runs import THRESHOLDS, Run

from tf_pfq import stats

KINDS = ("depthwise", "pointwise", "conv", "dense")
LABELS = {
    "pfq": "pfq (Algorithm 1)",
    "original": "original (no PfQ)",
    "pfq_no_bias_correction": "PfQ w/o bias correction",
    "pfq_once": "pfq_once (PfQ, fold, A+W once)",
    "qat_once": "qat_once (fold, A+W once, no PfQ)",
    "dfq": "dfq (fold, DFQ, A+W once; SGD, no momentum)",
    "tfmot": "tfmot as shipped",
    "tfmot_matched": "tfmot matched",
}
# Every difference between each baseline and tf_pfq's own QAT, besides the thing named.
BASELINE_NOTES = {
    "dfq": "differs from qat_once in DFQ (equalization, bias absorption and correction) "
    "and in its fine-tuning: plain SGD without momentum, weight decay 1e-4 (the "
    "paper's settings for DFQ), same learning rate and epochs",
    "tfmot": "tfmot's DefaultNBitQuantizeScheme as shipped: model input and logits at "
    "n bits, activation ranges start at [-6, 6] and move by a 0.999 moving average, BN "
    "kept unfolded (weights quantized before BN's scale), its own quantizers",
    "tfmot_matched": "the same scheme with 8-bit input, float logits and ranges from the "
    "first batch (the closest its API allows); BN still unfolded, its own quantizers",
}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _family(p) -> str:
    return f"{p.recipe}/{p.model}"


def _records(state, runs, budget: int = 1) -> dict:
    """{run: record} of the recorded runs with the given fine-tuning budget."""
    out = {}
    for run in runs:
        record = state.record(run) if run.budget == budget else None
        if record is not None:
            out[run] = record
    return out


def _budget_lines(state, runs) -> list[str]:
    """The longer runs beside the same runs at the benchmark's budget."""
    longer = _records(state, runs, budget=2)
    lines = [
        "| run | top-1 % at the benchmark's budget | at twice the budget | difference |",
        "|---|---|---|---|",
    ]
    for run, record in longer.items():
        base = state.record(dataclasses.replace(run, budget=1))
        if base is None:
            continue
        lines.append(
            f"| {run.pretrained.id} {run.method} A{run.bits[0]}/W{run.bits[1]} s{run.seed} "
            f"| {_pct(base['accuracy'])} | {_pct(record['accuracy'])} "
            f"| {100 * (record['accuracy'] - base['accuracy']):+.2f} |"
        )
    return lines


def _stage_a_end(record) -> float | None:
    points = [p for p in record["curve"] if p["stage"] == "stage_a"]
    return max(points, key=lambda p: p["epoch"])["accuracy"] if points else None


def _value(record, what: str):
    if what == "stage_a":
        return _stage_a_end(record)
    return record.get(what)


def _paired(records, family, bits, a, b, what="accuracy", ta="1e-5", tb="1e-5") -> list:
    """Differences a - b in points over the (pretrained, seed) pairs both have."""
    by_key: dict = defaultdict(dict)
    for run, record in records.items():
        if _family(run.pretrained) != family or run.bits != bits:
            continue
        for name, method, threshold in (("a", a, ta), ("b", b, tb)):
            if run.method == method and run.threshold == threshold:
                value = _value(record, what)
                if value is not None:
                    by_key[(run.pretrained.id, run.seed)][name] = value
    return [100 * (v["a"] - v["b"]) for v in by_key.values() if len(v) == 2]


# (claim "a beats b", a, b, what is compared): "stage_a" is top-1 at the end of
# activation-only fine-tuning (the paper's Table 1), "accuracy" the final QAT top-1,
# "tflite_accuracy" the exported file's top-1 against its own Keras model's.
CLAIMS = (
    ("PfQ beats original, activation-only (Table 1)", "pfq", "original", "stage_a"),
    ("PfQ w/o bias correction beats original (Table 1)", "pfq_no_bias_correction", "original",
     "stage_a"),
    ("bias correction helps PfQ (Table 1)", "pfq", "pfq_no_bias_correction", "stage_a"),
    ("PfQ beats original, A+W (Tables 2-3)", "pfq", "original", "accuracy"),
    ("PfQ helps one-stage QAT: pfq_once beats qat_once", "pfq_once", "qat_once", "accuracy"),
    ("Algorithm 1 beats fine-tuning once w/ PfQ (Table 2)", "pfq", "pfq_once", "accuracy"),
    ("Algorithm 1 beats tf_pfq's QAT once w/o PfQ", "pfq", "qat_once", "accuracy"),
    ("PfQ beats DFQ, both fine-tuned (Table 3)", "pfq", "dfq", "accuracy"),
    ("PfQ beats tfmot as shipped", "pfq", "tfmot", "accuracy"),
    ("PfQ beats tfmot matched", "pfq", "tfmot_matched", "accuracy"),
    ("the .tflite's top-1 equals its Keras QAT model's (pfq)", "pfq", "pfq", "tflite_accuracy"),
    ("threshold: each BN's epsilon beats 1e-5 (pfq)", "pfq", "pfq", "accuracy", "eps", "1e-5"),
)  # fmt: skip


def _claims(records, margin: float) -> list[dict]:
    """Every claim with at least two pairs, with its paired difference and TOST p-value."""
    claims = []
    for family in sorted({_family(r.pretrained) for r in records}):
        for bits in sorted({r.bits for r in records}, reverse=True):
            for text, a, b, what, *thresholds in CLAIMS:
                if what == "tflite_accuracy":
                    diffs = _tflite_vs_keras(records, family, bits, a)
                else:
                    diffs = _paired(records, family, bits, a, b, what, *thresholds)
                if len(diffs) >= 2:
                    label = f"A{bits[0]}" if what == "stage_a" else f"A{bits[0]}/W{bits[1]}"
                    claim = _claim(text, family, label, diffs, margin)
                    claim["equality"] = what == "tflite_accuracy"
                    claims.append(claim)
    return claims


def _tflite_vs_keras(records, family, bits, method) -> list:
    return [
        100 * (r["tflite_accuracy"] - r["accuracy"])
        for run, r in records.items()
        if _family(run.pretrained) == family
        and run.bits == bits
        and run.method == method
        and run.threshold == "1e-5"
        and r.get("tflite_accuracy") is not None
    ]


def _claim(text, family, bits_label, diffs, margin) -> dict:
    return {
        "claim": text,
        "family": family,
        "bits": bits_label,
        "difference": stats.paired_difference(diffs),
        "equivalence_p": stats.equivalence_p(diffs, margin),
    }


def _claims_table(claims, margin) -> list[str]:
    verdicts = stats.verdicts(
        [c["difference"] for c in claims],
        [c["equivalence_p"] for c in claims],
        equality=[c["equality"] for c in claims],
    )
    # The adjusted p-values behind each verdict, shown beside it.
    differ = stats.holm([c["difference"].p for c in claims])
    same = stats.holm([c["equivalence_p"] for c in claims])
    lines = [
        (
            "| claim | model | bits | pairs | difference (points) | 95 % interval | p | Holm p "
            "| TOST p (Holm) | verdict |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, verdict, p_differ, p_same in zip(claims, verdicts, differ, same):
        d = c["difference"]
        lines.append(
            f"| {c['claim']} | {c['family']} | {c['bits']} | {d.n} | {d.mean:+.2f} | "
            f"[{d.low:+.2f}, {d.high:+.2f}] | {d.p:.3g} | {p_differ:.3g} | {p_same:.3g} "
            f"| {verdict} |"
        )
    lines.append("")
    lines.append(
        f"'holds' / 'reversed': Holm-adjusted p < 0.05 over the {len(claims)} claims (the "
        f"95 % interval then excludes zero); 'equal': Holm-adjusted TOST p < 0.05 with a "
        f"margin of ±{margin} points; otherwise 'not resolved'. A claim 'equals' is 'equal' "
        f"when its equivalence test passes, even if the difference is also significant, "
        f"and 'differs' when only the difference is."
    )
    return lines


def _mean_ci(values) -> str:
    """Mean and 95 % interval in percent; names the run count when some runs have no value."""
    present = [100 * v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.2f} (1 run)"
    d = stats.paired_difference(present)
    some = f" ({len(present)} runs)" if len(present) < len(values) else ""
    return f"{d.mean:.2f} [{d.low:.2f}, {d.high:.2f}]{some}"


def _steps(records) -> str:
    """The file's worst logit differences from Keras in output steps, over the runs.

    Logits beyond the file's calibrated output range saturate there; runs that
    measured it give the saturated share apart ('sat.'), older runs counted it in.
    """
    p99 = [r["tflite_logit_steps_p99"] for r in records if "tflite_logit_steps_p99" in r]
    worst = [r["tflite_logit_steps_max"] for r in records if "tflite_logit_steps_max" in r]
    if not p99:
        return "-"
    saturated = [r["tflite_saturated"] for r in records if "tflite_saturated" in r]
    tail = f", sat. {100 * max(saturated):.3f} %" if saturated else ""
    return f"{max(p99):.2f} / {max(worst):.2f}{tail}"


def _results_table(records) -> list[str]:
    groups: dict = defaultdict(list)
    for run, r in records.items():
        groups[(_family(run.pretrained), run.bits, run.method, run.threshold)].append(r)
    lines = [
        (
            "| model | bits | method | threshold | runs | stage A top-1 % | Keras QAT top-1 % "
            "| .tflite top-1 % (XNNPACK) | agreement % | logit steps p99 / max | MACs (M) "
            "| params |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups):
        family, bits, method, threshold = key
        rs = groups[key]
        agreement = [r.get("tflite_agreement") for r in rs if r.get("tflite_agreement") is not None]
        lines.append(
            f"| {family} | A{bits[0]}/W{bits[1]} | {LABELS.get(method, method)} | {threshold} "
            f"| {len(rs)} | {_mean_ci([_stage_a_end(r) for r in rs])} "
            f"| {_mean_ci([r['accuracy'] for r in rs])} "
            f"| {_mean_ci([r.get('tflite_accuracy') for r in rs])} "
            f"| {_pct(np.mean(agreement)) if agreement else '-'} | {_steps(rs)} "
            f"| {np.mean([r['macs'] or 0 for r in rs]) / 1e6:.2f} "
            f"| {int(np.mean([r['params'] for r in rs]))} |"
        )
    return lines


def _curves(records) -> dict:
    """{(family, bits): {method: (epochs, mean accuracy per epoch, runs)}}."""
    out: dict = defaultdict(dict)
    grouped: dict = defaultdict(list)
    for run, r in records.items():
        if run.threshold == "1e-5":
            grouped[(_family(run.pretrained), run.bits, run.method)].append(r["curve"])
    for (family, bits, method), curves in grouped.items():
        stages = list(dict.fromkeys(p["stage"] for p in curves[0]))
        series = []
        for curve in curves:
            ordered = sorted(curve, key=lambda p: (stages.index(p["stage"]), p["epoch"]))
            series.append([p["accuracy"] for p in ordered])
        length = min(len(s) for s in series)
        mean = np.mean([s[:length] for s in series], axis=0)
        out[(family, bits)][method] = (np.arange(1, length + 1), mean, len(series))
    return out


def _plot_curves(curves, path: str) -> str | None:
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for method, (epochs, mean, n) in sorted(curves[key].items()):
            ax.plot(epochs, 100 * mean, marker="o", ms=3, label=f"{method} ({n})")
        ax.set_title(f"{key[0]} A{key[1][0]}/W{key[1][1]}", fontsize=9)
        ax.set_xlabel("fine-tuning epoch (both stages)")
        ax.set_ylabel("test top-1 %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curve_lines(curves) -> list[str]:
    lines = []
    for key in sorted(curves):
        family, bits = key
        lines += [f"**{family}, A{bits[0]}/W{bits[1]}** (mean top-1 % after each epoch)", ""]
        for method, (_, mean, n) in sorted(curves[key].items()):
            points = " ".join(f"{100 * v:.1f}" for v in mean)
            tail = 100 * (mean[-1] - mean[int(0.75 * (len(mean) - 1))])
            lines.append(f"- {method} ({n} runs): {points}  (last quarter: {tail:+.2f} points)")
        lines.append("")
    return lines


def _regime_lines(pretrained: dict) -> list[str]:
    lines = [
        "| pretrained | BN eps | float top-1 % | dead (V < eps) | dead (V < 1e-5) | "
        + " | ".join(f"dead {k}" for k in KINDS)
        + " | largest folded range without PfQ | with PfQ | layers PfQ narrows > 2x "
        "| weights PfQ removes |",
        "|---|---|---|---|---|" + "---|" * len(KINDS) + "---|---|---|---|",
    ]
    for pid, info in pretrained.items():
        dead = info["dead_1e-5"]
        total = dead["all"]
        ranges = list(info["folded_ranges"].values())
        cells = [
            f"{dead[k][0]}/{dead[k][1]} ({100 * dead[k][0] / dead[k][1]:.0f} %)"
            if k in dead
            else "-"
            for k in KINDS
        ]
        lines.append(
            f"| {pid} | {info['bn_epsilon']:g} | {_pct(info['float_accuracy'])} "
            f"| {info['dead_eps']['all'][0]} "
            f"| {total[0]}/{total[1]} ({100 * total[0] / total[1]:.1f} %) | "
            + " | ".join(cells)
            + f" | {max(r[0] for r in ranges):.3g} | {max(r[1] for r in ranges):.3g} "
            f"| {sum(r[1] < 0.5 * r[0] for r in ranges)}/{len(ranges)} "
            f"| {100 * info['params_removed_1e-5'] / info['params']:.1f} % |"
        )
    return lines


def _target_lines(pretrained: dict, dead_target=0.2, float_floor=0.91) -> list[str]:
    """How close the pilots came to the regime the paper describes, and why not closer."""
    fraction = {
        pid: info["dead_1e-5"]["all"][0] / info["dead_1e-5"]["all"][1]
        for pid, info in pretrained.items()
        if info["bn_epsilon"] <= 1e-5 and "mobilenet_v1" in pid  # the target's model
    }
    good = [p for p in fraction if pretrained[p]["float_accuracy"] >= float_floor]
    if not good:
        return []
    best = max(good, key=fraction.get)
    most = max(fraction, key=fraction.get)
    text = (
        f"Target (MobileNetV1-style): {100 * dead_target:.0f} % of BN channels dead at 1e-5 "
        f"with float top-1 >= {100 * float_floor:.0f} %. Closest with that accuracy: {best}, "
        f"{100 * fraction[best]:.1f} % dead at {_pct(pretrained[best]['float_accuracy'])} %"
    )
    if most != best:
        text += (
            f"; more decay kills more channels but costs accuracy ({most}: "
            f"{100 * fraction[most]:.1f} % dead at {_pct(pretrained[most]['float_accuracy'])} %)"
        )
    text += (
        ". Why not closer: dead channels accumulate over long training at a high learning "
        "rate, and the paper pretrains for 600 epochs where this benchmark's budget allows "
        "15; with decay only where MobileNet applies it, the channels that die are the "
        "depthwise ones, whose kernels carry no decay."
    )
    return [text, ""]


def _recipe_lines(pretrained: dict) -> list[str]:
    from tf_pfq.recipes import FASHION_MNIST_RECIPES

    used = sorted({info["recipe"] for info in pretrained.values()})
    return [
        f"- **{name}**: `{json.dumps(FASHION_MNIST_RECIPES[name], sort_keys=True)}`"
        for name in used
        if name in FASHION_MNIST_RECIPES
    ]


def _ratio_lines(pretrained: dict) -> list[str]:
    ids = list(pretrained)
    layers = list(dict.fromkeys(k for i in ids for k in pretrained[i]["folded_ranges"]))
    lines = ["| layer | " + " | ".join(ids) + " |", "|---|" + "---|" * len(ids)]
    for layer in layers:
        cells = []
        for i in ids:
            r = pretrained[i]["folded_ranges"].get(layer)
            cells.append(f"{r[1] / r[0]:.3g} ({r[0]:.3g})" if r and r[0] > 0 else "-")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines


def _threshold_lines(thresholds: dict) -> list[str]:
    lines = [
        (
            "| pretrained | threshold | dead BN channels | channels removed | weights removed "
            "| largest removed output std | max output change | float top-1 % after PfQ |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for pid, rows in thresholds.items():
        same = {r["threshold"]: r["removed_by_layer"] for r in rows}
        for r in rows:
            note = " (the same channels as 1e-5)" if r["threshold"] != "1e-5" and same[
                r["threshold"]] == same.get("1e-5") else ""  # fmt: skip
            change = r["max_output_change"]
            lines.append(
                f"| {pid} | {r['threshold']}{note} | {r['dead']} | {r['removed']} "
                f"| {100 * r['params_removed'] / r['params']:.1f} % | {r['max_removed_std']:.3g} "
                f"| {'-' if change is None else f'{change:.3g}'} | {_pct(r['float_accuracy'])} |"
            )
    return lines


def _ptq_lines(ptq: dict) -> list[str]:
    lines = [
        "| pretrained | quantized | weights | without PfQ % | with PfQ % | PfQ - without |",
        "|---|---|---|---|---|---|",
    ]
    for pid, rows in ptq.items():
        by = {
            (r["pfq"], r["activation_bits"], r["weight_bits"], r.get("per_channel", False)): r[
                "accuracy"
            ]
            for r in rows
        }
        for _, a, w, per_channel in [k for k in by if not k[0]]:
            label = f"{'A' + str(a) if a else 'A float'}/{'W' + str(w) if w else 'W float'}"
            kind = "-" if w is None else ("per channel" if per_channel else "per tensor")
            off, on = by[(False, a, w, per_channel)], by.get((True, a, w, per_channel))
            diff = f"{100 * (on - off):+.2f}" if on is not None else "-"
            lines.append(f"| {pid} | {label} | {kind} | {_pct(off)} | {_pct(on)} | {diff} |")
    return lines


def _export_notes(records) -> list[str]:
    """Why a method has no .tflite top-1: the refusal its runs recorded, once per method."""
    notes: dict = {}
    for run, record in records.items():
        note = record.get("tflite_note")
        if note and record.get("tflite_accuracy") is None:
            # The converter's message starts with a source location; its reason follows "error:".
            reason = note.split("error:", 1)[-1].strip() if "error:" in note else note
            notes.setdefault(run.method, (reason, []))[1].append(run.id)
    lines = [
        f"- **{method}** has no .tflite top-1 ({len(ids)} runs): {reason}"
        for method, (reason, ids) in sorted(notes.items())
    ]
    return ["Exported files:", "", *lines, ""] if lines else []


def write(state, nets, runs, flags_, started, machine) -> None:
    """Writes `<prefix>.md` and the curve plot from everything recorded."""
    import time

    records = _records(state, runs)
    claims = _claims(records, flags_.margin)
    directory = os.path.dirname(state.prefix) or "."
    base = os.path.basename(state.prefix)
    plot = _plot_curves(_curves(records), os.path.join(directory, f"{base}_curves.png"))
    wall = sum(r["wall_s"] for r in records.values())
    recorded = len(records) + len(_records(state, runs, budget=2))
    lines = [
        "# Evidence benchmark: PfQ on Fashion-MNIST",
        "",
        (
            f"{recorded} of {len(runs)} planned fine-tuning runs recorded "
            f"({'complete' if recorded == len(runs) else 'in progress'}); "
            f"fine-tuning time {wall / 3600:.2f} h on {machine} (this invocation "
            f"{(time.time() - started) / 60:.0f} min)."
        ),
        "",
        "Settings: " + json.dumps(state.settings, sort_keys=True),
        "",
        "## 1. The regime",
        "",
        (
            "Pretraining recipes (`tf_pfq.recipes.FASHION_MNIST_RECIPES`, MobileNet-style "
            "width 0.5, 28x28, all 60,000 training images):"
        ),
        "",
        *_recipe_lines(state.summary["pretrained"]),
        "",
        *_regime_lines(state.summary["pretrained"]),
        "",
        *_target_lines(state.summary["pretrained"]),
        (
            "Figure 2 ratio: the BN-folded kernel range with PfQ (threshold 1e-5) over the "
            "range without, per layer; below 1 means PfQ narrowed it. Per layer (ratio, and "
            "the range without PfQ):"
        ),
        "",
        *_ratio_lines(state.summary["pretrained"]),
        "",
        "## 2. Before any fine-tuning",
        "",
        *_ptq_lines(state.summary["ptq"]),
        "",
        "## 3. Accuracy of every method",
        "",
        *_results_table(records),
        "",
        "## 4. Learning curves",
        "",
        *([f"![curves]({os.path.basename(plot)})", ""] if plot else []),
        *_curve_lines(_curves(records)),
        "Twice the fine-tuning budget, one seed (where the curves flatten):",
        "",
        *_budget_lines(state, runs),
        "",
        "## 5. Claims",
        "",
        *_claims_table(claims, flags_.margin),
        "",
        "## 6. The PfQ threshold",
        "",
        (
            "Before any fine-tuning (float model, 10,000 test images; max output change over the "
            "logits on 256 training images):"
        ),
        "",
        *_threshold_lines(state.summary.get("thresholds", {})),
        "",
        (
            "After fine-tuning: the claim 'threshold: each BN's epsilon beats 1e-5' in section 5 "
            "(the weak-regime model, whose BN epsilon is 1e-3; in the paper's regime epsilon is "
            "1e-5 and the rules coincide)."
        ),
        "",
        "## 7. Baselines, named for what they are",
        "",
        *[f"- **{m}**: {note}." for m, note in BASELINE_NOTES.items()],
        "",
        *_export_notes(records),
        (
            "Thresholds of the weak-regime study: "
            + ", ".join(f"{k} = {v!r}" for k, v in THRESHOLDS.items())
        ),
        "",
    ]
    with open(state.prefix + ".md", "w") as f:
        f.write("\n".join(lines))
    _ = Run  # the record keys
