"""``openmythos prepare`` and training on prepared token shards; UTF-8 error policy;
streamed datasets resumed from their saved state.

The references are computed here from the raw bytes (the byte tokenizer's ids are the UTF-8
bytes, then EOS 258), not by the code under test.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from open_mythos.cli import main
from open_mythos.tokenizers import ByteTokenizer
from open_mythos.training import ConfigError, DataConfig, Trainer, documents
from open_mythos.training.config import UNSET
from open_mythos.training.data import TRAIN, VAL, StreamingTextSource, build_data_source
from open_mythos.training.distributed import free_port
from open_mythos.training.documents import InputFormat, split_pieces
from open_mythos.training.prepare import (
    ShardedTokens,
    load_data_tokenizer,
    open_prepared,
    prepare,
    token_dtype,
    verify_prepared,
)

from .conftest import TINY, read_metrics, run_checked, tiny_config

EOS = ByteTokenizer().eos_token_id
DOCS = [f"document {i}: " + "café ✓ " * (i % 5) + "x" * (7 * i % 23) + "\nend" for i in range(40)]


def byte_stream(texts: list[bytes]) -> np.ndarray:
    """The packed stream of the byte tokenizer: each document's bytes then EOS."""
    return np.concatenate([np.append(np.frombuffer(t, np.uint8).astype(np.int64), EOS)
                           for t in texts])


def shards_of(path) -> np.ndarray:
    manifest = json.loads((path / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    return np.concatenate([np.fromfile(path / s["file"], dtype=dtype)
                           for s in manifest["shards"]]).astype(np.int64)


@pytest.fixture
def corpus(tmp_path):
    """Three text files (one in a subdirectory) and the packed stream they make."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    texts = ["\n".join(DOCS[:15]).encode(), "\n".join(DOCS[15:30]).encode(),
             "\n".join(DOCS[30:]).encode()]
    for name, text in zip(["a.txt", "b.md", "sub/c.txt"], texts):
        (root / name).write_bytes(text)
    return root, byte_stream(texts)


def test_prepared_tokens_are_the_packed_stream(corpus, tmp_path):
    root, reference = corpus
    stats = prepare([str(root)], tmp_path / "prep", shard_tokens=1000)
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["documents"] == 3 == stats.documents
    assert [s["tokens"] for s in manifest["shards"]] == [1000] * (len(reference) // 1000) + (
        [len(reference) % 1000] if len(reference) % 1000 else [])
    assert manifest["tokens"] == len(reference)
    assert manifest["tokenizer"]["vocab_size"] == 259 and manifest["tokenizer"]["spec"] == "byte"
    np.testing.assert_array_equal(shards_of(tmp_path / "prep"), reference)
    # What training maps equals the files, and the checksums verify.
    opened = open_prepared(tmp_path / "prep").tokens
    np.testing.assert_array_equal(opened.take(np.arange(len(reference))), reference)
    assert verify_prepared(tmp_path / "prep") == []


def test_token_dtype_and_gather_across_shards():
    assert token_dtype(259) == np.uint16 and token_dtype(1 << 16) == np.uint16
    assert token_dtype((1 << 16) + 1) == np.uint32
    parts = [np.arange(0, 5, dtype=np.uint32) + 70_000, np.arange(5, 12, dtype=np.uint32) + 70_000,
             np.arange(12, 13, dtype=np.uint32) + 70_000]
    stream = ShardedTokens(parts)
    idx = np.array([[0, 4, 5, 11], [12, 3, 6, 12]])
    np.testing.assert_array_equal(stream.take(idx), idx + 70_000)
    assert len(stream) == 13


def test_split_pieces_cuts_at_line_ends_whatever_the_chunks():
    text = "".join(f"line {i} " + "w" * (i % 13) + "\n" for i in range(300)) + "z" * 50
    pieces = list(split_pieces([text], size=64))
    assert "".join(pieces) == text and len(pieces) > 10
    for piece in pieces[:-1]:
        assert piece.endswith("\n") and "\n" not in piece[64:-1] and len(piece) > 64
    for step in (1, 7, 100, 5000):
        chunks = [text[i:i + step] for i in range(0, len(text), step)]
        assert list(split_pieces(chunks, size=64)) == pieces
    # A line longer than 4 * size is cut hard, at 4 * size.
    assert [len(p) for p in split_pieces(["q" * 600], size=64)] == [256, 256, 88]


def test_batches_equal_the_in_memory_path_at_any_world_size(corpus, tmp_path):
    root, _ = corpus
    prepare([str(root)], tmp_path / "prep", shard_tokens=700)  # windows cross shard files
    common = dict(seq_len=16, batch_size=2, val_fraction=0.1)
    memory = build_data_source(DataConfig(text=[str(root)], **common), seed=5)
    mapped = build_data_source(DataConfig(prepared=str(tmp_path / "prep"), **common), seed=5)
    big = build_data_source(DataConfig(text=[str(root)], **{**common, "batch_size": 4}), seed=5)
    assert mapped.vocab_size == 259 and "prepared" in mapped.describe()
    n = memory.n_windows(TRAIN)
    for index in (0, 3, n // 2 - 1, n // 2 + 1, 3 * n):  # into later epochs too
        for split in (TRAIN, VAL):
            a, b = memory.batch(split, index), mapped.batch(split, index)
            assert torch.equal(a["input_ids"], b["input_ids"])
            assert torch.equal(a["targets"], b["targets"])
        # World size 2: the two ranks' shards are one process's batch of 4 rows.
        halves = [mapped.batch(TRAIN, index, shard=s, n_shards=2) for s in range(2)]
        assert torch.equal(torch.cat([h["input_ids"] for h in halves]),
                           big.batch(TRAIN, index)["input_ids"])


def _text_run(tmp_path, name, source: dict, **overrides):
    return tiny_config(tmp_path / name, data__task=UNSET, data__seq_len=16, model__vocab_size=259,
                       run__save_every=4, **{f"data__{k}": v for k, v in source.items()},
                       **overrides)


def test_training_on_prepared_data_matches_in_memory_and_resumes(corpus, tmp_path):
    root, _ = corpus
    prepare([str(root)], tmp_path / "prep", shard_tokens=500)
    text, prepared = {"text": [str(root)]}, {"prepared": str(tmp_path / "prep")}
    Trainer(_text_run(tmp_path, "memory", text, run__steps=8)).train()
    Trainer(_text_run(tmp_path, "mapped", prepared, run__steps=8)).train()
    expected = [r["loss"] for r in read_metrics(tmp_path / "memory")]
    assert len(expected) == 8 and all(np.isfinite(expected))
    assert [r["loss"] for r in read_metrics(tmp_path / "mapped")] == expected
    # Stopped at step 4 and resumed from its checkpoint: the same batches, the same losses.
    Trainer(_text_run(tmp_path, "part", prepared, run__steps=4)).train()
    Trainer(_text_run(tmp_path, "part", prepared, run__steps=8), resume=True).train()
    assert [r["loss"] for r in read_metrics(tmp_path / "part")] == expected


def _with_bad_byte(tmp_path, monkeypatch):
    """A file whose byte 21 is 0xFF, after a two-byte character cut by the read size."""
    monkeypatch.setattr(documents, "READ_BYTES", 6)
    data = b"abcde" + "é".encode() + b"0123456789abcd" + b"\xff" + b"tail\n"
    assert data.index(b"\xff") == 21
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    return path, data


def test_text_that_is_not_utf8_is_an_error_naming_file_and_offset(tmp_path, monkeypatch, capsys):
    path, _ = _with_bad_byte(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=rf"{path}: not UTF-8 at byte offset 21 \(bytes ff"):
        build_data_source(DataConfig(text=[str(path)], seq_len=4), seed=0)
    assert main(["prepare", str(path), "--out", str(tmp_path / "prep"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.txt: not UTF-8 at byte offset 21" in err and "Traceback" not in err
    assert not any((tmp_path / "prep").glob("tokens-*"))  # nothing half-written left behind
    # With the progress bar on, an input refused up front prints its error alone (an empty
    # bar was drawn first).
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err
    assert "is neither a file nor a directory" in err and "char" not in err, err
    # A sequence cut off by the end of the file: its first byte.
    (tmp_path / "cut.txt").write_bytes(b"abc\xc3")
    with pytest.raises(ConfigError, match="cut.txt: not UTF-8 at byte offset 3"):
        build_data_source(DataConfig(text=[str(tmp_path / "cut.txt")], seq_len=4), seed=0)
    with pytest.raises(ConfigError, match="data.encoding_errors='bogus' is invalid"):
        DataConfig(encoding_errors="bogus")


@pytest.mark.parametrize("policy", ["replace", "ignore"])
def test_encoding_errors_policy_reads_bad_bytes(tmp_path, monkeypatch, policy):
    path, data = _with_bad_byte(tmp_path, monkeypatch)
    reference = byte_stream([data.decode("utf-8", errors=policy).encode()])
    cfg = DataConfig(text=[str(path)], seq_len=4, batch_size=1, encoding_errors=policy,
                     val_fraction=0.2)
    src = build_data_source(cfg, seed=0)
    n_train = len(reference) - int(len(reference) * 0.2)
    np.testing.assert_array_equal(src.batch(VAL, 0)["input_ids"][0].numpy(),
                                  reference[n_train:n_train + 4])
    prepare([str(path)], tmp_path / "prep", encoding_errors=policy)
    np.testing.assert_array_equal(shards_of(tmp_path / "prep"), reference)


def _write_inputs(tmp_path, datasets, field="body"):
    """DOCS as JSON lines, Parquet and a save_to_disk dataset, with an extra id column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, field: d} for i, d in enumerate(DOCS)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet", row_group_size=7)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    return {"jsonl": tmp_path / "docs.jsonl", "parquet": tmp_path / "docs.parquet",
            "saved": tmp_path / "saved"}


def test_jsonl_parquet_and_saved_dataset_inputs(tmp_path, offline_datasets):
    inputs = _write_inputs(tmp_path, offline_datasets)
    reference = byte_stream([d.encode() for d in DOCS])
    for kind, path in inputs.items():
        stats = prepare([str(path)], tmp_path / f"prep-{kind}", text_field="body")
        assert stats.documents == len(DOCS), kind
        np.testing.assert_array_equal(shards_of(tmp_path / f"prep-{kind}"), reference)
    # A dataset for datasets.load_dataset (a local directory of JSON lines), streamed.
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_bytes(inputs["jsonl"].read_bytes())
    prepare([str(hub)], tmp_path / "prep-hf", fmt=InputFormat.HF, text_field="body")
    np.testing.assert_array_equal(shards_of(tmp_path / "prep-hf"), reference)


def test_parquet_dictionary_and_view_text_columns(tmp_path):
    """Text columns as pandas writes categoricals (dictionary) and as string/binary views."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    columns = {"cat": pa.array(DOCS).dictionary_encode(), "num": pa.array(range(len(DOCS)))}
    if hasattr(pa, "string_view"):
        columns["view"] = pa.array(DOCS, type=pa.string_view())
        columns["bytes"] = pa.array([d.encode() for d in DOCS], type=pa.binary_view())
    pq.write_table(pa.table(columns), tmp_path / "docs.parquet")
    reference = byte_stream([d.encode() for d in DOCS])
    for field in set(columns) - {"num"}:
        prepare([str(tmp_path / "docs.parquet")], tmp_path / f"prep-{field}", text_field=field)
        np.testing.assert_array_equal(shards_of(tmp_path / f"prep-{field}"), reference)
    with pytest.raises(ConfigError, match="column 'num' holds int64, not text"):
        prepare([str(tmp_path / "docs.parquet")], tmp_path / "prep-num", text_field="num")


def test_wrong_text_field_is_a_clear_error(tmp_path, offline_datasets):
    inputs = _write_inputs(tmp_path, offline_datasets)
    expected = {"jsonl": r"line 1 has no field 'text' \(fields: id, body\)",
                "parquet": r"no column 'text' \(columns: id, body\)",
                "saved": r"no column 'text' \(columns: id, body\)"}
    for kind, path in inputs.items():
        with pytest.raises(ConfigError, match=expected[kind]):
            prepare([str(path)], tmp_path / f"prep-{kind}")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_bytes(inputs["jsonl"].read_bytes())
    with pytest.raises(ConfigError, match=r"data.hf_text_field='text'.*columns: id, body"):
        build_data_source(DataConfig(hf_dataset=str(hub), seq_len=8), seed=0)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl: not UTF-8 at line 2, byte 25"):
        prepare([str(tmp_path / "bad.jsonl")], tmp_path / "prep-bad")
    # Options that no input reads (a misspelt --text-field, a split of text files) were
    # ignored without a word; `openmythos train` refuses [data] keys its source does not read.
    (tmp_path / "plain.txt").write_text("a plain text document")
    for options, flag in ((dict(text_field="body"), "--text-field 'body'"),
                          (dict(hf_split="test"), "--hf-split 'test'"),
                          (dict(hf_config="x"), "--hf-config 'x'")):
        with pytest.raises(ConfigError, match=f"no input reads {flag}"):
            prepare([str(tmp_path / "plain.txt")], tmp_path / "prep-plain", **options)
    # Read through the datasets library (--format hf), a malformed line was its reader's
    # traceback (pyarrow's ArrowInvalid); now one error naming the file.
    from open_mythos.training.documents import InputFormat
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"dataset '.*broken.jsonl' could not be read after "
                                          r"0 rows: ArrowInvalid"):
        prepare([str(tmp_path / "broken.jsonl")], tmp_path / "prep-broken", fmt=InputFormat.HF)


def _bpe_tokenizer_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(DOCS, trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>",
                                              pad_token="<pad>", eos_token="<eos>")
    hf.save_pretrained(tmp_path / "bpe")
    return tmp_path / "bpe", hf


def test_a_prepared_dir_of_another_tokenizer_is_refused(corpus, tmp_path):
    root, _ = corpus
    bpe_dir, hf = _bpe_tokenizer_dir(tmp_path)
    prepare([str(root)], tmp_path / "prep-byte")
    prepare([str(root)], tmp_path / "prep-bpe", str(bpe_dir))
    ids = shards_of(tmp_path / "prep-bpe")
    first = (root / "a.txt").read_text()
    expected = hf.encode(first, add_special_tokens=False) + [hf.eos_token_id]
    assert ids[:len(expected)].tolist() == expected
    with pytest.raises(ConfigError, match=r"tokenised with 'byte'.*data.tokenizer=.*bpe"):
        build_data_source(DataConfig(prepared=str(tmp_path / "prep-byte"),
                                     tokenizer=str(bpe_dir)), seed=0)
    with pytest.raises(ConfigError, match=r"tokenised with .*bpe.*data.tokenizer='byte'"):
        build_data_source(DataConfig(prepared=str(tmp_path / "prep-bpe")), seed=0)
    src = build_data_source(DataConfig(prepared=str(tmp_path / "prep-bpe"),
                                       tokenizer=str(bpe_dir), seq_len=8), seed=0)
    assert src.vocab_size == len(hf)
    # The same vocabulary with another normaliser encodes text otherwise: refused; a copy
    # saved again (as a run keeps its tokenizer) is the same tokenizer.
    import json
    import shutil

    lower = tmp_path / "bpe-lower"
    shutil.copytree(bpe_dir, lower)
    spec = json.loads((lower / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (lower / "tokenizer.json").write_text(json.dumps(spec))
    assert load_data_tokenizer(str(lower)).encode("Hello") != hf.encode("Hello")
    with pytest.raises(ConfigError, match="turns text into ids another way"):
        build_data_source(DataConfig(prepared=str(tmp_path / "prep-bpe"),
                                     tokenizer=str(lower)), seed=0)
    load_data_tokenizer(str(bpe_dir)).tokenizer.save_pretrained(tmp_path / "bpe-again")
    build_data_source(DataConfig(prepared=str(tmp_path / "prep-bpe"),
                                 tokenizer=str(tmp_path / "bpe-again"), seq_len=8), seed=0)
    # A BOS template and another decoder change no id training encodes (it adds no special
    # tokens around a text): the same tokenizer. An export removes its run's template, and
    # the export's tokenizer was refused for the data prepared with the run's.
    templated = tmp_path / "bpe-templated"
    shutil.copytree(bpe_dir, templated)
    spec = json.loads((templated / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<eos>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<eos>": {"id": "<eos>",
                                                           "ids": [hf.eos_token_id],
                                                           "tokens": ["<eos>"]}}}
    spec["decoder"] = {"type": "Fuse"}
    (templated / "tokenizer.json").write_text(json.dumps(spec))
    hf_templated = load_data_tokenizer(str(templated)).tokenizer
    assert hf_templated.encode("Hello")[0] == hf.eos_token_id  # the template is there
    prepare([str(root)], tmp_path / "prep-templated", str(templated))
    for data, tok in (("prep-bpe", templated), ("prep-templated", bpe_dir)):
        build_data_source(DataConfig(prepared=str(tmp_path / data), tokenizer=str(tok),
                                     seq_len=8), seed=0)
    # A manifest that hashed the whole tokenizer.json (before 2026-12-08) still matches it.
    from open_mythos.training.prepare import _pipeline_digest

    manifest = tmp_path / "prep-bpe" / "manifest.json"
    legacy = json.loads(manifest.read_text())
    legacy["tokenizer"]["pipeline"] = _pipeline_digest(load_data_tokenizer(str(bpe_dir)),
                                                       legacy=True)
    manifest.write_text(json.dumps(legacy))
    build_data_source(DataConfig(prepared=str(tmp_path / "prep-bpe"), tokenizer=str(bpe_dir),
                                 seq_len=8), seed=0)
    with pytest.raises(ConfigError, match="turns text into ids another way"):
        build_data_source(DataConfig(prepared=str(tmp_path / "prep-bpe"),
                                     tokenizer=str(lower)), seed=0)
    # A manifest written before the pipeline was recorded is checked by its vocabulary.
    manifest = tmp_path / "prep-bpe" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["tokenizer"]["pipeline"]
    manifest.write_text(json.dumps(old))
    build_data_source(DataConfig(prepared=str(tmp_path / "prep-bpe"), tokenizer=str(lower),
                                 seq_len=8), seed=0)


def test_damaged_or_missing_prepared_data_is_refused(corpus, tmp_path):
    root, _ = corpus
    prepare([str(root)], tmp_path / "prep", shard_tokens=1000)
    with pytest.raises(ConfigError, match="no manifest.json"):
        build_data_source(DataConfig(prepared=str(root)), seed=0)
    shard = tmp_path / "prep" / "tokens-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert verify_prepared(tmp_path / "prep") == ["tokens-00000.bin: sha256 differs from the "
                                                  "manifest's"]
    assert main(["prepare", "--verify", str(tmp_path / "prep")]) == 1
    # Training does not hash the shards, but an id past the vocabulary (0xFFFF at token 5)
    # is a named error when its window is read; it was the model's traceback.
    from open_mythos.training.data import DataUnreadable
    damaged = bytearray(raw)
    damaged[10:12] = b"\xff\xff"
    shard.write_bytes(bytes(damaged))
    source = build_data_source(DataConfig(prepared=str(tmp_path / "prep"), seq_len=8,
                                          batch_size=250), seed=0)
    with pytest.raises(DataUnreadable, match=r"token 5 of the stream is id 65535, outside the "
                                             r"tokenizer's \[0, 259\): a damaged shard"):
        source.batch("train", 0)
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(ConfigError, match="tokens-00000.bin' has 1998 bytes, the manifest says 2000"):
        build_data_source(DataConfig(prepared=str(tmp_path / "prep")), seed=0)
    with pytest.raises(ConfigError, match="already exists and is not an empty directory"):
        prepare([str(root)], tmp_path / "prep")
    # A manifest naming a shard outside its directory is refused, never read or hashed.
    (tmp_path / "outside.bin").write_bytes(b"\0" * 2000)
    manifest_file = tmp_path / "prep" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for name in ("../outside.bin", str(tmp_path / "outside.bin"), ".."):
        manifest["shards"][0]["file"] = name
        manifest_file.write_text(json.dumps(manifest))
        with pytest.raises(ConfigError, match="names a shard outside its directory"):
            verify_prepared(tmp_path / "prep")
        with pytest.raises(ConfigError, match="names a shard outside its directory"):
            build_data_source(DataConfig(prepared=str(tmp_path / "prep")), seed=0)


def test_cli_prepare_then_train(corpus, tmp_path, capsys):
    root, reference = corpus
    out = tmp_path / "prep"
    assert main(["prepare", str(root), "--out", str(out), "--no-progress"]) == 0
    assert f"{len(reference):,} tokens in 1 shard(s) from 3 documents" in capsys.readouterr().err
    np.testing.assert_array_equal(shards_of(out), reference)
    config = tmp_path / "run.toml"
    config.write_text(TINY.read_text().replace('task = "parity"', f'prepared = "{out}"')
                      .replace("seq_len = 32", "seq_len = 16"))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"),
                 "--steps", "3", "--no-progress", "--eval-every", "3"]) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and np.isfinite(rows[-1]["val_loss"])


class CountingTokenizer(ByteTokenizer):
    def __init__(self):
        self.calls = 0

    def encode(self, text, add_bos=False, add_eos=False):
        self.calls += 1
        return super().encode(text, add_bos, add_eos)


def test_streamed_dataset_resumes_from_its_saved_state(tmp_path, offline_datasets):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cfg = DataConfig(hf_dataset=str(hub), seq_len=16, batch_size=2)
    reference = torch.from_numpy(byte_stream([d.encode() for d in DOCS]))
    n_val = 4

    def windows(first, count):
        return torch.stack([reference[16 * g: 16 * g + 17] for g in range(first, first + count)])

    first = StreamingTextSource(cfg, CountingTokenizer(), 16, n_val)
    for index in range(5):
        first.batch(TRAIN, index)
    # Through torch.save / torch.load(weights_only=True), as trainer_state.pt holds it.
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    tok = CountingTokenizer()
    resumed = StreamingTextSource(cfg, tok, 16, n_val)
    calls_at_start = tok.calls
    resumed.load_state_dict(state)
    batch = resumed.batch(TRAIN, 5)
    assert torch.equal(batch["input_ids"], windows(n_val + 10, 2)[:, :-1])
    assert torch.equal(batch["targets"], windows(n_val + 10, 2)[:, 1:])
    assert torch.equal(first.batch(TRAIN, 5)["input_ids"], batch["input_ids"])
    # The stream continued where it stood: only the documents of batch 5 were tokenised,
    # not the ~12 that precede it.
    assert tok.calls - calls_at_start <= 2
    # A run that asks for another validation size (another batch size or world size)
    # keeps the saved split: the same first unread window, validation on the same 4
    # windows (it trained on former validation windows, or skipped some, before).
    other = StreamingTextSource(cfg, ByteTokenizer(), 16, 2 * n_val)
    other.load_state_dict(state)
    assert torch.equal(other.batch(TRAIN, 5)["input_ids"], batch["input_ids"])
    val = torch.cat([other.batch(VAL, 0, shard, 3)["input_ids"] for shard in range(3)])
    assert torch.equal(val, windows(0, 4)[[0, 1, 2, 3, 0, 1], :-1])


def test_a_stream_stopped_by_an_unreadable_row_resumes_from_its_last_whole_batch(
        tmp_path, offline_datasets):
    """A row that is not text stops the run (DataUnreadable) with its steps saved, but the
    state saved was where the failed batch had read to: the resume, asked for that batch,
    found the stream past it and replayed it from its first row. Reference: the batch a
    clean stream gives, and the documents tokenised on resuming."""
    from open_mythos.training.data import DataUnreadable

    hub = tmp_path / "hub"
    hub.mkdir()
    docs = [d for d in DOCS for _ in range(3)]
    bad = 9
    rows = [json.dumps({"text": None if i == bad else d}) + "\n" for i, d in enumerate(docs)]
    (hub / "train.jsonl").write_text("".join(rows))
    cfg = DataConfig(hf_dataset=str(hub), seq_len=16, batch_size=2)
    n_val = 2
    first = StreamingTextSource(cfg, ByteTokenizer(), 16, n_val)
    index = 0
    with pytest.raises(DataUnreadable):
        while True:
            first.batch(TRAIN, index)
            index += 1
    assert index > 1  # it failed inside a later batch, not in the first
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    (hub / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    clean = StreamingTextSource(cfg, ByteTokenizer(), 16, n_val)
    tok = CountingTokenizer()
    resumed = StreamingTextSource(cfg, tok, 16, n_val)
    calls_at_start = tok.calls
    resumed.load_state_dict(state)
    batch = resumed.batch(TRAIN, index)
    assert torch.equal(batch["input_ids"], clean.batch(TRAIN, index)["input_ids"])
    # Continued from before the failed batch: about its own documents tokenised, not the
    # stream's from its first row.
    assert tok.calls - calls_at_start <= 3, tok.calls - calls_at_start


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_on_prepared_data_match_one_process(corpus, tmp_path):
    """torchrun, 2 gloo ranks x batch 2 on the shards == one process x batch 4."""
    root, _ = corpus
    prepare([str(root)], tmp_path / "prep", shard_tokens=500)
    config = tmp_path / "run.toml"
    config.write_text(TINY.read_text().replace('task = "parity"', f'prepared = "{tmp_path}/prep"')
                      .replace("seq_len = 32", "seq_len = 16"))
    args = ["--config", str(config), "--no-progress", "--steps", "4", "--eval-every", "4",
            "--set", "optim.aux_weight=0"]  # the balance loss is per process
    run_checked([sys.executable, "-m", "open_mythos", "train", *args, "--batch-size", "4",
                 "--out", str(tmp_path / "one")])
    run_checked([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                 "-m", "open_mythos", "train", *args, "--batch-size", "2", "--parallel", "ddp",
                 "--out", str(tmp_path / "two")], timeout=300)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], abs=1e-5)


def test_a_full_disk_is_one_line_and_leaves_no_shards(corpus, tmp_path, monkeypatch, capsys):
    from open_mythos.training import prepare as prepare_mod

    root, _ = corpus
    monkeypatch.setattr(prepare_mod, "_WRITE_TOKENS", 100)
    real_open, opened = open, []

    class FullDisk:
        def __init__(self, path):
            self.path = path

        def write(self, raw):
            raise OSError(28, "No space left on device", str(self.path))

        def close(self):
            pass

    def fake_open(path, mode="r", *args, **kwargs):
        if mode == "wb" and str(path).endswith(".bin"):
            opened.append(path)
            if len(opened) == 2:  # the first shard is written, the second fails
                return FullDisk(path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    code = main(["prepare", str(root), "--out", str(tmp_path / "prep"), "--shard-tokens", "500",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3 and "No space left on device" in err and "tokens-00001.bin" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # The directory it created is gone; one that existed (empty) is kept, empty.
    assert len(opened) == 2 and not (tmp_path / "prep").exists()
    (tmp_path / "mine").mkdir()
    opened.clear()
    assert main(["prepare", str(root), "--out", str(tmp_path / "mine"), "--shard-tokens", "500",
                 "--no-progress"]) == 3
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_start_up_maps_the_shards_without_reading_them(corpus, tmp_path):
    """A 16 GB shard (sparse: it costs no disk) opens and serves batches in well under the
    time a read of it would take: nothing is read but the batches' windows."""
    import time

    root, _ = corpus
    prepare([str(root)], tmp_path / "prep")
    manifest_path = tmp_path / "prep" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    n = 8 << 30  # uint16 tokens: 16 GB
    with open(tmp_path / "prep" / "huge.bin", "wb") as fh:
        fh.truncate(2 * n)
    manifest["shards"].append({"file": "huge.bin", "tokens": n, "sha256": "not checked"})
    manifest["tokens"] += n
    manifest_path.write_text(json.dumps(manifest))
    t0 = time.perf_counter()
    src = build_data_source(DataConfig(prepared=str(tmp_path / "prep"), seq_len=4096,
                                       batch_size=2), seed=0)
    batch = src.batch(TRAIN, 123)
    val = src.batch(VAL, 0)
    assert time.perf_counter() - t0 < 2.0
    assert src.n_windows(TRAIN) == (manifest["tokens"] - int(manifest["tokens"] * 0.05) - 1) // 4096
    assert batch["input_ids"].shape == (2, 4096) and not val["input_ids"].any()  # sparse: zeros


def test_a_resumed_run_continues_the_stream_from_the_checkpoint(tmp_path, offline_datasets,
                                                                monkeypatch, capsys):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 10))

    def config(name, steps):
        return _text_run(tmp_path, name, {"hf_dataset": str(hub)}, run__steps=steps)

    Trainer(config("full", 8)).train()
    Trainer(config("part", 4)).train()
    loaded = []
    restore = StreamingTextSource.load_state_dict
    monkeypatch.setattr(StreamingTextSource, "load_state_dict",
                        lambda self, state: (loaded.append(state), restore(self, state)))
    Trainer(config("part", 8), resume=True).train()
    assert loaded and loaded[0]["windows"] > 0  # the stream's own position, not a replay
    assert ([r["loss"] for r in read_metrics(tmp_path / "part")]
            == [r["loss"] for r in read_metrics(tmp_path / "full")])
    # Resumed on another kind of source (local text): the stream's position is of no use
    # to it; said, not a traceback ("PackedTextSource keeps no state").
    (tmp_path / "doc.txt").write_text(" ".join(DOCS) * 20)
    capsys.readouterr()
    Trainer(_text_run(tmp_path, "part", {"text": [str(tmp_path / "doc.txt")]}, run__steps=10),
            resume=True).train()
    assert "holds the position of a streamed data source, but this run reads other data" \
        in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "part")][-2:] == [9, 10]


def test_hidden_files_are_not_the_corpus_and_shard_tokens_must_be_positive(corpus, tmp_path,
                                                                         capsys):
    """A corpus directory that is a git checkout: ``.git`` is skipped (it held binary
    objects read as documents)."""
    root, reference = corpus
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "objects" / "ab").write_bytes(b"\x78\x9c\xff\xfe binary")
    (root / ".hidden.txt").write_text("not a document")
    out = tmp_path / "prep"
    assert main(["prepare", str(root), "--out", str(out), "--no-progress"]) == 0
    np.testing.assert_array_equal(shards_of(out), reference)
    capsys.readouterr()
    assert main(["prepare", str(root), "--out", str(tmp_path / "zero"), "--no-progress",
                 "--shard-tokens", "0"]) == 2
    assert "shard_tokens=0 must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["strict", "replace", "ignore"])
def test_jsonl_with_a_lone_surrogate_escape(tmp_path, policy):
    """``"\\ud800"`` is valid JSON but not text: an error naming the line, or replaced by
    one U+FFFD / dropped as the policy says."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "bad \\ud800 x"}\n')
    args = ([str(path)], tmp_path / "prep")
    if policy == "strict":
        with pytest.raises(ConfigError, match=r"line 2: field 'text' holds a lone surrogate"):
            prepare(*args)
        return
    prepare(*args, encoding_errors=policy)
    text = "bad \ufffd x" if policy == "replace" else "bad  x"
    np.testing.assert_array_equal(shards_of(tmp_path / "prep"),
                                  byte_stream([b"ok", text.encode()]))


def test_special_token_strings_in_text_are_text(tmp_path):
    """A document that spells out ``<eos>`` gets EOS only at its end (the byte tokenizer
    already encodes the string as bytes)."""
    bpe_dir, hf = _bpe_tokenizer_dir(tmp_path)
    (tmp_path / "doc.txt").write_text("the end is marked by <eos> in this text")
    prepare([str(tmp_path / "doc.txt")], tmp_path / "prep", str(bpe_dir))
    ids = shards_of(tmp_path / "prep")
    assert list(ids).count(hf.eos_token_id) == 1 and ids[-1] == hf.eos_token_id


def test_a_tokenizer_with_an_id_past_its_length_sizes_the_vocabulary(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import models, pre_tokenizers

    from open_mythos.tokenizers import MythosTokenizer

    word = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2, "<eos>": 40},
                                                 unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>",
                                              eos_token="<eos>")
    assert len(hf) < 41
    tok = MythosTokenizer.from_tokenizer(hf)
    assert tok.vocab_size == 41 > max(tok.encode("a b <eos>", add_eos=True))


def test_paths_as_users_write_them(corpus, tmp_path, monkeypatch, capsys):
    """``~`` quoted past the shell, an upper-case suffix, a prepared directory given as text,
    a --prepared path that is not there: each read as meant or refused by what it is."""
    root, reference = corpus
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["prepare", "~/corpus", "--out", "~/prep", "--no-progress"]) == 0
    np.testing.assert_array_equal(shards_of(tmp_path / "prep"), reference)
    assert not (tmp_path / "~").exists() and not Path("~").exists()
    (tmp_path / "upper").mkdir()
    (tmp_path / "upper" / "DATA.JSONL").write_text(json.dumps({"text": "hi there"}) + "\n")
    prepare([str(tmp_path / "upper")], tmp_path / "prep-upper")
    assert shards_of(tmp_path / "prep-upper").tolist() == list(b"hi there") + [EOS]
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "prep"), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 2
    assert "prepared token shards" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="prepared token shards.*--prepared"):
        build_data_source(DataConfig(text=[str(tmp_path / "prep")]), seed=0)
    with pytest.raises(ConfigError, match="does not exist"):
        build_data_source(DataConfig(prepared=str(tmp_path / "no" / "such")), seed=0)
    # A prepare written into the corpus directory, then the corpus prepared again.
    assert main(["prepare", str(root), "--out", str(root / "prep1"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["prepare", str(root), "--out", str(tmp_path / "prep2"), "--no-progress"]) == 2
    assert "prep1' inside the input" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is a file"):
        build_data_source(DataConfig(prepared=str(root / "a.txt")), seed=0)
    # A run trained into the corpus: its checkpoint is named as one (it was called
    # prepared shards, having a manifest.json); a manifest of another kind is text.
    shutil.rmtree(root / "prep1")
    ckpt = root / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text(json.dumps({"step": 1, "files": {}}))
    with pytest.raises(ConfigError, match=r"step_00000001' inside the input .* is a training "
                                          r"checkpoint \(`openmythos train` output\), not text"):
        build_data_source(DataConfig(text=[str(root)]), seed=0)
    with pytest.raises(ConfigError, match="step_00000001' is a training checkpoint"):
        build_data_source(DataConfig(text=[str(ckpt)]), seed=0)
    shutil.rmtree(root / "run")
    (root / "site").mkdir()
    (root / "site" / "manifest.json").write_text('{"text": "a web app"}')
    source = build_data_source(DataConfig(text=[str(root)], seq_len=8, batch_size=1), seed=0)
    assert source.vocab_size > 0


def test_sigterm_stops_a_prepare_as_ctrl_c_does(corpus, tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM mid-way: the shards written so far go, the command exits 130,
    and the output directory can be reused."""
    import os
    import signal

    import open_mythos.training.prepare as prepare_module

    root, _ = corpus
    real, calls = prepare_module.encode_document, []

    def terminated(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "encode_document", terminated)
    out = tmp_path / "prep"
    before = signal.getsignal(signal.SIGTERM)
    assert main(["prepare", str(root), "--out", str(out), "--no-progress",
                 "--shard-tokens", "64"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler was put back
    monkeypatch.setattr(prepare_module, "encode_document", real)
    # Stopped while the manifest is being made, after the last shard: still nothing left.
    monkeypatch.setattr(prepare_module, "tokenizer_identity",
                        lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["prepare", str(root), "--out", str(out), "--no-progress"]) == 130
    assert not out.exists()
    monkeypatch.undo()
    assert main(["prepare", str(root), "--out", str(out), "--no-progress"]) == 0
