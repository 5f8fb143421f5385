"""PruneReport: totals, readable text, dict/JSON forms."""

from __future__ import annotations

import json

import pytest

from tf_pfq.report import LayerReport, PruneReport


def _report(**kwargs):
    rows = [
        LayerReport("conv", "Conv2D", 8, 6, removed=[1, 4], params_before=80, params_after=60),
        LayerReport(
            "conv_bn",
            "BatchNormalization",
            8,
            6,
            removed=[1, 4],
            dead=[1, 2, 4],
            kept={2: "Add 'add' has a live channel 2 on another branch"},
            notes=["moving_mean -= constants removed before 'x'"],
            residual_std=0.25,
        ),
        LayerReport("fc", "Dense", 10, 10, notes=["bias += removed constants (eq. 14)"]),
        LayerReport("idle", "Dense", 3, 3),
    ]
    args = {"params_before": 1000, "params_after": 900, "macs_before": 5000, "macs_after": 4000}
    args.update(kwargs)
    return PruneReport("net", rows, **args)


def test_totals():
    report = _report()
    assert (report.num_dead, report.num_pruned, report.num_kept) == (3, 2, 1)
    assert (report.bn_channels_before, report.bn_channels_after) == (8, 6)
    assert (report.channels_before, report.channels_after, report.num_removed) == (21, 19, 2)
    assert report.layer("fc").notes and not report.layer("idle").changed
    with pytest.raises(KeyError, match="nope"):
        report.layer("nope")


def test_str_lists_changed_layers_reasons_and_totals():
    text = str(_report(exact=False, max_output_change=0.0123, absorption="approximate"))
    assert "dead BN channels: 3, pruned 2, kept 1" in text
    assert "params: 1,000 -> 900 (10.0% less)" in text
    assert "MACs: 5,000 -> 4,000 (20.0% less)" in text
    assert "kept 1 [2]: Add 'add' has a live channel 2 on another branch" in text
    assert "interior" in text and "0.0123" in text
    assert "idle" not in text
    assert "vary by at most std 0.25" in text


def test_str_without_macs_or_calibration():
    text = str(_report(macs_before=None, macs_after=None))
    assert "MACs" not in text and "calibration" not in text and "exact" in text


def test_dict_and_json_round_trip():
    report = _report(max_output_change=0.5)
    data = json.loads(report.to_json())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["pruned_bn_channels"] == 2 and data["macs_after"] == 4000
    assert data["max_output_change"] == 0.5 and data["max_residual_std"] == 0.25
    row = data["layers"][1]
    assert row["name"] == "conv_bn" and row["kept"] == {"2": report.layer("conv_bn").kept[2]}
    assert row["removed"] == [1, 4] and row["dead"] == [1, 2, 4]


@pytest.mark.parametrize(
    ("absorption", "exact", "expected"),
    [
        ("exact", True, "absorption: exact (1 constant carrier past zero padding)"),
        ("keep", True, "absorption: exact (dead channels that meet zero padding kept)"),
        ("approximate", False, "absorption: approximate: exact in the interior only"),
        ("approximate", True, "absorption: approximate, exact here"),
        ("none", True, "absorption: none (absorb=False)"),
    ],
)
def test_str_and_dict_name_the_absorption(absorption, exact, expected):
    report = _report(exact=exact, absorption=absorption)
    carrier = "constant carrier: holds the removed constants that meet zero padding in 'x'"
    report.layer("conv_bn").kept[3] = carrier
    assert expected in str(report)
    data = report.to_dict()
    assert data["absorption"] == absorption and data["constant_carriers"] == 1
    assert data["exact"] is exact
