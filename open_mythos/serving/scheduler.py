"""Continuous batching: one thread owns the model and runs every request's sequences.

Each turn of the scheduler thread:

1. drops the sequences of cancelled requests (a client that went away) and of requests past
   their time limit;
2. admits waiting requests while the running rows leave room (``max_batch``);
3. prefills waiting prompts, at most ``prefill_chunk`` tokens in all, so a long prompt
   delays the running sequences by one chunk per turn, not by its whole length (prompts
   that arrived together and fit in the budget once padded run as one forward); a prompt
   whose prefill completes picks its first token and joins the decode batch of its
   ``n_loops``;
4. runs one decode step of every batch (one per distinct ``n_loops`` and exit rule), picks
   each row's next token with that row's own sampling settings and generator, and lets
   finished rows leave.

Rows of one batch share ``n_loops`` and exit rule: requests with different ones decode in
separate batches, stepped in turn (see :mod:`open_mythos.serving.batch` for the cache
layout). Within a batch each row still exits on its own under the rule.
Requests reach the thread through a bounded queue (:class:`QueueFull` when full) and hear
back through the ``emit`` callback of their :class:`Job`, called on the scheduler thread
with :class:`SeqDelta`, :class:`PromptLogprobs`, :class:`JobFailed` and a last
:class:`JobDone` (or :class:`JobFailed`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from ..inference.sampling import SamplingParams, select_next
from ..integrations.textgen import FinishReason, TextSequence, vocab_bound
from ..layers.recurrence import ExitRule
from ..model import CausalLM
from ..tokenizers import Tokenizer
from .batch import DecodeBatch, Prefill, prefill_together
from .jobs import (
    Job,
    JobDone,
    JobFailed,
    PromptLogprobs,
    QueueFull,
    SchedulerStopped,
    SeqDelta,
    ServeLimits,
    TokenLogprob,
    shown_token,
)

__all__ = ["Scheduler", "derive_seed"]


class _Row:
    """One generated sequence: its text, sampling, generator and next input token."""

    def __init__(self, job: Job, index: int, tokenizer: Tokenizer, device: torch.device,
                 vocab_limit: int):
        o = job.options
        self.job, self.index = job, index
        self.text = TextSequence(tokenizer, o.stop, context=job.prompts[index // job.n])
        self.params = SamplingParams(o.do_sample, o.temperature, o.top_k, o.top_p, vocab_limit)
        self.generator: torch.Generator | None = None
        if o.do_sample:
            self.generator = torch.Generator(device=device)
            if o.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(derive_seed(o.seed, index))
        self.token = 0  # the last token picked, fed at the next decode step
        self.logprobs: list[TokenLogprob] = []  # picked since the last delta

    @property
    def finished(self) -> bool:
        return self.text.finish_reason is not None


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for choice ``index`` of a request's ``seed`` (any integer,
    however large or negative): the same pair always gives the same seed."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


#: Rows decode together when they share ``n_loops`` and exit rule.
_BatchKey = tuple[int, ExitRule | None]


@dataclass
class _PrefillTask:
    prefill: Prefill
    job: Job
    rows: list[_Row]
    solo: bool = False  # prefill alone (a group it was in raised)


class Scheduler:
    """The thread that owns ``model`` and runs every submitted :class:`Job`.

    Args:
        model: the model; put in eval mode here and used only by the scheduler thread
            from :meth:`start` on.
        tokenizer: its tokenizer (EOS ends a sequence).
        limits: caps on requests and batches.
    """

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, limits: ServeLimits | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        #: Ids below this are the ones a sequence may take and logprobs may list: those
        #: both the model and the tokenizer have (a padded embedding's extra rows decode
        #: to nothing).
        self.vocab_limit = vocab_bound(model, tokenizer)
        self.limits = limits or ServeLimits()
        self.device = next(model.parameters()).device
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._prefills: deque[_PrefillTask] = deque()
        # One batch per (n_loops, exit rule); the rows of each, in batch order.
        self._batches: dict[_BatchKey, DecodeBatch] = {}
        self._rows: dict[_BatchKey, list[_Row]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (all batches)
        self.peak_batch = 0  # most rows in one decode step so far
        self.failures = 0  # turns that raised

    # --- the caller's side ---------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="openmythos-scheduler",
                                            daemon=True)
            self._thread.start()
        return self

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (no job is taken any more)."""
        return self._stopping

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` or :class:`SchedulerStopped`, and
        ``ValueError`` for a job that could never start (more rows than ``max_batch``)."""
        if job.n_rows > self.limits.max_batch:
            raise ValueError(f"the job has {job.n_rows} sequences; max_batch is "
                             f"{self.limits.max_batch}")
        with self._cv:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(job)
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """End every job (503) and the thread, at its next turn."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        """Counts for ``/health``; safe from any thread (``list`` snapshots the batches in
        one step under the GIL while the scheduler thread may be changing them)."""
        return {"running": sum(len(r) for r in list(self._rows.values())),
                "prefilling": len(self._prefills), "waiting": len(self._waiting),
                "decode_steps": self.steps, "peak_batch": self.peak_batch}

    # --- the scheduler thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._prefills or self._rows):
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                with torch.inference_mode():
                    self._turn()
            except Exception as err:  # fail what was running; keep serving
                self.failures += 1
                self._fail_all(JobFailed(500, f"{type(err).__name__}: {err}"))
        self._fail_all(JobFailed(503, "the server is shutting down", "service_unavailable"))

    def _turn(self) -> None:
        self._drop_gone()
        self._admit()
        self._prefill()
        for key in list(self._batches):
            self._decode(key)

    def _drop_gone(self) -> None:
        """Forget cancelled jobs; fail those past their time limit."""
        now = time.monotonic()
        with self._cv:
            jobs = {*self._waiting, *(t.job for t in self._prefills),
                    *(r.job for rows in self._rows.values() for r in rows)}
        late = [j for j in jobs if not j.cancelled and now - j.arrived > j.timeout]
        gone = {id(j) for j in jobs if j.cancelled} | {id(j) for j in late}
        if not gone:
            return
        with self._cv:
            self._waiting = deque(j for j in self._waiting if id(j) not in gone)
        self._prefills = deque(t for t in self._prefills if id(t.job) not in gone)
        for key, rows in list(self._rows.items()):
            self._keep(key, [i for i, r in enumerate(rows) if id(r.job) not in gone])
        for job in late:
            job.emit(JobFailed(504, f"the request ran past the server's time limit of "
                                    f"{job.timeout:g} s", "timeout"))

    def _running_rows(self) -> int:
        return (sum(len(r) for r in self._rows.values())
                + sum(len(t.rows) for t in self._prefills))

    def _admit(self) -> None:
        while True:
            with self._cv:
                if not self._waiting:
                    return
                job = self._waiting[0]
                if self._running_rows() + job.n_rows > self.limits.max_batch:
                    return
                self._waiting.popleft()
            self._start(job)

    def _start(self, job: Job) -> None:
        o = job.options
        n_loops = o.n_loops if o.n_loops is not None else self.model.default_n_loops
        rows = [_Row(job, i, self.tokenizer, self.device, self.vocab_limit)
                for i in range(job.n_rows)]
        if o.max_new_tokens == 0 and not job.echo_logprobs:
            for row in rows:
                self._finish(row, row.text.finish(FinishReason.LENGTH))
            return
        for p, ids in enumerate(job.prompts):
            self._prefills.append(_PrefillTask(
                Prefill(self.model, ids, n_loops, job.echo_logprobs, o.exit_rule), job,
                rows[p * job.n:(p + 1) * job.n]))

    def _prefill(self) -> None:
        budget = self.limits.prefill_chunk
        group = self._prefill_group(budget)
        if len(group) > 1:  # prompts that arrived together: one padded forward
            for _ in group:
                self._prefills.popleft()
            budget -= len(group) * max(t.prefill.length for t in group)
            try:
                prefill_together(self.model, [t.prefill for t in group])
            except Exception:  # retry one by one, so only the culprit fails
                for task in reversed(group):
                    task.solo = True
                    self._prefills.appendleft(task)
                group = []
            for task in group:
                self._join(task)
        while budget > 0 and self._prefills:
            task = self._prefills[0]
            try:
                budget -= task.prefill.run(budget)
            except Exception as err:
                self._prefills.popleft()
                self._fail_job(task.job, err)
                continue
            if task.prefill.finished:
                self._prefills.popleft()
                self._join(task)

    def _prefill_group(self, budget: int) -> list[_PrefillTask]:
        """The waiting prompts at the front that have not started, share a depth and exit
        rule and fit in ``budget`` tokens once padded to the longest."""
        group: list[_PrefillTask] = []
        for task in self._prefills:
            pf = task.prefill
            longest = max([pf.length, *(t.prefill.length for t in group)])
            if pf.done or task.solo or (len(group) + 1) * longest > budget or (group and (
                    (pf.n_loops, pf.exit_rule) != (group[0].prefill.n_loops,
                                                   group[0].prefill.exit_rule))):
                break
            group.append(task)
        return group

    def _fail_job(self, job: Job, err: Exception) -> None:
        """A step of ``job`` alone raised (its prefill, or the choice of its next token):
        fail it, keep serving the others; its other sequences leave at the next turn."""
        self.failures += 1
        if not job.cancelled:
            _emit(job, JobFailed(500, f"{type(err).__name__}: {err}"))
        job.cancel()

    def _join(self, task: _PrefillTask) -> None:
        try:
            self._join_unguarded(task)
        except Exception as err:
            self._fail_job(task.job, err)

    def _join_unguarded(self, task: _PrefillTask) -> None:
        """A prompt is prefilled: report its logprobs, pick each choice's first token and
        add the choices still running to the decode batch of their ``n_loops``."""
        pf, job = task.prefill, task.job
        if job.echo_logprobs:
            prompt = self._prompt_logprobs(pf, job.logprobs or 0)
            for row in task.rows:
                job.emit(PromptLogprobs(row.index, prompt))
        if job.options.max_new_tokens == 0:
            for row in task.rows:
                self._finish(row, row.text.finish(FinishReason.LENGTH))
            return
        logits = pf.last.unsqueeze(0)
        for row in task.rows:
            self._advance(row, logits, 0)
        running = [r for r in task.rows if not r.finished]
        if running and not job.cancelled:
            key = (pf.n_loops, pf.exit_rule)
            batch = self._batches.get(key)
            if batch is None:
                batch = self._batches[key] = DecodeBatch(self.model, *key)
                self._rows[key] = []
            for row in running:
                batch.add(pf)
                self._rows[key].append(row)

    def _decode(self, key: _BatchKey) -> None:
        batch, rows = self._batches[key], self._rows[key]
        tokens = torch.tensor([r.token for r in rows], dtype=torch.long, device=self.device)
        logits = batch.step(tokens)  # (B, V)
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(rows))
        greedy = (logits[:, :self.vocab_limit].argmax(-1).tolist()
                  if any(r.generator is None for r in rows) else None)
        for i, row in enumerate(rows):
            try:
                self._advance(row, logits, i, None if greedy is None else greedy[i])
            except Exception as err:  # one request's own choice (its sampling) failed
                self._fail_job(row.job, err)
        self._keep(key, [i for i, r in enumerate(rows) if not r.finished])

    def _keep(self, key: _BatchKey, keep: list[int]) -> None:
        self._batches[key].keep(keep)
        self._rows[key] = [self._rows[key][i] for i in keep]
        if not keep:
            del self._batches[key], self._rows[key]

    def _advance(self, row: _Row, logits: torch.Tensor, i: int, greedy: int | None = None) -> None:
        """Pick row ``row``'s next token from ``logits[i]`` and report its text."""
        if row.generator is None:
            tok = greedy if greedy is not None else int(logits[i, :self.vocab_limit].argmax())
        else:
            tok = int(select_next(logits[i:i + 1], row.params, row.generator))
        row.token = tok
        text = row.text.add(tok, self.tokenizer.eos_token_id)
        if row.job.logprobs is not None:
            row.logprobs.append(self._token_logprob(logits[i], tok, row.job.logprobs,
                                                    offset=row.text.last_offset))
        if not row.finished and row.text.n_tokens >= row.job.options.max_new_tokens:
            text += row.text.finish(FinishReason.LENGTH)
        if row.job.cancelled:  # the client went away during this turn: say nothing more
            return
        if row.finished:
            self._finish(row, text)
        elif text:
            # The tokens whose text is shown; one whose text is held back (it may start a
            # stop string) waits, to be shown with it or dropped with the stop string.
            shown = row.text.emitted
            ready = tuple(lp for lp in row.logprobs if lp.offset < shown)
            row.logprobs = [lp for lp in row.logprobs if lp.offset >= shown]
            row.job.emit(SeqDelta(row.index, text, logprobs=ready))

    def _finish(self, row: _Row, text: str) -> None:
        job = row.job
        # The tokens of a stop string (cut from the text) are left out of the logprobs
        # too, so that every entry's text_offset falls inside the text returned.
        end = len(row.text.text)
        cut = end < len(row.text.decoded)
        logprobs = tuple(lp for lp in row.logprobs if not cut or lp.offset < end)
        job.emit(SeqDelta(row.index, text, row.text.finish_reason, row.text.n_tokens,
                          logprobs))
        row.logprobs.clear()
        job.finished_rows += 1
        if job.finished_rows == job.n_rows:
            job.emit(JobDone())

    # --- logprobs ------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        """How a single token is shown in logprobs: its bytes in a text
        (:meth:`~open_mythos.tokenizers.Tokenizer.token_bytes`) as text, or as
        ``bytes:\\xNN...`` when they are part of a multi-byte character (a Hugging Face
        tokenizer's decode showed every such token as the same U+FFFD)."""
        return shown_token(self.tokenizer.token_bytes(token_id))

    def _token_logprob(self, logits: torch.Tensor, tok: int, top: int,
                       offset: int) -> TokenLogprob:
        lp = logits.float().log_softmax(-1)
        alts: tuple[tuple[int, str, float], ...] = ()
        if top:
            values, ids = lp[:self.vocab_limit].topk(min(top, self.vocab_limit))
            alts = tuple((int(t), self.token_text(int(t)), float(v))
                         for v, t in zip(values.tolist(), ids.tolist()))
        return TokenLogprob(tok, self.token_text(tok), float(lp[tok]), alts, offset)

    def _prompt_logprobs(self, pf: Prefill, top: int) -> tuple[TokenLogprob, ...]:
        ids = pf.ids[0].tolist()
        logits = pf.all_logits()
        # Each token's offset: the characters of the prompt's text before it, counted as
        # for generated text (TextSequence.last_offset).
        text = TextSequence(self.tokenizer, ())
        offsets = []
        for tok in ids:
            text.push(tok)
            offsets.append(text.last_offset)
        first = TokenLogprob(ids[0], self.token_text(ids[0]), None)
        rest = [self._token_logprob(logits[p - 1], ids[p], top, offsets[p])
                for p in range(1, len(ids))]
        return (first, *rest)

    def _fail_all(self, failure: JobFailed) -> None:
        with self._cv:
            jobs = {*self._waiting, *(t.job for t in self._prefills),
                    *(r.job for rows in self._rows.values() for r in rows)}
            self._waiting.clear()
        self._prefills.clear()
        self._batches.clear()
        self._rows.clear()
        for job in jobs:
            if not job.cancelled:
                _emit(job, failure)


def _emit(job: Job, event: JobFailed) -> None:
    """Report a failure; an ``emit`` that raises must not end the scheduler thread."""
    try:
        job.emit(event)
    except Exception:  # noqa: BLE001 - nobody is left to tell
        job.cancel()
