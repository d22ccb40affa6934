"""End to end on the real embedded SmolLM2-135M-Instruct: harvest -> train -> save -> load -> eval.

Small budgets (a few thousand tokens) keep this to about a minute on 2 cores; the figures that
matter (explained variance, CE loss score at 204,800 and 1M tokens) are in the README.
"""

from __future__ import annotations

import json

import pytest

from saelab.analysis.evaluation import EvalConfig, evaluate
from saelab.core.data import DataConfig
from saelab.core.models import load_model
from saelab.dictionaries import DictionaryConfig
from saelab.dictionaries.io import load_dictionary
from saelab.training import TrainConfig, train

pytestmark = pytest.mark.integration


def test_embedded_model_end_to_end(tmp_path):
    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"),
        n_tokens=32768,
        batch_size=1024,
        lr=2e-3,
        checkpoint_every=16,
        dead_after_tokens=4096,
        dictionaries=[
            DictionaryConfig(architecture="topk", d_in=0, d_sae=1024, k=32),
            DictionaryConfig(architecture="relu", d_in=0, d_sae=1024, l1_coefficient=2.0),
        ],
    )
    saved = train(cfg, progress=False)
    assert len(saved) == 2
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0], [m for m in metrics if m["dictionary"] == metrics[0]["dictionary"]][-1]
    assert last["fvu"] < first["fvu"]

    lm = load_model(None, dtype="auto")  # bfloat16 only where it runs fast
    topk = load_dictionary(saved["topk-k32-w1024"])
    assert topk.cfg.d_in == 576 and topk.cfg.metadata["hook_name"] == "blocks.15.hook_resid_post"
    result = evaluate(
        lm,
        topk,
        DataConfig(split="eval"),
        EvalConfig(n_tokens=4096, ce_contexts=8),
        out_dir=saved["topk-k32-w1024"],
        progress=False,
    )
    assert result["l0"] == pytest.approx(32, abs=0.5)
    assert 0.4 < result["explained_variance"] < 1.0  # an untrained SAE scores below 0
    assert result["ce_clean"] < result["ce_sae"] < result["ce_zero"]
    assert 0.5 < result["ce_loss_score"] <= 1.0
    assert (saved["topk-k32-w1024"] / "density.png").stat().st_size > 1000
