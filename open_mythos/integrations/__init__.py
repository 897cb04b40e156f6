"""Bridges to other ecosystems; each module imports its optional dependency itself.

* :mod:`.hf` -- ``transformers`` config/model classes, registered with the Auto* classes on
  import (``pip install 'open-mythos[hf]'``).
* :mod:`.lm_eval` -- an ``lm-evaluation-harness`` model named ``"openmythos"``
  (``pip install 'open-mythos[eval]'``).
* :mod:`.convert` -- training checkpoints <-> Hugging Face directories, for every model kind
  (needs ``transformers`` only to write the Hugging Face layout; loading either is
  :mod:`open_mythos.checkpoints`, re-exported there).
* :mod:`.textgen` -- text streaming with stop strings, shared by the CLI and the server.
* :mod:`.server` -- an OpenAI-compatible completions server (``pip install 'open-mythos[serve]'``).
"""
