import dataclasses
import json
import math

import pytest
import torch

from open_mythos import AttnType, MythosConfig
from tests.conftest import tiny_config

UPSTREAM_DEFAULTS = dict(
    vocab_size=32000, dim=2048, n_heads=16, n_kv_heads=4, max_seq_len=4096, max_loop_iters=16,
    prelude_layers=2, coda_layers=2, attn_type="mla", kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_experts=64,
    n_shared_experts=2, n_experts_per_tok=4, expert_dim=512, act_threshold=0.99,
    rope_theta=500000.0, lora_rank=16, max_output_tokens=4096, dropout=0.0,
)


def test_upstream_fields_and_defaults():
    cfg = MythosConfig()
    for name, value in UPSTREAM_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    assert cfg.attn_type == "mla" == AttnType.MLA and type(cfg.attn_type) is str
    assert MythosConfig(attn_type=AttnType.GQA).attn_type == "gqa"


def test_numpy_integers_become_ints():
    np = pytest.importorskip("numpy")
    cfg = tiny_config(dim=np.int64(64), max_loop_iters=np.int32(3), dense_ffn_dim=np.int64(8))
    assert all(type(getattr(cfg, k)) is int for k in ("dim", "max_loop_iters", "dense_ffn_dim"))
    assert cfg == tiny_config(max_loop_iters=3, dense_ffn_dim=8)
    with pytest.raises(ValueError, match="dim"):
        tiny_config(dim=np.float64(64.0))


def test_numpy_floats_and_bools_become_pythons(tmp_path):
    """np.float32 fields were refused with a message the value met ("dropout=0.0 ... must
    be a number in [0, 1)"), np.bool_ ones as not booleans, and np.float64 ones kept as
    NumPy values, which a weights-only load of the config's dict refuses."""
    np = pytest.importorskip("numpy")
    cfg = tiny_config(dropout=np.float32(0.0), init_std=np.float64(0.02),
                      act_threshold=np.float32(0.5), use_act=np.bool_(False),
                      rope_theta=np.int64(10000))
    assert cfg == tiny_config(dropout=0.0, init_std=0.02, act_threshold=0.5, use_act=False,
                              rope_theta=10000.0)
    assert type(cfg.dropout) is float and type(cfg.use_act) is bool
    torch.save(dataclasses.asdict(cfg), tmp_path / "cfg.pt")
    assert torch.load(tmp_path / "cfg.pt", weights_only=True)["init_std"] == 0.02


def test_config_dict_saves_like_upstreams(tmp_path):
    """A plain-str attn_type: asdict() round-trips through torch.save and a weights-only
    load (the default of torch.load), as upstream's config did."""
    cfg = MythosConfig(attn_type="GQA")
    torch.save({"cfg": dataclasses.asdict(cfg)}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt")["cfg"]
    assert MythosConfig(**loaded) == cfg and loaded["attn_type"] == "gqa"
    assert "attn_type='gqa'" in repr(cfg)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(attn_type="flash"), "attn_type"),
        (dict(dim=65), "dim"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(dim=72, n_heads=8), "dim"),  # head dim 9 is odd
        (dict(n_experts_per_tok=5), "n_experts_per_tok"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(max_loop_iters=-1), "max_loop_iters"),
        (dict(expert_dim=0), "expert_dim"),
        (dict(act_threshold=0.0), "act_threshold"),
        (dict(act_threshold=math.nan), "act_threshold"),
        (dict(act_threshold=True), "act_threshold"),  # once read as 1
        (dict(dropout=1.0), "dropout"),
        (dict(prelude_layers=-1), "prelude_layers"),
        (dict(attn_type="mla", qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(attn_type="mla", kv_lora_rank=0), "kv_lora_rank"),
        (dict(dim=True), "dim"),
        (dict(init_std=0.0), "init_std"),
        (dict(embed_init_std=-1.0), "embed_init_std"),
        (dict(init_logit_std=0.0), "init_logit_std"),
        (dict(init_logit_std=math.nan), "init_logit_std"),
    ],
)
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"MythosConfig\.{field}="):
        tiny_config(**overrides)


def test_unreachable_threshold_is_valid():
    assert tiny_config(act_threshold=math.inf).act_threshold == math.inf
    assert tiny_config(act_threshold=1.5).act_threshold == 1.5


def test_dict_round_trip():
    cfg = tiny_config("mla")
    assert MythosConfig.from_dict(cfg.to_dict()) == cfg
    # An unreachable threshold survives strict JSON (json.dumps would write Infinity).
    inf = tiny_config(act_threshold=math.inf)
    text = json.dumps(inf.to_dict(), allow_nan=False)
    assert MythosConfig.from_dict(json.loads(text)) == inf
    with pytest.raises(ValueError, match="unknown MythosConfig field"):
        MythosConfig.from_dict({**cfg.to_dict(), "n_layers": 3})


@pytest.mark.parametrize("field, value", [("n_kv_heads", 3), ("n_experts_per_tok", 99),
                                          ("dim", 30), ("attn_type", "bogus")])
def test_a_config_edited_in_place_is_checked_when_a_model_is_built(field, value):
    """Upstream's own scripts edit configs by assignment (``cfg.attn_type = "gqa"``): a bad
    value is a ValueError naming the field at construction, not a shape error at the
    first forward."""
    from open_mythos import OpenMythos
    from open_mythos.baseline import DenseBaseline, matched_baseline_config

    cfg = tiny_config("gqa")
    base_cfg = matched_baseline_config(cfg, 2)
    for c in (cfg, base_cfg):
        setattr(c, field, value)
    with pytest.raises(ValueError, match=rf"\.{field}="):
        OpenMythos(cfg)
    with pytest.raises(ValueError, match=rf"\.{field}="):
        DenseBaseline(base_cfg)
    cfg = tiny_config("gqa")
    cfg.attn_type = "MLA"  # a valid edit is normalised as at construction
    assert OpenMythos(cfg).cfg.attn_type == "mla"


def test_a_model_needs_a_config():
    from open_mythos import OpenMythos

    with pytest.raises(TypeError, match="needs a MythosConfig, got dict"):
        OpenMythos(dataclasses.asdict(tiny_config()))
