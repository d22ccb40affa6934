"""CONTRIBUTING.md's example family, as a new file of saelab/dictionaries/families/, works everywhere.

The code block of "## Adding a dictionary family" is written into a folder that joins the families
package's path, so the registry finds it the way it finds a real new file. It is then trained by
the real trainer on synthetic data, saved and reloaded through dictionaries/io, and run by the toy
bench; afterwards it is unregistered, so every other test sees the five built-in families.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from saelab.dictionaries import FAMILIES, DictionaryConfig, family, registry
from saelab.dictionaries.io import load_dictionary, save_dictionary
from saelab.toy.bench import BenchSetting, bench_settings, markdown_table, plot_setting, run_setting
from saelab.toy.synthetic import SYNTHETIC_HOOK, SyntheticConfig
from saelab.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
BUILT_IN = [
    "relu", "gated", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk", "clt", "clt_batchtopk", "crosscoder", "crosscoder_batchtopk",
]  # fmt: skip


def example() -> tuple[str, str]:
    """(module name, code) of the example family in CONTRIBUTING.md."""
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    section = text.split("## Adding a dictionary family", 1)
    assert len(section) == 2, "CONTRIBUTING.md has no section '## Adding a dictionary family'"
    body = re.split(r"\n## ", section[1], maxsplit=1)[0]
    path = re.search(r"saelab/dictionaries/families/(\w+)\.py", body)
    code = re.search(r"```python\n(.*?)```", body, re.DOTALL)
    assert path and code, "the section names no families/<name>.py file or has no python block"
    return path[1], code[1]


@pytest.fixture
def example_family(tmp_path, monkeypatch):
    """The example as a new module of the families package, discovered; unregistered afterwards."""
    module, code = example()
    folder = tmp_path / "families"
    folder.mkdir()
    (folder / f"{module}.py").write_text(code, encoding="utf-8")
    package = importlib.import_module(registry.FAMILIES_PACKAGE)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    before = list(FAMILIES)
    registry.discover()
    added = [name for name in FAMILIES if name not in before]
    try:
        assert len(added) == 1, f"the registry did not pick up families/{module}.py (it has {list(FAMILIES)})"
        yield family(added[0])
    finally:
        for name in added:
            registry.unregister(name)
        sys.modules.pop(f"{registry.FAMILIES_PACKAGE}.{module}", None)
    assert list(FAMILIES) == BUILT_IN


def test_the_registry_finds_the_new_file_and_lists_it_last(example_family):
    fam = example_family
    assert list(FAMILIES)[: len(BUILT_IN)] == BUILT_IN and list(FAMILIES)[-1] == fam.name
    assert fam.cls.__module__ == f"{registry.FAMILIES_PACKAGE}.{example()[0]}"
    assert fam.knob_default is not None and fam.label
    cfg = DictionaryConfig(architecture=fam.name, d_in=8, d_sae=16)
    assert cfg.options == dict(fam.options)  # defaults carried in the config
    with pytest.raises(ValueError, match="no option"):
        DictionaryConfig(architecture=fam.name, options={"not_an_option": 1})


def test_the_new_family_trains_saves_reloads_and_is_benchmarked(example_family, tmp_path):
    fam = example_family
    synthetic = SyntheticConfig(n_features=16, d=8, mean_active=2, seed=0)
    dcfg = DictionaryConfig(
        architecture=fam.name, d_in=0, d_sae=32, hook_name=SYNTHETIC_HOOK, **fam.with_knob(fam.knob_default)
    )
    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"),
        source=synthetic.as_source(),
        dictionaries=[dcfg],
        n_tokens=40 * 64,
        batch_size=64,
        lr=3e-3,
        log_every=10,
    )
    saved = train(cfg, progress=False)
    ((name, folder),) = saved.items()
    assert name == f"{fam.name}-{fam.tag(dcfg)}-w32"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert lines[-1]["loss"] < lines[0]["loss"], "the trainer's steps did not lower the example's loss"

    raw = json.loads((folder / "cfg.json").read_text())
    assert raw["architecture"] == fam.saelens_name(transcoder=False)
    assert raw["saelab"]["config"]["architecture"] == fam.name
    assert raw["saelab"]["config"].get("options", {}) == dict(fam.options)
    loaded = load_dictionary(folder)
    assert type(loaded) is fam.cls and loaded.cfg.options == dict(fam.options)
    again = load_dictionary(save_dictionary(loaded, tmp_path / "again"))
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again(x), loaded(x))

    # The toy bench runs every registered family: its settings now include this one ...
    quick = bench_settings(quick=True)["uniform"]
    assert fam.name in {c.architecture for c in quick.dictionary_configs(seed=0)}
    # ... and a small setting of this family alone goes through training, scoring, table and plots.
    setting = BenchSetting(
        name="example",
        title="the example family on 16 features in d=8",
        synthetic=synthetic,
        d_sae=32,
        n_samples=40 * 64,
        batch_size=64,
        resample_every=0,
        family_options={},
        family_samples={},
        sweeps={name: [] for name in BUILT_IN} | {fam.name: [fam.knob_default]},
        n_eval=1024,
    )
    rows = run_setting(setting, tmp_path / "bench", progress=False)
    assert [(row["family"], row["knob"], row["value"]) for row in rows] == [
        (fam.name, fam.knob, fam.knob_default)
    ]
    assert fam.label in markdown_table(setting, rows)
    (tmp_path / "plots").mkdir()
    assert all(path.stat().st_size > 0 for path in plot_setting(setting, rows, tmp_path / "plots"))
