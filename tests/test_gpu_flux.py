"""bench/gpu_flux.py's CPU path: the same script on a 1 + 1 block model, every measurement present and
its calibration readable by `rcgrpo plan --calibration` (the GPU numbers come from a GPU run)."""

import json
import math

from bench.gpu_flux import main
from rcgrpo.plan import Calibration


def test_the_reduced_benchmark_measures_everything_it_reports(tmp_path):
    results = main(["--reduced", "--out", str(tmp_path), "--steps", "4"])
    assert results["device"] == "cpu" and results["matmul_peak_tflops"] > 0
    assert [r["size"] for r in results["rollout"]] == [64, 128]
    for row in results["rollout"]:
        assert row["images_per_s"] > 0 and math.isfinite(row["acd_capture_overhead"]) and 0 < row["mfu"]
    train = results["train"]
    assert [(r["checkpointing"], r["micro_batch_rows"]) for r in train] == [
        (False, 1),
        (False, 2),
        (True, 1),
        (True, 2),
    ]
    assert all(r["seconds"] > 0 and r["rows"] == 4 and r["mfu"] > 0 for r in train)
    saved = json.loads((tmp_path / "gpu_flux.json").read_text())
    assert saved["train"] == train
    calibration = Calibration(**json.loads((tmp_path / "calibration.json").read_text()))
    assert calibration.saved_width > 1 and calibration.forward_s_per_row_block > 0
