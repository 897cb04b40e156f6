"""The scheduler thread: batched greedy output equals unbatched output, seeded sampling
does not depend on the batch, cancellation, time limits and the bounded queue."""

from __future__ import annotations

import threading
import time

import pytest

from open_mythos import ByteTokenizer
from open_mythos.integrations.textgen import GenerationOptions, complete
from open_mythos.layers.recurrence import ExitRule
from open_mythos.serving import Job, QueueFull, Scheduler, ServeLimits
from open_mythos.serving.jobs import JobDone, JobFailed, SeqDelta
from open_mythos.serving.scheduler import derive_seed
from tests.integrations.conftest import CORPUS, TRAINED_LOOPS

TOK = ByteTokenizer()
TIMEOUT = 60.0


class Collector:
    """A job's events, and a way to wait for its last one."""

    def __init__(self):
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, (JobDone, JobFailed)):
            self.done.set()

    def wait(self) -> list:
        assert self.done.wait(TIMEOUT), "the job did not finish"
        return self.events

    def texts(self, n_rows: int) -> list[tuple[str, str | None, int]]:
        out = [["", None, 0] for _ in range(n_rows)]
        for e in self.wait():
            if isinstance(e, SeqDelta):
                out[e.index][0] += e.text
                if e.finish_reason is not None:
                    out[e.index][1:] = [e.finish_reason, e.n_tokens]
        return [tuple(o) for o in out]


def submit(scheduler, prompt: str, options: GenerationOptions, n: int = 1) -> tuple[Job, Collector]:
    sink = Collector()
    job = Job([TOK.encode(prompt)], options, sink, n=n)
    scheduler.submit(job)
    return job, sink


@pytest.fixture
def scheduler(trained_model):
    # A small prefill chunk: long prompts are prefilled over several turns, between steps.
    s = Scheduler(trained_model, TOK, ServeLimits(prefill_chunk=8)).start()
    yield s
    s.stop()


EXIT = ExitRule(argmax_streak=1, min_loops=2)
#: (prompt, n_loops, max_new_tokens, stop, exit rule): different lengths, depths, stops
#: and exit rules.
GREEDY_CASES = [
    ("the cat sat on the ", TRAINED_LOOPS, 30, (), None),
    ("a", TRAINED_LOOPS, 20, (), None),
    ("a dog sat on a mat. the dog ", 1, 25, (), None),
    ("the dog sat on the log. a cat and a dog", TRAINED_LOOPS, 16, ("log",), None),
    ("on ", 3, 12, (), None),
    ("the mat", TRAINED_LOOPS, 40, (". a",), None),
    ("the cat and", 6, 20, (), EXIT),
    ("a cat sat", 6, 20, (), None),
]


@pytest.mark.parametrize("prefill_chunk", [8, 128])
def test_batched_greedy_output_equals_unbatched(trained_model, prefill_chunk):
    """Jobs submitted together (joining the running batch at different steps, with their
    own n_loops, stop strings and exit rule) produce what each produces alone through the
    unbatched generation path (textgen over inference.stream). With a budget of 8 tokens
    the prompts are prefilled in chunks, one at a time; with 128, the first ones together
    in one padded forward."""
    shapes: list[tuple[int, int]] = []  # (batch, tokens) of the scheduler's forwards

    def record(module, args, kwargs):
        if threading.current_thread().name == "openmythos-scheduler":
            shapes.append(tuple(args[0].shape))

    hook = trained_model.register_forward_pre_hook(record, with_kwargs=True)
    # Started once every job is queued (_check_greedy_cases): started first, a loaded
    # machine let it prefill the first job before the others arrived, and no prefill ever
    # held two prompts.
    scheduler = Scheduler(trained_model, TOK, ServeLimits(prefill_chunk=prefill_chunk))
    try:
        _check_greedy_cases(scheduler, trained_model)
    finally:
        hook.remove()
        scheduler.stop()
    prefills = [(b, t) for b, t in shapes if t > 1]
    if prefill_chunk == 8:
        assert max(t for _, t in prefills) == 8 and {b for b, _ in prefills} == {1}
    else:
        assert max(b for b, _ in prefills) > 1


def _check_greedy_cases(scheduler, trained_model):
    options = [GenerationOptions(max_new_tokens=m, n_loops=k, do_sample=False, stop=stop,
                                 exit_rule=rule)
               for _, k, m, stop, rule in GREEDY_CASES]
    expected = [complete(trained_model, TOK, [TOK.encode(p)], o)[0]
                for (p, *_), o in zip(GREEDY_CASES, options)]
    sinks = []
    for (prompt, *_), o in zip(GREEDY_CASES, options):
        sinks.append(submit(scheduler, prompt, o)[1])
    scheduler.start()
    got = [s.texts(1)[0] for s in sinks]
    assert got == [(e.text, e.finish_reason, e.completion_tokens) for e in expected]
    assert len({e.text for e in expected}) == len(expected)  # the cases really differ
    without_rule = complete(trained_model, TOK, [TOK.encode(GREEDY_CASES[6][0])],
                            GenerationOptions(max_new_tokens=20, n_loops=6, do_sample=False))
    assert without_rule[0].text != expected[6].text  # the exit rule was applied
    # They were decoded together (the prefill budget of 8 tokens a turn makes them join at
    # different steps): the jobs of TRAINED_LOOPS loops shared steps.
    assert scheduler.peak_batch >= 3


def test_seeded_choices_do_not_depend_on_the_rest_of_the_batch(scheduler):
    options = GenerationOptions(max_new_tokens=24, n_loops=TRAINED_LOOPS, temperature=1.2,
                                seed=2**70 + 3)
    alone = submit(scheduler, "the cat ", options, n=3)[1].texts(3)
    # The same job again, now beside others that join and leave around it.
    crowd = [submit(scheduler, p, GenerationOptions(max_new_tokens=m, n_loops=TRAINED_LOOPS))[1]
             for p, m in [("a dog", 30), ("the log", 5)]]
    again = submit(scheduler, "the cat ", options, n=3)[1].texts(3)
    for c in crowd:
        c.wait()
    assert again == alone
    assert len({t for t, _, _ in alone}) > 1  # the n choices are different draws
    assert derive_seed(-1, 0) != derive_seed(-1, 1) and 0 <= derive_seed(2**200, 0) < 2**63


def test_a_cancelled_job_leaves_the_batch_at_the_next_step(scheduler):
    long = GenerationOptions(max_new_tokens=50, n_loops=TRAINED_LOOPS, do_sample=False)
    job, sink = submit(scheduler, "t", long, n=4)
    deadline = time.monotonic() + TIMEOUT
    while not any(isinstance(e, SeqDelta) for e in sink.events):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    job.cancel()
    while scheduler.stats()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    events = len(sink.events)
    time.sleep(0.1)
    assert len(sink.events) == events  # nothing more was generated
    assert not any(isinstance(e, (JobDone, JobFailed)) for e in sink.events)
    generated = sum(1 for e in sink.events if isinstance(e, SeqDelta))
    assert generated < 4 * 50 / 2


def test_a_job_cancelled_during_a_turn_says_nothing_more(scheduler):
    # The client goes away while its first token is being reported, in the middle of the turn
    # that joins its choices to the decode batch: the rest of that turn says nothing for it.
    long = GenerationOptions(max_new_tokens=50, n_loops=TRAINED_LOOPS, do_sample=False)
    sink = Collector()
    job = Job([TOK.encode("t")], long, lambda e: (sink(e), job.cancel()), n=4)
    scheduler.submit(job)
    deadline = time.monotonic() + TIMEOUT
    while not sink.events or any(scheduler.stats()[k] for k in ("running", "prefilling")):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.1)
    assert len(sink.events) == 1 and isinstance(sink.events[0], SeqDelta)
    # ... and the scheduler serves the next job as usual.
    after = submit(scheduler, "a", GenerationOptions(max_new_tokens=3, n_loops=1))[1]
    assert isinstance(after.wait()[-1], JobDone)


def test_time_limit_fails_the_job_with_504(trained_model):
    s = Scheduler(trained_model, TOK).start()
    try:
        sink = Collector()
        s.submit(Job([TOK.encode("the")], GenerationOptions(max_new_tokens=60, n_loops=64),
                     sink, timeout=0.05))
        last = sink.wait()[-1]
        assert isinstance(last, JobFailed) and last.status == 504
        assert s.stats() == {**s.stats(), "running": 0, "prefilling": 0, "waiting": 0}
    finally:
        s.stop()


def test_a_full_queue_refuses_and_a_stopped_scheduler_fails_waiting_jobs(trained_model):
    s = Scheduler(trained_model, TOK, ServeLimits(max_queue=2))  # not started: jobs wait
    sinks = [Collector(), Collector()]
    for sink in sinks:
        s.submit(Job([[1, 2]], GenerationOptions(), sink))
    with pytest.raises(QueueFull):
        s.submit(Job([[1, 2]], GenerationOptions(), Collector()))
    with pytest.raises(ValueError, match="max_batch"):  # it could never start
        s.submit(Job([[1, 2]], GenerationOptions(), Collector(), n=s.limits.max_batch + 1))
    s.start().stop()
    for sink in sinks:
        failed = sink.wait()[-1]
        assert isinstance(failed, JobFailed) and failed.status == 503


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_batch"):
        ServeLimits(max_batch=0)
    with pytest.raises(ValueError, match="request_timeout"):
        ServeLimits(request_timeout=0)
    assert CORPUS  # the model these tests use was trained on it


def test_a_long_prompt_is_prefilled_between_decode_steps(trained_model):
    """Chunked prefill: while a 53-token prompt is prefilled 8 tokens a turn, the request
    already decoding gets a step after every chunk (its tokens keep coming)."""
    shapes: list[tuple[int, int]] = []  # (batch, tokens) of every forward, in order
    hook = trained_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(args[0].shape)), with_kwargs=True)
    s = Scheduler(trained_model, TOK, ServeLimits(prefill_chunk=8)).start()
    try:
        greedy = dict(n_loops=TRAINED_LOOPS, do_sample=False)
        _, running = submit(s, "the", GenerationOptions(max_new_tokens=40, **greedy))
        wait = time.monotonic() + TIMEOUT
        while not any(isinstance(e, SeqDelta) for e in running.events):
            assert time.monotonic() < wait
            time.sleep(0.001)
        long_prompt = "the cat sat on the mat. the dog sat on the log. a cat"
        _, long = submit(s, long_prompt, GenerationOptions(max_new_tokens=4, **greedy))
        long.wait()
        running.wait()
    finally:
        hook.remove()
        s.stop()
    chunks = [i for i, (_, t) in enumerate(shapes) if t > 1][1:]  # after "the"'s prefill
    assert [shapes[i][1] for i in chunks] == [8] * 6 + [5]
    for a, b in zip(chunks, chunks[1:]):
        assert (1, 1) in shapes[a + 1:b]  # the running request decoded in between


def test_a_request_whose_prefill_raises_fails_alone(trained_model):
    """A forward that raises on one request's prompt fails that request (500); the request
    submitted with it (first tried in the same padded prefill, then alone) finishes
    normally, and the scheduler keeps serving."""
    poison = TOK.encode("~")[0]
    shapes = []

    def refuse(module, args, kwargs):
        shapes.append(tuple(args[0].shape))
        if bool((args[0] == poison).any()):
            raise RuntimeError("poisoned prompt")

    hook = trained_model.register_forward_pre_hook(refuse, with_kwargs=True)
    s = Scheduler(trained_model, TOK)
    try:
        options = GenerationOptions(max_new_tokens=20, n_loops=TRAINED_LOOPS, do_sample=False)
        _, good = submit(s, "the cat", options)
        _, bad = submit(s, "the ~ cat", options, n=2)
        s.start()  # both wait: the first turn prefills them together
        failed = bad.wait()[-1]
        assert shapes[0] == (2, 9)
        assert isinstance(failed, JobFailed) and failed.status == 500
        assert "poisoned" in failed.message
        [(text, reason, n_tokens)] = good.texts(1)
        assert (reason, n_tokens) == ("length", 20)
        _, after = submit(s, "a dog", options)
        assert after.texts(1)[0][2] == 20
        assert s.failures == 1
    finally:
        hook.remove()
        s.stop()


def test_a_request_whose_sampling_raises_mid_decode_fails_alone(trained_model, monkeypatch):
    """Choosing one request's token raised while another decoded in the same batch (a
    temperature of 1e-37 once gave NaN probabilities): that request fails (500), the other
    finishes, and the scheduler keeps serving. Before, every request in the batch got 500."""
    from open_mythos.serving import scheduler as scheduler_module

    real = scheduler_module.select_next
    calls = []

    def flaky(logits, params, generator=None):
        if params.temperature == 0.5:
            calls.append(1)
            if len(calls) > 3:  # after its first tokens: mid-decode, beside the other
                raise RuntimeError("bad probabilities")
        return real(logits, params, generator)

    monkeypatch.setattr(scheduler_module, "select_next", flaky)
    s = Scheduler(trained_model, TOK)
    try:
        greedy = GenerationOptions(max_new_tokens=20, n_loops=TRAINED_LOOPS, do_sample=False)
        sampled = GenerationOptions(max_new_tokens=20, n_loops=TRAINED_LOOPS, temperature=0.5,
                                    seed=1)
        _, good = submit(s, "the cat", greedy)
        _, bad = submit(s, "a dog", sampled)
        s.start()  # both wait: they are prefilled and decoded together
        failed = bad.wait()[-1]
        assert isinstance(failed, JobFailed) and failed.status == 500
        assert "bad probabilities" in failed.message
        assert good.texts(1)[0][1:] == ("length", 20)
        assert s.peak_batch == 2 and s.failures == 1
        assert submit(s, "a dog", greedy)[1].texts(1)[0][1:] == ("length", 20)
    finally:
        s.stop()


def test_served_text_continues_the_prompt_for_a_sentencepiece_tokenizer():
    """A Llama-style decoder strips a text's first space: the server decoded the
    completion's ids alone and so returned "is looped" after "the model" (the text ran on
    as "the modelis looped"). Reference: the tokenizer's decode of prompt + completion, less
    that of the prompt; two choices, each continuing its prompt."""
    from tests.integrations.conftest import ScriptedModel, hf_tokenizers

    tok = hf_tokenizers()["sentencepiece"]
    prompt, completion = tok.encode("the model"), tok.encode(" is looped, isn't it?")
    script = [0] * (len(prompt) - 1) + completion  # position p predicts script[p]
    model = ScriptedModel(script, real_positions=True, vocab_size=tok.vocab_size)
    s = Scheduler(model, tok).start()
    try:
        sink = Collector()
        s.submit(Job([prompt], GenerationOptions(max_new_tokens=len(completion), do_sample=False),
                     sink, n=2))
        texts = sink.texts(2)
    finally:
        s.stop()
    want = tok.decode(prompt + completion)[len(tok.decode(prompt)):]
    assert want == " is looped, isn't it?"
    assert texts == [(want, "length", len(completion))] * 2
