"""The network against transformers' Qwen2 model, the KV cache, and the long-context formulas."""

import math
import sys

import pytest
import torch
import transformers
from conftest import to_transformers

from qwenkit import PRESETS, Qwen, QwenConfig
from qwenkit.model import (
    HUGE_PAGE_BYTES,
    FusedLinear,
    KVCache,
    attention_mask_from_positions,
    cpu_decode_layout,
    huge_page_empty,
    logn_scale,
    ntk_alpha,
    rotary_cos_sin,
    rotary_inv_freq,
)

VOCAB = 1000


def tiny_config(**overrides) -> QwenConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_theta=10000.0,
    )
    return QwenConfig(**{**values, **overrides})


def build_pair(**overrides) -> tuple[Qwen, transformers.Qwen2ForCausalLM]:
    """A random qwenkit model and transformers' Qwen2 model holding the very same weights."""
    config = tiny_config(**overrides)
    model = Qwen(config)
    model.init_weights(seed=0)
    with torch.no_grad():  # non-zero biases and norms, so their wiring is checked too
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model.eval(), to_transformers(model)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers(kv_heads, tied):
    model, hf = build_pair(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == (2, 23, VOCAB)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_left_padded_batch_matches_transformers_and_unpadded_rows():
    model, hf = build_pair(num_key_value_heads=2)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask).logits
        alone = model(ids[1:, 6:])
    real = mask.bool()
    assert not ours.isnan().any()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1, 6:], alone[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("switches", [{}, {"use_dynamic_ntk": True, "use_logn_attn": True}])
def test_incremental_decoding_equals_full_forward(switches):
    model, _ = build_pair(num_key_value_heads=2, **switches)
    ids = torch.randint(0, VOCAB, (1, 90), generator=torch.Generator().manual_seed(3))  # crosses S=64
    with torch.no_grad():
        # the original fixes the NTK factor at prefill; the full pass below uses the prefill length too
        full = model(ids[:, :40])
        cache = KVCache(model.config, 1, 50, model.device, model.dtype)
        steps = [model(ids[:, :30], cache=cache)]  # prefill
        steps += [model(ids[:, i : i + 1], cache=cache) for i in range(30, 37)]  # one token at a time
        steps.append(model(ids[:, 37:40], cache=cache))  # a chunk after a prefix
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_incremental_decoding_with_padding_and_windows():
    model, _ = build_pair(use_window_attn=True, window_sizes=[8, 16, 32])
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache(model.config, 2, 48, model.device, model.dtype)
        steps = [model(ids[:, :20], attention_mask=mask[:, :20], cache=cache)]
        steps += [model(ids[:, i : i + 1], cache=cache) for i in range(20, 48)]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {
            "use_dynamic_ntk": True,
            "use_logn_attn": True,
            "use_window_attn": True,
            "window_sizes": [8, 16, 80],
        },
    ],
)
def test_static_decode_step_equals_full_forward(switches):
    """decode_step (fixed shapes for CUDA graphs) after a padded prefill matches the plain forward."""
    model, _ = build_pair(num_key_value_heads=2, **switches)
    ids = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # rows of 70 and 50 real tokens at prefill: NTK alpha 3 and 1 (S = 64), kept after
    with torch.no_grad():
        full = model(ids[:, :76], attention_mask=mask[:, :76])
        prefilled = KVCache(model.config, 2, 70, model.device, model.dtype)
        model(ids[:, :70], attention_mask=mask[:, :70], cache=prefilled)
        cache = KVCache(model.config, 2, 76, model.device, model.dtype)
        cache.insert([0, 1], prefilled)
        steps = [model.decode_step(ids[:, i : i + 1], cache) for i in range(70, 76)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 70:], atol=1e-4, rtol=0)


def test_kv_cache_resize_keeps_what_rows_hold_and_counts_its_bytes():
    """A cache reshaped between decoding steps (more rows and slots, then fewer slots) decodes on as
    if it had been that shape from the start; `nbytes` is what `size_in_bytes` predicts."""
    model, _ = build_pair(num_key_value_heads=2, use_dynamic_ntk=True)
    ids = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(ids[:, :76])
        prefilled = KVCache(model.config, 2, 70, model.device, model.dtype)
        model(ids[:, :70], cache=prefilled)
        cache = KVCache(model.config, 2, 72, model.device, model.dtype)
        cache.insert([0, 1], prefilled)
        steps = [model.decode_step(ids[:, i : i + 1], cache) for i in range(70, 72)]
        cache.resize(3, 90)  # a third row joins; room for more slots
        assert cache.nbytes == KVCache.size_in_bytes(model.config, 3, 90, model.dtype)
        view = cache.first_rows(2)
        steps += [model.decode_step(ids[:, i : i + 1], view, width=i + 1) for i in range(72, 74)]
        cache.resize(2, 76)  # the rows' slots stay; the unused row and slots go
        steps += [model.decode_step(ids[:, i : i + 1], cache) for i in range(74, 76)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 70:], atol=1e-4, rtol=0)
    assert cache.nbytes == KVCache.size_in_bytes(model.config, 2, 76, model.dtype) > 0
    cache.resize(0, 0)
    assert cache.nbytes == 0


def test_ntk_alpha_at_and_around_power_of_two_boundaries():
    s = 2048
    for length, alpha in [(1, 1), (s - 1, 1), (s, 1), (s + 1, 3), (2 * s, 3), (2 * s + 1, 7), (4 * s, 7)]:
        assert ntk_alpha(length, s) == alpha, length
    assert ntk_alpha(4 * s + 1, s) == 15
    for length in range(1, 20 * s, 97):  # the formula as written in the report's code
        expected = max(2 ** math.ceil(math.log(length / s, 2) + 1) - 1, 1)
        assert ntk_alpha(length, s) == expected


def test_dynamic_ntk_rotary_base_and_activation():
    dim, base = 128, 10000.0
    positions = torch.arange(5)[None]
    cos, sin = rotary_cos_sin(positions, rotary_inv_freq(dim, base, [3]))
    scaled_base = base * 3 ** (dim / (dim - 2))
    inv_freq = 1.0 / (scaled_base ** (torch.arange(0, dim, 2).float() / dim))
    angles = positions[0, :, None].float() * inv_freq[None]
    torch.testing.assert_close(cos[0], torch.cat([angles, angles], -1).cos())
    torch.testing.assert_close(sin[0], torch.cat([angles, angles], -1).sin())

    # Within the training length the switch changes nothing; beyond it, it changes the logits.
    model, _ = build_pair()
    ntk, _ = build_pair(use_dynamic_ntk=True)
    short = torch.randint(0, VOCAB, (1, 64))
    long = torch.randint(0, VOCAB, (1, 65))
    with torch.no_grad():
        torch.testing.assert_close(model(short), ntk(short))
        assert (model(long) - ntk(long)).abs().max() > 1e-3
        ntk.train()  # never during training
        torch.testing.assert_close(model.train()(long), ntk(long))


def test_batch_rows_get_their_own_ntk_alpha():
    model, _ = build_pair(use_dynamic_ntk=True)
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :50] = 0  # row 1 is 50 tokens long: alpha 1; row 0 is 100: alpha 3
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        torch.testing.assert_close(batch[0], model(ids[:1])[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batch[1, 50:], model(ids[1:, 50:])[0], atol=1e-4, rtol=0)


def test_logn_factors():
    s = 2048
    factors = logn_scale(torch.arange(4 * s), s)
    assert factors[:s].eq(1).all()  # 1-based positions 1..S
    assert factors[s].item() == pytest.approx(math.log(s + 1) / math.log(s), abs=1e-12)
    assert factors[2 * s - 1].item() == pytest.approx(math.log(2 * s) / math.log(s), abs=1e-12)
    assert factors[4 * s - 1].item() == pytest.approx(math.log(4 * s, s), abs=1e-12)


def test_logn_scales_queries_only_beyond_training_length():
    plain, _ = build_pair()
    logn, _ = build_pair(use_logn_attn=True)
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = plain(ids), logn(ids)
    torch.testing.assert_close(a[:, :64], b[:, :64])  # positions up to S are untouched
    assert (a[:, 64:] - b[:, 64:]).abs().max() > 1e-4


def test_window_mask():
    positions = torch.arange(6)[None]
    mask = attention_mask_from_positions(positions, positions, window=3)[0, 0]
    expected = torch.tensor(
        [[1 if 0 <= i - j < 3 else 0 for j in range(6)] for i in range(6)], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    # left padding: pad keys are never visible; a pad query sees only its own slot (no empty softmax)
    padded = torch.tensor([[-1, -1, 0, 1, 2]])
    mask = attention_mask_from_positions(padded, padded, window=None)[0, 0]
    assert mask[0].tolist() == [True, False, False, False, False]
    assert mask[4].tolist() == [False, False, True, True, True]
    # decoding: one query at position 9 over 10 cached keys, window 4
    keys = torch.arange(10)[None]
    mask = attention_mask_from_positions(torch.tensor([[9]]), keys, window=4)[0, 0, 0]
    assert mask.tolist() == [False] * 6 + [True] * 4


def test_window_attention_in_the_model():
    model, _ = build_pair(use_window_attn=True, window_sizes=[4, 8, 64])
    plain, _ = build_pair()
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = model(ids), plain(ids)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # no window cuts anything yet
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-4
    # changing a token outside every window of the last query's receptive field leaves it alone:
    # lowest layer window 4, then 8, then 64 -> the last query reaches back 3 + 7 + 29 tokens at most
    model.config.window_sizes = [2, 2, 2]
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, -1], model(changed)[:, -1])


def test_default_window_schedule():
    config = QwenConfig.from_preset("qwen-7b", max_position_embeddings=2048)
    sizes = config.default_window_sizes()
    assert sizes == [2048] * 4 + [4096] * 4 + [8192] * 24


@pytest.mark.parametrize(
    "name, billions",
    [
        ("qwen-1.8b", 1.84),
        ("qwen-7b", 7.72),
        ("qwen-14b", 14.17),
        ("qwen-72b", 72.29),
        ("qwen2.5-0.5b", 0.49),
        ("qwen2.5-1.5b", 1.54),
        ("qwen2.5-7b", 7.61),
    ],
)
def test_preset_parameter_counts(name, billions):
    config = QwenConfig.from_preset(name)
    assert round(config.num_parameters / 1e9, 2) == billions
    assert name in PRESETS


def test_parameter_count_formula_matches_a_built_model():
    for name in ("tiny", "tiny-gqa"):
        model = Qwen(QwenConfig.from_preset(name))
        assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters


def test_initialization_follows_the_original():
    model = Qwen(QwenConfig.from_preset("tiny", num_hidden_layers=8))
    model.init_weights(seed=0)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.model.layers[0].self_attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() == 0
    assert model.model.norm.weight.eq(1).all()


def test_bfloat16_forward_keeps_fp32_norm_and_rope():
    model, _ = build_pair()
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        full = model(ids)
        half = model.to(torch.bfloat16)(ids)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max()


def test_packed_sequences_equal_separate_ones():
    """segment_ids: positions restart per sequence and attention stays inside it (block-diagonal)."""
    model, _ = build_pair(num_key_value_heads=2)
    a = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(9))
    b = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(10))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        out = model(packed, segment_ids=segments)
        torch.testing.assert_close(out[:, :7], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 7:], model(b), atol=1e-5, rtol=0)


def decode_logits(model: Qwen, ids: torch.Tensor, prefill: int, fused: bool) -> torch.Tensor:
    """Logits [B, T - prefill, V] of decode_step over ids[:, prefill:], one token at a time."""
    model.fused_decode = fused
    with torch.inference_mode():
        prefilled = KVCache(model.config, ids.shape[0], prefill, model.device, model.dtype)
        model(ids[:, :prefill], cache=prefilled)
        cache = KVCache(model.config, ids.shape[0], ids.shape[1], model.device, model.dtype)
        cache.insert(list(range(ids.shape[0])), prefilled)
        steps = [model.decode_step(ids[:, i : i + 1], cache) for i in range(prefill, ids.shape[1])]
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("switches", [{}, {"use_logn_attn": True, "use_dynamic_ntk": True}])
def test_fused_decoding_matches_unfused_and_transformers(switches):
    """Decoding with q/k/v and gate/up fused gives the unfused logits (1e-5) and transformers'."""
    model, hf = build_pair(num_key_value_heads=2, **switches)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(11))
    unfused = decode_logits(model, ids, 20, fused=False)
    assert model._fused == []  # nothing fused unless asked
    fused = decode_logits(model, ids, 20, fused=True)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    parts = model._fused[0]
    assert isinstance(parts.qkv, FusedLinear) and isinstance(parts.gate_up, FusedLinear)
    if not switches:  # LogN/NTK are qwenkit's long-context switches; transformers' Qwen2 has neither
        with torch.no_grad():
            theirs = hf(ids).logits[:, 20:]
        torch.testing.assert_close(fused, theirs, atol=1e-4, rtol=0)
    # the layers' weights are views of the fused ones: nothing is held twice
    assert attn.k_proj.weight.untyped_storage().data_ptr() == parts.qkv.weight.untyped_storage().data_ptr()
    assert (
        mlp.up_proj.weight.untyped_storage().data_ptr() == parts.gate_up.weight.untyped_storage().data_ptr()
    )
    assert attn.v_proj.bias.untyped_storage().data_ptr() == parts.qkv.bias.untyped_storage().data_ptr()


def test_fused_greedy_tokens_equal_transformers_generate():
    model, hf = build_pair(num_key_value_heads=2)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(12))
    for fused in (False, True):
        model.fused_decode = fused
        ours = model.generate(ids, max_new_tokens=12, do_sample=False, stop=[])
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ours.tolist() == theirs.tolist()


def test_fused_projections_follow_changes_to_the_model(tmp_path, byte_tokenizer):
    """After a decode, the state dict, saving, training, load_state_dict, casts and replaced layers
    behave as if nothing had been fused; the next decode sees every change."""
    import qwenkit

    model, _ = build_pair(num_key_value_heads=2)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(13))
    names = list(model.state_dict())
    decode_logits(model, ids, 10, fused=True)
    assert list(model.state_dict()) == names
    # saving writes each layer's own rows; loading gives the same decode
    loaded, _ = qwenkit.load(qwenkit.save(model, byte_tokenizer, tmp_path / "ckpt"), dtype="float32")
    torch.testing.assert_close(
        decode_logits(loaded, ids, 10, fused=False),
        decode_logits(model, ids, 10, fused=True),
        atol=1e-5,
        rtol=0,
    )
    # training after decoding (PPO: rollouts, then a step): gradients reach the layers, the step the fused rows
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids).logsumexp(-1).mean().backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    optimizer.step()
    model.eval()
    torch.testing.assert_close(
        decode_logits(model, ids, 10, fused=True),
        decode_logits(model, ids, 10, fused=False),
        atol=1e-5,
        rtol=0,
    )
    # new weights copied in, a replaced layer, a cast: fused again
    other, _ = build_pair(num_key_value_heads=2)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.mul_(3)
    model.load_state_dict(other.state_dict())
    model.model.layers[2].self_attn.q_proj = torch.nn.Linear(64, 64)
    expected = decode_logits(model, ids, 10, fused=False)
    torch.testing.assert_close(decode_logits(model, ids, 10, fused=True), expected, atol=1e-5, rtol=0)
    model.double()
    assert model._fused == []  # the fused fp32 copies are dropped at the cast, not at the next decode
    torch.testing.assert_close(
        decode_logits(model, ids, 10, fused=True), expected.double(), atol=1e-5, rtol=0
    )
    assert model._fused[0].qkv.weight.dtype == torch.float64


@pytest.mark.parametrize("weights", ["fp16", "int8", "int4"])
def test_fused_decoding_of_packed_and_half_weights(weights):
    """Packed (QuantLinear) and 16-bit (HalfLinear) layers fuse too (qwenkit.quant.linear.fuse_linears):
    the unfused logits, and the layers' packed rows become views of the fused layer's."""
    from qwenkit.quant.linear import HalfLinear, QuantLinear, use_half_weights
    from qwenkit.quant.quantize import quantize_model

    model, _ = build_pair(num_key_value_heads=2, hidden_size=128, intermediate_size=256)
    if weights == "fp16":
        use_half_weights(model, torch.float16)
    else:
        quantize_model(model, weights, group_size=64, progress=False)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(14))
    unfused = decode_logits(model, ids, 8, fused=False)
    fused = decode_logits(model, ids, 8, fused=True)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0)
    parts = model._fused[0]
    kind = HalfLinear if weights == "fp16" else QuantLinear
    assert isinstance(parts.qkv, kind) and isinstance(parts.gate_up, kind)
    name = "weight" if weights == "fp16" else "qweight"
    up = getattr(model.model.layers[0].mlp.up_proj, name)
    assert up.untyped_storage().data_ptr() == getattr(parts.gate_up, name).untyped_storage().data_ptr()


def test_cpu_decode_layout_copies_into_aligned_huge_page_memory():
    """The decode layout keeps values and shapes; wide matrices become column-major; the copy starts
    on a 2 MiB boundary (huge pages, Linux) and shares no memory with the original."""
    wide, square = torch.randn(2048, 1024), torch.randn(1024, 1024)
    for weight, column_major in ((wide, True), (square, False)):
        laid = cpu_decode_layout(weight)
        assert torch.equal(laid, weight) and laid.shape == weight.shape
        assert laid.t().is_contiguous() == column_major and laid.is_contiguous() == (not column_major)
        assert laid.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
        if sys.platform == "linux":
            assert laid.data_ptr() % HUGE_PAGE_BYTES == 0
    small = huge_page_empty((3, 5), torch.float16)
    assert small.shape == (3, 5) and small.dtype == torch.float16 and small.is_contiguous()


def _kernels() -> bool:
    from qwenkit.quant.linear import native_kernels

    return native_kernels()


needs_kernels = pytest.mark.skipif("not _kernels()", reason="no compiled CPU kernels here")


def native_and_python_logits(
    model: Qwen, ids: torch.Tensor, prefill: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_logits with the whole step in C++ (NativeDecode) and with the blocks run in Python."""
    model.native_decode = False
    python = decode_logits(model, ids, prefill, fused=True)
    model.native_decode = True
    return decode_logits(model, ids, prefill, fused=True), python


def laid_out_for_decoding(model: Qwen) -> Qwen:
    """Every linear weight in cpu_decode_layout, as qwenkit.load gives it (wide ones column-major)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = cpu_decode_layout(module.weight.data)
    return model


@pytest.mark.parametrize(
    "weights", ["fp32", "fp32 decode layout", "fp32 tied", "fp16", "bf16", "int8", "int4"]
)
def test_native_decode_step_equals_the_python_blocks(weights):
    """The whole step in one C++ call gives the Python path's logits (1e-5) for every kind of weight
    it reads: fp32 row-major and column-major (a tied head too), 16-bit, int8, int4."""
    from qwenkit.quant.linear import QuantLinear, native_kernels, use_half_weights
    from qwenkit.quant.quantize import quantize_model

    if not native_kernels():
        pytest.skip("no compiled CPU kernels here")
    model, _ = build_pair(
        num_key_value_heads=2,
        hidden_size=128,
        intermediate_size=320,
        tie_word_embeddings=weights == "fp32 tied",
    )
    if weights in ("fp32 decode layout", "fp32 tied"):
        laid_out_for_decoding(model)
        assert not model.lm_head.weight.is_contiguous()  # the head's product reads columns
    elif weights in ("fp16", "bf16"):
        use_half_weights(model, torch.float16 if weights == "fp16" else torch.bfloat16)
    elif weights != "fp32":
        quantize_model(model, weights, group_size=32, quantize_head=True, progress=False)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(21))
    native, python = native_and_python_logits(model, ids, 8)
    assert model._native is not None and model._native.usable
    scale = python.abs().max()
    if weights.startswith("int"):
        # int8 activations: a last-bit difference in a layer's input (the C++ norms and attention sum
        # in another order) can move one value across a rounding boundary, a jump of one level
        torch.testing.assert_close(native / scale, python / scale, atol=1e-2, rtol=0)
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.int8_activations = False  # fp32 inputs: no rounding, the same products
        model._fused, model._native = [], None  # fused layers copied the setting
        native, python = native_and_python_logits(model, ids, 8)
        assert model._native.usable and not model._native.products()[0][1][2]
    torch.testing.assert_close(native / scale, python / scale, atol=1e-5, rtol=0)


@needs_kernels
def test_native_decode_step_masks_windows_and_rows_of_different_lengths():
    """Window attention (each layer's own mask) and a batch decoded over the slots in use (`width`,
    rows of different lengths after a padded prefill) give the Python path's logits."""
    model, _ = build_pair(num_key_value_heads=2, use_window_attn=True, window_sizes=[4, 9, 80])
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(22))
    native, python = native_and_python_logits(model, ids, 20)
    assert model._native is not None and model._native.usable
    torch.testing.assert_close(native, python, atol=1e-5, rtol=0)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a row 5 tokens shorter, left-padded at prefill
    outs = []
    for native_decode in (True, False):
        model.native_decode = native_decode
        with torch.inference_mode():
            prefilled = KVCache(model.config, 2, 20, model.device, model.dtype)
            model(ids[:, :20], attention_mask=mask[:, :20], cache=prefilled)
            cache = KVCache(model.config, 2, 30, model.device, model.dtype)
            cache.insert([0, 1], prefilled)  # row 1 holds 15 slots, row 0 20
            outs.append(
                torch.stack(
                    [
                        model.decode_step(ids[:, i : i + 1], cache.first_rows(2), width=i + 1)
                        for i in range(20, 30)
                    ]
                )  # fmt: skip
            )
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


@needs_kernels
def test_native_decode_step_falls_back_where_it_does_not_apply():
    """int8 KV cache, LogN scaling, a bf16 model and act-order layers decode through the Python blocks."""
    from qwenkit.quant.linear import QuantLinear
    from qwenkit.quant.quantize import rtn

    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(23))
    for switches in ({"use_cache_quantization": True}, {"use_logn_attn": True}):
        model, _ = build_pair(num_key_value_heads=2, **switches)
        decode_logits(model, ids, 8, fused=True)
        assert model._native is None
    model, _ = build_pair(num_key_value_heads=2)
    decode_logits(model.to(torch.bfloat16), ids, 8, fused=True)
    assert model._native is None
    model, _ = build_pair(num_key_value_heads=2)
    down = model.model.layers[1].mlp.down_proj
    weight = rtn(down.weight.detach(), 8, 32)
    weight.g_idx = torch.randperm(down.in_features, generator=torch.Generator().manual_seed(0)) // 32
    model.model.layers[1].mlp.down_proj = QuantLinear.from_weight(
        weight
    )  # act-order: the kernel does not take it
    native, python = native_and_python_logits(model, ids, 8)
    assert model._native is not None and not model._native.usable
    torch.testing.assert_close(native, python, atol=0, rtol=0)


@needs_kernels
def test_native_decode_step_follows_changes_to_the_model():
    """A replaced layer, new tensors and a converted head after a native decode: the next decode
    sees them (the C++ step is rebuilt), as the Python path does."""
    from qwenkit.quant.linear import convert_head

    model, _ = build_pair(num_key_value_heads=2)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(24))
    decode_logits(model, ids, 8, fused=True)
    first = model._native
    model.model.layers[0].self_attn.o_proj = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.data = torch.randn(64, 176)
        model.model.layers[1].post_attention_layernorm.weight.mul_(
            2
        )  # in place: seen through the same memory
    native, python = native_and_python_logits(model, ids, 8)
    assert model._native is not first
    torch.testing.assert_close(native, python, atol=1e-5, rtol=0)
    convert_head(model, "int8")
    native, python = native_and_python_logits(model, ids, 8)
    torch.testing.assert_close(native, python, atol=1e-5, rtol=0)


@needs_kernels
def test_native_decode_step_is_the_same_on_any_number_of_threads_and_after_fork():
    """The team splits whole output rows, so 1 and 3 threads give the same bits; a forked child
    (whose copy of the team has no threads) decodes too."""
    import os
    import signal

    model, _ = build_pair(num_key_value_heads=2)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(25))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_logits(model, ids, 8, fused=True)
        torch.set_num_threads(3)
        three = decode_logits(model, ids, 8, fused=True)
        assert model._native.usable and torch.equal(one, three)
        with torch.inference_mode():  # prefilled here: the child runs decoding steps only
            prefilled = KVCache(model.config, 2, 8, model.device, model.dtype)
            model(ids[:, :8], cache=prefilled)
            cache = KVCache(model.config, 2, 12, model.device, model.dtype)
            cache.insert([0, 1], prefilled)
        pid = os.fork()
        if pid == 0:  # the child: a hang ends at the alarm, an error in a non-zero status
            signal.alarm(60)
            try:
                with torch.inference_mode():
                    steps = [model.decode_step(ids[:, i : i + 1], cache) for i in range(8, 12)]
                os._exit(0 if torch.equal(torch.stack(steps, dim=1), one) else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(threads)
