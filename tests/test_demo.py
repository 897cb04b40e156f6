"""``make demo`` runs end to end (quick mode: seconds, checks the pipeline, not the science)."""

import pytest

from open_mythos.cli import main


@pytest.mark.slow
def test_quick_demo_writes_report_and_prints_table(tmp_path, capsys):
    import json

    import torch

    from open_mythos.evaluation import sweep
    from open_mythos.tasks import get_task
    from open_mythos.training import load_checkpoint

    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--jobs", "2"]) == 0
    assert torch.get_num_threads() == threads  # the demo's thread settings do not leak
    out = capsys.readouterr().out
    assert "| loops | id | ood_hops |" in out and "| baseline (3 core blocks) |" in out
    assert "Targets:" in out and "in-distribution accuracy at T_train=3" in out
    assert "compile off (--quick" in out
    report = tmp_path / "demo" / "report"
    text = (report / "report.md").read_text()
    for png in ("depth_sweep.png", "training_curves.png"):
        assert (report / png).stat().st_size > 1000 and png in text
    assert (tmp_path / "demo" / "sweep.json").exists()
    assert "The same sweep with a training-free exit rule" in out
    assert "also measured: with the exit rule, in-distribution at 4x T_train" in out
    assert "also measured: with the exit rule at 12 loops, ood_hops: positions settled" in out
    assert (tmp_path / "demo" / "sweep_exit_rule.json").exists()
    for kind in ("looped", "baseline"):
        for stage in ("lookup", "chain"):
            assert (tmp_path / "demo" / kind / stage / "metrics.jsonl").exists()
    # The looped model's sweeps ran in the workers, a job per split: the same rows, in the
    # same order, as one sweep here.
    from open_mythos import ExitRule
    from open_mythos.commands.demo import DEFAULT_TASK_ARGS, DEMO_EXIT_RULE_ARGS

    model = load_checkpoint(tmp_path / "demo" / "looped" / "chain")[0].eval()
    task = get_task("multihop", **DEFAULT_TASK_ARGS)
    for name, rule in (("sweep.json", None), ("sweep_exit_rule.json",
                                             ExitRule(**DEMO_EXIT_RULE_ARGS))):
        here = sweep(model, task, loops=list(range(1, 13)), n_examples=16, early_exit=(False,),
                     exit_rule=rule)
        saved = json.loads((tmp_path / "demo" / name).read_text())
        saved = saved["rows"] if isinstance(saved, dict) else saved
        pooled = [(r["split"], r["n_loops"], r["accuracy"], r["loss"], r["loops_computed"])
                  for r in saved if r["model"] == "looped"]
        assert pooled == [(r.split, r.n_loops, r.accuracy, r.loss, r.loops_computed)
                          for r in here]


@pytest.mark.parametrize("argv, message", [
    (["--set", "model.init_std=-1"], "MythosConfig.init_std=-1.0 is invalid"),
    (["--set", "optim.bogus=1"], "unknown config key 'optim.bogus'"),
    (["--task-args", "[1]"], "--task-args must be a JSON object"),
    (["--steps", "0"], "--steps must be >= 1"),
    # What only training used to see (a traceback from a worker, exit 1):
    (["--task-args", '{"ood_hops": 5}'], "ood_hops must be a (lo, hi) pair"),
    (["--task-args", '{"hops": [1, 3], "ood_hops": [4, 6], "statements": 20}'],
     "task 'multihop''s longest sequence is 84 tokens, above model.max_seq_len=64"),
    (["--set", "run.out=elsewhere"], "the demo sets run.out itself from its flags (and "
                                     "reports it): use --out"),
    # Keys its flags set: training took the --set value, the banner, sweep and demo.md the
    # flag's (a sweep of a task the models never trained on).
    (["--set", "data.task=parity"], "the demo sets data.task itself"),
    (["--set", "data.task_args={hops = [1, 2]}"], "use --task-args"),
    (["--set", "data.task_args.hops=[1, 2]"], "the demo sets data.task_args itself"),
    (["--set", "run.steps=20"], "use --steps / --lookup-steps"),
    (["--set", "data.batch_size=4"], "use --batch-size"),
    (["--set", "model.max_loop_iters=5"], "use --train-loops"),
    # A dense "looped" model: both trained, then the report failed with a traceback.
    (["--set", "model.kind=dense"], "the demo sets model.kind itself"),
])
def test_bad_arguments_fail_before_training(tmp_path, capsys, argv, message):
    assert main(["demo", "--out", str(tmp_path / "d"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d" / "looped").exists()


def test_out_that_is_a_file_and_quick_sizes_given_explicitly(tmp_path, capsys, monkeypatch):
    from open_mythos.commands import demo

    (tmp_path / "a_file").write_text("")
    assert main(["demo", "--quick", "--out", str(tmp_path / "a_file")]) == 2
    assert "not a directory" in capsys.readouterr().err
    # --quick sizes what is not given; a size given explicitly wins.
    seen = {}
    monkeypatch.setattr(demo, "_check_args", lambda args: seen.update(vars(args)) or "stop")
    main(["demo", "--quick", "--steps", "20", "--out", str(tmp_path / "d")])
    assert (seen["steps"], seen["lookup_steps"], seen["batch_size"]) == (20, 6, 16)
    # Also a size equal to the default (it was taken as not given).
    main(["demo", "--quick", "--steps", "1500", "--batch-size", "128", "--out", str(tmp_path / "d")])
    assert (seen["steps"], seen["lookup_steps"], seen["batch_size"]) == (1500, 6, 128)
    assert type(seen["steps"]) is int and type(seen["lookup_steps"]) is int


def test_demo_compiles_when_a_compiler_is_there(monkeypatch):
    import shutil

    from open_mythos.commands.demo import compile_choice

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "g++" else None)
    assert compile_choice("auto", quick=False) == (True, "on (inductor with /usr/bin/g++)")
    assert compile_choice("auto", quick=True)[0] is False
    assert compile_choice("off", quick=False) == (False, "off")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert compile_choice("auto", quick=False) == (
        False, "off (no C++ compiler on the PATH for inductor)")
    assert compile_choice("on", quick=True) == (True, "on")


@pytest.mark.parametrize("stage", ["lookup", "chain"])
def test_demo_stages_are_the_documented_configs(stage):
    """``configs/multihop_{stage}.toml`` is what ``make demo`` trains (model, data, objective,
    schedule and steps), so the two ``openmythos train`` commands reproduce it."""
    import argparse
    from pathlib import Path

    from open_mythos.cli import build_parser
    from open_mythos.commands.demo import train_config
    from open_mythos.training import load_config

    args = build_parser().parse_args(["demo"])
    assert isinstance(args, argparse.Namespace)
    repo = Path(__file__).resolve().parents[1]
    demo = train_config(args, Path("runs"), "looped", stage)
    documented = load_config(repo / "configs" / f"multihop_{stage}.toml")
    for section in ("model", "data", "optim", "schedule"):
        assert getattr(demo, section) == getattr(documented, section), section
    assert demo.run.steps == documented.run.steps and demo.run.seed == documented.run.seed
    if stage == "chain":
        assert demo.run.init_from == str(Path("runs") / "lookup")
        assert documented.run.init_from == "runs/multihop_lookup"


@pytest.mark.parametrize("loops", ["fixed", "uniform"])
def test_lookup_stage_is_one_digit_ended_hop_at_shallow_depths(loops):
    """The lookup stage trains one hop on chains that end at a digit, at 1 to T_train - 1
    loops, whatever the chain stage's task knobs and loop schedule; the chain stage takes
    both as given, and the baseline always runs its T_train blocks."""
    from pathlib import Path

    from open_mythos.cli import build_parser
    from open_mythos.commands.demo import train_config

    task_args = '{"hops": [1, 2], "ood_hops": [3, 5], "statements": 7, "open_ends": 0.25}'
    args = build_parser().parse_args(["demo", "--loops", loops, "--task-args", task_args,
                                      "--train-loops", "4"])
    lookup = train_config(args, Path("runs"), "looped", "lookup")
    assert lookup.data.task_args == {"hops": [1, 1], "ood_hops": [2, 5], "statements": 7}
    assert (lookup.schedule.loops.value, lookup.schedule.min_loops,
            lookup.schedule.max_loops) == ("uniform", 1, 3)
    assert lookup.schedule.lr_decay.value == "constant"
    chain = train_config(args, Path("runs"), "looped", "chain")
    assert chain.data.task_args["open_ends"] == 0.25 and chain.data.task_args["hops"] == [1, 2]
    assert chain.schedule.loops.value == loops and chain.schedule.n_loops == 4
    for stage in ("lookup", "chain"):
        assert train_config(args, Path("runs"), "baseline", stage).schedule.loops.value == "fixed"


def _rows(model, split_acc):
    from open_mythos.evaluation.sweep import SweepRow

    return [SweepRow(model=model, task="multihop", split=split, n_loops=n, early_exit=False,
                     n_examples=256, accuracy=acc, loss=0.0, expected_loops=n, halt_loop=n,
                     loops_run=n, loops_computed=n, seconds=0.0)
            for (split, n), acc in split_acc.items()]


@pytest.mark.parametrize("ood_at_5, baseline, met", [
    (0.60, 0.49, True),    # +30 over T_train, +11 over the baseline
    (0.60, 0.51, False),   # only +9 over the baseline
    (0.39, 0.20, False),   # only +9 over T_train
])
def test_demo_target_needs_ten_points_over_both(ood_at_5, baseline, met):
    from open_mythos.commands.demo import check_targets

    looped = _rows("looped", {("id", 3): 1.0, ("id", 6): 1.0, ("id", 12): 0.5,
                              ("ood_hops", 3): 0.30, ("ood_hops", 4): 0.35,
                              ("ood_hops", 5): ood_at_5, ("ood_hops", 12): 0.1})
    base = _rows("baseline", {("id", 3): 0.9, ("ood_hops", 3): baseline})
    got, lines = check_targets(looped, base, 3)
    assert got is met
    assert lines[0].startswith("ood_hops: best depth above T_train is 5 loops")
    assert lines[0].endswith("NOT MET" if not met else " MET")
    assert lines[1].startswith("also measured: in-distribution accuracy at T_train=3: 100.0%")
    assert lines[-1].endswith("50.0 points below T_train (target <= 1 point) NOT MET")


def test_the_margin_over_the_baseline_carries_its_sampling_error():
    """Newcombe's (1998) example 56/70 - 48/80: his method 10 gives 0.0524 to 0.3339; at 0
    against 0 the interval still has a width (the normal one collapses there)."""
    from open_mythos.commands.demo import check_targets
    from open_mythos.evaluation.report import difference_interval, wilson_interval

    assert difference_interval(56 / 70, 70, 48 / 80, 80) == pytest.approx((0.0524, 0.3339),
                                                                            abs=1e-4)
    lo, hi = difference_interval(0.0, 16, 0.0, 16)
    assert lo == pytest.approx(-wilson_interval(0.0, 16)[1]) and hi == pytest.approx(-lo)
    assert hi > 0.1
    looped = _rows("looped", {("id", 3): 1.0, ("ood_hops", 3): 0.30, ("ood_hops", 5): 0.60})
    base = _rows("baseline", {("id", 3): 0.9, ("ood_hops", 3): 0.49})
    lo, hi = difference_interval(0.60, 256, 0.49, 256)
    line = check_targets(looped, base, 3)[1][0]
    assert f"+11.0 (95% interval {100 * lo:+.1f} to {100 * hi:+.1f}) over the baseline" in line
    assert 0.0 < lo < 0.11 < hi < 0.22


@pytest.mark.parametrize("ood_at_10, met", [(0.86, True), (0.83, False)])
def test_exit_rule_checks_hold_depth_past_the_best(ood_at_10, met):
    from open_mythos.commands.demo import exit_rule_checks

    plain = _rows("looped", {("id", 3): 0.98})
    with_rule = _rows("looped", {("id", 3): 0.98, ("id", 12): 0.975, ("ood_hops", 4): 0.80,
                                 ("ood_hops", 5): 0.88, ("ood_hops", 10): ood_at_10})
    lines = exit_rule_checks(with_rule, plain, 3)
    assert lines[0] == ("with the exit rule, in-distribution at 4x T_train (12 loops): 97.5%, "
                        "0.5 points below T_train without it (target <= 1 point) MET")
    assert lines[1].startswith("with the exit rule, ood_hops at 2x its best depth (10 loops)")
    assert lines[1].endswith(" MET") and ("NOT MET" not in lines[1]) is met


def test_a_worker_exits_when_its_parent_dies(tmp_path):
    """A killed demo leaves no training running: the worker watches its parent."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    # The parent starts a child that runs the watchdog and then sleeps; the parent is
    # killed, and the child must be gone shortly after.
    pid_file = tmp_path / "child.pid"
    child = ("import os, time, pathlib; from open_mythos.commands.demo import _exit_with_parent; "
             f"_exit_with_parent(os.getppid(), 0.05); pathlib.Path({str(pid_file)!r})"
             ".write_text(str(os.getpid())); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time; subprocess.Popen([sys.executable, "
                               f"'-c', {child!r}]); time.sleep(60)"])
    try:
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        child_pid = int(pid_file.read_text())
        os.kill(child_pid, 0)  # alive while the parent lives
    finally:
        parent.kill()
        parent.wait()
    for _ in range(100):
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        status = Path(f"/proc/{child_pid}/status")
        if status.exists() and "State:\tZ" in status.read_text():
            return  # exited; not yet reaped by the init process
        time.sleep(0.05)
    os.kill(child_pid, 9)
    raise AssertionError("the worker outlived its parent")


@pytest.mark.parametrize("jobs", [1, 2])
def test_each_model_trains_every_stage_on_one_thread_count(tmp_path, monkeypatch, jobs):
    """A model's thread count never changes during its run (it changes the arithmetic: a
    count set by timing made runs differ): one thread each in two workers, two in turn
    without them. An earlier demo's runs in the same --out are gone before the workers
    start (their metrics would pass for progress)."""
    import argparse
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    import open_mythos.training as training
    from open_mythos.commands import demo

    seen, lock = [], threading.Lock()

    class FakeTrainer:
        def __init__(self, cfg):
            self.cfg = cfg

        def train(self):
            kind, stage = self.cfg.run.out.split("/")[-2:]
            with lock:  # torch's thread count is per process: read it as it was set
                seen.append((kind, stage, torch.get_num_threads()))

    # The worker sets the thread count then builds its Trainer: in threads of one process,
    # the two must not interleave.
    real_worker = demo._train_worker

    def serial_worker(*args, **kwargs):
        with worker_lock:
            stale_at_start.append(stale.exists())
            return real_worker(*args, **kwargs)

    worker_lock, stale_at_start = threading.Lock(), []
    monkeypatch.setattr(training, "Trainer", FakeTrainer)
    monkeypatch.setattr(demo, "_train_worker", serial_worker)
    monkeypatch.setattr(demo, "_exit_with_parent", lambda parent: None)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    stale = tmp_path / "looped" / "chain" / "metrics.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"step": 9, "loss": 1.0}\n')
    args = demo.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(
        ["--out", str(tmp_path), "--lookup-steps", "3", "--steps", "4", "--compile", "off"])
    before = torch.get_num_threads()
    try:
        if jobs == 2:
            with ThreadPoolExecutor(2) as pool:
                seconds = demo.train_both(args, tmp_path, pool)
        else:
            seconds = demo.train_both(args, tmp_path)
    finally:
        torch.set_num_threads(before)
    assert set(seconds) == {"looped", "baseline"}
    threads = 1 if jobs == 2 else 2
    assert sorted(seen) == [("baseline", "chain", threads), ("baseline", "lookup", threads),
                            ("looped", "chain", threads), ("looped", "lookup", threads)]
    assert not stale.exists()
    if jobs == 2:  # gone before either worker started, not only once the looped one did
        assert stale_at_start == [False, False]


def test_a_demo_removes_an_earlier_demos_results_before_training(tmp_path, monkeypatch, capsys):
    """A demo that fails leaves no earlier demo's summary behind to pass for its own."""
    from open_mythos.commands import demo
    from open_mythos.training import ConfigError

    for name in ("demo.md", "sweep.json", "sweep_exit_rule.json", "report/report.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("an earlier demo's")
    (tmp_path / "notes.txt").write_text("the user's")

    def failing(args, out, pool=None):
        raise ConfigError("the worker's data")

    monkeypatch.setattr(demo, "train_both", failing)
    (tmp_path / demo.MARKER).write_text("")  # an earlier demo's directory
    assert main(["demo", "--quick", "--out", str(tmp_path), "--jobs", "1"]) == 2
    assert "the worker's data" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.MARKER, "notes.txt"]


def test_a_directory_a_demo_did_not_write_is_refused(tmp_path, monkeypatch, capsys):
    """``--out`` of another project's: its report/ and looped/ were deleted without a
    word. A demo's own directory, marked or (from before the marker) with its demo.md,
    is reused."""
    from open_mythos.commands import demo

    project = tmp_path / "project"
    (project / "report").mkdir(parents=True)
    (project / "report" / "thesis.md").write_text("mine")
    (project / "sweep.json").write_text("[]")
    assert main(["demo", "--quick", "--out", str(project)]) == 2
    assert "holds files a demo did not write (report, sweep.json)" in capsys.readouterr().err
    assert (project / "report" / "thesis.md").read_text() == "mine"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "demo.md").write_text("# openmythos demo\n\nExact-match accuracy ...")
    for out in (earlier, tmp_path / "new"):
        demo.check_demo_out(out)  # accepted


def test_progress_reads_the_last_row_of_a_long_metrics_file(tmp_path):
    import json

    from open_mythos.commands.demo import _last_step

    metrics = tmp_path / "metrics.jsonl"
    assert _last_step(metrics) == (0, None)
    metrics.write_text("".join(json.dumps({"step": i, "loss": i / 10, "pad": "x" * 300}) + "\n"
                               for i in range(1, 3001)))
    assert _last_step(metrics) == (3000, 300.0)
    assert _last_step(metrics, tail=500) == (3000, 300.0)  # the last row whole, one cut
    assert _last_step(metrics, tail=300) == (0, None)  # no whole row in the tail
    with open(metrics, "a") as fh:
        fh.write('{"step": 3001, "lo')  # a row being written
    assert _last_step(metrics) == (3000, 300.0)


def test_training_summary_says_which_stage_was_learned(tmp_path):
    """The demo says, from each stage's metrics, whether the answer was learned, and what
    to try when the looped model's lookup was not (the chain stage builds on it)."""
    import json

    from open_mythos.cli import build_parser
    from open_mythos.commands.demo import LEARNED_CE, training_summary

    def write(kind, stage, ces):
        run = tmp_path / kind / stage
        run.mkdir(parents=True)
        rows = [{"step": i + 1, "ce": ce} for i, ce in enumerate(ces)]
        rows.insert(1, {"step": 2, "ce": None})  # a non-finite step logs null
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    write("looped", "lookup", [5.0] * 60 + [0.64] * 50)
    write("looped", "chain", [0.05] * 50)
    write("baseline", "lookup", [0.02] * 50)
    write("baseline", "chain", [0.3] * 10 + [0.5] * 50)
    lines = training_summary(tmp_path, build_parser().parse_args(["demo"]))
    assert len(lines) == 4
    looped_lookup, looped_chain, base_lookup, base_chain = lines
    assert "0.640" in looped_lookup and "not learned" in looped_lookup
    assert "--lookup-steps" in looped_lookup and "--seed" in looped_lookup
    assert "0.050" in looped_chain and "(learned" in looped_chain
    assert "0.020" in base_lookup and "(learned" in base_lookup and "--seed" not in base_lookup
    assert "0.500" in base_chain and "not learned" in base_chain  # the last 50 steps only
    assert f"threshold is {LEARNED_CE}" in looped_chain


def test_hold_checks_of_a_model_with_no_accuracy_are_not_met():
    """A model at 0% everywhere 'kept' its accuracy at 2x and 4x T_train: MET, vacuously."""
    from open_mythos.commands.demo import check_targets, exit_rule_checks

    zero = {("id", 3): 0.0, ("id", 6): 0.0, ("id", 12): 0.0, ("ood_hops", 3): 0.0,
            ("ood_hops", 5): 0.0, ("ood_hops", 10): 0.0}
    looped = _rows("looped", zero)
    base = _rows("baseline", {("id", 3): 0.0, ("ood_hops", 3): 0.0})
    met, lines = check_targets(looped, base, 3)
    assert not met
    holds = [line for line in lines if "x T_train" in line]
    assert len(holds) == 2 and all(line.endswith("n/a (no accuracy to hold)") for line in holds)
    rule = exit_rule_checks(looped, looped, 3)
    assert rule and all(line.endswith("n/a (no accuracy to hold)") for line in rule)


def test_sample_answers_show_every_level():
    """One prompt per difficulty level: it showed only each split's end levels."""
    from open_mythos import OpenMythos
    from open_mythos.baseline import DenseBaseline, matched_baseline_config
    from open_mythos.commands.demo import sample_answers
    from open_mythos.tasks import VOCAB_SIZE, MultiHop
    from tests.conftest import tiny_config

    cfg = tiny_config(vocab_size=VOCAB_SIZE, max_seq_len=128)
    models = {"looped": OpenMythos(cfg).eval(),
              "baseline": DenseBaseline(matched_baseline_config(cfg, 2)).eval()}
    task = MultiHop(hops=(1, 3), ood_hops=(4, 6))
    table = sample_answers(models, task, [1, 2], seed=0)
    levels = [int(row.split("|")[2]) for row in table.splitlines()[2:]]
    assert levels == [1, 2, 3, 4, 5, 6]


def test_exit_rule_work_counts_the_loops_positions_ran(monkeypatch):
    """The share of the looped block's work, against the positions its loop steps actually
    received (counted by wrapping the step), and the settling loop against
    Decoded.per_position; with a rule that fires at once and one that never does."""
    import re

    import torch

    from open_mythos import ExitRule, OpenMythos
    from open_mythos.commands.demo import DEFAULT_TASK_ARGS, exit_rule_work
    from open_mythos.evaluation import greedy_decode, sample_examples
    from open_mythos.tasks import VOCAB_SIZE, get_task
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = OpenMythos(tiny_config(vocab_size=VOCAB_SIZE, max_seq_len=64, use_act=False)).eval()
    task = get_task("multihop", **DEFAULT_TASK_ARGS)
    rec, counts = model.recurrent, {"ran": 0, "full": 0}
    step = rec._step

    def counted(h, *args):
        counts["ran"] += h.shape[0] * h.shape[1]
        if args[1] == 0:  # the loop index: every row runs the first loop
            counts["full"] += h.shape[0] * h.shape[1]
        return step(h, *args)

    monkeypatch.setattr(rec, "_step", counted)
    rule = ExitRule(rel_change=0.3, min_loops=1)  # sequences stop after 2 or 3 loops
    [line] = [ln for ln in exit_rule_work(model, task, rule, 6, 16, 0) if ", id:" in ln]
    share = counts["ran"] / (6 * counts["full"])
    assert 0.1 < share < 0.9, "the rule should stop sequences at different loops"
    assert f"the looped block ran {share:.0%} of its 6-loop work" in line
    examples = sample_examples(task, "id", 16, 0)
    decoded = greedy_decode(model, [ex.prompt for ex in examples], 6, 2, early_exit=True,
                            exit_rule=rule)
    settled = float(re.search(r"settled after ([0-9.]+) loops", line).group(1))
    assert settled == round(decoded.per_position, 1) and settled != round(6 * share, 1)
    for rule, loops, work in ((ExitRule(entropy=1e9, min_loops=1), "1.0", "17%"),
                              (ExitRule(entropy=1e-12, min_loops=1), "6.0", "100%")):
        for line in exit_rule_work(model, task, rule, 6, 8, 0):
            assert f"settled after {loops} loops" in line and f"ran {work} of" in line
