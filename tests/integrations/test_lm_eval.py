"""lm-evaluation-harness model: log-likelihoods equal a direct log-softmax of our model."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from open_mythos import ByteTokenizer  # noqa: E402
from open_mythos.integrations.lm_eval import OpenMythosLM  # noqa: E402
from tests.integrations.conftest import (  # noqa: E402
    ScriptedModel,
    byte_baseline,
    byte_model,
    scripted_text,
    write_training_checkpoint,
)

TOK = ByteTokenizer()


def direct_logprob(model, context: list[int], continuation: list[int], n_loops: int) -> tuple[float, bool]:
    """Independent reference: one unbatched forward, float64 log-softmax."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, n_loops=n_loops).double(), -1)[0]
    rows = logp[len(context) - 1: len(context) + len(continuation) - 1]
    target = torch.tensor(continuation)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_matches_direct_computation_at_each_depth():
    model = byte_model("mla")
    pairs = [("The cat sat on", " the mat"), ("2+2=", "4"), ("a", "bcdefgh"),
             ("", "hello"), ("Hello wörld", " 🌍!")]
    for n_loops in (1, 3):
        lm = OpenMythosLM(pretrained=model, tokenizer=TOK, n_loops=n_loops, batch_size=3)
        got = lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
        for (ctx, cont), (score, greedy) in zip(pairs, got):
            ctx_ids = TOK.encode(ctx) if ctx else [TOK.bos_token_id]
            ref, ref_greedy = direct_logprob(model, ctx_ids, TOK.encode(cont), n_loops)
            assert math.isclose(score, ref, rel_tol=1e-5, abs_tol=1e-4), (ctx, cont, n_loops)
            assert greedy == ref_greedy


def test_greedy_flag_is_true_exactly_for_the_models_own_greedy_continuation():
    model = byte_model("gqa")
    lm = OpenMythosLM(pretrained=model, tokenizer=TOK, n_loops=2)
    ctx = TOK.encode("Once upon a time")
    out = model.generate(torch.tensor([ctx]), max_new_tokens=4, n_loops=2, do_sample=False)
    cont = out[0, len(ctx):].tolist()
    wrong = cont[:-1] + [(cont[-1] + 1) % 256]
    seen = []  # the last Coda block runs at the 4 continuation positions of each row (of 19)
    model.coda[-1].ffn.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[:2])))
    got = lm._loglikelihood_tokens([(None, ctx, cont), (None, ctx, wrong)], disable_tqdm=True)
    assert got[0][1] and not got[1][1]
    assert got[0][0] > got[1][0]
    assert seen == [(4, 1), (4, 1)]  # one request per forward (batch_size 1)
    # A continuation the tokenizer merged into the context (no tokens of its own) was
    # scored 0.0 and greedy: a multiple-choice option that always won.
    with pytest.raises(ValueError, match="encodes to no tokens of its own"):
        lm._loglikelihood_tokens([(None, ctx, cont), (None, ctx, [])], disable_tqdm=True)


def test_a_padded_embeddings_extra_ids_are_not_scored():
    """An embedding with more rows than the tokenizer has ids: generate_until never
    produces the extra ids, and loglikelihood normalised over them and took its argmax
    among them, so the adapter's own greedy continuation scored as not greedy."""
    model = byte_model("gqa", vocab_size=300)
    with torch.no_grad():
        model.head.weight[TOK.vocab_size:] *= 40  # the extra ids win every argmax
    lm = OpenMythosLM(pretrained=model, tokenizer=TOK, n_loops=2)
    for text in ("ab", "Once upon"):
        ctx = TOK.encode(text)
        (cont,) = lm.generate_until(instances("generate_until", [
            (text, {"until": ["\x00\x01"], "max_gen_toks": 1, "do_sample": False})]),
            disable_tqdm=True)
        target = TOK.encode(cont)
        with torch.no_grad():
            full = model(torch.tensor([ctx]), n_loops=2)[0, -1].double()
        assert int(full.argmax()) >= TOK.vocab_size  # so the case is what it says
        bounded = torch.log_softmax(full[:TOK.vocab_size], -1)
        assert target == [int(bounded.argmax())]
        ((score, greedy),) = lm._loglikelihood_tokens([(None, ctx, target)], disable_tqdm=True)
        assert greedy
        assert math.isclose(score, float(bounded[target[0]]), rel_tol=1e-5, abs_tol=1e-4)


def test_loglikelihood_rolling_sums_every_token_once_with_windows():
    model = byte_model("gqa")
    text = "The quick brown fox jumps over the lazy dog. " * 2  # 90 bytes > max_length
    lm = OpenMythosLM(pretrained=model, tokenizer=TOK, n_loops=2, max_length=32, batch_size=2)
    [score] = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]), True)
    ids = TOK.encode(text)
    # Reference, written out: windows of up to 32 predicted tokens; the model input of a
    # window is the 32 tokens before its last prediction (BOS stands before the text).
    seq = [TOK.bos_token_id] + ids
    ref, done = 0.0, 0
    while done < len(ids):
        n = min(32, len(ids) - done)
        full = seq[max(0, done + n - 32): done + n + 1]
        ref += direct_logprob(model, full[:-n], full[-n:], 2)[0]
        done += n
    assert math.isclose(score, ref, rel_tol=1e-5, abs_tol=1e-3)
    assert score < 0


def test_registered_and_loads_a_training_checkpoint(tmp_path):
    model = byte_model("gqa")
    write_training_checkpoint(tmp_path / "run", model)
    cls = get_model("openmythos")
    assert cls is OpenMythosLM
    lm = cls.create_from_arg_string(f"pretrained={tmp_path / 'run'},n_loops=3,batch_size=2")
    assert lm.n_loops == 3 and isinstance(lm.tokenizer, ByteTokenizer)
    [(score, _)] = lm.loglikelihood(instances("loglikelihood", [("abc", "def")]), True)
    ref, _ = direct_logprob(model, TOK.encode("abc"), TOK.encode("def"), 3)
    assert math.isclose(score, ref, rel_tol=1e-5, abs_tol=1e-4)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_a_dense_baseline_scores_and_generates_from_an_object_a_wrapper_and_a_checkpoint(
        attn_type, tmp_path):
    from open_mythos.integrations.hf import OpenMythosForCausalLM

    base = byte_baseline(attn_type)
    write_training_checkpoint(tmp_path / "run", base)
    pairs = [("The cat", " sat"), ("", "hello")]
    for pretrained in (base, OpenMythosForCausalLM.from_mythos(base), str(tmp_path / "run")):
        lm = OpenMythosLM(pretrained=pretrained, tokenizer=TOK, batch_size=2)
        got = lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
        for (ctx, cont), (score, greedy) in zip(pairs, got):
            ctx_ids = TOK.encode(ctx) if ctx else [TOK.bos_token_id]
            # n_loops is ignored by the fixed-depth baseline: any value is the reference.
            ref, ref_greedy = direct_logprob(base, ctx_ids, TOK.encode(cont), n_loops=1)
            assert math.isclose(score, ref, rel_tol=1e-5, abs_tol=1e-4), (pretrained, ctx)
            assert greedy == ref_greedy
        ctx = TOK.encode("Once")
        want = base.generate(torch.tensor([ctx]), max_new_tokens=5, do_sample=False)[0, len(ctx):]
        [text] = lm.generate_until(instances("generate_until", [("Once", {"max_gen_toks": 5})]),
                                   True)
        assert text == TOK.decode(want.tolist())


def test_generate_until_stops_at_the_until_string():
    script = b"abc. def. ghi. "
    lm = OpenMythosLM(pretrained=ScriptedModel(script), tokenizer=TOK, n_loops=2)
    ctx = "Q"  # one token: generation starts with script[0]
    [free] = lm.generate_until(instances("generate_until", [(ctx, {"max_gen_toks": 12})]), True)
    assert free == scripted_text(script, 1, 12) == "abc. def. gh"
    reqs = [(ctx, {"until": [". g"], "max_gen_toks": 12}), (ctx, {"until": ["."], "max_gen_toks": 12})]
    assert lm.generate_until(instances("generate_until", reqs), True) == ["abc. def", "abc"]


def test_generate_until_reads_the_harness_names_for_the_token_budget():
    """max_new_tokens, max_tokens and max_completion_tokens cap the continuation as
    max_gen_toks does (the harness's own order when several are given)."""
    script = b"abcdefghijklmnop"
    lm = OpenMythosLM(pretrained=ScriptedModel(script), tokenizer=TOK, n_loops=2)
    reqs = [("Q", {"max_new_tokens": 4}), ("Q", {"max_tokens": 3}),
            ("Q", {"max_completion_tokens": 2}), ("Q", {"max_gen_toks": 5, "max_new_tokens": 2})]
    assert lm.generate_until(instances("generate_until", reqs), True) == [
        "abcd", "abc", "ab", "abcde"]


def test_a_token_budget_that_leaves_no_context_is_an_error():
    """The default max_gen_toks (256) is longer than this model's 64-token context: an
    error that says what to change, not a context cut to nothing."""
    lm = OpenMythosLM(pretrained=ScriptedModel(b"abc"), tokenizer=TOK, n_loops=2)
    with pytest.raises(ValueError, match="max_gen_toks=256 leaves no room"):
        lm.generate_until(instances("generate_until", [("Q", {"until": ["."]})]), True)


def test_generation_settings_read_as_the_harness_reads_them(caplog):
    """Against lm-eval's own reader where this version has it; the contract otherwise."""
    from open_mythos.integrations.lm_eval import generation_settings

    cases = [{}, {"temperature": 0.7}, {"do_sample": False, "temperature": 0.7},
             {"do_sample": True, "temperature": 0.5, "until": "\n"},
             {"max_new_tokens": 9, "max_tokens": 3}, {"until": ["a", "b"], "max_tokens": 4}]
    expected = [(False, 0.0, 256, []), (True, 0.7, 256, []), (False, 0.0, 256, []),
                (True, 0.5, 256, ["\n"]), (False, 0.0, 9, []), (False, 0.0, 4, ["a", "b"])]
    for case, (sample, temp, budget, until) in zip(cases, expected):
        got = generation_settings(case, 256)
        assert (got["do_sample"], got["temperature"], got["max_gen_toks"], got["until"]) == (
            sample, temp, budget, until), case
    try:
        from lm_eval.models.utils import normalize_gen_kwargs
    except ImportError:
        normalize_gen_kwargs = None
    if normalize_gen_kwargs is not None:
        for case in cases:
            theirs, ours = normalize_gen_kwargs(dict(case), 256), generation_settings(case, 256)
            for key in ("do_sample", "max_gen_toks", "until"):
                assert ours[key] == theirs[key], (case, key)
            # Theirs leaves an unset temperature out (greedy, or the sampler's default).
            assert ours["temperature"] == theirs.get("temperature", 0.0), case
    with caplog.at_level("WARNING"):
        generation_settings({"repetition_penalty": 1.2}, 8)
    assert "repetition_penalty" in caplog.text


def test_max_batch_size_caps_auto():
    """simple_evaluate passes max_batch_size to every model."""
    model = byte_model("gqa")
    assert OpenMythosLM(pretrained=model, tokenizer=TOK, batch_size="auto",
                        max_batch_size=3).batch_size_per_call == 3
    assert OpenMythosLM(pretrained=model, tokenizer=TOK, batch_size=5,
                        max_batch_size=3).batch_size_per_call == 5


def test_a_model_in_memory_stays_put_and_says_so(recwarn):
    """device/dtype load a checkpoint; a model object keeps its place and dtype, and a
    request for another one is a warning rather than silently dropped."""
    model = byte_model("gqa")
    with pytest.warns(UserWarning, match=r"stays on cpu in torch.float32; dtype=bfloat16 ignored"):
        lm = OpenMythosLM(pretrained=model, tokenizer=TOK, dtype="bfloat16")
    assert lm.model is model and next(model.parameters()).dtype == torch.float32
    OpenMythosLM(pretrained=model, tokenizer=TOK, device="cpu", dtype="float32")
    OpenMythosLM(pretrained=model, tokenizer=TOK)
    assert not [w for w in recwarn if "in memory" in str(w.message)]


def test_chat_templates_as_the_harness_applies_them():
    """``--apply_chat_template``: the tokenizer's own template where it has one, else the
    server's plain one; the template string fingerprints the harness's cache."""
    pytest.importorskip("transformers")
    from open_mythos.integrations.hf import byte_tokenizer_for_transformers
    from open_mythos.tokenizers import MythosTokenizer

    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    plain = OpenMythosLM(pretrained=byte_model("gqa"), tokenizer=TOK)
    assert plain.apply_chat_template(history) == "System: be brief\nUser: 2+2?\nAssistant:"
    assert plain.apply_chat_template(
        [*history, {"role": "assistant", "content": "4"}], add_generation_prompt=False
    ) == "System: be brief\nUser: 2+2?\nAssistant: 4"
    assert plain.chat_template(False) is None and plain.chat_template(True).startswith("plain")
    assert plain.tokenizer_name == "ByteTokenizer"

    hf = byte_tokenizer_for_transformers()
    hf.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    own = OpenMythosLM(pretrained=byte_model("gqa"), tokenizer=MythosTokenizer.from_tokenizer(hf))
    assert own.apply_chat_template(history) == "<system>be brief\n<user>2+2?\n<assistant>"
    assert own.chat_template(True) == hf.chat_template


def test_max_length_defaults_to_the_length_the_run_trained_on(tmp_path):
    """Scoring windows of max_seq_len read positions a run that trained on shorter
    sequences never saw (bits per byte 1.40 against 0.90 at the trained 128 in an audit)."""
    from open_mythos.training.checkpoint import (
        TrainingCheckpoint,
        gather_model_state,
        save_checkpoint,
        tied_parameters,
    )
    from tests.integrations.conftest import byte_model

    model = byte_model("gqa")
    for name, data in (("short", 'tokenizer = "byte"\nseq_len = 16\n'),
                       ("unset", 'tokenizer = "byte"\n')):
        tied = tied_parameters(model)
        save_checkpoint(tmp_path / name, TrainingCheckpoint(
            step=1, model_state=gather_model_state(model, tied), model_config=model.cfg,
            train_config_toml=f"[data]\n{data}", optimizer_state={}, trainer_state={}), tied)
    assert OpenMythosLM(str(tmp_path / "short"), device="cpu").max_length == 16
    assert OpenMythosLM(str(tmp_path / "unset"), device="cpu").max_length == model.cfg.max_seq_len
    assert OpenMythosLM(str(tmp_path / "short"), device="cpu", max_length=24).max_length == 24


@pytest.mark.parametrize("bad", [0, -5, 65, True, 2.5])
def test_a_max_length_outside_the_context_is_refused_at_once(bad):
    """max_length=100 on a 64-position model was accepted and failed at the first long
    request, possibly far into a run; -5 was a bare AssertionError, 0 the default."""
    from tests.integrations.conftest import byte_model

    model = byte_model("gqa")
    assert model.cfg.max_seq_len == 64
    with pytest.raises(ValueError, match="max_length must be an integer from 1 to the "
                                         "model's max_seq_len 64"):
        OpenMythosLM(model, tokenizer="byte", max_length=bad)
    assert OpenMythosLM(model, tokenizer="byte", max_length=64).max_length == 64


def test_the_remote_code_class_of_an_export_is_accepted(tmp_path):
    """A model loaded with trust_remote_code before the package was imported is the
    export's own copy of the classes: it was refused with "... or an OpenMythosForCausalLM,
    got OpenMythosForCausalLM"."""
    import types

    from open_mythos.integrations.lm_eval import _load
    from tests.integrations.conftest import byte_model

    model = byte_model("gqa")
    # Stand-in for the copy: other classes, the same interface.
    copy_cls = type("OpenMythos", (torch.nn.Module,), {
        name: getattr(type(model), name) for name in
        ("cache_keys", "core_states", "hidden_states", "forward")})
    inner = copy_cls.__new__(copy_cls)
    inner.__dict__ = model.__dict__
    wrapper = types.SimpleNamespace(model=inner, config=types.SimpleNamespace(n_loops=3))
    got, tok, stored, _ = _load(wrapper, "byte", "cpu", None)
    assert got is inner and stored == 3
    with pytest.raises(TypeError, match="got types.SimpleNamespace"):
        _load(types.SimpleNamespace(model=object()), "byte", "cpu", None)


def test_an_exports_default_exit_rule_applies_and_model_args_set_one(tmp_path):
    """An export whose config sets exit_rule (the harness's hf model applies it) was scored
    without it; model_args had no way to give one. Reference: the model's own forward with
    the rule (float64 log-softmax)."""
    from open_mythos import ExitRule
    from open_mythos.integrations.hf import OpenMythosForCausalLM

    torch.manual_seed(0)
    model = byte_model("gqa", use_act=False)
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.5)  # depths that differ
    rule = ExitRule(kl=10.0, min_loops=1)  # fires at loop 2 everywhere
    pairs = [("The cat sat on", " the mat"), ("2+2=", "4")]

    def reference(exit_rule):
        out = []
        for ctx, cont in pairs:
            ids = torch.tensor([TOK.encode(ctx) + TOK.encode(cont)])
            with torch.no_grad():
                logits = model(ids, n_loops=4, exit_rule=exit_rule).double()
            rows = torch.log_softmax(logits, -1)[0, len(TOK.encode(ctx)) - 1:-1]
            out.append(float(rows.gather(-1, torch.tensor(TOK.encode(cont))[:, None]).sum()))
        return out

    with_rule, without = reference(rule), reference(None)
    assert not math.isclose(with_rule[0], without[0], rel_tol=1e-4)
    wrapped = OpenMythosForCausalLM.from_mythos(model, n_loops=4, exit_rule={"kl": 10.0})
    wrapped.save_pretrained(tmp_path / "export")
    for pretrained, extra in ((wrapped, {}), (str(tmp_path / "export"), {}),
                              (model, {"exit_rule": "kl:10;min_loops:1"}),
                              (model, {"exit_rule": rule}), (wrapped, {"exit_rule": "none"}),
                              (str(tmp_path / "export"), {"exit_rule": None})):
        lm = OpenMythosLM(pretrained=pretrained, tokenizer=TOK, n_loops=4, **extra)
        got = [s for s, _ in lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)]
        want = without if extra.get("exit_rule", "default") in ("none", None) else with_rule
        assert got == pytest.approx(want, rel=1e-5), (type(pretrained).__name__, extra)
    with pytest.raises(ValueError, match="field:value pairs"):
        OpenMythosLM(pretrained=model, tokenizer=TOK, exit_rule="kl=0.1")
    with pytest.raises(ValueError, match="argmax_streak takes an integer, got '1.5'"):
        OpenMythosLM(pretrained=model, tokenizer=TOK, exit_rule="argmax_streak:1.5")
    with pytest.raises(ValueError, match="kl is given twice"):  # the last one won silently
        OpenMythosLM(pretrained=model, tokenizer=TOK, exit_rule="kl:0.1;kl:0.2")
    # lm-eval reads "exit_rule=none" in model_args as None: no rule, not the export's.
    from lm_eval.api.registry import get_model

    lm = get_model("openmythos").create_from_arg_string(
        f"pretrained={tmp_path / 'export'},exit_rule=none", {"batch_size": 1})
    assert lm.exit_rule is None
    with pytest.raises(ValueError, match="fixed-depth baseline"):
        OpenMythosLM(pretrained=byte_baseline("gqa"), tokenizer=TOK, exit_rule="kl:0.1")


def test_a_model_object_is_scored_as_its_directory_or_says_what_it_lacks(tmp_path, recwarn):
    """An OpenMythosForCausalLM loaded from a task run's export was scored with the byte
    tokenizer's default, without the BOS its examples start with (about 20 nats worse, no
    warning); a bare model object now says what it cannot know. Reference: the export's
    directory given as a path."""
    from open_mythos.integrations.convert import training_to_hf
    from open_mythos.integrations.hf import OpenMythosForCausalLM
    from open_mythos.tokenizers import task_tokenizer

    model = byte_model("gqa")
    run = tmp_path / "run"
    write_training_checkpoint(run, model, task="parity")
    export = training_to_hf(run, tmp_path / "export")
    pairs = [("0110=", "0")]
    by_path = OpenMythosLM(pretrained=str(export), n_loops=2)
    wrapped = OpenMythosLM(pretrained=OpenMythosForCausalLM.from_pretrained(export), n_loops=2)
    assert by_path.tokenizer.add_bos_token and wrapped.tokenizer.add_bos_token
    assert by_path.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True) == \
        wrapped.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    recwarn.clear()
    OpenMythosLM(pretrained=model)
    assert any("records neither its tokenizer nor the depth" in str(w.message) for w in recwarn)
    recwarn.clear()
    OpenMythosLM(pretrained=model, tokenizer=task_tokenizer(), n_loops=2)
    assert not any("records neither" in str(w.message) for w in recwarn)
