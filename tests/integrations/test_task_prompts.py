"""A task run's prompts start with BOS wherever the model is run from its checkpoint.

Task examples train as ``BOS prompt answer EOS`` (:mod:`open_mythos.tasks.batching`); a
trained task model given the prompt without its BOS answers wrongly. The tokenizer that
every path resolves for a task run (:func:`~open_mythos.tokenizers.task_tokenizer`) starts
each text with BOS; a text run's adds nothing.
"""

from __future__ import annotations

import json

import pytest
import torch

from open_mythos import ByteTokenizer
from open_mythos.cli import main
from open_mythos.inference import generate
from open_mythos.integrations.convert import (
    hf_to_training,
    is_task_checkpoint,
    load_model,
    resolve_tokenizer,
    training_to_hf,
    training_to_safetensors,
)
from open_mythos.tasks import BOS_ID
from open_mythos.tasks.batching import encode_prompt
from open_mythos.tokenizers import load_tokenizer, task_tokenizer
from tests.integrations.conftest import byte_model, write_training_checkpoint

PROMPT = "0110="


def _greedy_text(model, ids: list[int], n: int = 6) -> str:
    out = generate(model, torch.tensor([ids]), n, 2, do_sample=False)[0, len(ids):]
    return ByteTokenizer().decode(out)


@pytest.fixture
def runs(tmp_path, trained_model):
    """The same weights saved as a task run and as a text run. The model is the trained
    byte model of the integration tests: untrained ones repeat the last byte whatever
    precedes it, so a BOS would change nothing."""
    model = trained_model
    task_run = write_training_checkpoint(tmp_path / "task", model, task="parity")
    text_run = write_training_checkpoint(tmp_path / "text", model)
    return model, task_run, text_run


def test_byte_tokenizer_bos_default_round_trips(tmp_path):
    tok = task_tokenizer()
    assert tok.encode("ab") == [BOS_ID, 97, 98]
    assert tok.encode("ab", add_bos=False) == [97, 98]
    assert ByteTokenizer().encode("ab") == [97, 98]
    assert tok.batch_encode(["a", "bc"])["input_ids"].tolist() == [[256, BOS_ID, 97],
                                                                   [BOS_ID, 98, 99]]
    tok.save_pretrained(tmp_path / "t")
    assert load_tokenizer(str(tmp_path / "t")).add_bos_token
    # A file written before the flag existed reads as no BOS.
    path = tmp_path / "t" / "byte_tokenizer.json"
    data = json.loads(path.read_text())
    del data["add_bos_token"]
    path.write_text(json.dumps(data))
    assert not load_tokenizer(str(tmp_path / "t")).add_bos_token
    with pytest.raises(TypeError, match="add_bos_token"):
        ByteTokenizer(add_bos_token="yes")


def test_a_task_run_resolves_to_the_bos_tokenizer_and_a_text_run_does_not(runs):
    _, task_run, text_run = runs
    assert is_task_checkpoint(task_run) and not is_task_checkpoint(text_run)
    task = load_model(task_run)
    assert resolve_tokenizer(task).add_bos_token
    assert resolve_tokenizer(task, "byte").add_bos_token  # 'byte' of a task run: its framing
    assert not resolve_tokenizer(load_model(text_run)).add_bos_token
    assert encode_prompt(PROMPT).tolist() == resolve_tokenizer(task).encode(PROMPT)


def test_generate_command_frames_a_task_prompt_as_training_did(runs, capsys):
    model, task_run, text_run = runs
    prompt = "the c"
    with_bos = _greedy_text(model, encode_prompt(prompt).tolist())
    without = _greedy_text(model, ByteTokenizer().encode(prompt))
    assert with_bos != without  # the BOS changes this model's answer
    args = ["generate", "--prompt", prompt, "--greedy", "--n-loops", "2",
            "--max-new-tokens", "6", "--no-echo", "--device", "cpu", "--checkpoint"]
    assert main(args + [str(task_run)]) == 0
    assert capsys.readouterr().out == with_bos + "\n"
    assert main(args + [str(text_run)]) == 0
    assert capsys.readouterr().out == without + "\n"


def test_exported_task_tokenizer_adds_bos_for_transformers_users(runs, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, task_run, text_run = runs
    hf_dir = training_to_hf(task_run, tmp_path / "hf", n_loops=2)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    batch = tok([PROMPT, "01="], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == encode_prompt(PROMPT).tolist()
    assert batch["input_ids"][1].tolist() == [256, 256] + encode_prompt("01=").tolist()
    assert tok(PROMPT, add_special_tokens=False)["input_ids"] == list(PROMPT.encode())
    hf = AutoModelForCausalLM.from_pretrained(hf_dir)
    out = hf.generate(**tok([PROMPT], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert tok.decode(out[0, 6:], skip_special_tokens=True) == \
        _greedy_text(model, encode_prompt(PROMPT).tolist())
    # Back to a training checkpoint, and the native loader of the HF directory: BOS kept.
    back = hf_to_training(hf_dir, tmp_path / "back")
    assert resolve_tokenizer(load_model(back)).add_bos_token
    assert resolve_tokenizer(load_model(hf_dir)).add_bos_token
    # Naming the byte tokenizer, as the docs' Python example does, is the task's too.
    named = training_to_hf(task_run, tmp_path / "named", tokenizer="byte", n_loops=2)
    assert AutoTokenizer.from_pretrained(named)(PROMPT)["input_ids"] == \
        encode_prompt(PROMPT).tolist()
    weights = training_to_safetensors(task_run, tmp_path / "weights", tokenizer="byte")
    assert resolve_tokenizer(load_model(weights)).add_bos_token
    text_hf = training_to_hf(text_run, tmp_path / "text_hf", n_loops=2)
    assert AutoTokenizer.from_pretrained(text_hf)(PROMPT)["input_ids"] == list(PROMPT.encode())


def test_lm_eval_and_server_tokenize_a_task_prompt_with_bos(runs):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from open_mythos.integrations.lm_eval import OpenMythosLM

    _, task_run, text_run = runs
    task_lm = OpenMythosLM(str(task_run), device="cpu")
    assert task_lm.tok_encode(PROMPT)[0] == BOS_ID
    assert OpenMythosLM(str(text_run), device="cpu").tok_encode(PROMPT)[0] != BOS_ID
    plain_lm = OpenMythosLM(str(task_run), device="cpu", add_bos_token=False)
    assert plain_lm.tok_encode(PROMPT)[0] != BOS_ID
    # A rolling log-likelihood starts from the harness's prefix token (BOS): the text
    # must not bring a BOS of its own, or the score includes log p(BOS | BOS).
    request = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(PROMPT,),
                        idx=0)]
    rolled = task_lm.loglikelihood_rolling(request)[0]
    assert rolled == pytest.approx(plain_lm.loglikelihood_rolling(request)[0], abs=1e-5)
    ids = torch.tensor([[BOS_ID, *PROMPT.encode()]])
    with torch.no_grad():
        logp = task_lm.model(ids, task_lm.n_loops).log_softmax(-1)[0, :-1]
    assert rolled == pytest.approx(float(logp.gather(1, ids[0, 1:, None]).sum()), abs=1e-4)


def test_server_tokenizes_a_task_prompt_with_bos():
    pytest.importorskip("fastapi")
    from open_mythos.integrations.server import CompletionService

    service = CompletionService(byte_model("gqa"), task_tokenizer(), model_name="t")
    try:
        assert service.encode_text(PROMPT) == encode_prompt(PROMPT).tolist()
        assert service.encode_text(PROMPT, False) == list(PROMPT.encode())
    finally:
        service.close()


def test_inspect_frames_the_prompt_as_the_run_trained(runs, tmp_path, capsys):
    """inspect put BOS before every prompt, text runs' included (they never saw one)."""
    _, task_run, text_run = runs
    heads = {}
    for name, run in (("task", task_run), ("text", text_run)):
        assert main(["inspect", "--checkpoint", str(run), "--prompt", "ab", "--n-loops", "2",
                     "--out", str(tmp_path / name)]) == 0
        heads[name] = capsys.readouterr().out.splitlines()[0].split()
    assert heads["task"][:4] == ["loop", "<bos>", "a", "b"]
    assert heads["text"][:3] == ["loop", "a", "b"] and "<bos>" not in heads["text"]


def test_info_names_a_task_runs_tokenizer(runs, tmp_path, capsys):
    """info read the task tokenizer's repr as a Hub id and failed on every task run."""
    _, task_run, text_run = runs
    assert main(["info", str(task_run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["run"]["tokenizer"] == "byte, BOS first (a task run)"
    weights = training_to_safetensors(task_run, tmp_path / "weights")
    assert main(["info", str(weights), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["tokenizer"].startswith("byte, BOS")
    assert main(["info", str(text_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["tokenizer"] == "byte"


def test_a_text_runs_bpe_export_encodes_as_training_did(tmp_path):
    """A Llama-style tokenizer (a template adding <s>) exported with a text run: training
    packed documents without BOS, so transformers users must get the same ids as the
    training encoding (no <s>, special names as characters); they got a BOS the model
    never saw and answers unlike the native model's."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from open_mythos.tokenizers import MythosTokenizer

    bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=280,
                                                special_tokens=["<unk>", "<s>", "</s>"],
                                                show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    hf_tok.save_pretrained(tmp_path / "tok")
    assert hf_tok("the fox")["input_ids"][0] == 1  # the template adds <s>

    model = byte_model("gqa", vocab_size=len(hf_tok))
    run = write_training_checkpoint(tmp_path / "run", model, tokenizer=str(tmp_path / "tok"))
    out = training_to_hf(run, tmp_path / "hf", n_loops=2)
    exported = transformers.AutoTokenizer.from_pretrained(out)
    trained = MythosTokenizer(str(tmp_path / "tok"))
    for text in ("the fox", "the lazy</s>dog"):
        assert exported(text)["input_ids"] == trained.encode_literal(text), text
    assert exported(["the fox", "dog"], padding=True)["input_ids"][1][-1] == \
        trained.encode_literal("dog")[-1]
