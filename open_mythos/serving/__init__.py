"""Serving many requests on one model: continuous batching.

* :mod:`.batch` -- sequences decoding together over one KV cache, joining and leaving
  between steps, and the chunked prefill of a prompt before it joins.
* :mod:`.scheduler` -- the thread that owns the model, its bounded queue, caps
  (:class:`ServeLimits`), cancellation and time limits.

The HTTP layer is :mod:`open_mythos.integrations.server`.
"""

from .scheduler import Job, QueueFull, Scheduler, SchedulerStopped, ServeLimits

__all__ = ["Job", "QueueFull", "Scheduler", "SchedulerStopped", "ServeLimits"]
