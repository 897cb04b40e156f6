"""lm-eval as users run it (#15 item 3): our model registered beside the harness's own, by
``simple_evaluate`` and from the command line, and the HF export scored by the stock
``--model hf`` with the same numbers as ``--model openmythos``, on small local tasks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from open_mythos import ByteTokenizer  # noqa: E402
from open_mythos.cli import main  # noqa: E402
from tests.integrations.conftest import CORPUS, TRAINED_LOOPS  # noqa: E402
from tests.integrations.test_export import write_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()

MC_DOCS = [
    {"context": "the cat sat on the", "choices": ["mat", "dog", "log"], "label": 0},
    {"context": "the dog sat on the", "choices": ["cat", "log", "and"], "label": 1},
    {"context": "a cat and a", "choices": ["dog", "mat", "sat"], "label": 0},
    {"context": "a dog and a", "choices": ["log", "cat", "on"], "label": 1},
    {"context": "sat on a", "choices": ["mat", "the", "dog"], "label": 0},
    {"context": "the cat", "choices": ["on", "sat", "a"], "label": 1},
]
PPL_TEXTS = ["the cat sat on the mat.", CORPUS[:60], "a dog sat on a log."]  # one window each


def test_registering_ours_keeps_the_harness_models():
    """In a fresh interpreter (an empty lm-eval registry, as a user has it)."""
    code = ("import open_mythos.integrations.lm_eval as ours\n"
            "from lm_eval.api.registry import get_model\n"
            "assert get_model('openmythos') is ours.OpenMythosLM\n"
            "print(get_model('hf').__name__, get_model('dummy').__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["HFLM", "DummyLM"]


def write_tasks(root: Path) -> Path:
    """Two local lm-eval tasks (offline ``json`` datasets): ``om_mc`` (multiple choice:
    acc, acc_norm) and ``om_ppl`` (rolling log-likelihood: perplexities, bits per byte)."""
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("\n".join(json.dumps(d) for d in MC_DOCS))
    (tasks / "ppl.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in PPL_TEXTS))
    common = f"""dataset_path: json
test_split: test
dataset_kwargs:
  cache_dir: {root / "datasets_cache"}
  data_files:
"""
    (tasks / "om_mc.yaml").write_text(f"""task: om_mc
{common}    test: {tasks / "mc.jsonl"}
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (tasks / "om_ppl.yaml").write_text(f"""task: om_ppl
{common}    test: {tasks / "ppl.jsonl"}
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return tasks


@pytest.fixture(scope="module")
def run_and_export(trained_model, tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("lm_eval")
    run = write_run(root / "run", trained_model, n_loops=TRAINED_LOOPS)
    assert main(["export", str(run), "--out", str(root / "hf")]) == 0
    return run, root / "hf", write_tasks(root)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def evaluate(model: str, model_args: str, tasks_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import open_mythos.integrations.lm_eval  # noqa: F401

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["om_mc", "om_ppl"],
                                  task_manager=TaskManager(include_path=str(tasks_dir)),
                                  batch_size=2, log_samples=False)
    return out["results"]


def reference_metrics(model: torch.nn.Module) -> dict[str, float]:
    """Independent reference: acc and acc_norm from one float64 forward per choice, and
    byte perplexity from one forward per text (each shorter than max_seq_len, so a single
    window), with BOS as the first context token as the harness does."""
    def logprob(context: list[int], continuation: list[int]) -> float:
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, n_loops=TRAINED_LOOPS).double(), -1)[0]
        rows = logp[len(context) - 1: len(context) + len(continuation) - 1]
        return float(rows.gather(-1, torch.tensor(continuation)[:, None]).sum())

    acc = acc_norm = 0
    for doc in MC_DOCS:
        # The harness joins context and choice with its target delimiter, " ".
        scores = [logprob(TOK.encode(doc["context"]), TOK.encode(" " + c)) for c in doc["choices"]]
        norm = [s / len(c) for s, c in zip(scores, doc["choices"])]
        acc += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == doc["label"]
    total = sum(logprob([TOK.bos_token_id], TOK.encode(t)) for t in PPL_TEXTS)
    n_bytes = sum(len(t.encode()) for t in PPL_TEXTS)
    return {"acc": acc / len(MC_DOCS), "acc_norm": acc_norm / len(MC_DOCS),
            "byte_perplexity": math.exp(-total / n_bytes),
            "bits_per_byte": -total / n_bytes / math.log(2)}


METRICS = [("om_mc", "acc"), ("om_mc", "acc_norm"), ("om_ppl", "word_perplexity"),
           ("om_ppl", "byte_perplexity"), ("om_ppl", "bits_per_byte")]


@pytest.mark.slow
def test_stock_hf_on_the_export_scores_the_same_as_our_model_type(
        run_and_export, trained_model, offline):
    run, hf_dir, tasks = run_and_export
    ours = evaluate("openmythos", f"pretrained={run}", tasks)
    stock = evaluate("hf", f"pretrained={hf_dir},trust_remote_code=True,dtype=float32,"
                           "device=cpu", tasks)
    ref = reference_metrics(trained_model)
    for task, metric in METRICS:
        a, b = ours[task][f"{metric},none"], stock[task][f"{metric},none"]
        assert math.isclose(a, b, rel_tol=1e-5), (task, metric, a, b)
        if metric in ref:
            assert math.isclose(a, ref[metric], rel_tol=1e-5), (task, metric, a, ref[metric])
    assert 0 < ours["om_mc"]["acc,none"] < 1 or ours["om_mc"]["acc,none"] == 1.0
    assert ours["om_ppl"]["byte_perplexity,none"] < 20  # a trained model, not uniform (259)


@pytest.mark.slow
def test_lm_eval_command_line_runs_our_model_type(run_and_export, tmp_path, offline):
    run, _, tasks = run_and_export
    cmd = [sys.executable, "-m", "open_mythos.integrations.lm_eval", "run", "--model",
           "openmythos", "--model_args", f"pretrained={run}", "--tasks", "om_mc",
           "--include_path", str(tasks), "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = list((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(result.read_text())["results"]["om_mc"]["acc,none"]
    import lm_eval  # noqa: F401

    assert math.isclose(acc, evaluate("openmythos", f"pretrained={run}", tasks)["om_mc"]["acc,none"])


@pytest.mark.slow
def test_apply_chat_template_scores_the_rendered_conversation(run_and_export, offline):
    """``apply_chat_template=True``: every request's context is the conversation rendered by
    the plain template (no chat template in the byte tokenizer), and its score is our
    model's log-likelihood of the choice after that context."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import open_mythos.integrations.lm_eval  # noqa: F401  (registers --model openmythos)
    from open_mythos.checkpoints import load_model

    run, _, tasks = run_and_export
    out = lm_eval.simple_evaluate(model="openmythos", model_args=f"pretrained={run}",
                                  tasks=["om_mc"], batch_size=2, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)),
                                  apply_chat_template=True)
    model = load_model(run).model
    samples = out["samples"]["om_mc"]
    assert len(samples) == len(MC_DOCS)
    for sample in samples:
        for (context, continuation), [(score, _)] in zip(sample["arguments"], sample["resps"]):
            assert context.startswith("User: ") and context.endswith("\nAssistant:")
            ids = TOK.encode(context + continuation)
            n_ctx = len(TOK.encode(context))
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids]), n_loops=TRAINED_LOOPS)
                                         .double(), -1)[0]
            want = sum(float(logp[i - 1, ids[i]]) for i in range(n_ctx, len(ids)))
            assert math.isclose(score, want, rel_tol=1e-4, abs_tol=1e-4)
