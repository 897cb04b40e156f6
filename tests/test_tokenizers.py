import json

import pytest
import torch

from open_mythos.tokenizers import ByteTokenizer, MythosTokenizer, Tokenizer, load_tokenizer

TEXTS = ["hello world", "naïve café — déjà vu", "数学 and ελληνικά", "emoji 🤖👩‍💻!", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_byte_specials_inside_vocab():
    tok = ByteTokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.vocab_size == len(tok) == 259
    assert max(tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) < tok.vocab_size
    assert tok.encode("<eos>") == list(b"<eos>")  # specials only come from add_bos/add_eos
    with pytest.raises(TypeError, match=r"encode takes a str, got bytes \(decode bytes first"):
        tok.encode(b"hi")
    with pytest.raises(TypeError, match="encode takes a str, got int"):
        tok.encode(123)


def test_byte_decode_specials_and_invalid_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("hi", add_bos=True, add_eos=True) + [tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi<eos><pad>"
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # truncated 3-byte sequence
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])


def test_byte_batch_left_padding():
    tok = ByteTokenizer()
    batch = tok(["abc", "a", ""], add_eos=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (3, 4)
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert (ids[:, -1] == tok.eos_token_id).all()
    for row, m, text in zip(ids, mask, ["abc", "a", ""]):
        assert tok.decode(row[m.bool()]) == text
    right = tok.batch_encode(["abc", "a"], padding_side="right")
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_byte_save_load(tmp_path):
    ByteTokenizer().save_pretrained(tmp_path)
    assert isinstance(ByteTokenizer.from_pretrained(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    # A damaged file is a ValueError naming it (a bare JSON message, or an AttributeError
    # traceback for `null`, reached generate, export and serve).
    saved = tmp_path / "byte_tokenizer.json"
    for damaged, why in ((saved.read_bytes()[:20], "is not valid JSON"), (b"null", "holds no JSON"),
                         (b"\xe1", "is not valid JSON")):
        saved.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"byte_tokenizer.json {why}"):
            ByteTokenizer.from_pretrained(tmp_path)


def _build_hf_tokenizer():
    """A small byte-level BPE trained here, with <unk>/<pad>/<eos> and one added special."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["hello world", "the quick brown fox", "jumps over the lazy dog"] * 10
    bpe.train_from_iterator(corpus, trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    hf.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    return hf


def test_mythos_tokenizer_from_local_directory(tmp_path):
    hf = _build_hf_tokenizer()
    hf.save_pretrained(tmp_path)
    tok = MythosTokenizer(str(tmp_path))
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(tok) == len(hf)
    assert tok.vocab_size > hf.vocab_size  # the added special is counted
    assert tok.tokenizer.convert_tokens_to_ids("<tool>") < tok.vocab_size
    assert tok.eos_token_id < tok.vocab_size and tok.pad_token_id < tok.vocab_size

    text = "the lazy fox jumps, café 🤖"
    ids = tok.encode(text, add_eos=True)
    assert ids[-1] == tok.eos_token_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text

    batch = tok(["hello", "the quick brown fox"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0, 0] == 0 and batch["input_ids"][0, 0] == tok.pad_token_id
    assert isinstance(load_tokenizer(tmp_path), MythosTokenizer)
    # A special token's name inside a prompt is its characters, as in the training data
    # (prepare encodes documents literally): "<eos>" mid-prompt was an EOS at inference.
    inside = tok.encode("the dog<eos>the <tool> fox")
    assert tok.eos_token_id not in inside and inside == tok.encode_literal(
        "the dog<eos>the <tool> fox")
    assert tok.tokenizer.convert_tokens_to_ids("<tool>") not in inside
    assert tok.decode(inside) == "the dog<eos>the <tool> fox"


def test_both_tokenizers_refuse_what_they_cannot_encode_or_decode():
    """A lone surrogate (JSON's "\\ud800") and ids outside the vocabulary are ValueErrors
    (a 400 from the server) for both tokenizers: the Hugging Face one raised a TypeError
    naming TextEncodeInput (a 500) and dropped out-of-range ids from its text."""
    hf = MythosTokenizer.from_tokenizer(_build_hf_tokenizer())
    for tok in (ByteTokenizer(), hf):
        with pytest.raises(ValueError, match=r"lone surrogate \(\\ud800\) at character 1"):
            tok.encode("a\ud800b")
        for bad in (tok.vocab_size, -1):
            with pytest.raises(ValueError, match=f"token id {bad} is outside"):
                tok.decode([5, bad])
        assert tok.decode(tok.encode("caf\u00e9")) == "caf\u00e9"
    with pytest.raises(ValueError, match="outside"):
        hf.decode_piece([hf.vocab_size])


def test_mythos_tokenizer_pads_with_eos_when_no_pad():
    hf = _build_hf_tokenizer()
    hf.pad_token = None
    tok = MythosTokenizer.from_tokenizer(hf)
    assert tok.pad_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="BOS"):
        tok.encode("hello", add_bos=True)


def test_mythos_tokenizer_missing_path_is_clear_and_offline(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MythosTokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of the files.*tokenizer.json"):
        MythosTokenizer(str(tmp_path / "empty"))
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        MythosTokenizer("no-such-org/no-such-tokenizer")
    # A tokenizer.json of another layout failed deep in the loaders (KeyError, or the
    # tokenizers library's bare Exception): the training CLI printed a traceback, status 1.
    for name, spec in (("other", {"not": "a tokenizer"}),
                       ("newer", {"version": "1.0", "model": {"type": "Quantum"}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(spec))
        with pytest.raises(OSError, match="could not load tokenizer"):
            MythosTokenizer(str(tmp_path / name))


def test_mythos_tokenizer_without_transformers_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"open-mythos\[hf\]"):
        MythosTokenizer("anything")


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_rows_places_each_row_on_its_side(side):
    from open_mythos.tokenizers import pad_rows

    rows = [[5, 6, 7], torch.tensor([8]), []]
    ids, mask = pad_rows(rows, pad_id=0, side=side)
    expected = {"left": [[5, 6, 7], [0, 0, 8], [0, 0, 0]],
                "right": [[5, 6, 7], [8, 0, 0], [0, 0, 0]]}[side]
    assert ids.tolist() == expected
    assert mask.tolist() == [[int(t != 0) for t in row] for row in expected]
    with pytest.raises(ValueError, match="side"):
        pad_rows(rows, 0, side="middle")
