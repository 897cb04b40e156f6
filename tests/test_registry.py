"""The registry of model kinds: one decision of "looped or dense baseline" for everything."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from open_mythos import MythosConfig, OpenMythos
from open_mythos.baseline import (
    BaselineConfig,
    DenseBaseline,
    attention_flops,
    matched_baseline_config,
    swiglu_flops,
)
from open_mythos.registry import (
    DENSE,
    KINDS,
    LOOPED,
    ModelKind,
    build_model,
    config_fields,
    config_from_dict,
    flops_per_token,
    is_looped,
    kind_of,
    register,
)
from tests.conftest import tiny_config

KIND_NAMES = ["looped", "dense"]


def config_of(kind: str, attn_type: str) -> MythosConfig:
    cfg = tiny_config(attn_type)
    return cfg if kind == "looped" else matched_baseline_config(cfg, 3)


def test_each_kind_maps_config_model_and_dict_to_itself(attn_type):
    for kind, cls in ((LOOPED, OpenMythos), (DENSE, DenseBaseline)):
        cfg = config_of(kind.name, attn_type)
        model = cls(cfg)
        assert kind_of(cfg) is kind_of(model) is kind_of(cfg.to_dict()) is kind
        assert is_looped(model) is is_looped(cfg) is (kind is LOOPED)
    assert list(KINDS) == KIND_NAMES


def test_subclasses_and_wrappers_have_their_parents_kind():
    class Sub(DenseBaseline):
        pass

    cfg = matched_baseline_config(tiny_config("gqa"), 2)
    assert kind_of(Sub(cfg)) is DENSE
    wrapped = torch.nn.Module()
    wrapped.module = OpenMythos(tiny_config("gqa"))  # as DDP holds its model
    assert kind_of(wrapped) is LOOPED
    with pytest.raises(TypeError, match="not a registered model kind"):
        kind_of(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a MythosConfig"):
        kind_of(3)


def test_config_dict_kind_is_chosen_by_a_set_baseline_field():
    cfg = tiny_config("mla")
    data = cfg.to_dict()
    # A Hugging Face config carries the baseline's fields for every model, None if unused.
    assert type(config_from_dict({**data, "core_layers": None, "core_ffn_dim": None})) is MythosConfig
    base = config_from_dict({**data, "core_layers": 2})
    assert type(base) is BaselineConfig and base.core_layers == 2
    assert base == BaselineConfig(**data, core_layers=2)
    for cfg in (tiny_config("gqa"), matched_baseline_config(tiny_config("gqa"), 5)):
        assert config_from_dict(cfg.to_dict()) == cfg and type(config_from_dict(cfg.to_dict())) is type(cfg)
    with pytest.raises(ValueError, match="unknown MythosConfig field"):
        config_from_dict({**data, "depth": 3})


def test_config_fields_cover_every_kind_with_plain_defaults():
    fields = config_fields()
    want = {f.name for f in dataclasses.fields(BaselineConfig)}  # a superset of MythosConfig's
    assert set(fields) == want
    assert fields["core_layers"] is None and fields["dim"] == MythosConfig().dim


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_build_model_on_every_device_option(kind):
    cfg = config_of(kind, "gqa")
    cls = OpenMythos if kind == "looped" else DenseBaseline
    torch.manual_seed(0)
    plain = build_model(cfg)
    torch.manual_seed(0)
    assert type(plain) is cls and _same(plain, cls(cfg))  # device=None: the constructor
    meta = build_model(cfg, device="meta")
    assert type(meta) is cls and all(p.is_meta for p in meta.parameters())
    real = build_model(cfg, device="cpu")
    assert not any(t.is_meta for t in [*real.parameters(), *real.buffers()])
    assert all(torch.isfinite(t).all() for t in real.state_dict().values())
    assert real.head.weight is real.embed.weight


def test_flops_dispatch_by_kind():
    cfg = tiny_config("gqa")
    base = matched_baseline_config(cfg, 3)
    attn = attention_flops(cfg, 5)
    trunk = 2 * cfg.dim * cfg.vocab_size + 2 * (attn + swiglu_flops(cfg.dim, cfg.ffn_dim))
    assert flops_per_token(base, context_len=5) == trunk + 3 * (
        attn + swiglu_flops(cfg.dim, base.core_ffn_dim))
    assert flops_per_token(base, n_loops=7) == flops_per_token(base)  # fixed depth
    assert flops_per_token(cfg, n_loops=7) > flops_per_token(cfg, n_loops=3)
    # NumPy's integers are counts; anything that is no count is refused, for either kind
    # (0 loops used to count the trunk alone, -3 a negative number).
    assert flops_per_token(cfg, np.int64(3), np.int64(5)) == flops_per_token(cfg, 3, 5)
    assert matched_baseline_config(cfg, np.int64(3)) == base
    for model_cfg in (cfg, base):
        for bad in (0, -3, 2.5, True, "2"):
            with pytest.raises(ValueError, match="n_loops must be a positive integer"):
                flops_per_token(model_cfg, n_loops=bad)
        with pytest.raises(ValueError, match="context_len must be a non-negative integer"):
            flops_per_token(model_cfg, context_len=-100)


def test_register_rejects_a_clash_and_old_import_paths_still_work():
    import open_mythos.baseline as baseline
    import open_mythos.registry as registry

    with pytest.raises(ValueError, match="clashes"):
        register(ModelKind("other", BaselineConfig, DenseBaseline, False, flops_per_token))
    assert list(KINDS) == KIND_NAMES
    for name in ("build_model", "config_from_dict", "flops_per_token", "is_looped"):
        assert getattr(baseline, name) is getattr(registry, name)
    with pytest.raises(AttributeError):
        baseline.no_such_name  # noqa: B018


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@dataclasses.dataclass
class _SameFieldsConfig(MythosConfig):
    """A user kind that adds no configuration field."""


class _SameFieldsModel(OpenMythos):
    pass


@dataclasses.dataclass
class _BiasConfig(MythosConfig):
    """A user kind whose added field has a value by default."""

    logit_bias: float = 0.5


class _BiasModel(OpenMythos):
    def __init__(self, cfg: _BiasConfig):
        super().__init__(cfg)
        self.extra = torch.nn.Parameter(torch.full((cfg.dim,), cfg.logit_bias))


@pytest.fixture
def user_kinds(monkeypatch):
    """Two kinds registered for the test alone."""
    import open_mythos.registry as registry

    with contextlib.suppress(ImportError):  # before the kinds: it read the fields at import
        import open_mythos.integrations.hf  # noqa: F401
    monkeypatch.setattr(registry, "KINDS", dict(KINDS))
    same = register(ModelKind("same_fields", _SameFieldsConfig, _SameFieldsModel, True,
                              LOOPED.flops_per_token))
    bias = register(ModelKind("bias", _BiasConfig, _BiasModel, True, LOOPED.flops_per_token))
    return registry, same, bias


def test_a_kind_defined_again_replaces_itself(user_kinds):
    """A notebook cell that defines and registers a kind, run twice: the second definition
    replaces the first (it was a clash); another kind of that name still clashes."""
    registry, same, _ = user_kinds
    config_class = dataclasses.make_dataclass(
        "_SameFieldsConfig", [], bases=(MythosConfig,), namespace={"__module__": __name__})
    model_class = type("_SameFieldsModel", (OpenMythos,), {"__module__": __name__})
    again = register(ModelKind("same_fields", config_class, model_class, True,
                               LOOPED.flops_per_token))
    assert registry.KINDS["same_fields"] is again and again is not same
    with pytest.raises(ValueError, match="clashes"):
        register(ModelKind("same_fields", _BiasConfig, _SameFieldsModel, True,
                           LOOPED.flops_per_token))


def test_saved_files_name_their_kind(user_kinds, tmp_path, monkeypatch):
    """A kind is recorded by name where a configuration is saved: a kind with no field of
    its own reloaded as the plain model; one whose field has a default took over every
    plain model loaded through transformers; in a process without the kind, its files
    loaded as the base model, silently."""
    pytest.importorskip("transformers")
    from open_mythos.checkpoints import load_model
    from open_mythos.config import KIND_KEY
    from open_mythos.integrations.hf import OpenMythosForCausalLM, OpenMythosHFConfig
    from open_mythos.registry import config_dict
    from open_mythos.training import Trainer
    from tests.training.conftest import tiny_config as tiny_train_config

    registry, same, bias = user_kinds
    cfg = _SameFieldsConfig(**tiny_config("gqa").to_dict())
    assert config_dict(cfg)[KIND_KEY] == "same_fields"
    assert type(config_from_dict(config_dict(cfg))) is _SameFieldsConfig
    assert type(config_from_dict(cfg.to_dict())) is MythosConfig  # no name: by the fields
    assert config_fields()["logit_bias"] is None  # a default would name the kind
    # Hugging Face directories, written and read in a process that has the kinds.
    for model in (_SameFieldsModel(cfg), _BiasModel(_BiasConfig(**tiny_config("gqa").to_dict())),
                  OpenMythos(tiny_config("gqa"))):
        out = tmp_path / type(model).__name__
        OpenMythosForCausalLM.from_mythos(model).save_pretrained(out)
        assert type(load_model(out).model) is type(model)
        assert type(OpenMythosForCausalLM.from_pretrained(out).model) is type(model)
    # The Trainer builds a kind by name (model.kind) and its checkpoint records it.
    run = tmp_path / "run"
    trainer = Trainer(tiny_train_config(run, run__steps=1, model__kind="same_fields"))
    trainer.train()
    assert type(trainer.core) is _SameFieldsModel and type(load_model(run).model) is _SameFieldsModel
    # The run's own config.toml names the kind (its fields do not), so a plain --resume
    # builds it again (it built the plain model: "the model configuration changed ()").
    from open_mythos.cli import main

    assert 'kind = "same_fields"' in (run / "config.toml").read_text()
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--no-progress"]) == 0
    assert type(load_model(run).model) is _SameFieldsModel
    # An empty kind clears it (--set model.kind=): the fields tell the kind.
    cleared = Trainer(tiny_train_config(tmp_path / "cleared", run__steps=1, model__kind=""))
    cleared.train()
    assert type(cleared.core) is OpenMythos
    assert "kind" not in (tmp_path / "cleared" / "config.toml").read_text()
    # Where the kind is not registered: an error that says how, not another model.
    monkeypatch.setattr(registry, "KINDS", {"looped": LOOPED, "dense": DENSE})
    for path in (tmp_path / "_SameFieldsModel", tmp_path / "_BiasModel", run):
        with pytest.raises(ValueError, match=r"model kind '\w+', which is not registered.*--import"):
            load_model(path)
    with pytest.raises(ValueError, match="'bias', which is not registered"):
        OpenMythosForCausalLM.from_pretrained(tmp_path / "_BiasModel")
    assert type(load_model(tmp_path / "OpenMythos").model) is OpenMythos
    assert OpenMythosHFConfig().to_mythos_config() == MythosConfig()  # no kind named: looped
