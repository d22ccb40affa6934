"""A crosscoder's latents in the feature store: analysed over its two member models (PairedModels), each
latent's per-member decoder norms, logit effects, examples and diffing tags checked against brute force;
`saelab analyze` / `saelab diff` on a crosscoder folder; a schema 3 store upgraded in place."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import torch

from saelab.analysis.features import AnalysisConfig, analyze
from saelab.analysis.store import SCHEMA_VERSION, FeatureStore
from saelab.analysis.views import DisplayContext
from saelab.core.data import DataConfig
from saelab.core.models import load_model
from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.dictionaries.io import save_dictionary
from saelab.diffing import diff_latents
from saelab.diffing.paired import PairedModels
from saelab.errors import FeatureStoreError, ModelNotFoundError
from tests.helpers import make_model, make_tokenizer, refused, run, write_corpus

D, WIDTH, CTX = 16, 24, 16
HOOK = "blocks.0.hook_resid_post"
SCALES = [2.0, 0.5]  # folded member scales: decoder norms are compared in the normalised space
B_ONLY, A_ONLY = range(0, 6), range(6, 12)  # latents planted to write (almost) only into B / only into A


def analysis_cfg() -> AnalysisConfig:
    return AnalysisConfig(
        n_tokens=16 * CTX, batch_contexts=4, top_k=4, n_quantiles=2, per_quantile=2, reservoir_size=8,
        window_left=3, window_right=1, logit_top=4, neighbours=3, geometry_chunk=10,
    )  # fmt: skip


def tiny_crosscoder(member_models: list[str]):
    """A random crosscoder_batchtopk over model{i}/HOOK with planted B-only and A-only latents."""
    cfg = DictionaryConfig(
        architecture="crosscoder_batchtopk", d_in=D, d_sae=WIDTH, k=4, layers=[0, 1],
        hook_name="model{i}/" + HOOK, normalize_activations="none",
        metadata={"member_models": member_models, "member_scales": SCALES},
    )  # fmt: skip
    cc = build_dictionary(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        cc.W_dec.copy_(torch.randn(WIDTH, 2, D, generator=g) * 0.3)
        cc.W_dec.div_(torch.tensor(SCALES)[None, :, None])  # comparable norms in the normalised space
        cc.W_dec[list(B_ONLY), 0] *= 0.02
        cc.W_dec[list(A_ONLY), 1] *= 0.02
        cc.W_enc.copy_(torch.randn(2, D, WIDTH, generator=g) * 5.0)  # tiny residuals (norm ~0.1)
        cc.b_enc.fill_(-0.3)
    return cc.eval()


def build(root):
    """Two tiny Llamas sharing a tokenizer (saved), a corpus, the crosscoder, and its analysed store."""
    folders = []
    for name, seed in (("base", 0), ("tuned", 1)):
        make_model(n_layers=2, hidden=D, seed=seed).save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
        folders.append(root / name)
    corpus = write_corpus(root / "corpus.jsonl", n_docs=80)
    lms = [load_model(f, device="cpu", dtype=torch.float32) for f in folders]
    paired = PairedModels(lms)
    cc = tiny_crosscoder([str(f) for f in folders])
    data = DataConfig(source=str(corpus), split="all", context_size=CTX)
    path = root / "cc.db"
    analyze(paired, cc, data, analysis_cfg(), path, progress=False)
    return paired, cc, data, path, corpus, folders


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    return build(tmp_path_factory.mktemp("crosscoder_store"))


def test_per_member_rows_match_brute_force(analysed):
    paired, cc, data, path, *_ = analysed
    norms = cc.W_dec.detach().norm(dim=-1) * torch.tensor(SCALES)  # [F, 2], normalised space
    expected_diff = diff_latents(cc).rows()
    # Every latent's activations on the same tokens, kept at once.
    hooks = cc.cfg.input_hooks
    acts = []
    with torch.no_grad():
        for ids in data.batches(paired.tokenizer, 4, max_contexts=16):
            keep = ~data.mask(ids, paired.tokenizer)
            acts.append(cc.encode(cc.capture_inputs(paired.capture(ids, hooks))) * keep[..., None])
    flat = torch.cat(acts).reshape(-1, WIDTH)
    with FeatureStore(path, create=False) as store:
        meta = store.meta()
        assert meta["members"] == paired.names and len(meta["member_models"]) == 2
        display = DisplayContext.of(store)
        assert display.members == paired.names
        tags = store.latent_diff_counts()
        assert tags.get("b_only") == len(B_ONLY) and tags.get("a_only") == len(A_ONLY)
        for i in range(WIDTH):
            row = store.feature(i)
            assert [m["member"] for m in row["members"]] == [0, 1]
            for m, member in enumerate(row["members"]):
                assert member["decoder_norm"] == pytest.approx(float(norms[i, m]), rel=1e-5)
                # The latent's decoder for member m through model m's own final norm and unembedding.
                lm = paired.lms[m]
                effects = (cc.decoder(m)[i].detach() * lm.final_norm_gain()) @ lm.unembed.detach().T
                top = effects.topk(4)
                assert [t for t, _ in member["logits_pos"]] == top.indices.tolist()
                assert [v for _, v in member["logits_pos"]] == pytest.approx(top.values.tolist(), rel=1e-4)
                assert member["logit_hist"]["max"] == pytest.approx(float(effects.max()), rel=1e-4)
            home = int(norms[i].argmax())  # the main columns: the member the latent writes most into
            assert row["logits_pos"] == row["members"][home]["logits_pos"]
            want = expected_diff[i]
            assert row["diff"]["tag"] == want["tag"]
            assert row["diff"]["delta_norm"] == pytest.approx(want["delta_norm"], abs=1e-6)
            assert row["diff"]["cosine"] == pytest.approx(want["cosine"], abs=1e-5)
            assert row["diff"]["nu_eps"] is None and row["diff"]["nu_r"] is None  # no data: no ν
            # Examples: the strongest activation, and what it writes into each member.
            values = flat[:, i]
            assert row["n_active"] == int((values > 0).sum())
            page = display.page(store, i)
            if row["n_active"]:
                best = page.top[0]
                assert best.value == pytest.approx(float(values.max()), rel=1e-5)
                assert [m.member for m in best.members] == paired.names
                for m, written in enumerate(best.members):
                    assert written.value == pytest.approx(float(values.max() * norms[i, m]), rel=1e-5)
                api = best.api()["members"]
                assert api[1]["label"] == "tuned" and api[1]["value"] == written.value
            assert [m.decoder_norm for m in page.feature.members] == [
                m["decoder_norm"] for m in row["members"]
            ]
            assert sum(m.share for m in page.feature.members) == pytest.approx(1.0)
        assert sum(store.feature(i)["n_active"] > 0 for i in range(WIDTH)) > WIDTH // 2


def test_the_list_filters_and_sorts_by_tag_and_delta_norm(analysed):
    path = analysed[3]
    with FeatureStore(path, create=False) as store:
        b_only = store.list_features(tag="b_only", include_dead=True, limit=100)
        assert sorted(r["idx"] for r in b_only) == list(B_ONLY)
        assert all(r["tag"] == "b_only" and r["delta_norm"] < 0.1 for r in b_only)
        assert store.count_features(tag="a_only") == len(A_ONLY) and store.count_features(tag="other") >= 0
        by_delta = store.list_features(sort="delta_norm", descending=False, limit=100)
        deltas = [r["delta_norm"] for r in by_delta]
        assert deltas == sorted(deltas) and by_delta[0]["idx"] in B_ONLY
        assert store.list_features(tag="shared", min_score=0.5) == []  # composes with the other filters


def test_latent_scaling_rows_add_nu_and_mismatched_rows_are_refused(analysed, tmp_path):
    paired, cc, data, path, *_ = analysed
    copy = tmp_path / "copy.db"
    copy.write_bytes(path.read_bytes())
    x = torch.randn(256, 2, D, generator=torch.Generator().manual_seed(0))
    diff = diff_latents(cc, [x])
    with FeatureStore(copy, create=False) as store:
        assert store.set_latent_diff(diff.rows(), {"via": "test"}) == WIDTH
        assert store.meta()["latent_diff"] == {"via": "test"}
        for i, want in enumerate(diff.rows()):
            got = store.feature(i)["diff"]
            for key in ("nu_eps", "nu_r"):
                assert (got[key] is None) == (want[key] is None)
                if want[key] is not None:
                    assert got[key] == pytest.approx(want[key], abs=1e-6)
            assert got["fired"] == want["fired"]
        before = store.dump()["latent_diff"]
        with pytest.raises(FeatureStoreError, match="holds 24 latents, the rows name 3"):
            store.set_latent_diff(diff.rows()[:3])
        with pytest.raises(FeatureStoreError, match="tag must be"):
            store.set_latent_diff([{**r, "tag": None} for r in diff.rows()])
        assert store.dump()["latent_diff"] == before  # a refused write leaves the figures as they were
    # ... and `analyze` takes them at once (as saelab analyze does from diff.json).
    again = tmp_path / "again.db"
    analyze(paired, cc, data, analysis_cfg(), again, progress=False, latent_diff=diff)
    with FeatureStore(again, create=False) as store:
        nus = [store.feature(i)["diff"]["nu_eps"] for i in range(WIDTH)]
        assert any(v is not None and math.isfinite(v) for v in nus)


def test_a_crosscoder_over_one_model_is_refused_naming_paired_models(analysed, tmp_path):
    paired, cc, data, *_ = analysed
    with pytest.raises(ModelNotFoundError, match="PairedModels"):
        analyze(paired.lms[0], cc, data, analysis_cfg(), tmp_path / "x.db", progress=False)
    assert not (tmp_path / "x.db").exists()


def _as_schema_3(path) -> None:
    """Turn a store into what schema 3 wrote: no members / latent_diff tables, version 3."""
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE members")
        db.execute("DROP TABLE latent_diff")
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")


def test_a_schema_3_store_is_upgraded_in_place_and_keeps_everything(analysed, tmp_path):
    path = tmp_path / "v3.db"
    path.write_bytes(analysed[3].read_bytes())
    _as_schema_3(path)
    with sqlite3.connect(path) as db:
        before = {t: db.execute(f"SELECT * FROM {t}").fetchall() for t in ("features", "examples", "vocab")}
    with pytest.warns(UserWarning, match=rf"schema version 3 feature store: upgrading it in place to version "
                      rf"{SCHEMA_VERSION} \(tables for crosscoder members"):  # fmt: skip
        store = FeatureStore(path, create=False)
    with store:
        assert store.meta()["schema_version"] == SCHEMA_VERSION == 4
        with sqlite3.connect(path) as db:
            for table, rows in before.items():
                assert db.execute(f"SELECT * FROM {table}").fetchall() == rows, table
        row = store.feature(0)
        assert row["members"] == [] and row["diff"] is None  # readable: it just has no crosscoder figures
        assert store.list_features(limit=3)[0]["tag"] is None and store.count_features(tag="b_only") == 0
        assert DisplayContext.of(store).page(store, 0).feature.members == []


def test_saelab_analyze_and_diff_on_a_crosscoder_folder(analysed, tmp_path):
    paired, cc, _, _, corpus, folders = analysed
    folder = save_dictionary(cc, tmp_path / "cc")
    args = ("--data", corpus, "--tokens", 8 * CTX, "--top-k", 3, "--dtype", "float32", "--device", "cpu")
    code, out, err = run("analyze", folder, *args)  # the members from the crosscoder's member_models
    assert code == 0, err
    store_path = folder / "features.db"
    with FeatureStore(store_path, create=False) as store:
        assert store.meta()["members"] == [str(f) for f in folders]
        assert store.latent_diff_counts()["b_only"] == len(B_ONLY)
        assert store.feature(0)["diff"]["nu_eps"] is None
    # saelab diff writes its figures into the store it finds beside the crosscoder.
    code, out, err = run("diff", folder)
    assert code == 0, err
    assert "tagged" in " ".join(out.split())
    with FeatureStore(store_path, create=False) as store:
        assert store.meta()["latent_diff"]["diff_json"].endswith("diff.json")
    saved = json.loads((folder / "diff" / "diff.json").read_text())
    assert len(saved["latents"]) == WIDTH
    # --model twice overrides member_models (here: the same models, in order).
    code, _, err = run("analyze", folder, "--model", folders[0], "--model", folders[1], *args,
                       "--out", tmp_path / "over.db")  # fmt: skip
    assert code == 0, err


def test_missing_member_models_are_refused_with_the_fix(analysed, tmp_path):
    *_, corpus, folders = analysed
    lost = tiny_crosscoder([str(tmp_path / "gone_a"), str(tmp_path / "gone_b")])
    folder = save_dictionary(lost, tmp_path / "lost")
    message = refused("analyze", folder, "--data", corpus, "--tokens", 64)
    assert "member 0" in message and "--model MODEL_0 --model MODEL_1" in message
    message = refused("analyze", folder, "--model", folders[0], "--data", corpus)
    assert "1 --model given" in message
