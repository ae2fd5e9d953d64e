"""The offline demo runs end to end in a reduced-steps mode and writes what it promises."""

import json

import pytest

from clic.cli import main
from clic.models import bundled_model


def _check_outputs(out):
    report = json.loads((out / "report.json").read_text())
    for name in ("grid.png", "transfer.png", "transfer_attention.png", "generated_0.png", "generated_3.png",
                 "learning/attention_0_0.png", "learning/mask_0_0.png", "concept.safetensors", "report.md"):
        assert (out / name).exists(), name
    assert set(report["seconds"]) == {"learn_s", "transfer_s", "generate_s", "total_s"}
    return report


def test_demo_on_tiny_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model", "tiny", "--steps", "2", "--sample-steps", "3", "-q"]) == 0
    report = _check_outputs(out)
    assert report["learn_steps"] == 2 and not report["toy_model"]
    assert "# clic demo" in capsys.readouterr().out


@pytest.mark.skipif(bundled_model() is None, reason="no bundled toy model in this checkout")
def test_demo_on_bundled_toy_model(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--sample-steps", "4", "-q"]) == 0
    report = _check_outputs(out)
    det = report["detector"]
    assert report["toy_model"] and det["learned"] == "crosses-staggered"
    assert len(det["generated_objects"]) == 4 and det["generated_found"] == det["generated_objects"].count(det["learned"])
    assert det["transfer_found"] == (det["transfer_region"] == det["learned"])
