"""transformers integration: save/load round trip, generate parity, loop-count control."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from open_mythos import ByteTokenizer  # noqa: E402
from open_mythos.inference import generate  # noqa: E402
from open_mythos.integrations.hf import (  # noqa: E402
    MythosCache,
    OpenMythosForCausalLM,
    OpenMythosHFConfig,
    byte_tokenizer_for_transformers,
)
from tests.integrations.conftest import BYTE_VOCAB, byte_baseline, byte_model  # noqa: E402


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(params=["gqa", "mla"])
def saved(request, tmp_path):
    """(our model, directory written by save_pretrained)."""
    model = byte_model(request.param)
    OpenMythosForCausalLM.from_mythos(model, eos_token_id=258).save_pretrained(tmp_path)
    return model, tmp_path


def test_round_trip_gives_identical_logits_and_stores_the_tied_head_once(saved):
    model, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "openmythos" and config["dim"] == model.cfg.dim
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "model.embed.weight" in keys and "model.head.weight" not in keys

    hf = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(hf, OpenMythosForCausalLM) and not hf.training
    assert hf.model.head.weight is hf.model.embed.weight
    assert hf.model.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), hf.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not hf.model.recurrent.block.ffn.load_since_update.any()  # unsaved buffer zeroed
    ids = torch.randint(0, BYTE_VOCAB, (2, 11))
    # NOTE: equal weights, but loaded tensors may sit at other memory alignments, which can
    # change the summation order of vectorised kernels in the last bits.
    close(hf(ids, n_loops=5).logits, model(ids, n_loops=5))


def test_greedy_generate_matches_our_generate(saved):
    model, path = saved
    hf = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 256, (2, 6))
    ours = generate(model, ids, 12, 5, do_sample=False)
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, n_loops=5)
    assert torch.equal(theirs, ours)


def test_greedy_generate_matches_with_left_padding():
    model = byte_model("mla", seed=3)
    hf = OpenMythosForCausalLM.from_mythos(model, pad_token_id=256)
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 4))
    ids = torch.cat([a, torch.cat([torch.full((1, 3), 256), b], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    ours = generate(model, ids, 8, 4, do_sample=False, attention_mask=mask)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, n_loops=4)
    assert torch.equal(theirs, ours)
    alone = generate(model, b, 8, 4, do_sample=False)
    assert torch.equal(theirs[1, 7:], alone[0, 4:])


def test_n_loops_at_load_time_and_per_call(saved):
    model, path = saved
    ids = torch.randint(0, BYTE_VOCAB, (1, 9))
    default = AutoModelForCausalLM.from_pretrained(path)
    assert default.config.n_loops is None  # max_loop_iters
    close(default(ids).logits, model(ids))
    deep = AutoModelForCausalLM.from_pretrained(path, n_loops=7, act_early_exit=False)
    assert deep.config.n_loops == 7 and deep.config.act_early_exit is False
    close(deep(ids).logits, model(ids, n_loops=7, act_early_exit=False))
    close(deep(ids, n_loops=2).logits, model(ids, n_loops=2, act_early_exit=False))
    no_halt = OpenMythosForCausalLM.from_mythos(byte_model("gqa", act_threshold=float("inf")))
    assert not torch.allclose(no_halt(ids, n_loops=1).logits, no_halt(ids, n_loops=4).logits)
    out = deep.generate(ids, max_new_tokens=5, do_sample=False, n_loops=3)
    assert torch.equal(out, generate(model, ids, 5, 3, do_sample=False, act_early_exit=False))
    with pytest.raises(ValueError, match="n_loops"):
        deep(ids, n_loops=0)
    with pytest.raises(ValueError, match="n_loops"):
        AutoModelForCausalLM.from_pretrained(path, n_loops=0)
    # A NumPy count is stored as an int: the config still serialises.
    np_loops = AutoModelForCausalLM.from_pretrained(path, n_loops=np.int64(3))
    assert type(np_loops.config.n_loops) is int and '"n_loops": 3' in np_loops.config.to_json_string()
    # The trained depth, kept apart from the default depth, round trips and is checked.
    assert default.config.trained_depth is None
    default.config.trained_depth = np.int64(2)
    assert OpenMythosHFConfig.from_dict(default.config.to_dict()).trained_depth == 2
    with pytest.raises(ValueError, match="trained_depth"):
        OpenMythosHFConfig(trained_depth=0)


def test_forward_refuses_a_misspelled_option():
    """``**kwargs`` is there for what transformers passes; a typo is not silently run at the
    default depth."""
    hf = OpenMythosForCausalLM.from_mythos(byte_model("gqa")).eval()
    ids = torch.randint(0, BYTE_VOCAB, (1, 5))
    with pytest.raises(TypeError, match="unexpected keyword argument.*n_loop"):
        hf(ids, n_loop=1)
    with pytest.raises(ValueError, match="output_attentions"):
        hf(ids, output_attentions=True)
    with pytest.raises(TypeError, match="act_early_exit must be True, False or None"):
        hf(ids, act_early_exit="no")
    # What a Trainer or a tokenizer's output passes along is taken.
    torch.testing.assert_close(hf(ids, token_type_ids=torch.zeros_like(ids),
                                  output_attentions=False, num_items_in_batch=5).logits,
                               hf(ids).logits, rtol=0, atol=0)


def test_cache_forward_matches_full_forward_and_returns_our_cache():
    model = byte_model("gqa")
    hf = OpenMythosForCausalLM.from_mythos(model)
    ids = torch.randint(0, BYTE_VOCAB, (2, 10))
    full = hf(ids, n_loops=4).logits
    first = hf(ids[:, :6], n_loops=4, use_cache=True)
    assert isinstance(first.past_key_values, MythosCache)
    assert first.past_key_values.get_seq_length() == 6
    rest = hf(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True, n_loops=4)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full)
    rest.past_key_values.crop(8)
    assert rest.past_key_values.get_seq_length() == 8
    assert hf(ids, n_loops=4, logits_to_keep=1).logits.shape == (2, 1, BYTE_VOCAB)
    # The last k positions (the Coda's last block runs there only), with a cache and
    # left padding too: the full forward's logits at those positions.
    seen = []
    hook = model.coda[-1].ffn.register_forward_hook(
        lambda m, i, o: seen.append(tuple(i[0].shape[:2])))
    for k in (1, 3):
        torch.testing.assert_close(hf(ids, n_loops=4, logits_to_keep=k).logits, full[:, -k:])
    hook.remove()
    assert seen == [(2, 1), (2, 10)]  # k = 1: the last Coda block at one position per row
    cached = hf(ids[:, :6], n_loops=4, use_cache=True).past_key_values
    torch.testing.assert_close(hf(ids[:, 6:], past_key_values=cached, n_loops=4,
                                  logits_to_keep=2).logits, full[:, -2:])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    torch.testing.assert_close(hf(ids, attention_mask=mask, n_loops=4, logits_to_keep=2).logits,
                               hf(ids, attention_mask=mask, n_loops=4).logits[:, -2:])


def test_a_cache_passed_in_is_returned_updated_without_use_cache():
    """Step-by-step decoding that keeps each call's returned cache (no use_cache flag, as
    transformers' own models allow), starting from an empty DynamicCache, gives the logits
    of full forwards."""
    from transformers import DynamicCache

    model = byte_model("mla")
    hf = OpenMythosForCausalLM.from_mythos(model)
    ids = torch.randint(0, BYTE_VOCAB, (1, 9))
    out = hf(ids[:, :5], past_key_values=DynamicCache(), n_loops=3)
    past = out.past_key_values
    assert isinstance(past, MythosCache) and past.get_seq_length() == 5
    for t in range(5, 9):
        out = hf(ids[:, t:t + 1], past_key_values=past, n_loops=3)
        assert out.past_key_values is past and past.get_seq_length() == t + 1
        torch.testing.assert_close(out.logits[:, -1], hf(ids[:, :t + 1], n_loops=3).logits[:, -1])
    assert hf(ids, n_loops=3).past_key_values is None  # no cache asked for, none made
    # The wrapper's cache is the model's own layout: MLA's latent stored normalised once,
    # not upstream's raw c_kv normalised again at every step of every layer.
    assert not past.store.upstream_entries
    assert all(set(entry) == {"kv_latent"} for entry in past.store.store.values())


def test_labels_give_the_shifted_cross_entropy():
    model = byte_model("gqa").train()
    hf = OpenMythosForCausalLM.from_mythos(model)
    assert hf.training
    ids = torch.randint(0, BYTE_VOCAB, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    out = hf(ids, labels=labels, n_loops=2)
    logits = model(ids, n_loops=2)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, BYTE_VOCAB),
                                            labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    assert model.embed.weight.grad is not None


def test_fresh_model_from_config_has_our_initialisation():
    cfg = OpenMythosHFConfig.from_mythos_config(byte_model("mla").cfg)
    hf = AutoModelForCausalLM.from_config(cfg)
    rec = hf.model.recurrent
    assert torch.all(rec.lora.B == 0) and torch.all(rec.lora.scale.weight == 1)
    assert torch.all(rec.act.halt.bias == cfg.act_halt_bias_init)
    assert torch.all(rec.injection.B == 0.1) and torch.all(rec.injection.log_A == 0)
    assert torch.all(rec.block.ffn.router_bias == 0)
    assert 0.015 < float(rec.block.ffn.w_gate_up.detach().std()) < 0.025
    assert hf.model.head.weight is hf.model.embed.weight
    assert isinstance(AutoConfig.for_model("openmythos"), OpenMythosHFConfig)


def test_num_parameters_counts_the_tied_head_once_and_excludes_only_the_embedding():
    model = byte_model("gqa")
    hf = OpenMythosForCausalLM.from_mythos(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert hf.num_parameters() == sum(unique.values())
    embed = model.embed.weight.numel()
    assert model.recurrent.lora.scale.weight.numel() > 0
    assert hf.num_parameters(exclude_embeddings=True) == sum(unique.values()) - embed
    model.recurrent.requires_grad_(False)
    frozen = sum(p.numel() for p in model.recurrent.parameters())
    assert hf.num_parameters(only_trainable=True) == sum(unique.values()) - frozen


def test_config_json_is_strict_json_with_an_unreachable_threshold(tmp_path):
    model = byte_model("gqa")
    model.cfg.act_threshold = float("inf")
    OpenMythosForCausalLM.from_mythos(model).save_pretrained(tmp_path)

    def refuse(constant):
        raise AssertionError(f"config.json holds {constant}, which is not JSON")

    config = json.loads((tmp_path / "config.json").read_text(), parse_constant=refuse)
    assert config["act_threshold"] == "inf"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.model.cfg.act_threshold == float("inf") and hf.model.cfg == model.cfg
    # The HF config itself holds the float again, not the string ("inf" > 1 raised).
    assert hf.config.act_threshold == float("inf") and hf.config.act_threshold > 1
    assert AutoConfig.from_pretrained(tmp_path).to_dict() == hf.config.to_dict()


def test_config_rejects_untied_embeddings(saved):
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        OpenMythosHFConfig(tie_word_embeddings=False)
    # from_pretrained sets it after __init__; an untied head was left uninitialised (NaN).
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        AutoModelForCausalLM.from_pretrained(saved[1], tie_word_embeddings=False)


def test_stop_strings_stop_generation_and_the_pipeline(trained_model):
    """generate(stop_strings=..., tokenizer=tok) leaves ``tokenizer`` among the model
    kwargs; the strict forward refused it, so stop strings crashed."""
    from transformers import pipeline

    hf = OpenMythosForCausalLM.from_mythos(trained_model, n_loops=2).eval()
    tok = byte_tokenizer_for_transformers()
    ids = tok(["the c"], return_tensors="pt")
    full = tok.decode(hf.generate(**ids, max_new_tokens=12, do_sample=False)[0, 5:])
    assert " " in full[1:]  # greedy continuation of the trained model: "at og the..."
    stop = full.index(" ", 1) + 1  # up to and including its first inner space
    stopped = hf.generate(**ids, max_new_tokens=12, do_sample=False, stop_strings=[" "],
                          tokenizer=tok)
    assert tok.decode(stopped[0, 5:]) == full[:stop]
    text = pipeline("text-generation", model=hf, tokenizer=tok)(
        "the c", max_new_tokens=12, do_sample=False, stop_sequence=" ")[0]["generated_text"]
    assert text == "the c" + full[:stop - 1] or text == "the c" + full[:stop]


def test_byte_tokenizer_for_transformers_matches_byte_tokenizer(tmp_path):
    ours = ByteTokenizer()
    byte_tokenizer_for_transformers().save_pretrained(str(tmp_path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(theirs) == ours.vocab_size
    assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (256, 257, 258)
    text = "Héllo wörld 🌍\n\t  tabs <eos> 你好"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    ids = ours.encode(text, add_bos=True, add_eos=True)
    assert theirs.decode(ids, skip_special_tokens=True) == text
    assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    # Left padding, as batched generation with a decoder-only model needs (it was right).
    assert theirs.padding_side == "left" == byte_tokenizer_for_transformers().padding_side
    batch = theirs(["ab", "abcd"], padding=True)["input_ids"]
    assert batch[0][:2] == [256, 256] and batch[0][2:] == ours.encode("ab")


def test_exit_rule_at_load_time_and_per_call(saved):
    """An exit rule set in the config (saved as a dict) or per call gives the same logits
    and greedy tokens as our model with that rule."""
    from open_mythos import ExitRule

    model, path = saved
    model.eval()
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.5)  # loops that change the state
    rule = ExitRule(rel_change=0.2, min_loops=2)
    ids = torch.randint(0, BYTE_VOCAB, (2, 9))
    want = model(ids, n_loops=6, exit_rule=rule)
    assert not torch.allclose(want, model(ids, n_loops=6)), "the rule should stop some loops"
    OpenMythosForCausalLM.from_mythos(model).save_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, n_loops=6, exit_rule={"rel_change": 0.2,
                                                                         "min_loops": 2})
    hf.save_pretrained(path / "again")
    again = AutoModelForCausalLM.from_pretrained(path / "again")
    assert again.config.exit_rule == {"kl": None, "entropy": None, "rel_change": 0.2,
                                      "argmax_streak": None, "min_loops": 2}
    close(again(ids).logits, want)
    plain = AutoModelForCausalLM.from_pretrained(path, n_loops=6)
    close(plain(ids, exit_rule=rule).logits, want)
    out = plain.generate(ids, max_new_tokens=5, do_sample=False, exit_rule=rule)
    assert torch.equal(out, generate(model, ids, 5, 6, do_sample=False, exit_rule=rule))
    with pytest.raises(TypeError, match="unexpected keyword"):
        plain(ids, exit_rule={"kl_div": 0.1})
    # False: no rule for this call, the configured one included (None means the config's).
    close(again(ids, exit_rule=False).logits, model(ids, n_loops=6))
    out = again.generate(ids, max_new_tokens=5, do_sample=False, exit_rule=False)
    assert torch.equal(out, generate(model, ids, 5, 6, do_sample=False))


def test_loss_over_the_items_of_an_accumulated_batch():
    """``num_items_in_batch`` (what transformers' Trainer passes under gradient
    accumulation): the summed cross-entropy of this micro-batch over that count."""
    model = byte_model("gqa").train()
    hf = OpenMythosForCausalLM.from_mythos(model)
    ids = torch.randint(0, BYTE_VOCAB, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    logits = model(ids, n_loops=2)
    total = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, BYTE_VOCAB),
                                              labels[:, 1:].reshape(-1), reduction="sum")
    for items in (40, torch.tensor(40)):
        out = hf(ids, labels=labels, n_loops=2, num_items_in_batch=items)
        torch.testing.assert_close(out.loss, total / 40)


def _hf_trainer(hf, tmp_path, batch_size: int, accumulation: int, steps: int, data,
                callbacks=(), save_steps: int | None = None):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    saving = dict(save_strategy="no") if save_steps is None else dict(
        save_strategy="steps", save_steps=save_steps)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **saving)
    dataset = [{"input_ids": row, "labels": row.clone()} for row in data]
    return transformers.Trainer(model=hf, args=args, train_dataset=dataset,
                                callbacks=list(callbacks))


def test_trainer_with_gradient_accumulation_takes_the_same_step(tmp_path):
    """One optimizer step over 4 sequences: batch 4, or 4 accumulated batches of 1."""
    data = torch.randint(0, BYTE_VOCAB, (4, 12))
    deltas = []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        model = byte_model("gqa", use_act=False).train()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        hf = OpenMythosForCausalLM.from_mythos(model, n_loops=2)
        _hf_trainer(hf, tmp_path / f"{batch_size}", batch_size, accumulation, 1, data).train()
        deltas.append({k: v.detach() - before[k] for k, v in model.named_parameters()})
    for name, delta in deltas[0].items():
        torch.testing.assert_close(deltas[1][name], delta, rtol=1e-4, atol=1e-7, msg=name)
    assert any(d.abs().max() > 0 for d in deltas[0].values())


def test_trainer_resumes_from_its_checkpoint_with_the_head_tied(tmp_path, caplog):
    """Two steps, a checkpoint, two more steps in a fresh process's model: the weights of
    four uninterrupted steps; the checkpoint (which stores the tied head once) loads
    without a missing-key warning and the head stays the embedding."""
    from transformers.utils import logging as hf_logging

    data = torch.randint(0, BYTE_VOCAB, (8, 12))

    def fresh():
        return OpenMythosForCausalLM.from_mythos(byte_model("gqa", use_act=False).train(),
                                                 n_loops=2)

    straight = fresh()
    _hf_trainer(straight, tmp_path / "straight", 2, 1, 4, data).train()
    _hf_trainer(fresh(), tmp_path / "resumed", 2, 1, 2, data, save_steps=2).train()
    resumed = fresh()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            _hf_trainer(resumed, tmp_path / "resumed", 2, 1, 4, data,
                        save_steps=2).train(resume_from_checkpoint=True)
    finally:
        hf_logging.disable_propagation()
    assert "missing keys" not in caplog.text
    model = resumed.model
    assert model.head.weight is model.embed.weight
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, msg=name)
    assert not torch.equal(model.embed.weight, fresh().model.embed.weight)


def test_router_bias_callback_balances_experts_under_the_trainer(tmp_path):
    """With :class:`RouterBiasCallback` every optimizer step moves each MoE layer's router
    bias by ``rate * sign(mean load - load)`` (centred) from the load its forwards routed;
    without it the bias stays at zero."""
    from transformers import TrainerCallback

    from open_mythos.integrations.hf import RouterBiasCallback

    class RecordLoads(TrainerCallback):
        def __init__(self):
            self.loads = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.loads.append(model.model.recurrent.block.ffn.load_since_update.clone())

    data = torch.randint(0, BYTE_VOCAB, (8, 12))
    for with_callback in (False, True):
        model = byte_model("gqa", use_act=False).train()
        moe = model.recurrent.block.ffn
        moe.router_bias.zero_()
        record = RecordLoads()
        callbacks = [record, RouterBiasCallback()] if with_callback else [record]
        hf = OpenMythosForCausalLM.from_mythos(model, n_loops=2)
        _hf_trainer(hf, tmp_path / str(with_callback), 2, 2, 2, data, callbacks).train()
        expected = torch.zeros_like(moe.router_bias)
        for load in record.loads if with_callback else []:
            assert load.sum() > 0
            expected += moe.bias_update_rate * torch.sign(load.mean() - load)
            expected -= expected.mean()
        torch.testing.assert_close(moe.router_bias, expected)
        assert bool(moe.router_bias.abs().sum() > 0) == with_callback


@pytest.mark.parametrize("kind", ["looped", "dense"])
def test_gradient_checkpointing_enable_recomputes_loops_with_equal_gradients(kind):
    """transformers' switch (``activation_checkpointing_enable`` since 5.x, formerly
    ``gradient_checkpointing_enable``) turns on the model's own per-loop checkpointing (the
    dense baseline's per-block one: transformers said it was not compatible)."""
    model = (byte_model("gqa") if kind == "looped" else byte_baseline("gqa")).train()
    hf = OpenMythosForCausalLM.from_mythos(model, **({"n_loops": 3} if kind == "looped" else {}))
    switch = model.recurrent if kind == "looped" else model
    ids = torch.randint(0, BYTE_VOCAB, (2, 10))
    grads = []
    for enabled in (False, True):
        if enabled:
            (getattr(hf, "activation_checkpointing_enable", None)
             or hf.gradient_checkpointing_enable)()
        assert switch.gradient_checkpointing is enabled
        hf.zero_grad(set_to_none=True)
        hf(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
    assert not switch.gradient_checkpointing


def test_generate_longer_than_max_seq_len_is_refused_before_decoding():
    model = byte_model("gqa")
    hf = OpenMythosForCausalLM.from_mythos(model, n_loops=2)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, BYTE_VOCAB, (1, 10))
    limit = model.cfg.max_seq_len
    with pytest.raises(ValueError, match=f"exceeds max_seq_len={limit}"):
        hf.generate(ids, max_new_tokens=limit, do_sample=False)
    with pytest.raises(ValueError, match=f"exceeds max_seq_len={limit}"):
        hf.generate(ids, max_length=limit + 1, do_sample=False)
    assert calls == []
    assert hf.generate(ids, max_new_tokens=limit - 10, do_sample=False).shape == (1, limit)
    # A prompt that alone fills the context: it said "ask for at most -6 new tokens".
    with pytest.raises(ValueError, match=f"the prompt \\({limit + 6} tokens\\) leaves no room"):
        hf.generate(torch.randint(0, BYTE_VOCAB, (1, limit + 6)), max_new_tokens=1)


def test_generate_reuses_a_cache_of_the_whole_prompt_and_refuses_a_longer_one():
    """transformers' prompt-cache reuse with nothing after the cached prompt: the slice of
    uncached input_ids was empty ("input_ids is empty along the sequence dimension"); a
    cache longer than input_ids (grown in place by an earlier generate) said the same.
    Reference: generate without a cache."""
    import copy

    hf = OpenMythosForCausalLM.from_mythos(byte_model("gqa"), n_loops=2)
    ids = torch.randint(0, BYTE_VOCAB, (1, 7))
    want = hf.generate(ids, max_new_tokens=5, do_sample=False)
    prompt_cache = hf(ids, use_cache=True).past_key_values
    got = hf.generate(ids, past_key_values=copy.deepcopy(prompt_cache), max_new_tokens=5,
                      do_sample=False)
    assert torch.equal(got, want)
    grown = copy.deepcopy(prompt_cache)
    hf.generate(ids, past_key_values=grown, max_new_tokens=5, do_sample=False)
    with pytest.raises(ValueError, match="the cache holds 11 positions but input_ids only 7"):
        hf.generate(ids, past_key_values=grown, max_new_tokens=5, do_sample=False)


def test_the_deferred_stop_checks_calls_keep_the_cache():
    """transformers defers its stop check by a step on Apple MPS (torch has no CPU events to
    run it here): it calls activate_past_recording (which the cache lacked, an
    AttributeError), crop(0) after every step ("remove nothing", which emptied our cache)
    and crop(-1) to undo its extra step, then walks cache.layers. Those calls, as it makes
    them; reference: the cache's length and a forward from it."""
    hf = OpenMythosForCausalLM.from_mythos(byte_model("gqa"), n_loops=2)
    ids = torch.randint(0, BYTE_VOCAB, (1, 9))
    cache = hf(ids[:, :8], use_cache=True).past_key_values
    cache.activate_past_recording(recurrent_states_to_keep=max(1, cache.get_recurrent_states_to_keep()))
    cache.crop(0)
    assert cache.get_seq_length() == 8
    hf(ids[:, 8:], past_key_values=cache)  # the deferred check's extra step
    cache.crop(-1)
    assert cache.get_seq_length() == 8 and list(cache.layers) == []
    torch.testing.assert_close(hf(ids[:, 8:], past_key_values=cache).logits[:, -1],
                               hf(ids).logits[:, -1])


def test_load_time_inference_options_are_checked(saved):
    _, path = saved
    with pytest.raises(ValueError, match="kl"):
        AutoModelForCausalLM.from_pretrained(path, exit_rule={"kl": -1})
    with pytest.raises(TypeError, match="bogus"):
        AutoModelForCausalLM.from_pretrained(path, exit_rule={"bogus": 1})
    with pytest.raises(TypeError, match="act_early_exit"):
        AutoModelForCausalLM.from_pretrained(path, act_early_exit="no")
    hf = AutoModelForCausalLM.from_pretrained(path, act_early_exit=False, exit_rule={"kl": 0.1})
    assert hf.config.act_early_exit is False and hf.config.exit_rule["kl"] == 0.1


def test_generate_refuses_padding_rows_and_modes_it_cannot_run():
    """A row of padding alone was decoded from no context (one such prompt alone is an
    error); assisted, prompt-lookup and chunked-prefill decoding failed saying the model
    has no cache."""
    hf = OpenMythosForCausalLM.from_mythos(byte_model("gqa")).eval()
    ids = torch.tensor([[256, 256, 256], [97, 98, 99]])
    mask = torch.tensor([[0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"prompt\(s\) \[0\] are all padding"):
        hf.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    for option, mode in (({"prompt_lookup_num_tokens": 2}, "prompt-lookup"),
                         ({"assistant_model": hf}, "assisted decoding"),
                         ({"prefill_chunk_size": 2}, "chunked prefill")):
        with pytest.raises(ValueError, match=f"does not support {mode}.*speculative_generate"):
            hf.generate(ids[1:], max_new_tokens=2, do_sample=False, **option)
    from transformers import GenerationConfig

    with pytest.raises(ValueError, match="prompt-lookup"):
        hf.generate(ids[1:], GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=2))
    assert hf.generate(ids[1:], max_new_tokens=2, do_sample=False).shape == (1, 5)
