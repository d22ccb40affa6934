"""The ground-truth benchmark, reduced: every family trained on one synthetic stream and scored."""

from __future__ import annotations

import json
import time

import pytest

from saelab.dictionaries import FAMILIES
from saelab.errors import SaelabError
from saelab.toy.bench import bench_settings, best_per_family, run_bench

SINGLE_HOOK = {name for name, fam in FAMILIES.items() if not fam.cross_layer}  # the toy data has one hook


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    started = time.perf_counter()
    results = run_bench(out, quick=True, progress=False)
    return out, results, time.perf_counter() - started


def test_quick_bench_writes_table_plots_and_json(quick_bench):
    out, results, _ = quick_bench
    assert (out / "results.md").read_text().startswith("# Ground-truth benchmark")
    assert (out / "pareto_uniform.png").stat().st_size > 10_000
    assert (out / "cosines_uniform.png").stat().st_size > 10_000
    saved = json.loads((out / "results.json").read_text())
    rows = saved["settings"]["uniform"]["rows"]
    assert {row["family"] for row in rows} == SINGLE_HOOK
    for row in rows:
        assert 0 <= row["recovered"] <= 1 and -1 <= row["mmcs"] <= 1
        assert row["l0"] > 0 and row["fvu"] >= 0
        assert len(row["max_cosine_per_feature"]) == 64


def test_every_family_recovers_the_quick_ground_truth(quick_bench):
    """64 features in 32 dimensions: each family's best point finds most of them (seeded, so exact).

    Matryoshka's inner prefixes must reconstruct alone, so on flat, independent features (no hierarchy to
    exploit) its latents mix features more at this budget (MMCS 0.858, 42% recovered, measured): it is in
    the table, but the claim is the flat families'. The hierarchy benchmark (tests/toy/test_toy_hierarchy.py)
    is where Matryoshka is meant to win."""
    _, results, _ = quick_bench
    best = best_per_family(results["settings"]["uniform"]["rows"])
    assert "matryoshka_batchtopk" in best and 0 < best["matryoshka_batchtopk"]["mmcs"] <= 1
    for family, row in best.items():
        if family == "matryoshka_batchtopk":
            continue
        assert row["mmcs"] >= 0.9, (family, row["mmcs"])
        assert row["recovered"] >= 0.75, (family, row["recovered"])


def test_a_finished_bench_is_not_trained_again_and_gives_the_same_numbers(quick_bench):
    out, results, first_seconds = quick_bench
    started = time.perf_counter()
    again = run_bench(out, quick=True, progress=False)
    assert time.perf_counter() - started < first_seconds

    def strip(res):
        return [
            (r["dictionary"], r["mmcs"], r["recovered"], r["l0"]) for r in res["settings"]["uniform"]["rows"]
        ]

    assert strip(again) == strip(results)


def test_settings_match_the_issue():
    settings = bench_settings()
    uniform, sharkey = settings["uniform"], settings["sharkey"]
    assert (uniform.synthetic.n_features, uniform.synthetic.d, uniform.d_sae) == (512, 128, 1024)
    assert uniform.synthetic.frequency == "uniform" and uniform.synthetic.mean_active == 5
    assert (sharkey.synthetic.n_features, sharkey.synthetic.d, sharkey.d_sae) == (512, 256, 1024)
    assert sharkey.synthetic.frequency == "decay" and sharkey.synthetic.frequency_decay == 0.99
    for setting in settings.values():
        assert set(setting.sweeps) == SINGLE_HOOK


def test_unknown_setting_is_refused(tmp_path):
    with pytest.raises(SaelabError, match="unknown benchmark setting"):
        run_bench(tmp_path, quick=True, settings=["nope"], progress=False)


def test_toy_commands_refuse_bad_input_with_a_clear_message(tmp_path):
    from tests.helpers import run

    code, _, err = run("toy", "superposition", "--n", "2", "--m", "3", "--out", tmp_path)
    assert code == 2 and "0 < m < n" in err and "Traceback" not in err
    code, _, err = run("toy", "bench", "--setting", "nope", "--out", tmp_path / "b")
    assert code == 2 and "unknown benchmark setting" in err


def test_toy_phase_command_writes_its_plot(tmp_path):
    from tests.helpers import run

    code, out, err = run("toy", "phase", "--quick", "--out", tmp_path)
    assert code == 0, err
    assert (tmp_path / "phase_diagram.png").is_file() and (tmp_path / "phase_diagram.json").is_file()
    assert "phase diagram: done" in out
