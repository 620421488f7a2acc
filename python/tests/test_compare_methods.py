"""examples/python/compare_methods.py against the C++ tool it mirrors.

kvc-attention-error --dump writes a real model's rows (kvref); the script
replays them through kvc from Python and measures the attention-output error
against exact float64 attention. kvc-attention-error measures the same
replay in C++ against full_cache f32: the two means must agree (they differ
only by the reference's float32 rounding), which checks the dump, the
script's replay and its error formula together.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = os.environ.get("KVC_ATTENTION_ERROR")
RUN = ["--model", str(ROOT / "models/kvref/model.bin"), "--windows", "2", "--prompt", "192", "--steps", "8",
       "--chunk", "64"]


@pytest.mark.skipif(not TOOL, reason="KVC_ATTENTION_ERROR (kvc-attention-error, built with the examples) is not set")
def test_compare_methods_agrees_with_kvc_attention_error(tmp_path):
    subprocess.run([TOOL, *RUN, "--dump", str(tmp_path)], check=True, capture_output=True)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["windows"], meta["prompt"], meta["steps"], meta["layers"]) == (2, 192, 8, 4)
    # The plot when matplotlib is there (python3-matplotlib; not a build dependency).
    plot = tmp_path / "plot.png" if importlib.util.find_spec("matplotlib") else None
    table = subprocess.run([sys.executable, str(ROOT / "examples/python/compare_methods.py"), str(tmp_path), "q4_0",
                            "none:f16 + snapkv:0.25", *(["--plot", str(plot)] if plot else [])],
                           check=True, capture_output=True, text=True).stdout
    assert plot is None or plot.stat().st_size > 0
    rows = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(r"\| `([^`]+)` \| (\S+) \| \S+ \| \d+ \| \S+ \| (\S+) \|", table)}
    for spec, args in (("q4_0", ["--cache", "q4_0"]), ("none:f16 + snapkv:0.25", ["--cache", "none:f16", "--evict", "snapkv:0.25"])):
        cpp = json.loads(subprocess.run([TOOL, *RUN, *args], check=True, capture_output=True, text=True).stdout)
        error, kept = rows[spec]
        assert error == pytest.approx(cpp["error_mean"], rel=1e-3), table
        assert kept == pytest.approx(cpp["rows_kept"], abs=1e-3), table
