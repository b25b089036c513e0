"""Checkpoint and conversion error paths: incomplete streamed writes, shape mismatches,
dtype and size options, and rotation by checkpoint.keep."""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe.checkpoint.params import ParamReader, ParamWriter
from moe.checkpoint.runs import RunCheckpoints
from moe.convert import ConversionError, convert_from_hf, convert_to_hf
from moe.convert.hf import parse_size

from helpers import ROOT


def test_param_writer_refuses_to_close_with_a_slice_missing(tmp_path):
    shapes = {"w": jax.ShapeDtypeStruct((2, 3, 4), np.float32)}
    writer = ParamWriter(tmp_path / "p", shapes)
    writer.write(("w",), (0,), np.ones((3, 4)))
    with pytest.raises(ValueError, match="expected shape \\(3, 4\\), got \\(4, 3\\)"):
        writer.write(("w",), (1,), np.ones((4, 3)))
    with pytest.raises(ValueError, match="w: 1 of 2 slices were written"):
        writer.close()
    writer.write(("w",), (1,), np.full((3, 4), 2.0))
    writer.close()
    np.testing.assert_array_equal(ParamReader(tmp_path / "p").read(("w",), (1,)), np.full((3, 4), 2.0))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("5GB", 5 * 10**9),
        ("200MB", 200 * 10**6),
        ("1.5GiB", 3 * 2**29),
        ("40KB", 40_000),
        ("12345", 12345),
        (" 2 kib ", 2048),
    ],
)
def test_shard_sizes_read_their_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5XB", "GB", "", "-3"])
def test_unreadable_shard_sizes_are_refused(text):
    with pytest.raises(ConversionError, match="cannot read the size"):
        parse_size(text)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
    )
    path = tmp_path_factory.mktemp("hf") / "model"
    MixtralForCausalLM(config).save_pretrained(path)
    return path


def test_from_hf_dtype_sets_the_stored_dtype_and_to_hf_refuses_a_mismatched_config(tmp_path, hf_dir):
    result = subprocess.run(
        [sys.executable, "-m", "moe", "convert", "from-hf", str(hf_dir), str(tmp_path / "c"), "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    reader = ParamReader(tmp_path / "c" / "params")
    assert reader.dtype(("layers", "moe", "w1")) == jax.numpy.bfloat16
    config = tmp_path / "c" / "config.yaml"
    config.write_text(config.read_text().replace("d_ff: 24", "d_ff: 32"))
    with pytest.raises(
        ConversionError,
        match="checkpoint array layers.moe.w1 has shape \\(1, 2, 16, 24\\), but .*'s config implies \\(1, 2, 16, 32\\)",
    ):
        convert_to_hf(tmp_path / "c", tmp_path / "out")


def test_a_bias_in_the_mlp_is_refused(tmp_path, hf_dir):
    import json
    import shutil

    shutil.copytree(hf_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    with pytest.raises(ConversionError, match="mlp_bias=True .*biases in the MLP"):
        convert_from_hf(tmp_path / "m", tmp_path / "c")


def test_run_checkpoints_keep_only_the_newest(tmp_path):
    checkpoints = RunCheckpoints(tmp_path / "ckpt", keep=2, async_save=True)
    params, opt_state = {"w": np.zeros(3, np.float32)}, {"m": np.zeros(3, np.float32)}
    for step in (1, 2, 3, 4):
        checkpoints.save(step, {"w": np.full(3, step, np.float32)}, opt_state, {"pos": step}, {"step": step})
    checkpoints.wait()
    assert checkpoints.steps() == [3, 4]
    restored = checkpoints.restore_latest(params, opt_state)
    assert restored[0] == 4 and restored[3] == {"pos": 4}
    np.testing.assert_array_equal(restored[1]["w"], np.full(3, 4.0))
    checkpoints.close()


def test_a_params_checkpoint_restores_as_numpy_without_a_topology_warning(tmp_path):
    """Read back without a target, as inference and conversion read a run's params: numpy
    arrays in their stored dtype, and no Orbax warning about the saving run's topology."""
    import warnings

    import jax.numpy as jnp

    from moe.checkpoint.params import restore_params, save_params

    save_params(tmp_path / "p", {"a": jnp.ones((4, 3)), "b": {"c": jnp.zeros(2, jnp.bfloat16)}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = restore_params(tmp_path / "p")
    assert [str(w.message) for w in caught if "topology" in str(w.message)] == []
    assert isinstance(restored["a"], np.ndarray) and restored["b"]["c"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["a"], np.ones((4, 3)))
