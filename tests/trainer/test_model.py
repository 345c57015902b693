import pytest
import torch

from trainer.model import (
    SIT_MODELS,
    Attention,
    MlpKind,
    NormKind,
    SiT,
    SiTConfig,
    SwiGLU,
    apply_rope,
    build_model,
    count_parameters,
    forward_gmac,
    make_norm,
    rope_angles_2d,
    sincos_pos_embed_2d,
    sit_config,
)


def expected_parameters(depth: int, d: int, p: int, in_ch: int = 4, classes: int = 1000) -> int:
    """Trainable parameters of DiT/SiT from the architecture's formula (learn_sigma=True)."""
    block = 18 * d * d + 15 * d  # qkv 3D^2, proj D^2, fc1 4D^2, fc2 4D^2, adaLN 6D^2 (+ biases)
    patch = p * p * in_ch * d + d
    time = 256 * d + d + d * d + d
    label = (classes + 1) * d
    final = d * p * p * 2 * in_ch + p * p * 2 * in_ch + d * 2 * d + 2 * d
    return depth * block + patch + time + label + final


SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


@pytest.mark.parametrize("name", SIT_MODELS)
def test_parameter_counts_on_meta_device(name):
    model = build_model(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    size, patch = name.removeprefix("SiT-").split("/")
    depth, hidden, heads = SIZES[size]
    assert (model.config.depth, model.config.hidden_size, model.config.num_heads) == (depth, hidden, heads)
    assert count_parameters(model) == expected_parameters(depth, hidden, int(patch))


def test_sit_xl2_matches_released_count():
    model = build_model("SiT-XL/2", device="meta")
    # The released model counts its frozen pos_embed as a parameter: 675,129,632 in total.
    assert count_parameters(model) + model.pos_embed.numel() == 675_129_632


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="SiT-XL/2"):
        sit_config("SiT-XXL/2")


def tiny(**kw) -> SiT:
    cfg = {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2, "input_size": 8, "num_classes": 10}
    cfg.update(kw)
    return SiT(SiTConfig(**cfg))


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (8, 12), (6, 10)])
def test_any_input_size(size):
    torch.manual_seed(0)
    model = tiny().eval()
    with torch.no_grad():  # zero-initialised output layer: perturb it so outputs depend on input
        model.final_layer.linear.weight.normal_()
    x, t, y = torch.randn(2, 4, *size), torch.rand(2), torch.tensor([1, 2])
    out = model(x, t, y)
    assert out.shape == x.shape
    # Positions are in use: without them the model is equivariant to rolling the input by whole
    # patches (attention is permutation-equivariant, the rest acts per token), so the output of the
    # rolled input would be the rolled output.
    assert not torch.allclose(model(x.roll(2, dims=-1), t, y), out.roll(2, dims=-1), atol=1e-5)
    # ... which this comparison detects: with the positions zeroed it holds
    model.positions = lambda h, w: torch.zeros(1, h * w, 64)
    with torch.no_grad():
        flat = model(x, t, y)
    assert torch.allclose(model(x.roll(2, dims=-1), t, y), flat.roll(2, dims=-1), atol=1e-5)


def test_odd_input_rejected():
    with pytest.raises(ValueError, match="divisible by patch size"):
        tiny()(torch.randn(1, 4, 7, 8), torch.rand(1), torch.tensor([0]))


def test_learn_sigma_output_channels():
    assert tiny(learn_sigma=True).final_layer.linear.out_features == 2 * 2 * 8
    assert tiny(learn_sigma=False).final_layer.linear.out_features == 2 * 2 * 4
    for learn_sigma in (True, False):
        out = tiny(learn_sigma=learn_sigma)(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
        assert out.shape == (1, 4, 8, 8)


def test_adaln_zero_initialisation_gives_zero_output():
    model = tiny()
    out = model(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 10]))
    assert torch.count_nonzero(out) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0


def test_pos_embed_is_sincos_with_column_first_half():
    pe = sincos_pos_embed_2d(16, 3, 5)  # (15, 16)
    cols = torch.arange(15) % 5
    rows = torch.arange(15) // 5
    assert torch.allclose(pe[:, 0], torch.sin(cols.float()))  # omega_0 = 1
    assert torch.allclose(pe[:, 8], torch.sin(rows.float()))
    assert torch.allclose(pe[:, 4], torch.cos(cols.float()))
    model = tiny()
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(64, 4, 4))
    assert not model.pos_embed.requires_grad and "pos_embed" in model.state_dict()


def test_time_embedding_uses_raw_t_cos_then_sin():
    emb = SiT.__dict__  # noqa: F841 - keep the import used
    from trainer.model import TimestepEmbedder

    t = torch.tensor([0.0, 0.5, 1.0])
    e = TimestepEmbedder.timestep_embedding(t, 256)
    assert torch.allclose(e[:, 0], torch.cos(t)) and torch.allclose(e[:, 128], torch.sin(t))


def test_label_dropout_train_only_and_generator_deterministic():
    model = tiny(num_classes=10)
    y = torch.arange(10).repeat(100)
    emb = model.y_embedder
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = emb(y, True, g1), emb(y, True, g2)
    assert torch.equal(a, b)
    null = emb.embedding_table.weight[10]
    dropped = (a == null).all(dim=1).float().mean().item()
    assert 0.07 < dropped < 0.13  # p = 0.1 over 1000 labels
    assert not (emb(y, False) == null).all(dim=1).any()
    assert emb.embedding_table.num_embeddings == 11  # null class at index num_classes


def test_meta_build_then_materialise_matches_normal_init():
    meta = build_model("SiT-S/8", device="meta", input_size=16)
    meta.to_empty(device="cpu")
    meta.initialize_weights()
    ref = build_model("SiT-S/8", input_size=16)
    assert torch.equal(meta.pos_embed, ref.pos_embed)
    for (name, a), (_, b) in zip(meta.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.isfinite(a).all(), name  # nothing left of to_empty's uninitialised memory
        assert bool((a == 0).all()) == bool((b == 0).all()), name  # the same parts are zero-initialised
    # The same non-zero weights must give the same function. (Compared straight after init, both
    # outputs would be zero - adaLN-Zero - and equal whatever the blocks compute.)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    weights = {k: v for k, v in ref.state_dict().items() if k != "pos_embed"}  # meta keeps its own positions
    missing, unexpected = meta.load_state_dict(weights, strict=False)
    assert missing == ["pos_embed"] and unexpected == []
    meta.eval(), ref.eval()
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 2])
    out = ref(x, t, y)
    assert out.abs().mean() > 1e-2
    assert torch.equal(meta(x, t, y), out)


# ---- block options --------------------------------------------------------------------------------


def test_rmsnorm_formula():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(make_norm(NormKind.RMSNORM, 16).double()(x), expected)
    layer = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(make_norm(NormKind.LAYERNORM, 16).double()(x), layer)


def test_swiglu_formula_by_hand():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 12).double()  # gated width 2/3 * 12 = 8
    assert mlp.fc1.out_features == 16 and mlp.fc2.in_features == 8
    x = torch.randn(4, 8, dtype=torch.float64)
    w1, b1, w2, b2 = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
    h = x @ w1.T + b1
    a, b = h[:, :8], h[:, 8:]
    expected = (a / (1 + torch.exp(-a)) * b) @ w2.T + b2  # silu(a) = a * sigmoid(a)
    torch.testing.assert_close(mlp(x), expected.detach())


def test_rope_angles_and_rotation():
    angles = rope_angles_2d(8, 3, 4)  # (12, 4): 2 row pairs, 2 column pairs
    rows, cols = torch.arange(12) // 4, torch.arange(12) % 4
    assert torch.allclose(angles[:, 0], rows.float()) and torch.allclose(angles[:, 2], cols.float())
    assert torch.allclose(angles[:, 1], rows * 10000**-0.5) and torch.allclose(angles[:, 3], cols * 10000**-0.5)
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    rotated = apply_rope(x, angles.double())
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])  # position (0, 0): identity


def test_rope_scores_depend_only_on_the_relative_position():
    head_dim, side = 16, 6
    angles = rope_angles_2d(head_dim, side, side).double()  # (36, 8)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def score(pq: tuple[int, int], pk: tuple[int, int]) -> float:
        rq = apply_rope(q.expand(1, 1, 1, -1), angles[pq[0] * side + pq[1]][None])
        rk = apply_rope(k.expand(1, 1, 1, -1), angles[pk[0] * side + pk[1]][None])
        return float((rq * rk).sum())

    base = score((1, 2), (3, 1))
    assert score((2, 4), (4, 3)) == pytest.approx(base, abs=1e-6)  # both shifted by (1, 2)
    assert score((0, 1), (2, 0)) == pytest.approx(base, abs=1e-6)  # by (-1, -1)
    assert abs(score((1, 2), (3, 2)) - base) > 1e-3  # another offset: another score
    assert abs(score((1, 2), (1, 1)) - score((1, 2), (0, 2))) > 1e-3  # rows and columns differ


def test_qk_norm_makes_attention_invariant_to_the_scale_of_q_and_k():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    for qk_norm, invariant in ((True, True), (False, False)):
        attn = Attention(32, 4, qk_norm)
        before = attn(x)
        with torch.no_grad():  # q and k (the first 2D rows of qkv) times 10
            attn.qkv.weight[:64] *= 10
            attn.qkv.bias[:64] *= 10
        assert torch.allclose(attn(x), before, atol=1e-4) is invariant


def modern(**kw) -> SiT:
    return tiny(mlp=MlpKind.SWIGLU, norm=NormKind.RMSNORM, rope=True, qk_norm=True, **kw)


@pytest.mark.parametrize(
    "options",
    [{"mlp": "swiglu"}, {"norm": "rmsnorm"}, {"rope": True}, {"qk_norm": True}],
)
@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_each_switch_runs_and_changes_the_function(options, size):
    torch.manual_seed(0)
    released, switched = tiny(), tiny(**options)
    assert isinstance(switched.config.mlp, MlpKind)  # strings become members (exact values only)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (released, switched):
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    x, t, y = torch.randn(2, 4, *size, generator=gen), torch.rand(2, generator=gen), torch.tensor([1, 2])
    out = switched(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    if options != {"mlp": "swiglu"}:  # SwiGLU has other shapes; the rest share every weight
        switched.load_state_dict(released.state_dict(), strict=False)
        assert not torch.allclose(out, released(x, t, y), atol=1e-4)


def test_rope_alone_is_a_position_signal():
    """Without absolute positions a RoPE model is still not roll-equivariant (see test_any_input_size)."""
    torch.manual_seed(0)
    model = tiny(rope=True).eval()
    model.positions = lambda h, w: torch.zeros(1, h * w, 64)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * 0.2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert not torch.allclose(model(x.roll(2, dims=-1), t, y), model(x, t, y).roll(2, dims=-1), atol=1e-5)


def test_released_block_keeps_its_names_and_modern_adds_only_qk_scales():
    released = set(tiny().state_dict())
    assert not any("norm" in k for k in released)  # no affine norms in the released block
    extra = set(modern().state_dict()) - released
    assert extra == {f"blocks.{i}.attn.{n}_norm.weight" for i in range(2) for n in "qk"}
    assert torch.count_nonzero(modern()(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))) == 0  # adaLN-Zero


def test_modern_config_round_trips_through_an_export(tmp_path):
    from trainer.export import read_export, save_export

    model = modern()
    save_export(str(tmp_path / "m.safetensors"), model.state_dict(), model.config, {})
    config, state, _ = read_export(str(tmp_path / "m.safetensors"))
    assert config == model.config and config.mlp is MlpKind.SWIGLU
    SiT(config).load_state_dict(state)


def test_forward_gmac_counts_the_papers_figure():
    assert forward_gmac(sit_config("SiT-XL/2")) == pytest.approx(118.6, abs=0.05)
    assert forward_gmac(sit_config("SiT-XL/2", input_size=64)) == pytest.approx(524.6, abs=0.1)
    released = forward_gmac(sit_config("SiT-B/2"))
    switched = forward_gmac(sit_config("SiT-B/2", mlp="swiglu", rope=True, qk_norm=True))
    assert switched == pytest.approx(released, rel=2e-3)  # SwiGLU at 2/3 width: the same multiply-adds
