"""What a run directory carries so that it can be handed on: its own tokenizer, absolute data
paths, and (in every checkpoint's ``train_config.toml``) the loop schedule that gives its
trained depth.

* :func:`absolute_paths`: the configuration written to ``DIR/config.toml`` names local files
  and directories (``data.text``, ``data.prepared``, a tokenizer directory, a local
  ``data.hf_dataset``, ``run.init_from``) by absolute path, so ``--resume``, ``generate`` and
  ``export`` work from any working directory.
* :func:`copy_tokenizer`: the tokenizer's files are copied into ``DIR/tokenizer/`` (the byte
  tokenizer as ``byte_tokenizer.json``), where :func:`open_mythos.integrations.convert.
  find_tokenizer_dir` finds them, so the run still has its tokenizer when the original
  directory is gone.
* :func:`resume_config`: ``openmythos train --out DIR --resume`` with no ``--config`` reads
  ``DIR/config.toml``; the flags given on top of it are listed by :func:`changed_keys`.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import TrainConfig, _plain, load_config

RUN_TOKENIZER_DIR = "tokenizer"
RUN_CONFIG_FILE = "config.toml"


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every local path absolute (see the module docstring); names that are not
    local paths (``"byte"``, a Hub dataset or tokenizer name) are kept as they are."""
    data = cfg.data
    tokenizer = data.tokenizer
    if tokenizer.lower() != "byte" and Path(tokenizer).expanduser().exists():
        tokenizer = _absolute(tokenizer)
    hf_dataset = data.hf_dataset
    if hf_dataset is not None and Path(hf_dataset).expanduser().exists():
        hf_dataset = _absolute(hf_dataset)
    data = dataclasses.replace(
        data, text=[_absolute(p) for p in data.text], tokenizer=tokenizer,
        hf_dataset=hf_dataset, prepared=data.prepared and _absolute(data.prepared))
    run = dataclasses.replace(cfg.run, init_from=cfg.run.init_from and _absolute(cfg.run.init_from))
    return dataclasses.replace(cfg, data=data, run=run)


def copy_tokenizer(cfg: TrainConfig, run_dir: str | Path) -> Path | None:
    """Copy the tokenizer of a text run into ``run_dir/tokenizer`` (replacing what is there);
    returns that directory, or None for a task run (whose vocabulary is the task's) and for a
    tokenizer that is not a local directory (a Hub name: nothing local to copy)."""
    from ..integrations.convert import save_tokenizer

    spec = cfg.data.tokenizer
    if cfg.data.task is not None or (spec.lower() != "byte" and not Path(spec).expanduser().is_dir()):
        return None
    dest = Path(run_dir) / RUN_TOKENIZER_DIR
    if dest.resolve() == Path(cfg.data.tokenizer).expanduser().resolve():
        return dest  # a resumed run that reads the copy itself
    tmp = dest.with_name(f".{RUN_TOKENIZER_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tokenizer(cfg.data.tokenizer, tmp, hf_files=False)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def resume_config(run_dir: str | Path, overrides: Iterable[tuple[str, Any]] = ()
                  ) -> TrainConfig | None:
    """The configuration a run continues with: ``run_dir/config.toml`` with ``overrides``
    applied (:func:`~.config.load_config`), or None when the run has no ``config.toml``.

    A tokenizer directory that no longer exists is replaced by the run's own copy
    (``run_dir/tokenizer``) when there is one.
    """
    run_dir = Path(run_dir).expanduser()  # "~/run" as run.out reads it
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    return with_own_tokenizer(load_config(path, overrides), run_dir)


def with_own_tokenizer(cfg: TrainConfig, run_dir: str | Path) -> TrainConfig:
    """``cfg`` reading the run's copy of its tokenizer (``run_dir/tokenizer``) when the
    tokenizer directory it names no longer exists and the copy does."""
    own = Path(run_dir) / RUN_TOKENIZER_DIR
    spec = cfg.data.tokenizer
    if spec.lower() != "byte" and not Path(spec).expanduser().exists() and own.is_dir():
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(own)))
    return cfg


def changed_keys(before: TrainConfig, after: TrainConfig,
                 ignore: Iterable[str] = ("run.out",)) -> list[str]:
    """``["optim.lr: 0.001 -> 0.002", ...]``: the dotted keys whose values differ. A model
    field that ``before`` does not name (a configuration written before the field existed)
    is no change when ``after`` holds its default."""
    from ..registry import config_fields

    old, new = _flat(before.to_dict()), _flat(after.to_dict())
    defaults = {f"model.{k}": _plain(v) for k, v in config_fields().items()}
    ignore = set(ignore)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in ignore
            and not (k not in old and k in defaults and new[k] == defaults[k])]


def _flat(tree: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, keys in tree.items()
            for key, value in keys.items()}
