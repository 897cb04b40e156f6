"""Data sources: determinism by index, sharding, packing, splits, optional extras."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from open_mythos.tokenizers import ByteTokenizer
from open_mythos.training import ConfigError, DataConfig
from open_mythos.training.data import (
    TRAIN,
    VAL,
    PackedTextSource,
    build_data_source,
    builtin_corpus,
    tokenize_documents,
)


def test_a_task_run_header_names_the_task_knobs():
    """A task's repr shows its levels only: the header must also say which knobs the run
    gave it (``open_ends`` or ``statements`` change the task without changing the levels)."""
    knobs = {"hops": [1, 3], "ood_hops": [4, 6], "statements": 8, "open_ends": 0.5}
    line = build_data_source(DataConfig(task="multihop", task_args=knobs, batch_size=2),
                             seed=0).describe()
    assert line.startswith("task 'multihop' {") and json.loads(line[line.index("{"):line.index("}") + 1]) == knobs
    bare = build_data_source(DataConfig(task="parity", batch_size=2, seq_len=32), seed=0)
    assert bare.describe().startswith("task 'parity' (")


def test_task_batches_are_deterministic_and_shard_the_global_batch():
    src = build_data_source(DataConfig(task="parity", batch_size=2, seq_len=32), seed=3)
    a, b = src.batch(TRAIN, 5), src.batch(TRAIN, 5)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert a["input_ids"].shape == a["targets"].shape == (2, 32)
    assert not torch.equal(src.batch(TRAIN, 6)["input_ids"], a["input_ids"])
    assert (a["targets"] == -100).any() and (a["targets"] != -100).any()
    # Shards of 2 rows of a global batch == one process's batch of 4 rows.
    whole = build_data_source(DataConfig(task="parity", batch_size=4, seq_len=32), seed=3)
    full = whole.batch(TRAIN, 5)
    parts = [src.batch(TRAIN, 5, shard=s, n_shards=2) for s in range(2)]
    for key in ("input_ids", "targets"):
        assert torch.equal(torch.cat([p[key] for p in parts]), full[key])
    val = src.batch(VAL, 0)
    assert not torch.equal(val["input_ids"], src.batch(TRAIN, 0)["input_ids"])


def test_task_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.task='nope'"):
        build_data_source(DataConfig(task="nope"), seed=0)
    with pytest.raises(ConfigError, match="data.seq_len=8"):
        build_data_source(DataConfig(task="parity", seq_len=8), seed=0)
    with pytest.raises(ConfigError, match="data.val_split"):
        build_data_source(DataConfig(task="parity", val_split="test"), seed=0)
    src = build_data_source(DataConfig(task="parity", task_args={"lengths": [2, 3]}), seed=0)
    assert src.seq_len == src.task.max_len("id")


def test_packed_windows_shift_targets_and_cover_an_epoch():
    tokens = np.arange(1001, dtype=np.int32) % 250  # 901 train tokens: 90 windows
    src = PackedTextSource(tokens, batch_size=3, seq_len=10, seed=0, val_fraction=0.1,
                           vocab_size=259, label="t")
    batch = src.batch(TRAIN, 0)
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    n = src.n_windows(TRAIN)
    starts = []
    for i in range(n // 3):
        starts += src.batch(TRAIN, i)["input_ids"][:, 0].tolist()
    assert n == 90 and len(starts) == n
    assert sorted(starts) == sorted((np.arange(n) * 10 % 250).tolist())  # each window once
    # Validation windows come from the held-out tail only.
    val = src.batch(VAL, 0)["input_ids"]
    assert val[0, 0].item() == 901 % 250
    # Sharding, and a fresh permutation at the next epoch.
    pair = [src.batch(TRAIN, 4, shard=s, n_shards=2)["input_ids"] for s in range(2)]
    big = PackedTextSource(tokens, 6, 10, 0, 0.1, 259, "t").batch(TRAIN, 4)["input_ids"]
    assert torch.equal(torch.cat(pair), big)


def test_validation_rows_past_the_held_out_windows_are_not_scored():
    """Asked for more rows than the held-out text has windows, validation went round them
    again and val_loss weighted some windows more than others (3 windows read as
    0, 1, 2, 0, 1, 2, 0, 1). Rows past the last window now carry no targets."""
    from open_mythos.training.losses import IGNORE_INDEX

    tokens = np.arange(1001, dtype=np.int32) % 250  # 100 val tokens: 9 windows of 10 + 1
    src = PackedTextSource(tokens, batch_size=4, seq_len=10, seed=0, val_fraction=0.1,
                           vocab_size=259, label="t")
    n = src.n_windows(VAL)
    assert n == 9
    scored = []
    for i in range(3):  # 12 rows: windows 0-8, then 0-2 again
        for shard in range(2):
            batch = src.batch(VAL, i, shard, 2)
            scored += [row[0].item() for row, t in zip(batch["input_ids"], batch["targets"])
                       if not t.eq(IGNORE_INDEX).all()]
            assert all(t.eq(IGNORE_INDEX).all() or not t.eq(IGNORE_INDEX).any()
                       for t in batch["targets"])
    assert sorted(scored) == sorted((901 + 10 * np.arange(n)) % 250)  # each window once
    assert not src.batch(TRAIN, 5)["targets"].eq(IGNORE_INDEX).any()
    # The fingerprint a checkpoint records of its validation batches is the files', as
    # before rows were left unscored (a resume called such a run's unchanged data changed).
    import open_mythos.training.data as data_mod

    masked = [src.batch(VAL, i) for i in range(3)]
    real = data_mod._score_once
    try:
        data_mod._score_once = lambda *args: None
        whole = [src.batch(VAL, i) for i in range(3)]
    finally:
        data_mod._score_once = real
    assert data_mod.val_fingerprint(src, masked) == data_mod.val_fingerprint(src, whole)
    assert not any(b["targets"].eq(IGNORE_INDEX).any() for b in whole)


def test_builtin_corpus_and_text_files(tmp_path):
    docs = builtin_corpus()
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000
    (tmp_path / "a.txt").write_text("hello world " * 200)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("é" * 300)
    src = build_data_source(DataConfig(text=[str(tmp_path)], seq_len=16, batch_size=2), seed=0)
    assert src.vocab_size == 259
    tokens = tokenize_documents(["ab", "c"], ByteTokenizer())
    assert tokens.tolist() == [97, 98, 258, 99, 258]
    with pytest.raises(ConfigError, match="neither a file nor a directory"):
        build_data_source(DataConfig(text=[str(tmp_path / "missing")]), seed=0)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_data_source(DataConfig(text=[str(tmp_path)], tokenizer="gpt2"), seed=0)
    with pytest.raises(ConfigError, match="fewer than one sequence"):
        build_data_source(DataConfig(text=[str(tmp_path / "a.txt")], seq_len=2000), seed=0)


def test_hf_dataset_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ConfigError, match="'datasets' package"):
        build_data_source(DataConfig(hf_dataset="some/corpus"), seed=0)


def test_hf_dataset_streams_local_json_lines_and_resumes(tmp_path, monkeypatch):
    """The real ``datasets`` library streaming a local JSON-lines directory (no network):
    the batches are the packed windows of the documents, computed here independently."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    docs = [f"document {i}: " + "ab" * (i % 7) for i in range(60)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "train.jsonl", "w") as fh:
        for i, doc in enumerate(docs):
            fh.write(json.dumps({"id": i, "body": doc}) + "\n")
    cfg = DataConfig(hf_dataset=str(corpus), hf_text_field="body", seq_len=16, batch_size=2,
                     eval_batches=1)
    src = build_data_source(cfg, seed=0)
    assert src.vocab_size == 259 and "streamed" in src.describe()

    # The packed stream: every document's bytes then EOS; window g is tokens
    # [16 g, 16 g + 17); the first eval_batches * batch_size = 2 windows are validation.
    tok = ByteTokenizer()
    stream = torch.tensor([t for doc in docs for t in tok.encode(doc) + [tok.eos_token_id]])

    def windows(first: int, count: int) -> torch.Tensor:
        return torch.stack([stream[16 * g: 16 * g + 17] for g in range(first, first + count)])

    val = src.batch(VAL, 0)
    assert torch.equal(val["input_ids"], windows(0, 2)[:, :-1])
    assert torch.equal(val["targets"], windows(0, 2)[:, 1:])
    for i in range(3):
        batch = src.batch(TRAIN, i)
        assert torch.equal(batch["input_ids"], windows(2 + 2 * i, 2)[:, :-1])
        assert torch.equal(batch["targets"], windows(2 + 2 * i, 2)[:, 1:])
    # Shard 1 of 2 of global batch 1 (4 rows): rows 2-3, windows 2 + 4 + 2.
    shard = src.batch(TRAIN, 1, shard=1, n_shards=2)
    assert torch.equal(shard["input_ids"], windows(8, 2)[:, :-1])
    # A fresh source (a resumed run) jumps straight to index 2 and sees the same batch.
    again = build_data_source(cfg, seed=0).batch(TRAIN, 2)
    assert torch.equal(again["input_ids"], windows(6, 2)[:, :-1])

    # Gradient accumulation asks for shard 0 then shard 1 of each global batch: the
    # stream is read once, in order, not replayed from the start for every shard.
    accum = build_data_source(cfg, seed=0)
    opened = []
    real_windows = type(accum)._windows
    monkeypatch.setattr(type(accum), "_windows",
                        lambda self, state=None: opened.append(1) or real_windows(self, state))
    for step in range(4):
        for s in range(2):
            got = accum.batch(TRAIN, step, shard=s, n_shards=2, start=4 * step)
            assert torch.equal(got["targets"], windows(2 + 4 * step + 2 * s, 2)[:, 1:])
    assert opened == []


def test_hf_dataset_errors_of_the_real_library_are_config_errors(tmp_path, offline_datasets):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text(json.dumps({"text": "a short document"}) + "\n")
    with pytest.raises(ConfigError, match="data.hf_dataset=.* could not be opened"):
        build_data_source(DataConfig(hf_dataset=str(corpus), hf_split="test"), seed=0)
    with pytest.raises(ConfigError, match="ran out after 0 sequences"):
        build_data_source(DataConfig(hf_dataset=str(corpus), seq_len=64), seed=0)


def test_a_streamed_dataset_that_runs_out_saves_the_steps_done(tmp_path, offline_datasets):
    """Mid-run exhaustion of a stream names the step and saves the last completed one
    (it was a bare configuration error, losing the steps since the last checkpoint)."""
    from open_mythos.training import Trainer, load_checkpoint
    from open_mythos.training.config import UNSET
    from open_mythos.training.data import DataExhausted

    from .conftest import read_metrics, tiny_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text("\n".join(
        json.dumps({"text": f"document {i} of a short corpus"}) for i in range(40)) + "\n")
    cfg = tiny_config(tmp_path / "run", data__task=UNSET, data__task_args=UNSET,
                      data__hf_dataset=str(corpus),
                      data__seq_len=16, data__batch_size=4, data__eval_batches=1,
                      run__steps=100, run__save_every=5)
    with pytest.raises(DataExhausted, match=r"ran out after .* in step (\d+) of 100; the \d+ "
                                            r"steps done are saved in .*step_000000") as caught:
        Trainer(cfg).train()
    failed_step = int(caught.value.args[0].split("in step ")[1].split()[0])
    assert read_metrics(tmp_path / "run")[-1]["step"] == failed_step - 1
    assert load_checkpoint(tmp_path / "run")[1] is not None
    assert (tmp_path / "run" / "checkpoints" / f"step_{failed_step - 1:08d}").is_dir()


def test_a_streamed_row_that_cannot_be_read_stops_after_saving_the_steps_done(
        tmp_path, offline_datasets):
    """A null text mid-stream (an empty CSV cell reads as one) stopped the run without
    saving the steps since the last checkpoint or naming the step; a malformed line in a
    local file ended in the reader's traceback (pyarrow's, pandas'). Both now stop as a
    stream that runs out does. Reference: the metrics and checkpoints on disk."""
    from open_mythos.training import Trainer
    from open_mythos.training.config import UNSET
    from open_mythos.training.data import DataUnreadable

    from .conftest import read_metrics, tiny_config

    def run_on(name: str, body: str, steps: int = 100):
        path = tmp_path / name
        path.write_text(body)
        cfg = tiny_config(tmp_path / ("run-" + name), data__task=UNSET, data__task_args=UNSET,
                          data__hf_dataset=str(path), data__seq_len=16, data__batch_size=4,
                          data__eval_batches=1, run__steps=steps, run__save_every=50)
        return Trainer(cfg), tmp_path / ("run-" + name)

    rows = [json.dumps({"text": f"document {i} of a short corpus"}) for i in range(60)]
    trainer, run = run_on("null.jsonl", "\n".join(rows + ['{"text": null}'] + rows) + "\n")
    with pytest.raises(DataUnreadable, match=r"holds a NoneType value there, not text .* in "
                                             r"step (\d+) of 100; the \d+ steps done are "
                                             r"saved in .*step_000000") as caught:
        trainer.train()
    failed_step = int(caught.value.args[0].split("in step ")[1].split()[0])
    assert read_metrics(run)[-1]["step"] == failed_step - 1 > 0
    assert (run / "checkpoints" / f"step_{failed_step - 1:08d}").is_dir()
    # A line that is not JSON, read before the first step: one error naming the file.
    trainer, _ = run_on("bad.jsonl", "\n".join(rows[:3] + ["{not json"]) + "\n")
    with pytest.raises(DataUnreadable, match=r"data.hf_dataset='.*bad.jsonl' could not be "
                                             r"read: ArrowInvalid: JSON parse error"):
        trainer.train()


def test_a_saved_dataset_without_the_split_says_how_to_read_another(tmp_path, offline_datasets):
    """data.text reads a saved DatasetDict's 'train' split; one without it said only that
    the split was missing, and the key that chooses a split is refused for data.text."""
    import datasets

    path = tmp_path / "dict"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["a document"] * 4})}
                         ).save_to_disk(str(path))
    with pytest.raises(ConfigError, match=r"no split 'train' \(splits: test; choose one with "
                                          r"openmythos prepare --hf-split, or stream it with "
                                          r"--hf-dataset and data.hf_split\)"):
        build_data_source(DataConfig(text=[str(path)], seq_len=8), seed=0)
