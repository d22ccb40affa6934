"""Tests for saelab.core.data, .splits and .corpus: sources, splits, packing, resumption, masks, errors."""

import json
import random
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saelab.core import corpus, data
from saelab.core.data import (
    DataConfig,
    check_enough_tokens,
    exclusion_mask,
    iter_contexts,
    iter_texts,
    token_batches,
)
from saelab.core.splits import is_eval_text
from saelab.errors import DataError

WORDS = [f"w{i}" for i in range(200)]


def make_tokenizer(bos=True, eos=True):
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"pad_token": "<pad>", "unk_token": "<unk>"}
    if bos:
        special["bos_token"] = "<bos>"
    if eos:
        special["eos_token"] = "<eos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def make_docs(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 30))) for _ in range(n)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def expected_stream(docs, tok):
    ids = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


# --- packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_packing_is_the_doc_stream_cut_into_contexts(tok, prepend_bos):
    docs, T = make_docs(100), 16
    contexts = list(iter_contexts(docs, tok, T, prepend_bos=prepend_bos, tokenizer_batch=7))
    n = T - 1 if prepend_bos else T
    stream = expected_stream(docs, tok)
    assert len(contexts) == len(stream) // n
    assert all(c.shape == (T,) and c.dtype == torch.long for c in contexts)
    if prepend_bos:
        assert all(c[0].item() == tok.bos_token_id for c in contexts)
    body = torch.cat([c[1:] if prepend_bos else c for c in contexts]).tolist()
    assert body == stream[: len(body)]


def test_no_bos_no_eos_tokenizer_is_an_error():
    with pytest.raises(DataError, match="neither a BOS nor an EOS"):
        list(iter_contexts(["w1 w2"], make_tokenizer(bos=False, eos=False), 4))


def test_eos_is_used_as_bos_when_there_is_no_bos():
    tok = make_tokenizer(bos=False)
    (ctx,) = list(iter_contexts(["w1 w2 w3"], tok, 4))
    assert ctx.tolist()[0] == tok.eos_token_id


def test_skip_contexts_resumes_exactly_and_max_contexts(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(300))
    full = torch.cat(list(token_batches(path, tok, context_size=8, batch_size=5, split="all")))
    assert len(full) > 40
    resumed = torch.cat(list(token_batches(path, tok, 8, 5, split="all", skip_contexts=13)))
    assert torch.equal(resumed, full[13:])
    batches = list(token_batches(path, tok, 8, 5, split="all", skip_contexts=3, max_contexts=12))
    assert [b.shape for b in batches] == [(5, 8), (5, 8), (2, 8)]  # last batch is smaller
    assert torch.equal(torch.cat(batches), full[3:15])
    again = torch.cat(list(token_batches(path, tok, context_size=8, batch_size=5, split="all")))
    assert torch.equal(again, full)  # deterministic


def test_data_config_round_trip_and_batches(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(50))
    cfg = DataConfig(source=str(path), split="all", context_size=8)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert DataConfig.from_dict({**d, "unknown_future_key": 1}) == cfg
    (batch,) = list(cfg.batches(tok, batch_size=4, max_contexts=4))
    assert batch.shape == (4, 8)
    assert cfg.mask(batch, tok)[:, 0].all()


# --- sources -------------------------------------------------------------------------------------


def test_small_txt_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    assert list(iter_texts(tmp_path / "a.txt", split="all")) == ["first paragraph\n\nsecond paragraph\n"]


@pytest.mark.parametrize("sep", ["\n\n", "\n", " "])
def test_large_txt_streams_in_bounded_pieces(tmp_path, sep):
    text = sep.join(" ".join(make_docs(3, seed=i)) for i in range(3000))
    (tmp_path / "big.txt").write_text(text)
    pieces = list(data._read_txt(tmp_path / "big.txt"))
    assert "".join(pieces) == text
    assert len(pieces) >= len(text) // 65536 > 3 and max(map(len, pieces)) <= 65536
    if sep != " ":
        assert all(p.startswith(sep) for p in pieces[1:])  # cut at paragraph (else line) boundaries


def test_jsonl_text_field_and_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["alpha", "beta"], field="content")
    assert list(iter_texts(path, split="all", text_field="content")) == ["alpha", "beta"]
    with pytest.raises(DataError, match="no field 'text'.*content"):
        list(iter_texts(path, split="all"))


def test_parquet_text_field_and_missing_column(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["one", "two", None, "three"], "n": [1, 2, 3, 4]}), path)
    assert list(iter_texts(path, split="all", text_field="body")) == ["one", "two", "three"]
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_texts(path, split="all"))


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("from a")
    write_jsonl(tmp_path / "b" / "c.jsonl", ["from c1", "from c2"])
    pq.write_table(pa.table({"text": ["from d"]}), tmp_path / "b" / "d.parquet")
    (tmp_path / "notes.csv").write_text("ignored")
    assert list(iter_texts(tmp_path, split="all")) == ["from a", "from c1", "from c2", "from d"]


def test_train_and_eval_splits_are_disjoint_and_deterministic(tmp_path):
    docs = make_docs(2000)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    train, ev = list(iter_texts(path, split="train")), list(iter_texts(path, split="eval"))
    assert ev and not set(train) & set(ev)
    assert sorted(train + ev) == sorted(d for d in docs)
    assert all(is_eval_text(t) for t in ev)
    assert list(iter_texts(path, split="eval")) == ev
    with pytest.raises(DataError, match="Unknown split"):
        list(iter_texts(path, split="validation"))


def test_embedded_source_reads_the_cached_corpus(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "corpus.jsonl", make_docs(500))
    monkeypatch.setattr(data, "build_embedded_corpus", lambda force=False: path)
    assert list(iter_texts(None, split="all")) == list(iter_texts("embedded", split="all"))
    assert len(list(iter_texts(None, split="all"))) == 500


def test_file_docstrings_use_ast_and_skip_bad_files(tmp_path):
    long = "Explains why. " * 10
    good = tmp_path / "good.py"
    good.write_text(
        f'"""{long}"""\nraise SystemExit("never imported")\n'
        f'class A:\n    """{long}A"""\n    async def f(self):\n        """{long}f"""\n'
        f'def g():\n    """short"""\n'
    )
    assert corpus._file_docstrings(str(good)) == [long, long + "A", long + "f"]
    (tmp_path / "broken.py").write_text(f'"""{long}"""\ndef (:\n')
    (tmp_path / "latin1.py").write_bytes(f'"""{long}\xe9"""\n'.encode("latin-1"))
    assert corpus._file_docstrings(str(tmp_path / "broken.py")) == []
    assert corpus._file_docstrings(str(tmp_path / "latin1.py")) == []


# --- errors --------------------------------------------------------------------------------------


def test_empty_and_too_short_sources_raise(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="gave 0 tokens; it needs at least 127"):
        next(token_batches(tmp_path / "empty.txt", tok, split="all"))
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    with pytest.raises(DataError, match=r"gave 4 tokens.*Check the path"):
        check_enough_tokens(tmp_path / "short.txt", tok, context_size=128, split="all")
    check_enough_tokens(tmp_path / "short.txt", tok, context_size=4, split="all")  # enough


def test_missing_local_path_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="No such file"):
        list(iter_texts(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="Unknown file type"):
        list(iter_texts(tmp_path / "x.csv", split="all"))


def test_unknown_dataset_offline_raises_data_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-user/no-such-dataset.*Accepted sources"):
        list(iter_texts("no-such-user/no-such-dataset"))


def test_hub_names_go_to_load_dataset_streaming(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return [{"body": f"doc {i}"} for i in range(200)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(list(iter_texts("user/ds", split="validation", text_field="body"))) == 200
    assert len(list(iter_texts("user/ds", split="all", text_field="body"))) == 200
    train = list(iter_texts("user/ds", split="train", text_field="body", dataset_config="en"))
    ev = list(iter_texts("user/ds", split="eval", text_field="body", dataset_config="en"))
    assert calls[:2] == [("user/ds", None, "validation", True), ("user/ds", None, "train", True)]
    assert calls[2:] == [("user/ds", "en", "train", True)] * 2
    assert len(train) + len(ev) == 200 and not set(train) & set(ev)
    with pytest.raises(DataError, match="no field 'text'"):
        list(iter_texts("user/ds"))


def test_real_load_dataset_on_a_local_folder(tmp_path):
    (tmp_path / "data.csv").write_text("text,n\nhello there,1\ngeneral kenobi,2\n")
    assert list(iter_texts(tmp_path, split="all")) == ["hello there", "general kenobi"]


# --- masks ---------------------------------------------------------------------------------------


def test_exclusion_mask_marks_position_zero_and_special_tokens(tok):
    ids = torch.tensor([[1, 5, 2, 6], [7, 0, 8, 3]])  # bos w1 eos w2 / w3 pad w4 unk
    assert exclusion_mask(ids, tok).tolist() == [[1, 0, 1, 0], [1, 1, 0, 1]]
    assert exclusion_mask(ids, tok, exclude_special=False).tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]
    assert exclusion_mask(ids, tok, exclude_bos=False).tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    assert not exclusion_mask(ids, tok, False, False).any()


# --- the real embedded corpus (built once, then cached) ------------------------------------------


@pytest.mark.integration
def test_embedded_corpus_is_large_deterministic_and_split():
    stats = corpus.embedded_corpus_stats()
    assert stats["documents"] > 10_000 and stats["characters"] > 15_000_000
    assert 0 < stats["eval_documents"] < stats["documents"] / 20
    head = list(islice(iter_texts(None, split="all"), 100))
    assert head == list(islice(iter_texts(None, split="all"), 100))
    ev = set(iter_texts(None, split="eval"))
    assert len(ev) == stats["eval_documents"]
    assert not any(t in ev for t in iter_texts(None, split="train"))
