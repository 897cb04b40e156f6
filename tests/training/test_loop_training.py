"""Loop-supervised training options: per-loop readout loss, per-loop intermediate targets,
uniform depth sampling, truncated and progressive backpropagation, init from another run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from open_mythos import OpenMythos
from open_mythos.baseline import build_model
from open_mythos.tasks import IGNORE_INDEX, get_task, make_batch
from open_mythos.training import ConfigError, LoopSchedule, Trainer, load_checkpoint
from open_mythos.training.losses import loop_weights, readout_depths, targets_at_depth
from open_mythos.training.schedule import progressive_split

from ..conftest import tiny_config as tiny_model_config
from .conftest import read_metrics, tiny_config

MULTIHOP = dict(data__task="multihop", data__task_args={"hops": [1, 3], "ood_hops": [4, 5]},
                data__seq_len=None, data__batch_size=6)


def _first_batch_and_model(trainer_cfg):
    """The model and the first training batch a fresh run of ``trainer_cfg`` starts from."""
    from open_mythos.training.data import TRAIN, build_data_source

    data = build_data_source(trainer_cfg.data, trainer_cfg.run.seed,
                             with_trace=trainer_cfg.optim.loop_targets)
    torch.manual_seed(trainer_cfg.run.seed)
    model = build_model(trainer_cfg.model.build(data.vocab_size))
    return model, data.batch(TRAIN, 0)


def _mean_ce(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(),
                           ignore_index=IGNORE_INDEX).item()


def test_loop_loss_is_the_weighted_mean_of_separate_forwards(tmp_path):
    """loss = ce + w * sum_d weight_d * ce(forward with d loops), recomputed independently."""
    w, gamma = 0.7, 0.5
    cfg = tiny_config(tmp_path / "run", run__steps=1, optim__aux_weight=0.0,
                      optim__loop_loss_weight=w, optim__loop_loss_gamma=gamma,
                      schedule__n_loops=3, model__use_act=False)
    model, batch = _first_batch_and_model(cfg)
    Trainer(cfg).train()
    row = read_metrics(tmp_path / "run")[0]
    x, y = batch["input_ids"], batch["targets"]
    with torch.no_grad():
        per_depth = {d: _mean_ce(model(x, n_loops=d), y) for d in (1, 2, 3)}
    weights = {d: gamma ** (3 - d) for d in (1, 2, 3)}
    expected = sum(weights[d] * per_depth[d] for d in weights) / sum(weights.values())
    assert row["ce"] == pytest.approx(per_depth[3], rel=1e-5)
    assert row["loop_ce"] == pytest.approx(expected, rel=1e-5)
    assert row["loss"] == pytest.approx(row["ce"] + w * expected, rel=1e-5)


def test_loop_loss_last_k_and_weights():
    assert readout_depths(6) == [1, 2, 3, 4, 5, 6]
    assert readout_depths(6, last=2) == [5, 6] and readout_depths(2, last=5) == [1, 2]
    assert loop_weights([1, 2], 2) == {1: 0.5, 2: 0.5}
    assert loop_weights([1, 2, 3], 3, gamma=0.5) == pytest.approx({1: 1 / 7, 2: 2 / 7, 3: 4 / 7})


@pytest.mark.parametrize("open_ends", [0.0, 0.5])
def test_per_loop_targets_follow_the_chain(open_ends):
    """Loop ``d``'s target is the chain's value after ``d`` hops, held at its end (a digit,
    or with ``open_ends`` also a variable that nothing assigns)."""
    task = get_task("multihop", hops=(1, 4), ood_hops=(5, 6), open_ends=open_ends)
    batch = make_batch(task, __import__("random").Random(0), "train", 16, with_trace=True)
    ends = {chr(t) for t in batch["trace"][:, -1].tolist()}
    assert any(c.isalpha() for c in ends) == (open_ends > 0)
    pos = batch["answer_start"] - 1
    for i in range(16):
        prompt = "".join(chr(t) for t in batch["input_ids"][i, 1:batch["answer_start"][i]].tolist())
        chain = task.trace(prompt)
        for d in range(1, 7):
            y = targets_at_depth(batch["targets"], batch["answer_start"], batch["trace"], d)
            assert chr(y[i, pos[i]]) == chain[min(d, len(chain)) - 1]
            # Every other position keeps its target.
            keep = torch.ones_like(y[i], dtype=torch.bool)
            keep[pos[i]] = False
            assert torch.equal(y[i][keep], batch["targets"][i][keep])


@pytest.mark.parametrize("n_loops", [3, 2])
def test_loop_targets_replace_the_answer_target_of_each_loop(tmp_path, n_loops):
    """Loop ``d`` is trained on the chain's value after ``d`` hops; the last loop, whose
    Coda readout is the model's output, on the answer (with 2 loops and 3-hop chains it
    was trained on the second hop's value, against the main loss's answer)."""
    common = dict(run__steps=1, optim__loop_loss_weight=1.0, optim__aux_weight=0.0,
                  schedule__n_loops=n_loops, model__use_act=False, **MULTIHOP)
    cfg = tiny_config(tmp_path / "trace", optim__loop_targets=True, **common)
    model, batch = _first_batch_and_model(cfg)
    Trainer(tiny_config(tmp_path / "final", **common)).train()
    Trainer(cfg).train()
    final, trace = read_metrics(tmp_path / "final")[0], read_metrics(tmp_path / "trace")[0]
    # Independently: decode each prompt, follow its chain, put hop d's value as the target.
    x, y = batch["input_ids"], batch["targets"]
    task = get_task("multihop", hops=(1, 3), ood_hops=(4, 5))
    chains = [task.trace("".join(map(chr, x[i, 1:batch["answer_start"][i]].tolist())))
              for i in range(x.shape[0])]
    depths = range(1, n_loops + 1)
    with torch.no_grad():
        logits = {d: model(x, n_loops=d) for d in depths}
    hop_ce = []
    for d in depths:
        y_d = y.clone()
        for i, chain in enumerate(chains):
            y_d[i, batch["answer_start"][i] - 1] = ord(chain[min(d, len(chain)) - 1])
        hop_ce.append(_mean_ce(logits[d], y if d == n_loops else y_d))
    assert max(map(len, chains)) > 2  # some chain is longer than 2 loops
    assert trace["loop_ce"] == pytest.approx(sum(hop_ce) / n_loops, rel=1e-5)
    assert final["loop_ce"] == pytest.approx(sum(_mean_ce(logits[d], y) for d in depths) / n_loops,
                                             rel=1e-5)
    assert final["ce"] == pytest.approx(trace["ce"], rel=1e-6)
    with pytest.raises(ConfigError, match="loop_targets"):
        Trainer(tiny_config(tmp_path / "parity", optim__loop_targets=True,
                            optim__loop_loss_weight=1.0, run__steps=1)).train()
    with pytest.raises(ConfigError, match="loop_loss_weight"):
        tiny_config(tmp_path / "x", optim__loop_targets=True)


def test_truncated_backprop_differentiates_exactly_the_last_loops():
    torch.manual_seed(0)
    model = OpenMythos(tiny_model_config(use_act=False, max_loop_iters=6))
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.1)
    tracked = []
    model.recurrent.block.register_forward_hook(lambda m, i, o: tracked.append(o.requires_grad))
    ids = torch.randint(0, 97, (2, 8))
    model(ids, n_loops=5, backprop_loops=2).sum().backward()
    assert tracked == [False, False, False, True, True]
    # Each loop index has its own LoRA scale row: only the last two loops' rows get gradient.
    grad = model.recurrent.lora.scale.weight.grad
    assert [bool(grad[t].abs().sum() > 0) for t in range(6)] == [False] * 3 + [True] * 2 + [False]


def test_progressive_split_is_deterministic_and_covers_its_range():
    splits = [progressive_split(0, step, 4) for step in range(400)]
    assert splits == [progressive_split(0, step, 4) for step in range(400)]
    assert all(0 <= n <= 3 and 1 <= k <= 4 - n for n, k in splits)
    assert {n for n, _ in splits} == {0, 1, 2, 3}
    assert {n + k for n, k in splits} == {1, 2, 3, 4}
    assert [progressive_split(1, step, 4) for step in range(400)] != splits


def test_progressive_loss_runs_the_drawn_split(tmp_path, monkeypatch):
    alpha = 0.4
    calls = []
    forward = OpenMythos.forward

    def spy(self, ids, n_loops=None, *args, **kwargs):
        calls.append((n_loops, kwargs.get("backprop_loops")))
        return forward(self, ids, n_loops, *args, **kwargs)

    monkeypatch.setattr(OpenMythos, "forward", spy)
    cfg = tiny_config(tmp_path / "run", run__steps=3, optim__progressive_weight=alpha,
                      optim__aux_weight=0.0, schedule__n_loops=4, model__use_act=False)
    model, batch = _first_batch_and_model(cfg)
    Trainer(cfg).train()
    # Each step: the usual forward at 4 loops, then n + k loops with the last k trained.
    expected = []
    for step in range(3):
        n, k = progressive_split(0, step, 4)
        expected += [(4, None), (n + k, k)]
    assert calls == expected
    row = read_metrics(tmp_path / "run")[0]
    n, k = progressive_split(0, 0, 4)
    with torch.no_grad():
        progressive = _mean_ce(forward(model, batch["input_ids"], n + k), batch["targets"])
    assert row["loss"] == pytest.approx((1 - alpha) * row["ce"] + alpha * progressive, rel=1e-5)
    with pytest.raises(ConfigError, match="progressive_weight"):
        tiny_config(tmp_path / "bad", optim__progressive_weight=1.0)


def test_uniform_loop_sampling():
    cfg = tiny_config("unused", schedule__loops="uniform", schedule__min_loops=2,
                      schedule__max_loops=5).schedule
    sampler = LoopSchedule.from_config(cfg, 100, seed=3)
    draws = [sampler(s) for s in range(400)]
    assert draws == [sampler(s) for s in range(400)]
    counts = np.bincount(draws, minlength=6)[2:]
    assert counts.min() > 60 and set(draws) == {2, 3, 4, 5}  # each about 100 of 400


def started_from(tmp_path, source: str) -> dict[str, torch.Tensor]:
    """Train ``stage2`` one step at lr 1e-9 from ``run.init_from = tmp_path / source``,
    check that it starts at ``stage1``'s weights, and return its state dict."""
    stage1, _ = load_checkpoint(tmp_path / "stage1")
    stage2 = Trainer(tiny_config(tmp_path / "stage2", run__steps=1, optim__lr=1e-9,
                                 run__init_from=str(tmp_path / source)))
    stage2.train()
    # One step at lr 1e-9 moves no weight; the router bias takes its own balancing step.
    after = stage2.core.state_dict()
    for name, a in stage1.state_dict().items():
        if "load_since_update" not in name and "router_bias" not in name:
            assert torch.allclose(a, after[name], atol=1e-6), name
    return after


def test_init_from_starts_at_the_other_runs_weights(tmp_path):
    Trainer(tiny_config(tmp_path / "stage1", run__steps=3)).train()
    after = started_from(tmp_path, "stage1")
    fresh = Trainer(tiny_config(tmp_path / "fresh", run__steps=1, run__seed=5))
    fresh.train()
    assert not torch.allclose(fresh.core.embed.weight, after["embed.weight"])
    with pytest.raises(ConfigError, match=r"does not fit this model \(dim: 32 there, 48 here\)"):
        Trainer(tiny_config(tmp_path / "wider", run__steps=1, model__dim=48,
                            run__init_from=str(tmp_path / "stage1"))).train()
    with pytest.raises(ConfigError, match="init_from"):
        Trainer(tiny_config(tmp_path / "none", run__steps=1,
                            run__init_from=str(tmp_path / "missing"))).train()
    # A refused start leaves no config.toml behind (a later --resume took the directory
    # for a run to continue, and said "nothing to resume"); nor does a progressive loss
    # on the dense baseline, refused before the directory is claimed.
    for name in ("wider", "none"):
        assert not (tmp_path / name / "config.toml").exists()
    # ... but what was there before is kept (a user's own config and tokenizer there).
    mine = tmp_path / "mine"
    (mine / "tokenizer").mkdir(parents=True)
    (mine / "tokenizer" / "vocab.json").write_text("{}")
    (mine / "config.toml").write_text("# mine\n")
    with pytest.raises(ConfigError, match="init_from"):
        Trainer(tiny_config(mine, run__steps=1, run__init_from=str(tmp_path / "missing"))).train()
    assert (mine / "config.toml").read_text() == "# mine\n"  # not even rewritten
    assert (mine / "tokenizer" / "vocab.json").is_file()
    with pytest.raises(ConfigError, match="does not fit"):  # checked before the claim writes
        Trainer(tiny_config(mine, run__steps=1, model__dim=48,
                            run__init_from=str(tmp_path / "stage1"))).train()
    assert (mine / "config.toml").read_text() == "# mine\n"
    with pytest.raises(ConfigError, match="progressive_weight needs a looped model"):
        Trainer(tiny_config(tmp_path / "dense", run__steps=1, model__core_layers=2,
                            optim__progressive_weight=0.3)).train()
    assert not (tmp_path / "dense" / "config.toml").exists()
    Trainer(tiny_config(tmp_path / "wider", run__steps=1, model__dim=48)).train()  # starts


def test_init_from_a_hugging_face_directory(tmp_path):
    """An exported model starts a run as its training checkpoint does (it crashed with a
    traceback on the HF config's extra keys)."""
    pytest.importorskip("transformers")
    from open_mythos.integrations.convert import training_to_hf

    Trainer(tiny_config(tmp_path / "stage1", run__steps=3)).train()
    training_to_hf(tmp_path / "stage1", tmp_path / "hf")
    started_from(tmp_path, "hf")
    with pytest.raises(ConfigError, match=r"does not fit this model \(dim: 32 there, 48 here\)"):
        Trainer(tiny_config(tmp_path / "wider", run__steps=1, model__dim=48,
                            run__init_from=str(tmp_path / "hf"))).train()
    # Its configuration fits but its weights cannot be used: refused before the claim
    # writes (the pre-check reads the weights files' headers; it compared the
    # configurations alone, so the user's config.toml was rewritten first).
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("# mine\n")
    damages = {
        "no model.safetensors": lambda: weights.unlink(),
        "is unreadable": lambda: weights.write_bytes(weights.read_bytes()[:-100]),
        r"does not fit this model: norm.weight \(16,\) != \(32,\)": lambda: save_file(
            {**state, "model.norm.weight": state["model.norm.weight"][:16]}, weights),
    }
    for message, damage in damages.items():
        save_file(state, weights)
        damage()
        with pytest.raises(ConfigError, match=message):
            Trainer(tiny_config(mine, run__steps=1, run__init_from=str(tmp_path / "hf"))).train()
        assert (mine / "config.toml").read_text() == "# mine\n"


def test_head_lens_reads_the_state_at_the_supervised_positions(tmp_path):
    """Without a Coda, the head lens is a forward stopped after d loops: the loss matches."""
    cfg = tiny_config(tmp_path / "run", run__steps=1, optim__aux_weight=0.0,
                      optim__loop_loss_weight=1.0, optim__loop_readout="head",
                      schedule__n_loops=3, model__use_act=False, model__coda_layers=0)
    model, batch = _first_batch_and_model(cfg)
    Trainer(cfg).train()
    row = read_metrics(tmp_path / "run")[0]
    with torch.no_grad():
        expected = sum(_mean_ce(model(batch["input_ids"], n_loops=d), batch["targets"])
                       for d in (1, 2, 3)) / 3
    assert row["loop_ce"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="loop_readout"):
        tiny_config(tmp_path / "bad", optim__loop_readout="lens")


def test_logits_only_at_supervised_positions_train_the_same_weights(tmp_path, monkeypatch):
    """On task batches (the answer supervised, not the prompt) the trainer computes logits
    at the supervised positions only: the same losses and weights as every position's
    logits, through the per-loop readout (Coda lens) and the progressive term, and the same
    validation loss and accuracy."""
    import open_mythos.training.trainer as trainer_mod

    settings = dict(MULTIHOP, run__steps=2, optim__loop_loss_weight=0.5,
                    optim__loop_readout="coda", optim__progressive_weight=0.3,
                    schedule__n_loops=3, model__use_act=False, run__eval_every=2)
    passed = []  # what each forward got as logits_at
    forward = OpenMythos.forward

    def spy(self, ids, *args, **kwargs):
        passed.append(kwargs.get("logits_at"))
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(OpenMythos, "forward", spy)
    rows = Trainer(tiny_config(tmp_path / "rows", **settings))
    rows.train()
    # 2 steps x (main + progressive forward) + validation, each on the answer positions only
    assert len(passed) >= 5 and all(p is not None for p in passed)
    assert all(0 < len(p) < 0.5 * 6 * rows.data.seq_len for p in passed)  # 6 = batch size
    monkeypatch.setattr(trainer_mod, "supervised_rows", lambda targets: None)
    full = Trainer(tiny_config(tmp_path / "full", **settings))
    full.train()
    for a, b in zip(read_metrics(tmp_path / "rows"), read_metrics(tmp_path / "full")):
        for key in ("loss", "ce", "loop_ce", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    a, b = read_metrics(tmp_path / "rows")[-1], read_metrics(tmp_path / "full")[-1]
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert a["val_acc"] == b["val_acc"]
    after = full.core.state_dict()
    for name, value in rows.core.state_dict().items():
        torch.testing.assert_close(value, after[name], rtol=1e-5, atol=1e-6, msg=name)


def test_supervised_rows_only_when_few_positions_have_a_loss():
    from open_mythos.training.losses import supervised_rows

    targets = torch.full((2, 5), IGNORE_INDEX)
    targets[0, 3], targets[1, 0] = 7, 9
    assert supervised_rows(targets).tolist() == [3, 5]
    assert supervised_rows(torch.arange(10).view(2, 5)) is None  # language modelling
    targets[:, :3] = 1  # 7 of 10 supervised
    assert supervised_rows(targets) is None and supervised_rows(targets, 0.8) is not None
