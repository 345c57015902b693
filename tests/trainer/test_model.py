import pytest
import torch

from trainer.model import SIT_MODELS, SiT, SiTConfig, build_model, count_parameters, sincos_pos_embed_2d, sit_config


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
    x = torch.randn(2, 4, *size)
    out = model(x, torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == x.shape
    # Translation of the input changes the output: positions are in use.
    assert not torch.allclose(out, model(x.roll(2, dims=-1), torch.rand(2), torch.tensor([1, 2])))


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
