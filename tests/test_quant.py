"""moe.quant: code books and block layout against bitsandbytes and the QLoRA paper, qwix's
integer formats, each format's error bound, and the model computing with quantized weights
(exact against dequantizing first, close to float32, greedy tokens of a trained model kept)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import moe.model as model_lib
from moe.model import codes as codes_lib
from moe.model.qarray import QuantError, quantize
from moe.quant.params import dequantize_params, quantize_params

from helpers import IN_CI, tiny_model

if not IN_CI:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the test extra) is the reference for NF4")
import bitsandbytes.functional as bnbf  # noqa: E402
import torch  # noqa: E402

# Appendix E of Dettmers et al. 2023 (QLoRA): the NF4 data type's 16 values
QLORA_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
FORMAT_MODEL = dict(d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, head_dim=16)  # input dims divisible by 64


def _tensor(shape, heavy=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(2, size=shape) if heavy else rng.standard_normal(shape)
    return (x * 0.05).astype(np.float32)


def test_nf4_code_book_is_the_qlora_papers_and_bitsandbytes():
    np.testing.assert_array_equal(codes_lib.nf4_code(), np.asarray(QLORA_NF4, np.float32))
    np.testing.assert_array_equal(codes_lib.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu").numpy())


def test_dynamic_8bit_code_is_bitsandbytes():
    np.testing.assert_array_equal(codes_lib.dynamic_code(), bnbf.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("shape", [(64, 256), (7, 33), (96, 640)])
def test_nf4_codes_scales_and_values_are_bitsandbytes(shape):
    x = _tensor(shape, heavy=True)
    packed, state = bnbf.quantize_4bit(torch.tensor(x), blocksize=64, quant_type="nf4")
    q = quantize(x, "nf4")
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))  # layout and nibble order
    np.testing.assert_array_equal(np.asarray(q.scale), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), bnbf.dequantize_4bit(packed, state).numpy())


@pytest.mark.parametrize("shape", [(128, 512), (7, 33)])
def test_double_quantization_is_bitsandbytes(shape):
    x = _tensor(shape, heavy=True, seed=1)
    packed, state = bnbf.quantize_4bit(torch.tensor(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize(x, "nf4", double_quant=True)
    assert q.fmt == "nf4-dq"
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    # the offset is a float32 mean summed in another order than torch's: within an ulp, and
    # the second-level scales (absmax of the scales minus it) with it
    np.testing.assert_allclose(float(q.offset), state.offset.item(), rtol=2**-23)
    np.testing.assert_allclose(np.asarray(q.scale2), state.state2.absmax.numpy(), rtol=2**-22)
    # the 8-bit scale codes: ours is always the nearest code value; bitsandbytes' CPU kernel
    # (an approximate binary search) picks a neighbour for a fraction of a percent
    ours, theirs = np.asarray(q.scale), state.absmax.numpy()
    code, centered = codes_lib.dynamic_code(), np.asarray(quantize(x, "nf4").scale) - float(q.offset)
    scaled = centered / np.repeat(np.asarray(q.scale2), 256)[: centered.size]
    assert np.all(np.abs(scaled - code[ours]) <= np.abs(scaled - code[theirs]) + 1e-7)
    assert np.mean(ours != theirs) < 0.01
    # bitsandbytes' own stored fields read back through our decoder: its values, bit for bit
    theirs_q = q.replace(
        scale=jnp.asarray(theirs),
        scale2=jnp.asarray(state.state2.absmax.numpy()),
        offset=jnp.asarray(state.offset.numpy()),
    )
    np.testing.assert_array_equal(
        np.asarray(theirs_q.dequantize(jnp.float32)), bnbf.dequantize_4bit(packed, state).numpy()
    )


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_integer_formats_are_qwix(fmt):
    import qwix

    x = _tensor((32, 256))
    ref = qwix.quantize(
        jnp.asarray(x),
        jnp.int8 if fmt == "int8" else jnp.int4,
        channelwise_axes=[0],
        tiled_axes=None if fmt == "int8" else {1: 64},
    )
    np.testing.assert_array_equal(np.asarray(quantize(x, fmt).dequantize()), np.asarray(qwix.dequantize(ref)))


def _bound(fmt, blocks):
    """Each format's worst rounding error for the absmax of an element's block (or row)."""
    half_gap = {"int8": 1 / 255, "int4": 1 / 15, "nf4": np.max(np.diff(QLORA_NF4)) / 2}
    return blocks * half_gap["nf4" if fmt == "nf4-dq" else fmt]


@pytest.mark.parametrize("heavy", [False, True])
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "nf4-dq"])
def test_round_trip_within_the_formats_bound(fmt, heavy):
    x = _tensor((48, 512), heavy=heavy, seed=2)
    q = quantize(x, fmt)
    err = np.abs(np.asarray(q.dequantize(jnp.float32)) - x)
    if fmt == "int8":
        absmax = np.repeat(np.abs(x).max(axis=1, keepdims=True), 512, axis=1)
    else:  # blocks of 64 along the row
        absmax = np.repeat(np.abs(x).reshape(-1, 64).max(axis=1), 64).reshape(x.shape)
    slack = 0.0
    if fmt == "nf4-dq":  # the block absmax itself comes back within the 8-bit code's bound
        from moe.model.qarray import block_absmax

        slack = np.repeat(np.abs(np.asarray(block_absmax(q)) - absmax.reshape(-1, 64)[:, 0]), 64).reshape(x.shape)
    assert np.all(err <= _bound(fmt, absmax) * (1 + 1e-4) + slack + 1e-8)
    assert err.mean() < 0.6 * _bound(fmt, absmax).mean()  # uniform rounding averages half the worst case


def test_double_quantized_scales_within_the_8bit_bound():
    from moe.model.qarray import SCALE_BLOCK, block_absmax

    x = _tensor((64, 1024), heavy=True, seed=3)
    true = np.asarray(quantize(x, "nf4").scale)
    q = quantize(x, "nf4-dq")
    half_gap = np.max(np.diff(codes_lib.dynamic_code())) / 2  # the code's widest step, near +-1
    second = np.repeat(np.asarray(q.scale2), SCALE_BLOCK)[: true.size]
    assert np.all(np.abs(np.asarray(block_absmax(q)) - true) <= second * half_gap * (1 + 1e-5))
    assert q.nbytes * 8 / x.size == pytest.approx(4.127, abs=0.002)


def test_weights_quantize_in_torch_orientation_blocks_along_the_input():
    w = _tensor((128, 3, 64))  # [in, heads, head_dim]: a q projection, one input dim
    q = quantize(w, "nf4", n_in=1)
    torch_layout = w.reshape(128, 192).T  # [out, in], as a torch Linear stores it
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(quantize(torch_layout, "nf4").codes))
    assert q.shape == w.shape and q.dequantize().shape == w.shape
    with pytest.raises(QuantError, match="unknown quantization format 'nf5'"):
        quantize(w, "nf5")
    with pytest.raises(QuantError, match="divisible by 64"):
        quantize(_tensor((48, 8)), "int4", n_in=1)


@pytest.fixture(scope="module")
def trained():
    """A tiny Mixtral trained to continue arithmetic sequences (next = previous + 7), so its
    greedy tokens are decided by learned margins, not by the noise of a random init."""
    cfg = tiny_model(**FORMAT_MODEL)
    seq = jnp.asarray((np.arange(40)[None] * 7 + np.arange(8)[:, None] * 3) % cfg.vocab_size, jnp.int32)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        def loss(p):
            logits = model_lib.apply(cfg, p, seq[:, :-1])[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:]).mean()

        updates, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    params = model_lib.init(cfg, jax.random.key(1))
    state = opt.init(params)
    for _ in range(150):
        params, state = step(params, state)
    return cfg, params, np.asarray(seq)


@pytest.mark.parametrize("dispatch", ["grouped", "gather", "dense"])
def test_dequantizing_inside_the_dispatch_equals_dequantizing_first(trained, dispatch):
    cfg, params, seq = trained
    cfg = dataclasses.replace(cfg, moe_dispatch=dispatch)
    tokens = jnp.asarray(seq[:2, :12])
    for fmt in ("int4", "nf4-dq"):
        quantized = quantize_params(params, fmt)
        inside = jax.jit(lambda p: model_lib.apply(cfg, p, tokens)[0])(quantized)
        first = jax.jit(lambda p: model_lib.apply(cfg, dequantize_params(p), tokens)[0])(quantized)
        np.testing.assert_array_equal(np.asarray(inside), np.asarray(first))


@pytest.mark.parametrize("fmt,bound", [("int8", 0.03), ("int4", 0.25), ("nf4", 0.25), ("nf4-dq", 0.25)])
def test_quantized_logits_within_a_stated_bound_of_float32(trained, fmt, bound):
    cfg, params, seq = trained
    tokens = jnp.asarray(seq[:, :24])
    ref = np.asarray(model_lib.logits(cfg, params, tokens))
    out = np.asarray(model_lib.logits(cfg, quantize_params(params, fmt), tokens))
    # mean logit error / mean logit size; measured 0.014 (int8), 0.13 to 0.14 (4 bits): bounds about 2x that
    assert np.abs(out - ref).mean() / np.abs(ref).mean() < bound


def test_greedy_tokens_of_a_trained_model_survive_quantization(trained):
    from moe.infer import generate

    cfg, params, seq = trained
    prompts = [list(seq[1, :3]), list(seq[5, :4])]
    expected = [list(seq[1, 3:11]), list(seq[5, 4:12])]
    assert generate(cfg, params, prompts, 8) == expected  # the float32 model learned the sequences
    for fmt in ("int8", "int4", "nf4", "nf4-dq"):
        assert generate(cfg, quantize_params(params, fmt), prompts, 8) == expected, fmt
