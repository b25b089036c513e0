import pytest

from moe import config as C

from helpers import CONFIGS, ROOT


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = C.load(path)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(C.dump(cfg))
    assert C.load(dumped) == cfg


def test_expected_presets_exist():
    names = {p.stem for p in CONFIGS}
    assert {"mistral-7b", "mixtral-8x7b", "mixtral-8x22b", "tiny-dense", "tiny-moe", "bench-moe"} <= names


def test_overrides_are_typed_and_applied():
    cfg = C.load(
        ROOT / "configs/tiny-moe.yaml",
        ["model.n_experts=4", "model.rope_theta=1e6", "model.sliding_window=null", "seed=3"],
    )
    assert cfg.model.n_experts == 4 and cfg.model.rope_theta == 1e6 and cfg.seed == 3
    assert cfg.model.sliding_window is None and isinstance(cfg.model.rope_theta, float)


def test_base_chain_merges_sections(tmp_path):
    (tmp_path / "run.yaml").write_text(f"base: {ROOT / 'configs/tiny-moe.yaml'}\nmodel:\n  n_layers: 2\n")
    (tmp_path / "run2.yaml").write_text("base: run.yaml\nseed: 5\n")
    cfg = C.load(tmp_path / "run2.yaml")
    assert cfg.model.n_layers == 2 and cfg.model.n_experts == 8 and cfg.seed == 5


def test_base_loop_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(C.ConfigError, match="loops back"):
        C.load(tmp_path / "a.yaml")


TINY = str(ROOT / "configs/tiny-moe.yaml")

INVALID = [
    (
        ["model.n_heads=6", "model.n_kv_heads=4", "model.head_dim=32"],
        r"n_heads \(6\) must be divisible by model.n_kv_heads \(4\)",
    ),
    (["model.top_k=9"], r"top_k \(9\) must be between 1 and model.n_experts \(8\)"),
    (["model.top_k=0"], r"top_k \(0\) must be between 1"),
    (
        ["model.n_heads=3", "model.n_kv_heads=1"],
        r"d_model \(128\) is not divisible by model.n_heads \(3\); set model.head_dim",
    ),
    (["model.head_dim=7"], r"head_dim must be a positive even number"),
    (["model.sliding_window=0"], r"sliding_window must be >= 1"),
    (["model.n_expert=4"], r"unknown config key 'model.n_expert'; did you mean 'n_experts'\?"),
    (["modle.d_model=4"], r"unknown config key 'modle'; did you mean 'model'\?"),
    (["model.d_model=big"], r"model.d_model must be int, got 'big'"),
    (["model.d_model=1.5"], r"model.d_model must be int, got 1.5"),
    (["model.dtype=fp8"], r"model.dtype must be one of \['float32', 'bfloat16', 'float16'\]"),
    (["model.n_layers=0"], r"model.n_layers must be >= 1"),
    (["model.n_experts=1"], r"n_experts=1 is a dense model"),
    (["model.n_experts=-2"], r"n_experts must be >= 0"),
    (["model.rope_theta=0"], r"rope_theta must be > 0"),
    (["model=3"], r"model must be a mapping of fields"),
    (["model.d_model"], r"must look like section.key=value"),
    (["train.batch_size=6", "train.grad_accum=4"], r"batch_size \(6\) must be divisible by train.grad_accum \(4\)"),
    (["train.seq_len=40000"], r"seq_len \(40000\) exceeds model.max_seq_len \(256\)"),
    (["train.lr=0"], r"train.lr must be > 0"),
    (["train.warmup_steps=-1"], r"train.warmup_steps >= 0"),
    (["train.min_lr_ratio=1.5"], r"train.min_lr_ratio in \[0, 1\]"),
    (["train.steps=0"], r"train.steps must be >= 1"),
    (["train.grad_accum=0"], r"train.grad_accum must be >= 1"),
    (["train.clip_norm=-1"], r"train.clip_norm must be >= 0"),
    (["train.aux_loss_coef=-0.1"], r"train.aux_loss_coef must be >= 0"),
    (["data.val_fraction=0"], r"data.val_fraction must be in \(0, 1\), got 0.0"),
    (["data.val_fraction=1"], r"data.val_fraction must be in \(0, 1\)"),
    (["data.workers=-1"], r"data.workers must be >= 0"),
    (["data.shuffle_window=-5"], r"data.shuffle_window must be >= 0"),
    (["data.format=csv"], r"data.format must be one of \['auto', 'text', 'jsonl', 'chat', 'preference'\]"),
    (["checkpoint.keep=0"], r"checkpoint.every_steps and checkpoint.keep must be >= 1"),
    (["checkpoint.every_steps=0"], r"checkpoint.every_steps and checkpoint.keep must be >= 1"),
    (["mesh.rules=fancy"], r"mesh.rules must be one of \['default', 'replicated'\]"),
    (["mesh.data=two"], r"mesh.data must be int"),
]


@pytest.mark.parametrize("overrides,message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_configs_raise_their_message(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(TINY, overrides)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load(tmp_path / "nope.yaml")


def test_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n   n_layers: [2\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml:3:\d+: YAML syntax error"):
        C.load(bad)
