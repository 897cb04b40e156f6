"""Local data as users have it: ``data.text`` and ``data.hf_dataset`` read ``.jsonl``,
``.parquet``, ``.txt`` files and ``save_to_disk`` directories (the real ``datasets`` library,
offline); a missing text field is a clear error; a tokenizer without EOS is warned about."""

from __future__ import annotations

import json
import warnings

import pytest

from open_mythos.tokenizers import ByteTokenizer
from open_mythos.training.config import ConfigError, DataConfig
from open_mythos.training.data import _read_text_files, build_data_source
from open_mythos.training.prepare import prepare

from .test_prepare import _bpe_tokenizer_dir

DOCS = ["the first document.", "a second, longer document about loops.", "third!"] * 6


def packed(docs: list[str]) -> list[int]:
    """The reference stream: every document's bytes, then EOS."""
    tok = ByteTokenizer()
    return [i for d in docs for i in (*tok.encode(d), tok.eos_token_id)]


def write_formats(tmp_path, datasets) -> dict[str, str]:
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    ds = datasets.Dataset.from_dict({"body": DOCS})
    ds.to_parquet(str(tmp_path / "docs.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    return {"jsonl": str(tmp_path / "docs.jsonl"), "parquet": str(tmp_path / "docs.parquet"),
            "saved": str(tmp_path / "saved")}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_text_reads_rows_of_local_datasets(tmp_path, offline_datasets, fmt):
    path = write_formats(tmp_path, offline_datasets)[fmt]
    assert ["".join(doc) for doc in _read_text_files([path], "strict", "body")] == DOCS
    source = build_data_source(DataConfig(text=[path], hf_text_field="body", seq_len=16,
                                          batch_size=2), seed=0)
    ids = source.batch("train", 0)["input_ids"]
    stream = packed(DOCS)
    # Every training window is a run of the packed stream.
    for row in ids.tolist():
        assert any(stream[i:i + 16] == row for i in range(len(stream) - 15))


def test_a_byte_order_mark_is_not_read_as_text(tmp_path):
    """A UTF-8 file a Windows tool wrote starts with EF BB BF: a text file trained the mark
    as document text, and a JSON lines file was refused ("Unexpected UTF-8 BOM") with no
    setting to read it. A mark later in a text is text, and is kept."""
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9\xef\xbb\xbf\n")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n')
    docs = _read_text_files([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert ["".join(doc) for doc in docs] == ["caf\u00e9\ufeff\n", "one", "two"]


def test_text_mixes_plain_files_and_datasets(tmp_path, offline_datasets):
    paths = write_formats(tmp_path, offline_datasets)
    (tmp_path / "note.txt").write_text("plain text file")
    docs = _read_text_files([str(tmp_path / "note.txt"), paths["jsonl"]], "strict", "body")
    assert ["".join(doc) for doc in docs] == ["plain text file", *DOCS]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_hf_dataset_streams_local_files_and_saved_datasets(tmp_path, offline_datasets, fmt):
    path = write_formats(tmp_path, offline_datasets)[fmt]
    cfg = DataConfig(hf_dataset=path, hf_text_field="body", seq_len=16, batch_size=2,
                     eval_batches=1)
    source = build_data_source(cfg, seed=0)
    stream = packed(DOCS)
    # The first windows go to validation; the training stream follows them.
    val = source.batch("val", 0)["input_ids"]
    assert val[0].tolist() == stream[:16]
    assert val[1].tolist() == stream[16:32]
    train = source.batch("train", 0)["input_ids"]
    assert train[0].tolist() == stream[32:48]
    # A hub configuration name has no meaning for a local file: refused, not ignored.
    with pytest.raises(ConfigError, match="is a local file or saved dataset"):
        build_data_source(DataConfig(hf_dataset=path, hf_config="en", hf_text_field="body",
                                     seq_len=16), seed=0)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_a_missing_text_field_names_the_field_and_the_columns(tmp_path, offline_datasets,
                                                               fmt):
    path = write_formats(tmp_path, offline_datasets)[fmt]
    with pytest.raises(ConfigError, match=r"text.*body"):
        build_data_source(DataConfig(text=[path], seq_len=16, batch_size=2), seed=0)
    with pytest.raises(ConfigError, match=r"'text'.*body"):
        source = build_data_source(DataConfig(hf_dataset=path, seq_len=16, batch_size=2,
                                              eval_batches=1), seed=0)
        source.batch("val", 0)


def test_a_local_file_of_another_kind_is_refused(tmp_path, offline_datasets):
    (tmp_path / "docs.xml").write_text("<doc/>")
    with pytest.raises(ConfigError, match=r"data.hf_dataset=.*docs.xml.*must end in"):
        build_data_source(DataConfig(hf_dataset=str(tmp_path / "docs.xml"), seq_len=16,
                                     batch_size=2), seed=0)


def test_a_tokenizer_without_eos_is_warned_about_with_the_fix(tmp_path):
    bpe_dir, hf = _bpe_tokenizer_dir(tmp_path)
    hf.eos_token = None
    hf.save_pretrained(tmp_path / "no_eos")
    (tmp_path / "a.txt").write_text("the first document. " * 20)
    cfg = DataConfig(text=[str(tmp_path / "a.txt")], tokenizer=str(tmp_path / "no_eos"),
                     seq_len=8, batch_size=2)
    with pytest.warns(UserWarning, match=r"no EOS token.*add_special_tokens"):
        build_data_source(cfg, seed=0)
    with pytest.warns(UserWarning, match=r"no EOS token.*add_special_tokens"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "prep", str(tmp_path / "no_eos"))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        build_data_source(DataConfig(text=[str(tmp_path / "a.txt")], tokenizer=str(bpe_dir),
                                     seq_len=8, batch_size=2), seed=0)
    assert not [r for r in records if "EOS" in str(r.message)]


def test_train_has_the_flags_its_data_errors_name(tmp_path, capsys):
    """The errors for a missing text field or bytes that are not UTF-8 name --text-field
    and --encoding-errors, which only `prepare` had: `train` refused them."""
    from open_mythos.cli import main

    from .conftest import TINY

    rows = tmp_path / "d.jsonl"
    rows.write_text("\n".join(json.dumps({"body": "the cat sat on the mat " * 8})
                              for _ in range(40)) + "\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the cat sat on the mat \xff\xfe " * 200)
    common = ["train", "--config", str(TINY), "--no-progress", "--steps", "1", "--eval-every",
              "0", "--set", "data.task=", "--set", "data.seq_len=16", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a"), "--text", str(rows)]) == 2
    assert "--text-field" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b"), "--text", str(rows),
                 "--text-field", "body"]) == 0
    assert main([*common, "--out", str(tmp_path / "c"), "--text", str(bad)]) == 2
    assert "--encoding-errors" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "d"), "--text", str(bad),
                 "--encoding-errors", "replace"]) == 0


def test_a_streamed_run_resumed_on_another_number_of_processes_keeps_its_split(
        tmp_path, offline_datasets):
    """Every rank reads the whole stream, so their saved states are one: resumed on another
    number of processes the stream's state was dropped, and the validation split rebuilt at
    the new size (windows the run had trained on became validation)."""
    import hashlib

    import torch

    from open_mythos.training import Trainer
    from open_mythos.training.config import UNSET

    from .conftest import tiny_config

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS * 4))
    opts = dict(data__task=UNSET, data__hf_dataset=str(docs), data__hf_text_field="body",
                data__seq_len=16, data__batch_size=2, schedule__n_loops=2,
                model__use_act=False)
    Trainer(tiny_config(tmp_path / "run", run__steps=2, run__save_every=2,
                        data__eval_batches=1, **opts)).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    # As two processes with a split of 2 windows each would have written it.
    (saved,) = state["data"]
    state.update(world_size=2, data=[saved, saved])
    torch.save(state, ckpt / "trainer_state.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    body = (ckpt / "trainer_state.pt").read_bytes()
    manifest["files"]["trainer_state.pt"] = {"size": len(body),
                                             "sha256": hashlib.sha256(body).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    # (Asking for 2 validation batches: rebuilt, the split would hold 4 windows.)
    resumed = Trainer(tiny_config(tmp_path / "run", run__steps=3, data__eval_batches=2,
                                  **opts), resume=True)
    resumed.train()
    assert resumed.data.state_dict()["n_val"] == saved["n_val"] == 2  # not 2 x 2 rebuilt
    # A sweep of the run scores the windows its trainer validates on (rebuilt from the
    # configuration alone, the split held windows the run had trained on).
    from open_mythos.evaluation.runs import run_val_batches
    from open_mythos.training.data import VAL, val_batches

    want = val_batches(resumed.data, 2)  # the resumed run's checkpoint: 1 process
    got = run_val_batches(tmp_path / "run")
    assert len(got) == len(want) == 2
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, want))
    assert {tuple(r.tolist()) for b in got for r in b["input_ids"]} == {
        tuple(r.tolist()) for r in resumed.data.batch(VAL, 0)["input_ids"]}
