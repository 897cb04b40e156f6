"""The training loop in process: metrics, exact resume, accumulation, non-finite steps."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import types

import pytest
import torch

from open_mythos.checkpoints import load_model
from open_mythos.cli import main
from open_mythos.tasks import PAD_ID
from open_mythos.training import ConfigError, LoopSchedule, Trainer, TrainingDiverged
from open_mythos.training import trainer as trainer_mod
from open_mythos.training.data import TRAIN, build_data_source
from open_mythos.training.trainer import build_optimizer

from .conftest import REPO, TINY, read_metrics, tiny_config

REQUIRED = {"step", "loss", "lr", "tokens_per_s", "ponder", "loops",
            "expert_load_max_over_mean", "grad_norm"}


def losses(run_dir):
    return [row["loss"] for row in read_metrics(run_dir)]


def watch_model(monkeypatch, watch) -> None:
    """Call ``watch(model)`` on the model the trainer builds, before it is wrapped."""
    build = trainer_mod.build_model

    def build_and_watch(cfg, *args, **kwargs):
        model = build(cfg, *args, **kwargs)
        watch(model)
        return model

    monkeypatch.setattr(trainer_mod, "build_model", build_and_watch)


def test_short_run_writes_metrics_config_and_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "run", run__steps=6, run__eval_every=3,
                      schedule__loops="sampled", schedule__n_loops=2)
    state = Trainer(cfg).train()
    rows = read_metrics(tmp_path / "run")
    assert state.step == 6 and [r["step"] for r in rows] == list(range(1, 7))
    for row in rows:
        assert REQUIRED <= set(row) and not row["skipped"]
        assert row["loss"] > 0 and row["grad_norm"] > 0 and 1 <= row["loops"] <= 4
    sampler = LoopSchedule.from_config(cfg.schedule, cfg.run.steps, cfg.run.seed)
    assert [r["loops"] for r in rows] == [sampler(s) for s in range(6)]
    assert "val_loss" in rows[2] and "val_loss" in rows[5] and "val_loss" not in rows[0]
    assert (tmp_path / "run" / "config.toml").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step_00000006" / "model.safetensors").is_file()


@pytest.mark.parametrize("schedule, val_loops", [
    (dict(schedule__loops="uniform", schedule__n_loops=3, schedule__min_loops=1,
          schedule__max_loops=2), 2),
    (dict(schedule__loops="fixed", schedule__n_loops=3), 3),
    (dict(schedule__loops="uniform", schedule__max_loops=2, schedule__eval_loops=4), 4),
])
def test_validation_runs_at_the_trained_depth(tmp_path, schedule, val_loops):
    """Uniform counts in [1, 2] were validated at n_loops = 3, a depth never trained,
    unlike the depth every command later runs the checkpoint at."""
    from open_mythos.evaluation.runs import run_train_loops

    cfg = tiny_config(tmp_path / "run", run__steps=2, run__eval_every=2, **schedule)
    Trainer(cfg).train()
    assert read_metrics(tmp_path / "run")[-1]["val_loops"] == val_loops
    if "schedule__eval_loops" not in schedule:
        assert run_train_loops(tmp_path / "run") == val_loops


def test_validation_runs_without_autograd_and_a_trained_model_deepcopies(tmp_path, monkeypatch):
    """Validation kept every batch's graph alive (memory grew with eval_batches), and
    its telemetry left the model un-deepcopyable (EMA/SWA helpers deepcopy models)."""
    import copy

    grad_modes = []
    watch_model(monkeypatch, lambda model: model.register_forward_hook(
        lambda *_: grad_modes.append((model.training, torch.is_grad_enabled()))))
    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=2, run__eval_every=2,
                                  data__eval_batches=3))
    trainer.train()
    assert [g for training, g in grad_modes if not training] == [False] * 3
    assert [g for training, g in grad_modes if training] == [True] * 2
    assert trainer.core.training  # back to training mode after validation
    core = trainer.core
    ids = torch.randint(0, core.cfg.vocab_size, (2, 8))
    core(ids, n_loops=2).sum().backward()  # telemetry from a forward with autograd
    assert core.recurrent.last_aux_loss.grad_fn is not None
    copied = copy.deepcopy(core)
    assert copied.recurrent.last_aux_loss.grad_fn is None
    assert core.recurrent.last_aux_loss.grad_fn is not None  # the original keeps its graph
    with torch.no_grad():
        torch.testing.assert_close(copied(ids, n_loops=2), core(ids, n_loops=2))
    # The copy's hook tables are still PyTorch's (rebuilt as plain dicts, no hook could be
    # registered on the looped block or its MoE layer, and fully_shard failed).
    seen = []
    for module in (copied.recurrent, copied.recurrent.block.ffn):
        module.register_forward_pre_hook(lambda m, args: seen.append(type(m).__name__))
        module.register_full_backward_hook(lambda *_: None)
    with torch.no_grad():
        copied(ids, n_loops=2)
    assert seen == ["RecurrentBlock"] + ["MoEFFN"] * 2
    torch.optim.swa_utils.AveragedModel(core)


def test_throughput_and_expert_balance_metrics_are_the_measured_values(tmp_path, monkeypatch):
    """``tokens`` is what the step's micro-batches hold, ``tokens_per_s`` that over the
    step's time on the trainer's clock, and ``expert_load_max_over_mean`` the max/mean of
    the expert loads recomputed from the router inputs of every training forward."""
    cfg = tiny_config(tmp_path / "run", run__steps=4, optim__grad_accum=2,
                      schedule__loops="sampled", schedule__n_loops=2)
    ticks = itertools.count()
    # Every reading of the clock is 0.25 s after the previous one: a step reads it twice.
    monkeypatch.setattr(trainer_mod, "time",
                        types.SimpleNamespace(perf_counter=lambda: 0.25 * next(ticks)))
    loads: dict[int, torch.Tensor] = {}
    trainer = Trainer(cfg)

    def count_routes(moe, args, out):
        if not moe.training or trainer.core.recurrent._replaying:  # not a recomputation
            return
        # Top-k of the biased router logits, in float64, from the layer's input, at the
        # real tokens (parity pads its batches: padding is left out of the load).
        x = args[0].detach().reshape(-1, moe.dim).double()
        if len(args) > 1 and args[1] is not None:
            x = x[args[1].reshape(-1)]
        logits = x @ moe.router.weight.detach().double().T + moe.router_bias.double()
        chosen = logits.topk(moe.topk, dim=-1).indices.flatten()
        step = trainer.state.step
        loads[step] = loads.get(step, 0) + torch.bincount(chosen, minlength=moe.n_experts)

    watch_model(monkeypatch, lambda m: m.recurrent.block.ffn.register_forward_hook(count_routes))
    trainer.train()
    rows = read_metrics(tmp_path / "run")
    data = build_data_source(cfg.data, cfg.run.seed)
    for step, row in enumerate(rows):
        micro = [data.batch(TRAIN, step, i, 2) for i in range(2)]
        tokens = sum(b["input_ids"].numel() for b in micro)
        assert row["tokens"] == tokens == 2 * cfg.data.batch_size * data.seq_len
        assert row["tokens_per_s"] == pytest.approx(tokens / 0.25, rel=1e-12)
        load = loads[step].double()
        # Every real token of every micro-batch at every loop chose top-k experts.
        real = sum(int((b["input_ids"] != PAD_ID).sum()) for b in micro)
        assert 0 < real < tokens  # the batches hold padding
        assert load.sum() == real * row["loops"] * trainer.model_cfg.n_experts_per_tok
        assert row["expert_load_max_over_mean"] == pytest.approx(
            (load.max() / load.mean()).item(), rel=1e-6)
    assert len({r["expert_load_max_over_mean"] for r in rows}) > 1  # not a constant


def test_resume_in_process_is_exact(tmp_path):
    common = dict(schedule__loops="sampled", schedule__decay_steps=8, schedule__warmup_steps=2,
                  optim__grad_accum=2, run__save_every=4, optim__aux_weight=0.01,
                  optim__ponder_weight=0.01)
    full = Trainer(tiny_config(tmp_path / "full", run__steps=8, **common))
    full.train()
    Trainer(tiny_config(tmp_path / "part", run__steps=5, **common)).train()
    # Resume from the step-4 checkpoint (the step-5 rows are dropped and redone).
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_00000005")
    (tmp_path / "part" / "latest").unlink()
    resumed = Trainer(tiny_config(tmp_path / "part", run__steps=8, **common), resume=True)
    resumed.train()
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    for a, b in zip(full.core.state_dict().values(), resumed.core.state_dict().values()):
        assert torch.equal(a, b)


def test_a_64_bit_seed_trains(tmp_path):
    """Seeds up to 2**64 - 1 (torch.manual_seed's range; ``date +%s%N``, ``secrets.randbits(64)``):
    the per-rank seed derived from it (seed * 1009 + rank + 1) overflowed it, a traceback
    after the run directory was claimed."""
    seed = 2**64 - 1
    state = Trainer(tiny_config(tmp_path / "run", run__steps=2, run__seed=seed)).train()
    assert state.step == 2
    assert f"seed = {seed}" in (tmp_path / "run" / "config.toml").read_text()


@pytest.mark.parametrize("parallel", ["none", "ddp", "fsdp"])
def test_a_run_whose_halting_head_never_learns_resumes_exactly(tmp_path, parallel):
    """With ACT off the halting head never has a gradient, so the saved optimizer holds no
    state for it: resuming crashed ("Missing optimizer state for parameter
    'recurrent.act.halt.weight'") for every such run, four shipped configs among them.
    Both checkpoint layouts: gathered (one process; DDP, broadcast from rank 0) and sharded
    (FSDP2), here on a one-process group."""
    torch.set_num_threads(1)
    common = dict(model__use_act=False, run__save_every=3, run__parallel=parallel,
                  schedule__loops="sampled")
    Trainer(tiny_config(tmp_path / "full", run__steps=6, **common)).train()
    Trainer(tiny_config(tmp_path / "part", run__steps=3, **common)).train()
    resumed = Trainer(tiny_config(tmp_path / "part", run__steps=6, **common), resume=True)
    resumed.train()
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a, b = load_model(tmp_path / "part").model, load_model(tmp_path / "full").model
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    # As in the uninterrupted run: still no state (a placeholder would count a step).
    halt = resumed.core.recurrent.act.halt
    assert halt.weight not in resumed.optimizer.state and halt.bias not in resumed.optimizer.state
    assert resumed.core.recurrent.lora.B in resumed.optimizer.state


def test_existing_run_needs_resume_and_same_model(tmp_path):
    Trainer(tiny_config(tmp_path / "run", run__steps=2)).train()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(tiny_config(tmp_path / "run", run__steps=4)).train()
    config_before = (tmp_path / "run" / "config.toml").read_text()
    with pytest.raises(ConfigError, match="dim: 32 -> 64"):
        Trainer(tiny_config(tmp_path / "run", run__steps=4, model__dim=64), resume=True).train()
    assert (tmp_path / "run" / "config.toml").read_text() == config_before  # untouched
    Trainer(tiny_config(tmp_path / "run", run__steps=3), resume=True).train()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.parametrize(("progressive", "ponder"), [(0.0, 0.0), (0.3, 0.0), (0.0, 1.0)])
def test_gradient_accumulation_matches_a_big_batch(tmp_path, progressive, ponder):
    # No balance loss: it is a product of batch means, computed per micro-batch. The
    # progressive loss's split is drawn per step, so every micro-batch runs the same one.
    # The ponder cost of padded batches (parity's prompts differ in length) is the mean over
    # the real positions of the whole batch, not a mean of the micro-batches' means.
    opts = dict(optim__aux_weight=0.0, optim__progressive_weight=progressive,
                optim__ponder_weight=ponder, model__act_halt_bias_init=0.0,
                schedule__n_loops=4)
    big = tiny_config(tmp_path / "big", run__steps=4, data__batch_size=4, **opts)
    acc = tiny_config(tmp_path / "acc", run__steps=4, data__batch_size=2, optim__grad_accum=2,
                      **opts)
    Trainer(big).train()
    Trainer(acc).train()
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), abs=1e-5)
    for key in ("ponder", "grad_norm"):
        assert [r[key] for r in read_metrics(tmp_path / "acc")] == pytest.approx(
            [r[key] for r in read_metrics(tmp_path / "big")], rel=1e-5)


def test_save_after_train_keeps_the_run_directory_consistent(tmp_path, monkeypatch):
    """``save()`` once ``train()`` has returned (a notebook cell run again): it pruned the
    checkpoints another trainer had since written and pointed ``latest`` back, ignored the
    run lock, wrote relative to the working directory of the moment, and saved the state
    of a step stopped half-way (its data position one batch ahead of its weights)."""
    from open_mythos.training.rundir import RunLock, RunLocked

    run = tmp_path / "run"
    first = Trainer(tiny_config(run, run__steps=2))
    first.train()
    monkeypatch.chdir(tmp_path / "run")  # a %cd between cells
    first.save()  # nothing newer: saved again where the run is
    assert (run / "latest").read_text().strip().endswith("step_00000002")
    assert not (run / "run").exists()
    Trainer(tiny_config(run, run__steps=4), resume=True).train()
    with pytest.raises(RuntimeError, match="holds a checkpoint of step 4, newer than this "
                                           "trainer's step 2"):
        first.save()
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_00000004"
    assert (run / "latest").read_text().strip().endswith("step_00000004")
    holder = RunLock.acquire(run)  # another process's live run
    try:
        with pytest.raises(RunLocked):
            first.save()
    finally:
        holder.release()

    def stop_in_step_2(step, loss):
        if step == 2:
            raise KeyboardInterrupt  # a notebook's stop button, inside the step
        return loss

    halted = Trainer(tiny_config(tmp_path / "halted", run__steps=3, run__save_every=1),
                     loss_hook=stop_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        halted.train()
    with pytest.raises(RuntimeError, match="in the middle of step 2.*step_00000001"):
        halted.save()
    with pytest.raises(TypeError, match="loss_hook must return the objective"):
        Trainer(tiny_config(tmp_path / "none", run__steps=1),
                loss_hook=lambda step, loss: None).train()


def test_progress_written_to_a_file_is_redrawn_rarely(tmp_path, monkeypatch):
    """Progress to a file or pipe (a batch job's log) was redrawn every 0.1 s, ~100 bytes a
    time: tens of MB over a day's run, nearly all on one line."""
    import io

    monkeypatch.setattr("sys.stderr", io.StringIO())
    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=1, run__progress=True))
    trainer.train()
    assert trainer.bar.mininterval == 30.0
    assert "train" in sys.stderr.getvalue()


def test_a_process_default_dtype_does_not_change_the_run(tmp_path):
    """An earlier ``torch.set_default_dtype(torch.float64)`` in the process (a notebook
    cell) trained and saved float64 weights under ``run.precision = "fp32"``."""
    Trainer(tiny_config(tmp_path / "ref", run__steps=2)).train()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trainer = Trainer(tiny_config(tmp_path / "f64", run__steps=2))
        trainer.train()
        assert torch.get_default_dtype() == torch.float64  # the process's own, restored
    finally:
        torch.set_default_dtype(before)
    assert {p.dtype for p in trainer.core.parameters()} == {torch.float32}
    assert load_model(tmp_path / "f64").model.embed.weight.dtype == torch.float32
    assert losses(tmp_path / "f64") == losses(tmp_path / "ref")


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    def hook(step, loss):  # steps numbered as in metrics.jsonl (the hook's were from 0)
        return loss * float("nan") if step == 3 else loss

    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=5), loss_hook=hook)
    state = trainer.train()
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert rows[2]["loss"] is None and rows[2]["bad_steps"] == 1 and rows[4]["bad_steps"] == 1
    assert state.bad_steps == 1 and state.consecutive_bad == 0
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {4}  # five steps, one never applied
    assert all(torch.isfinite(p).all() for p in trainer.core.parameters())


def test_on_step_sees_every_step_in_the_training_thread(tmp_path):
    """``on_step`` gets each step's metrics row after it is written, in the thread that
    trains: a hook that sets the thread count there changes the next step's."""
    import threading

    seen, written = [], []

    def on_step(step, row):
        seen.append((step, dict(row), threading.get_ident(), torch.get_num_threads()))
        written.append(len(read_metrics(tmp_path / "run")))
        if step == 2:
            torch.set_num_threads(1)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Trainer(tiny_config(tmp_path / "run", run__steps=4, run__eval_every=2),
                on_step=on_step).train()
    finally:
        torch.set_num_threads(before)
    rows = read_metrics(tmp_path / "run")
    assert [s for s, *_ in seen] == [1, 2, 3, 4] and written == [1, 2, 3, 4]
    assert ["val_loss" in r for _, r, *_ in seen] == [False, True, False, True]
    assert [r for _, r, *_ in seen] == rows
    assert {t for _, _, t, _ in seen} == {threading.get_ident()}
    assert [n for *_, n in seen] == [2, 2, 1, 1]


def test_too_many_bad_steps_stop_the_run(tmp_path):
    def hook(step, loss):
        return loss + float("inf") if step >= 2 else loss

    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        Trainer(tiny_config(tmp_path / "run", run__steps=10, run__max_bad_steps=3),
                loss_hook=hook).train()
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [False, True, True, True]


def test_cli_exit_status_when_diverging(tmp_path, monkeypatch, capsys):
    real = trainer_mod.compute_loss

    def nan_loss(*args, **kwargs):
        parts = real(*args, **kwargs)
        parts.objective = parts.objective * float("nan")
        return parts

    monkeypatch.setattr(trainer_mod, "compute_loss", nan_loss)
    code = main(["train", "--config", str(TINY), "--out", str(tmp_path / "run"), "--steps", "5",
                 "--max-bad-steps", "2", "--no-progress"])
    assert code == 1
    assert "diverged" in capsys.readouterr().err


@pytest.mark.parametrize("core_layers", [None, 2], ids=["looped", "dense"])
def test_gradient_checkpointing_matches_plain_training(tmp_path, core_layers):
    """Equal losses, and the switch reaches the model (the dense baseline's was ignored)."""
    dense = {} if core_layers is None else {"model__core_layers": core_layers}
    plain = tiny_config(tmp_path / "a", run__steps=3, **dense)
    ckpt = tiny_config(tmp_path / "b", run__steps=3, run__gradient_checkpointing=True, **dense)
    Trainer(plain).train()
    trainer = Trainer(ckpt)
    trainer.train()
    assert (trainer.core if core_layers else trainer.core.recurrent).gradient_checkpointing
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-6)


@pytest.fixture
def aot_eager_compiles(monkeypatch) -> list:
    """``torch.compile`` with the ``aot_eager`` backend (the same graphs without the C++
    build), from fresh dynamo caches; the list collects what was compiled."""
    compiled = []
    real_compile = torch.compile

    def compile_aot_eager(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    return compiled


def test_compiled_run_matches_plain_training(tmp_path, aot_eager_compiles):
    """``run.compile`` compiles the Prelude/Coda blocks and the loop body and trains the
    same."""
    Trainer(tiny_config(tmp_path / "a", run__steps=3)).train()
    assert not aot_eager_compiles
    Trainer(tiny_config(tmp_path / "b", run__steps=3, run__compile=True)).train()
    names = [getattr(fn, "__name__", type(fn).__name__) for fn in aot_eager_compiles]
    assert "loop_body" in names, names
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-5)


def test_whole_model_compiled_run_matches_plain_training(tmp_path, aot_eager_compiles):
    """``run.compile = "model"`` compiles the model's forward as a whole, in place (its
    ``_call_impl``: checkpoints keep their parameter names), and trains the same."""
    Trainer(tiny_config(tmp_path / "a", run__steps=3)).train()
    trainer = Trainer(tiny_config(tmp_path / "b", run__steps=3, run__compile="model"))
    trainer.train()
    assert [getattr(fn, "__name__", "") for fn in aot_eager_compiles] == ["_call_impl"]
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-5)
    assert not any("_orig_mod" in k for k in trainer.core.state_dict())


def test_whole_model_compiled_task_run_matches_plain_training(tmp_path, aot_eager_compiles):
    """A task batch supervises 2 of 36 positions: the compiled whole-model step selects
    them (the head and the last Coda block run there only) and trains as eager does."""
    kw = dict(run__steps=3, data__task="multihop", data__seq_len=36,
              data__task_args={"statements": 8, "ood_hops": [4, 6]},
              optim__loop_loss_weight=1.0, optim__loop_targets=True, optim__loop_readout="head")
    Trainer(tiny_config(tmp_path / "a", **kw)).train()
    Trainer(tiny_config(tmp_path / "b", run__compile="model", **kw)).train()
    assert [getattr(fn, "__name__", "") for fn in aot_eager_compiles] == ["_call_impl"]
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-5)


def test_whole_model_compile_with_changing_loop_counts_matches_eager(tmp_path,
                                                                     aot_eager_compiles):
    """Loop counts drawn per step and progressive splits (``n`` loops without gradient,
    ``k`` with) change the graph's integer inputs every step: each is its own graph, and
    the run trains as the eager one does."""
    kw = dict(run__steps=3, schedule__loops="uniform", schedule__min_loops=1,
              schedule__max_loops=3, optim__progressive_weight=0.5)
    Trainer(tiny_config(tmp_path / "a", **kw)).train()
    with torch._dynamo.config.patch(specialize_int=False):  # dynamo's default
        Trainer(tiny_config(tmp_path / "b", run__compile="model", **kw)).train()
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-5)
    assert len({r["loops"] for r in read_metrics(tmp_path / "b")}) > 1


def test_whole_model_compile_allows_a_graph_per_loop_count(tmp_path, capsys,
                                                           aot_eager_compiles):
    """A schedule drawing 1..10 loops compiles up to 10 graphs plus evaluation's: the
    recompilation limit (8 here) is raised so that none falls back to eager, and the cost
    is said. Integers are specialised while the run trains, not after it (a user's own
    compiled code then made a graph per integer value), and each run adds its graphs to
    the limit (dynamo counts them per code object over every model of the process: the
    fifth model shape trained in one process fell back to eager)."""
    seen = []
    with torch._dynamo.config.patch(recompile_limit=8, specialize_int=False):
        Trainer(tiny_config(tmp_path / "a", run__compile="model", schedule__loops="uniform",
                            schedule__min_loops=1, schedule__max_loops=10,
                            model__max_loop_iters=10, run__steps=1),
                on_step=lambda *_: seen.append(torch._dynamo.config.specialize_int)).train()
        first = torch._dynamo.config.recompile_limit
        assert first >= 8 + 11 and seen == [True]
        assert not torch._dynamo.config.specialize_int
        Trainer(tiny_config(tmp_path / "b", run__compile="blocks", run__steps=1)).train()
        assert torch._dynamo.config.recompile_limit > first
    assert "trains at 10 loop counts" in capsys.readouterr().err


@pytest.mark.parametrize("backprop_loops", [None, 1, 2])
def test_truncated_backprop_differentiates_exactly_the_last_loops(tmp_path, monkeypatch,
                                                                   backprop_loops):
    """Loop ``t`` scales the depth-LoRA by row ``t`` of ``lora.scale``: that row has a
    gradient if and only if loop ``t`` was differentiated."""
    n_loops = 3
    grads: list[torch.Tensor] = []

    def watch(model):
        scale = model.recurrent.lora.scale.weight
        scale.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.clone()))

    watch_model(monkeypatch, watch)
    cfg = tiny_config(tmp_path / "run", run__steps=3, schedule__n_loops=n_loops,
                      schedule__backprop_loops=backprop_loops)
    Trainer(cfg).train()
    assert all(r["loss"] is not None for r in read_metrics(tmp_path / "run"))
    assert len(grads) == 3
    # Step 1: the LoRA's B starts at zero, so no row has a gradient yet.
    assert not grads[0].any()
    first = 0 if backprop_loops is None else n_loops - backprop_loops
    for g in grads[1:]:
        has_grad = [bool(row.any()) for row in g]
        assert has_grad == [first <= t < n_loops for t in range(4)]  # max_loop_iters = 4


def test_bf16_autocast_and_tensorboard(tmp_path, monkeypatch):
    """The block matmuls run in bfloat16 under autocast; the master weights, their
    gradients and the optimizer state stay float32."""
    seen: dict[str, set[torch.dtype]] = {}

    def watch(model):
        for name in ("prelude.0.attn.wq", "recurrent.block.attn.wo", "recurrent.act.halt",
                     "coda.0.ffn.down"):
            module = model.get_submodule(name)
            module.register_forward_hook(
                lambda m, args, out, name=name: seen.setdefault(name, set()).add(out.dtype))

    watch_model(monkeypatch, watch)
    cfg = tiny_config(tmp_path / "run", run__steps=3, run__precision="bf16",
                      run__tensorboard=True, run__log_every=1)
    trainer = Trainer(cfg)
    trainer.train()
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen.values()), seen
    assert all(r["loss"] is not None for r in read_metrics(tmp_path / "run"))
    assert {p.dtype for p in trainer.core.parameters()} == {torch.float32}
    states = [v for s in trainer.optimizer.state.values() for v in s.values() if v.ndim]
    assert states and {v.dtype for v in states} == {torch.float32}
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.distributed
def test_fsdp_on_one_process_matches_plain(tmp_path):
    """The FSDP2 code path (a one-process gloo group) agrees with plain training."""
    Trainer(tiny_config(tmp_path / "plain", run__steps=3)).train()
    Trainer(tiny_config(tmp_path / "fsdp", run__steps=3, run__parallel="fsdp")).train()
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    assert not torch.distributed.is_initialized()


def test_weight_decay_groups():
    from open_mythos import OpenMythos
    from tests.conftest import tiny_config as model_config

    model = OpenMythos(model_config())
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in exempt  # and so the tied head
    assert {"recurrent.lora.scale.weight", "norm.weight", "recurrent.act.halt.bias",
            "recurrent.injection.log_A"} <= exempt
    assert {"recurrent.block.ffn.w_gate_up", "prelude.0.attn.wq.weight"} <= decayed
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


def test_dense_baseline_trains_from_the_same_config(tmp_path, capsys):
    """``model.core_layers`` selects the FLOPs-matched non-looped baseline."""
    from open_mythos.baseline import DenseBaseline
    from open_mythos.training import load_checkpoint

    cfg = tiny_config(tmp_path / "base", run__steps=6, run__eval_every=6,
                      model__core_layers=3)
    Trainer(cfg).train()
    # Its validation line names no loop count (it has none; it said "(2 loops)").
    logged = [line for line in capsys.readouterr().err.splitlines() if "val_loss" in line]
    assert logged and not any("loops" in line for line in logged)
    rows = read_metrics(tmp_path / "base")
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    # Nor do its metrics (they logged the ignored schedule.n_loops as "loops" it never ran).
    assert {(r["loops"], r["ponder"]) for r in rows} == {(None, None)}
    assert rows[-1]["val_loops"] is None and rows[-1]["val_loss"] > 0
    model, model_cfg = load_checkpoint(tmp_path / "base")
    assert isinstance(model, DenseBaseline) and model_cfg.core_layers == 3
    assert model.head.weight is model.embed.weight


def test_text_run_resumed_with_another_global_batch_reads_on(tmp_path, monkeypatch):
    """Text data is a fixed sequence of windows: a run resumed with another global batch
    (here fewer accumulation steps; likewise another number of processes) reads on from the
    first unread window, neither skipping nor repeating any. Reference: the windows one
    uninterrupted run reads with the new global batch."""
    from open_mythos.training.data import PackedTextSource

    (tmp_path / "a.txt").write_text(" ".join(f"word{i} of the text" for i in range(400)))
    read: list[list[int]] = []
    real = PackedTextSource.batch

    def record(self, split, *args, **kwargs):
        out = real(self, split, *args, **kwargs)
        if split == "train":
            read.extend(out["input_ids"].tolist())
        return out

    monkeypatch.setattr(PackedTextSource, "batch", record)
    common = dict(data__task="", data__text=[str(tmp_path / "a.txt")], data__seq_len=16,
                  data__batch_size=2, run__save_every=4)
    Trainer(tiny_config(tmp_path / "ref", run__steps=12, **common)).train()
    want, read[:] = read[:], []
    Trainer(tiny_config(tmp_path / "run", run__steps=4, optim__grad_accum=2, **common)).train()
    assert read == want[:16]
    Trainer(tiny_config(tmp_path / "run", run__steps=8, **common), resume=True).train()
    assert read == want


def test_evaluate_and_save_before_train_say_to_train_first(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=2))
    for method in (trainer.evaluate, trainer.save):
        with pytest.raises(RuntimeError, match=r"call train\(\) first"):
            method()
    assert not (tmp_path / "run").exists()
    trainer.train()
    assert set(trainer.evaluate()) >= {"val_loss"}


def test_evaluate_after_a_distributed_train_says_the_group_has_ended(tmp_path):
    """train() ends the process group it started, so the collective evaluate()/save()
    after it raised "Default process group has not been initialized"; they say why now."""
    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=2, run__parallel="ddp"))
    trainer.train()
    for method in (trainer.evaluate, trainer.save):
        with pytest.raises(RuntimeError, match="ended with train"):
            method()


def test_an_interruption_says_which_signal_stopped_which_step():
    import pickle
    import signal
    from pathlib import Path

    from open_mythos.training import TrainingInterrupted

    stop = TrainingInterrupted(7, Path("runs/x/step_7"), signal.SIGTERM)
    assert str(stop) == "SIGTERM stopped the run after step 7 (saved in runs/x/step_7)"
    again = pickle.loads(pickle.dumps(stop))
    assert (again.step, again.checkpoint, again.signum) == (7, Path("runs/x/step_7"), 15)
    assert "not saved" in str(TrainingInterrupted(3, None))


def test_top1_routing_without_a_balance_loss_is_warned_about(tmp_path, capsys):
    """With one expert per token the renormalised gate is 1 whatever the router says: the
    language-model loss gives the router no gradient, and without the balance loss its
    weights stay as initialised, with no word said."""
    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=2, model__n_experts_per_tok=1,
                                  optim__aux_weight=0.0, optim__weight_decay=0.0))
    trainer.train()
    assert "top-1 routing" in capsys.readouterr().err
    router = trainer.core.recurrent.block.ffn.router.weight
    torch.manual_seed(0)  # the claim the warning makes: the router has no gradient
    trainer.core(torch.randint(0, trainer.model_cfg.vocab_size, (2, 8)), n_loops=2).sum().backward()
    assert router.grad is None or not router.grad.any()
    Trainer(tiny_config(tmp_path / "aux", run__steps=1, model__n_experts_per_tok=1)).train()
    assert "top-1 routing" not in capsys.readouterr().err


def test_schedules_the_run_cannot_carry_out_are_warned_about(tmp_path, capsys):
    """Warmup as long as the run (the rate never reaches optim.lr), a curriculum that ends
    after the run (the run records max_loops as its trained depth, a depth it never
    trained at), and a ponder weight with ACT off (a constant): accepted silently before.
    Checked against the run's own metrics."""
    from open_mythos.training.trainer import _schedule_warnings

    cfg = tiny_config(tmp_path / "run", run__steps=4, schedule__warmup_steps=8,
                      schedule__loops="curriculum", schedule__min_loops=1,
                      schedule__max_loops=4, schedule__curriculum_steps=100,
                      optim__ponder_weight=0.1, model__use_act=False)
    Trainer(cfg).train()
    err = capsys.readouterr().err
    rows = read_metrics(tmp_path / "run")
    assert max(r["lr"] for r in rows) < cfg.optim.lr and "never reaches optim.lr" in err
    assert max(r["loops"] for r in rows) == 1
    assert "the curriculum ends at 1 loops, below max_loops=4" in err
    assert "with model.use_act = false" in err
    fine = tiny_config(tmp_path / "fine", run__steps=20, schedule__warmup_steps=8,
                       schedule__loops="curriculum", schedule__max_loops=4,
                       schedule__curriculum_steps=20, optim__ponder_weight=0.1,
                       model__use_act=True)
    assert _schedule_warnings(fine, looped=True, use_act=True) == []
    # Warmup exactly as long as the run reaches optim.lr at its last step: nothing to say.
    even = tiny_config(tmp_path / "even", run__steps=8, schedule__warmup_steps=8)
    assert _schedule_warnings(even, looped=True, use_act=True) == []
    assert _schedule_warnings(cfg, looped=False, use_act=False)[1:] == []  # dense: no loops
    # backprop_loops truncates loops: a dense baseline has none to truncate (ignored silently).
    truncated = tiny_config(tmp_path / "dense", run__steps=8, schedule__warmup_steps=0,
                            schedule__backprop_loops=1)
    assert _schedule_warnings(truncated, looped=True, use_act=True) == []
    (line,) = _schedule_warnings(truncated, looped=False, use_act=True)
    assert line.startswith("schedule.backprop_loops=1 truncates the looped block's backward")


def test_act_with_one_differentiated_loop_is_warned_about(tmp_path, capsys):
    """backprop_loops = 1 differentiates only the last loop, whose halting weight is the
    remaining mass: the halting head got no gradient, the ponder penalty's neither."""
    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=1, model__use_act=True,
                                  schedule__n_loops=3, schedule__backprop_loops=1,
                                  optim__ponder_weight=0.05))
    trainer.train()
    assert "the head gets no gradient" in capsys.readouterr().err
    core = trainer.core
    core.zero_grad(set_to_none=True)
    out = core(torch.randint(0, trainer.model_cfg.vocab_size, (2, 8)), n_loops=3,
               backprop_loops=1)
    (out.sum() + core.recurrent.last_ponder_cost.sum()).backward()
    halt = core.recurrent.act.halt.weight
    assert halt.grad is None or not halt.grad.any()
    Trainer(tiny_config(tmp_path / "two", run__steps=1, model__use_act=True,
                        schedule__n_loops=3, schedule__backprop_loops=2)).train()
    # The progressive forward differentiates its own k loops: the head trains there.
    Trainer(tiny_config(tmp_path / "prog", run__steps=1, model__use_act=True,
                        schedule__n_loops=3, schedule__backprop_loops=1,
                        optim__progressive_weight=0.5)).train()
    assert "halting head" not in capsys.readouterr().err
    # ... but the ponder penalty, a term of the main objective, still has no gradient.
    Trainer(tiny_config(tmp_path / "prog_ponder", run__steps=1, model__use_act=True,
                        schedule__n_loops=3, schedule__backprop_loops=1,
                        optim__progressive_weight=0.5, optim__ponder_weight=0.05)).train()
    assert "optim.ponder_weight has no effect" in capsys.readouterr().err


def test_a_resume_records_what_changed_and_notices_changed_data(tmp_path, capsys):
    """``config.toml`` holds the newest settings and old checkpoints are pruned, so each
    resume appends what it changed to ``resumes.jsonl``; data files changed between the
    two runs (the validation batches' fingerprint differs from the checkpoint's) are
    logged and recorded instead of resumed silently."""
    corpus = tmp_path / "a.txt"
    corpus.write_text("the loops pay when they are trained well. " * 40)
    common = dict(data__task="", data__text=[str(corpus)], data__seq_len=16,
                  data__batch_size=2, run__save_every=2)
    Trainer(tiny_config(tmp_path / "run", run__steps=2, **common)).train()
    assert not (tmp_path / "run" / "resumes.jsonl").exists()
    Trainer(tiny_config(tmp_path / "run", run__steps=4, optim__lr=1e-3, **common),
            resume=True).train()
    assert "validation batches are not those" not in capsys.readouterr().err
    corpus.write_text(corpus.read_text() + "other text at the end. " * 30)
    Trainer(tiny_config(tmp_path / "run", run__steps=6, optim__lr=1e-3, **common),
            resume=True).train()
    assert "validation batches are not those the run evaluated on up to step 4" in (
        capsys.readouterr().err)
    with open(tmp_path / "run" / "resumes.jsonl") as fh:
        records = [json.loads(line) for line in fh]
    assert [(r["step"], r["checkpoint"], r["data_changed"]) for r in records] == [
        (2, "step_00000002", False), (4, "step_00000004", True)]
    assert "optim.lr: 0.003 -> 0.001" in records[0]["changes"]
    assert not any(c.startswith("optim.lr") for c in records[1]["changes"])


def test_a_resume_with_another_seed_is_not_taken_for_changed_data(tmp_path, capsys):
    """A task's validation batches are drawn from the seed: changing it changes them by
    design (the change is logged), not because data files changed."""
    Trainer(tiny_config(tmp_path / "run", run__steps=2, run__save_every=2, run__seed=1)).train()
    Trainer(tiny_config(tmp_path / "run", run__steps=4, run__save_every=2, run__seed=2),
            resume=True).train()
    assert "validation batches are not those" not in capsys.readouterr().err
    with open(tmp_path / "run" / "resumes.jsonl") as fh:
        (record,) = [json.loads(line) for line in fh]
    assert record["changes"] == ["run.seed: 1 -> 2", "run.steps: 2 -> 4"]
    assert record["data_changed"] is False


def test_a_failed_train_retried_on_the_same_trainer_starts_clean(tmp_path):
    """A hook that fails in step 1 (nothing saved), then train() again with resume="auto":
    the retry kept the failed attempt's step and data position, so it reported 8 steps after
    7 and never trained on the first batch. Reference: an uninterrupted run."""
    Trainer(tiny_config(tmp_path / "ref", run__steps=4)).train()
    calls = []

    def fail_once(step, row):
        calls.append(step)
        if len(calls) == 1:
            raise RuntimeError("a notebook hook's bug")

    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=4), resume="auto",
                      on_step=fail_once)
    with pytest.raises(RuntimeError, match="hook's bug"):
        trainer.train()
    assert trainer.train().step == 4
    got = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "run")]
    assert got == [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref")]


def test_settings_assigned_after_building_the_config_are_checked(tmp_path):
    """cfg.run.compile = "blocks" (TOML's spelling, a str where the code compares members)
    trained uncompiled while config.toml said compiled; "bf16" for run.precision failed
    with an AttributeError after the run directory was made; a dict for a section passed
    until train(); a run.out changed after building the Trainer was written into the old
    directory's config.toml."""
    from open_mythos.training import TrainConfig
    from open_mythos.training.config import Precision

    cfg = tiny_config(tmp_path / "a", run__steps=1)
    cfg.run.precision = "bf16"
    cfg.run.out = str(tmp_path / "b")
    trainer = Trainer(cfg)
    trainer.train()
    assert trainer.cfg.run.precision is Precision.BF16
    assert not (tmp_path / "a").exists() and (tmp_path / "b" / "config.toml").is_file()
    cfg.run.steps = 0
    with pytest.raises(ConfigError, match="run.steps"):
        Trainer(cfg).train()
    with pytest.raises(ConfigError, match="TrainConfig.model must be a ModelConfig, got dict .*from_dict"):
        TrainConfig(model={"dim": 64})
    # Checking again changes no valid configuration: every preset, and a task knob whose
    # None means something (a round trip through plain data dropped it).
    from open_mythos.training import load_config

    for preset in sorted((REPO / "configs").glob("*.toml")):
        assert load_config(preset).validated() == load_config(preset), preset.name
    knobs = load_config(None, [("data.task", "multihop"),
                               ("data.task_args", {"hops": (1, 2), "cap": None})])
    assert knobs.validated() == knobs and knobs.validated().data.task_args["cap"] is None


def test_train_gives_the_global_random_generators_back(tmp_path):
    """train() seeded torch's and Python's global generators from run.seed and left them so:
    a notebook's later cells drew from the run's seed, not the user's. Reference: the
    draws the user's seed gives without a run in between."""
    import random

    torch.manual_seed(1234)
    random.seed(1234)
    want = (torch.rand(3), random.random())
    torch.manual_seed(1234)
    random.seed(1234)
    Trainer(tiny_config(tmp_path / "run", run__steps=2)).train()
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]



def test_a_streamed_local_file_changed_before_a_resume_is_noticed(tmp_path, capsys,
                                                                  offline_datasets):
    """A file streamed with data.hf_dataset was not fingerprinted: edited between a run and
    its resume, its validation rows changed and data_changed said false, where the same edit
    to a data.text corpus is logged and recorded."""
    from open_mythos.training.config import UNSET

    data = tmp_path / "docs.jsonl"
    rows = [json.dumps({"text": f"document {i}: the loops pay when trained"}) for i in range(80)]
    data.write_text("\n".join(rows) + "\n")
    common = dict(data__task=UNSET, data__task_args=UNSET, data__hf_dataset=str(data),
                  data__seq_len=16, data__batch_size=2, data__eval_batches=1,
                  run__save_every=2)
    Trainer(tiny_config(tmp_path / "run", run__steps=2, **common)).train()
    Trainer(tiny_config(tmp_path / "run", run__steps=4, **common), resume=True).train()
    assert "validation batches are not those" not in capsys.readouterr().err
    data.write_text("\n".join([json.dumps({"text": "COMPLETELY DIFFERENT"})] + rows) + "\n")
    Trainer(tiny_config(tmp_path / "run", run__steps=6, **common), resume=True).train()
    assert "validation batches are not those the run evaluated on up to step 4" in (
        capsys.readouterr().err)
    with open(tmp_path / "run" / "resumes.jsonl") as fh:
        assert [json.loads(line)["data_changed"] for line in fh] == [False, True]
