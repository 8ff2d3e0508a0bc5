"""PyTorch reference network, checkpoint import/export and Flax <-> PyTorch parity."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")

from cpsl_jax import convert  # noqa: E402
from cpsl_jax.models import DeepLabV2, Discriminator  # noqa: E402
from cpsl_jax.torch_mirror import network as tr  # noqa: E402

pytestmark = pytest.mark.torch
LISTING = Path(__file__).resolve().parent / "data" / "official-state-dict.txt"
TINY = dict(width=8, head_width=32)


def parse_listing() -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(segmenter, discriminator) {key: shape} from the official listing."""
    seg, disc = {}, {}
    cur = seg
    for line in LISTING.read_text().splitlines():
        if line.startswith("# Discriminator"):
            cur = disc
        m = re.match(r"^(\S+) \(([\d, ]*)\)$", line)
        if m:
            cur[m.group(1)] = tuple(int(s) for s in m.group(2).replace(" ", "").split(",") if s)
    return seg, disc


def randomize(net: "torch.nn.Module", seed: int) -> "torch.nn.Module":
    """He-scaled conv weights and non-trivial BN/GN affine and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return net


def to_nhwc(t: "torch.Tensor") -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference_checkpoint(net, path, prototypes=None, disc=None, iteration=7, best_iou=np.float64(41.25)):
    state = {"ResNet101": {"model_state": net.state_dict(), "prototypes_ema": prototypes}}
    if disc is not None:
        state["FCDiscriminator"] = {"model_state": disc.state_dict(), "prototypes_ema": prototypes}
    state["iter"], state["best_iou"] = iteration, best_iou
    torch.save(state, path)
    return path


# ------------------------------------------------------------------------------- names
def test_reference_state_dict_matches_official_listing():
    seg, disc = parse_listing()
    assert len(seg) == 658
    sd = tr.ResNet101(num_classes=19, depth=101, bn_pretrain=True).state_dict()
    assert list(sd) == list(seg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == seg
    dsd = tr.FCDiscriminator(19).state_dict()
    assert {k: tuple(v.shape) for k, v in dsd.items()} == disc


def test_flax_names_and_shapes_map_onto_official_listing():
    seg, _ = parse_listing()
    shapes = convert._variable_shapes(19, True, 101, 64, 256)
    mapped = {}
    for col in ("params", "batch_stats"):
        for path, spec in shapes[col].items():
            mapped[convert.torch_key(path)] = convert._torch_shape(tuple(spec.shape))
    assert mapped == {k: v for k, v in seg.items() if not k.endswith("num_batches_tracked")}


# ------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def deep_pair(tmp_path_factory):
    """Depth-101 (width 8) reference net with random weights, saved and imported."""
    torch.manual_seed(0)
    net = randomize(tr.ResNet101(num_classes=19, depth=101, **TINY), seed=1).eval()
    protos = torch.randn(19, 32, requires_grad=True)
    path = reference_checkpoint(net, tmp_path_factory.mktemp("ck") / "model.pkl", prototypes=protos)
    ck = convert.load_torch_checkpoint(path, depth=101, **TINY)
    return net, protos, ck, path


def test_eval_parity_depth101_odd_input(deep_pair):
    net, protos, ck, _ = deep_pair
    assert ck["missing"] == [] and ck["unexpected"] == []
    assert ck["iteration"] == 7 and ck["best_iou"] == pytest.approx(41.25)
    np.testing.assert_array_equal(np.asarray(ck["prototypes"]), protos.detach().numpy())
    x = torch.rand(2, 3, 33, 47, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = net(x)
    model = DeepLabV2(num_classes=19, depth=101, **TINY)
    out = jax.jit(lambda v, im: model.apply(v, im, train=False))(ck["variables"], jnp.asarray(to_nhwc(x)))
    assert out["logits"].shape == (2, 5, 7, 19)  # ceil-mode pool: 47 -> 24 -> 13 (floor would give 12) -> 7
    assert rel_err(out["logits"], to_nhwc(ref["out"])) < 1e-4
    assert rel_err(out["features"], to_nhwc(ref["feat"])) < 1e-4


def test_export_roundtrip_loads_strictly_in_torch(deep_pair, tmp_path):
    net, protos, ck, _ = deep_pair
    path = tmp_path / "export.pkl"
    convert.save_torch_checkpoint(ck["variables"], path, prototypes=ck["prototypes"], iteration=3, best_iou=50.5)
    state = torch.load(path, weights_only=True)
    assert state["iter"] == 3 and state["best_iou"] == 50.5
    np.testing.assert_array_equal(state["ResNet101"]["prototypes_ema"].numpy(), protos.detach().numpy())
    fresh = tr.ResNet101(num_classes=19, depth=101, **TINY).eval()
    fresh.load_state_dict(state["ResNet101"]["model_state"], strict=True)
    for k, v in net.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0, msg=k)
    x = torch.rand(1, 3, 41, 29)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)["out"], net(x)["out"], rtol=0, atol=0)


def _tiny_pair(seed: int, bn_pretrain: bool = False, dropout_rate: float = 0.1):
    net = randomize(tr.ResNet101(num_classes=19, depth=14, bn_pretrain=bn_pretrain, dropout_rate=dropout_rate, **TINY), seed)
    ck = convert.load_torch_checkpoint({"ResNet101": {"model_state": net.state_dict()}}, depth=14, bn_pretrain=bn_pretrain, **TINY)
    assert ck["missing"] == [] and ck["unexpected"] == []
    return net, ck["variables"]


def test_train_mode_parity_batch_stats_and_running_update():
    net, variables = _tiny_pair(seed=4, bn_pretrain=True, dropout_rate=0.0)
    net.train()
    x = torch.rand(3, 3, 37, 45, generator=torch.Generator().manual_seed(5))
    ref = net(x)
    model = DeepLabV2(num_classes=19, depth=14, bn_pretrain=True, dropout_rate=0.0, **TINY)
    out, upd = model.apply(variables, jnp.asarray(to_nhwc(x)), train=True, mutable=["batch_stats"])
    assert rel_err(out["logits"], to_nhwc(ref["out"])) < 1e-4
    assert rel_err(out["features"], to_nhwc(ref["feat"])) < 1e-4
    sd = net.state_dict()
    flat = traverse_util.flatten_dict(dict(upd["batch_stats"]))
    assert len(flat) == 2 * sum(1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for path, value in flat.items():
        key = convert.torch_key(path)
        ref_v = sd[key].numpy()
        np.testing.assert_allclose(np.asarray(value), ref_v, rtol=2e-5, atol=2e-6, err_msg=key)
        # The update moved the statistic (it is not the stored value left unchanged).
        assert not np.allclose(np.asarray(value), np.asarray(traverse_util.flatten_dict(dict(variables["batch_stats"]))[path]))


def test_bare_resnet_state_dict_loads_backbone_only():
    net, _ = _tiny_pair(seed=6)
    sd = {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("layer5")}
    sd["module.fc.weight"], sd["module.fc.bias"] = torch.zeros(10, 256), torch.zeros(10)
    ck = convert.load_torch_checkpoint({"state_dict": sd}, num_classes=19, depth=14, **TINY)
    assert ck["unexpected"] == []
    head_keys = [k for k in net.state_dict() if k.startswith("layer5")]
    assert sorted(ck["missing"]) == sorted(head_keys)
    np.testing.assert_array_equal(
        np.asarray(ck["variables"]["params"]["layer2_0"]["conv1"]["kernel"]),
        net.layer2[0].conv1.weight.detach().permute(2, 3, 1, 0).numpy(),
    )
    head = ck["variables"]["params"]["layer5"]
    assert head["head_1"]["kernel"].shape == (1, 1, 32, 19)
    assert float(jnp.std(head["conv2d_list_1_0"]["kernel"])) == pytest.approx(0.01, rel=0.05)
    assert ck["prototypes"] is None and ck["iteration"] is None and ck["discriminator"] is None


def test_discriminator_import_parity(tmp_path):
    net, _ = _tiny_pair(seed=7)
    disc = tr.FCDiscriminator(19)
    path = reference_checkpoint(net, tmp_path / "warmup.pkl", prototypes=torch.zeros(19, 32), disc=disc)
    ck = convert.load_torch_checkpoint(path, depth=14, **TINY)
    assert ck["prototypes"] is None  # zeros: the warm-up has no prototypes yet
    x = torch.softmax(torch.randn(2, 19, 40, 57), dim=1)
    with torch.no_grad():
        ref = disc(x)
    out = Discriminator().apply(ck["discriminator"], jnp.asarray(to_nhwc(x)))
    assert out.shape == (2, 3, 4, 1)
    assert rel_err(out, to_nhwc(ref)) < 1e-5
    back = convert.to_torch_state_dict(ck["discriminator"])
    for k, v in disc.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)


# ------------------------------------------------------------------------------- errors and CLI
def test_shape_mismatch_names_tensor_and_shapes():
    net, _ = _tiny_pair(seed=8)
    with pytest.raises(ValueError, match=r"layer5\.head\.1\.weight.*\(19, 32, 1, 1\).*\(16, 32, 1, 1\)"):
        convert.load_torch_checkpoint({"ResNet101": {"model_state": net.state_dict()}}, num_classes=16, depth=14, **TINY)


def test_non_checkpoint_files_are_named(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(text))):
        convert.load_torch_checkpoint(text, depth=14, **TINY)
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(ValueError, match=re.escape(str(a_list))):
        convert.load_torch_checkpoint(a_list, depth=14, **TINY)
    with pytest.raises(FileNotFoundError, match="absent.pkl"):
        convert.load_torch_checkpoint(tmp_path / "absent.pkl", depth=14, **TINY)


def test_cli_import_export_roundtrip(tmp_path, capsys):
    net, _ = _tiny_pair(seed=9)
    src = reference_checkpoint(net, tmp_path / "in.pkl", prototypes=torch.randn(19, 32), iteration=11)
    args = ["--depth", "14", "--width", "8", "--head-width", "32"]
    assert convert.main(["import", str(src), str(tmp_path / "m.msgpack"), *args]) == 0
    assert convert.main(["export", str(tmp_path / "m.msgpack"), str(tmp_path / "out.pkl")]) == 0
    a, b = torch.load(src, weights_only=False), torch.load(tmp_path / "out.pkl", weights_only=True)
    assert b["iter"] == 11
    torch.testing.assert_close(b["ResNet101"]["prototypes_ema"], a["ResNet101"]["prototypes_ema"])
    for k, v in a["ResNet101"]["model_state"].items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(b["ResNet101"]["model_state"][k], v, rtol=0, atol=0)
    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    assert e.value.code == 0 and "import" in capsys.readouterr().out
