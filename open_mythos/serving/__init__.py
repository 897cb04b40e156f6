"""Serving many requests on one model: continuous batching.

* :mod:`.batch` -- sequences decoding together over one KV cache, joining and leaving
  between steps, and the chunked prefill of a prompt before it joins.
* :mod:`.jobs` -- the server's caps (:class:`ServeLimits`), a request (:class:`Job`) and
  the events it receives.
* :mod:`.scheduler` -- the thread that owns the model: its bounded queue, admission,
  chunked prefill, decode steps, cancellation and time limits.

The HTTP layer is :mod:`open_mythos.integrations.server`.
"""

from .jobs import Job, QueueFull, SchedulerStopped, ServeLimits
from .scheduler import Scheduler

__all__ = ["Job", "QueueFull", "Scheduler", "SchedulerStopped", "ServeLimits"]
