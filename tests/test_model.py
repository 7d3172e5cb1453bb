"""Model behaviour beyond parity: SO(3) building blocks, activation checkpointing, bad input."""
import pytest
import torch
import torch.distributed as dist
from ase import Atoms
from e3nn import o3
from fairchem.core.models.base import HydraModel
from torch.nn.parallel import DistributedDataParallel
from structures import default_structures, to_batch

from fairchem_equiformerv2 import EquiformerV2Backbone, runtime
from fairchem_equiformerv2.errors import ConfigError
from fairchem_equiformerv2.nn.ops import dense
from fairchem_equiformerv2.so3.frames import edge_frames
from fairchem_equiformerv2.so3.layout import EdgeLayout
from fairchem_equiformerv2.so3.wigner import wigner_d_blocks

SMALL = dict(
    num_layers=2, sphere_channels=8, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
    attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8, lmax_list=[3], mmax_list=[2],
    max_radius=5.0, max_neighbors=20,
)
HEADS = {"energy": {"module": "fairchem_equiformerv2.EnergyHead"}, "forces": {"module": "fairchem_equiformerv2.ForceHead"}}


def hydra(**backbone):
    return HydraModel(backbone={"model": "fairchem_equiformerv2.EquiformerV2Backbone", **SMALL, **backbone}, heads=HEADS)


# --- SO(3) ground floor -------------------------------------------------------------------------


def test_wigner_matches_e3nn_and_is_a_representation():
    torch.manual_seed(0)
    r1, r2 = o3.rand_matrix(5, dtype=torch.float64), o3.rand_matrix(5, dtype=torch.float64)
    d1, d2, d12 = (wigner_d_blocks(r, 6) for r in (r1, r2, r1 @ r2))
    for l in range(7):
        assert torch.allclose(d1[l], o3.Irrep(l, 1).D_from_matrix(r1), atol=1e-5)  # e3nn's is float32-accurate
        assert torch.allclose(d1[l] @ d2[l], d12[l], atol=1e-12)
    assert torch.allclose(d1[1], r1, atol=1e-14)


def test_edge_frames_take_edges_to_the_polar_axis():
    vec = torch.randn(100, 3, dtype=torch.float64)
    vec[0] = torch.tensor([0.0, 0.0, 2.0])
    for random in (False, True):
        frames = edge_frames(vec, random=random)
        assert torch.allclose(frames @ frames.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(100, 3, 3), atol=1e-12)
        assert torch.allclose(torch.linalg.det(frames), torch.ones(100, dtype=torch.float64))
        unit = vec / vec.norm(dim=1, keepdim=True)
        assert torch.allclose((frames @ unit.unsqueeze(2)).squeeze(2), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12)
    assert torch.equal(edge_frames(vec), edge_frames(vec))


def test_edge_layout_is_m_major_and_truncated():
    layout = EdgeLayout(lmax=3, mmax=1)
    assert layout.degrees_orders == [(0, 0), (1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (3, 1), (1, -1), (2, -1), (3, -1)]
    assert layout.index.tolist() == [0, 2, 6, 12, 3, 7, 13, 1, 5, 11]
    assert layout.rescale[3].item() == pytest.approx((7 / 3) ** 0.5)


# --- training behaviour -----------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients():
    batch = to_batch(default_structures())
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        m = hydra(activation_checkpoint=checkpointing, alpha_drop=0.0, drop_path_rate=0.0, edge_roll="deterministic").train()
        out = m(batch)
        (out["energy"]["energy"].pow(2).sum() + out["forces"]["forces"].pow(2).sum()).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7, msg=k)


def test_eval_is_deterministic_and_training_roll_is_random():
    batch = to_batch(default_structures())
    m = hydra(alpha_drop=0.0, drop_path_rate=0.0).eval()
    a, b = m(batch), m(batch)
    assert torch.equal(a["forces"]["forces"], b["forces"]["forces"])
    m.train()
    assert not torch.equal(m(batch)["forces"]["forces"], m(batch)["forces"]["forces"])


def test_float64():
    m = hydra().double().eval()
    out = m(to_batch(default_structures(), dtype=torch.float64))
    assert out["energy"]["energy"].dtype == torch.float64 and torch.isfinite(out["forces"]["forces"]).all()


def test_bf16_autocast_keeps_geometry_and_sums_in_float32():
    """Under autocast the graph, frames and Wigner matrices stay float32 (bf16 periodic-image offsets
    alone moved forces by 12% on the 31M shape), as do the norms and the outputs; training runs."""
    batch = to_batch(default_structures())
    torch.manual_seed(0)
    m = hydra(edge_roll="deterministic", alpha_drop=0.0, drop_path_rate=0.0).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        reference = m(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = m.backbone(batch)
            out = m(batch)
    assert emb["graph"].edge_distance_vec.dtype == torch.float32 and emb["rotation"].to_edge.dtype == torch.float32
    assert emb["node_embedding"].dtype == torch.float32  # the final norm
    for key in ("energy", "forces"):
        assert out[key][key].dtype == torch.float32
        error = (out[key][key] - reference[key][key]).norm() / reference[key][key].norm()
        assert 0 < error < 2e-2, key  # bf16 rounding, not float32 (0) and not broken geometry
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(batch)
        (out["energy"]["energy"].pow(2).sum() + out["forces"]["forces"].pow(2).sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_bf16_autocast_keeps_atom_work_radial_weights_and_sums_in_float32():
    """Under autocast the feed-forward network (work per atom), the radial MLP, the per-edge radial
    weights and the edge-degree embedding compute in float32 as without autocast, and sums into atoms
    accumulate in float32, forward and backward, while the attention's rotations run as bf16 matmuls."""
    from fairchem_equiformerv2.nn.embedding import EdgeDegreeEmbedding
    from fairchem_equiformerv2.nn.feed_forward import FeedForward
    from fairchem_equiformerv2.nn.radial import RadialMLP
    from fairchem_equiformerv2.nn.ops.scatter import gather_pairs, scatter_sum
    from fairchem_equiformerv2.nn.ops.so2 import radial_weights
    from fairchem_equiformerv2.so3.rotation import EdgeRotation

    mlp = RadialMLP([6, 5, 5, 7])
    features = torch.randn(11, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, full = mlp.hidden(features), mlp(features)
        w = radial_weights(h, mlp.last.weight, mlp.last.bias)
    assert h.dtype == w.dtype == full.dtype == torch.float32
    torch.testing.assert_close(full, mlp(features), rtol=0, atol=0)  # as in float32, not a bf16 result cast up
    torch.testing.assert_close(w, full)
    ffn, nodes = FeedForward(8, 8, 8, lmax=2), torch.randn(5, 9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ffn(nodes)
    torch.testing.assert_close(out, ffn(nodes), rtol=0, atol=0)

    embedding = EdgeDegreeEmbedding(8, 2, [6, 5, 5], max_num_elements=None, rescale_factor=3.0)
    edge_index, rotation = torch.randint(0, 5, (2, 11)), EdgeRotation(torch.randn(11, 7, 9), torch.randn(11, 9, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = embedding(torch.ones(5, dtype=torch.long), features, edge_index, rotation)
    torch.testing.assert_close(out, embedding(torch.ones(5, dtype=torch.long), features, edge_index, rotation), rtol=0, atol=0)

    num_nodes, num_edges = 4, 11
    source, target = torch.randint(0, num_nodes, (2, num_edges))
    x = torch.randn(num_nodes, 9, 2, requires_grad=True)
    to_edge, from_edge = torch.randn(num_edges, 5, 9), torch.randn(num_edges, 9, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pairs = gather_pairs(x, source, target, to_edge)
        summed = scatter_sum(pairs, target, num_nodes, from_edge)
    assert pairs.dtype == torch.bfloat16 and summed.dtype == torch.float32
    rotated = torch.bmm(from_edge.bfloat16(), pairs).float()  # each edge's rotation in bf16, summed in float32
    torch.testing.assert_close(summed, torch.zeros(num_nodes, 9, 4).index_add(0, target, rotated))
    summed.sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_block_compiles_without_graph_breaks():
    """``torch.compile`` sees one graph per block (the blocked grid loop is eager-only), also under bf16
    autocast (with the float32 parts' autocast switches inside)."""
    batch = to_batch(default_structures())
    m = hydra(edge_roll="deterministic").train()
    block, captured = m.backbone.blocks[0], {}
    block.register_forward_pre_hook(lambda module, args: captured.setdefault("args", args))
    m(batch)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            explanation = torch._dynamo.explain(block)(*captured["args"])
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


def test_torch_compile_option_matches_eager(monkeypatch):
    """``torch_compile`` compiles the blocks, the edge-degree embedding and the heads' blocks in place:
    same parameter names (checkpoints load either way), same energies, forces and gradients, also
    inside DDP as fairchem's trainers run it. (The ``aot_eager`` backend traces forward and backward as
    the default one does, without building kernels.) Eager runs its products through torch's ops here,
    as the compiled modules do (oneDNN's differ from them by float rounding: test_dense.py)."""
    runtime.configure()  # first: building through fairchem would otherwise choose the route below
    monkeypatch.setattr(dense, "_route", "torch")
    batch = to_batch(default_structures())
    torch.manual_seed(0)
    eager = hydra(edge_roll="deterministic").eval()  # eval: no dropout
    compiled = hydra(edge_roll="deterministic", torch_compile={"backend": "aot_eager", "dynamic": False}).eval()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    grads = []
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for model in (eager, DistributedDataParallel(compiled)):
            out = model(batch)
            (out["energy"]["energy"].pow(2).sum() + out["forces"]["forces"].pow(2).sum()).backward()
            grads.append({name.removeprefix("module."): p.grad for name, p in model.named_parameters() if p.grad is not None})
            for key in ("energy", "forces"):
                grads[-1][key] = out[key][key].detach()
    finally:
        dist.destroy_process_group()
    assert counts["stats"]["unique_graphs"] >= 4  # the edge embedding, a block, the two heads' blocks
    assert not counts["graph_break"]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    assert "torch_compile={'dynamic': False, 'backend': 'aot_eager'}" in repr(compiled.backbone)
    with pytest.raises(ConfigError, match="torch_compile"):
        hydra(torch_compile="yes")
    with pytest.raises(ConfigError, match="torch_compile with activation_checkpoint"):
        hydra(torch_compile=True, activation_checkpoint=True)


def test_bf16_autocast_computes_attention_logits_in_float32(monkeypatch):
    """Under autocast the attention logits, from the first SO(2) convolution's (bf16) invariant outputs
    to the softmax, compute in float32: the softmax gets what the same steps give without autocast."""
    import fairchem_equiformerv2.nn.attention as attention

    m = hydra(edge_roll="deterministic", alpha_drop=0.0, drop_path_rate=0.0).eval()
    block, seen = m.backbone.blocks[0].ga, {}  # the first graph attention that runs

    def record_invariants(module, args, out):
        seen.setdefault("invariants", out[1])

    block.so2_conv_1.register_forward_hook(record_invariants)
    real_softmax = attention.segment_softmax

    def recording_softmax(src, *args, **kwargs):
        seen.setdefault("logits", src)
        return real_softmax(src, *args, **kwargs)

    monkeypatch.setattr(attention, "segment_softmax", recording_softmax)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(to_batch(default_structures()))
        heads, channels = block.num_heads, block.alpha_channels
        invariants = seen["invariants"][:, : heads * channels]
        expected = block.alpha_act(block.alpha_norm(invariants.float().view(-1, heads, channels)))
        expected = torch.einsum("eha,ha->eh", expected, block.alpha_dot)
    assert invariants.dtype == torch.bfloat16 and seen["logits"].dtype == torch.float32
    torch.testing.assert_close(seen["logits"], expected, rtol=0, atol=0)  # not a bf16 product cast up


@pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) >= (2, 5), reason="torch 2.4's CPU compiler")
def test_compiled_model_under_cpu_autocast_is_refused_naming_torch_compile():
    """torch 2.4's CPU compiler builds kernels of the wrong dtype for our blocks under bf16 autocast:
    a clear error before anything compiles, not a RuntimeError from inside a generated kernel. Other
    backends (``aot_eager``) are let through."""
    batch = to_batch(default_structures())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ConfigError, match="torch_compile under CPU autocast"):
            hydra(torch_compile=True)(batch)
        hydra(torch_compile={"backend": "aot_eager"}, num_layers=1).eval()(batch)
    hydra(torch_compile=True).backbone._check_cpu_compile_autocast()  # without autocast: fine


def test_repr_shows_hyperparameters():
    text = repr(hydra().backbone)
    assert "lmax=3" in text and "mmax=2" in text and "SO2Convolution" in text and "activation='separable_s2'" in text


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, field",
    [
        (dict(lmax_list=[2], mmax_list=[3]), "mmax_list"),
        (dict(lmax_list=[4, 2], mmax_list=[2]), "same length"),
        (dict(lmax_list=[4, 2], mmax_list=[2, 2]), "one resolution"),
        (dict(norm_type="batch_norm"), "norm_type"),
        (dict(distance_function="sigmoid"), "distance_function"),
        (dict(use_s2_act_attn=True), "use_s2_act_attn"),
        (dict(weight_init="xavier"), "weight_init"),
        (dict(use_energy_lin_ref=True), "load_energy_lin_ref"),
        (dict(edge_roll="sometimes"), "edge_roll"),
    ],
)
def test_bad_configuration_names_the_field(args, field):
    with pytest.raises(ConfigError, match=field):
        EquiformerV2Backbone(**{**SMALL, **args})


def test_atomic_number_outside_the_table():
    m = hydra(max_num_elements=20).eval()
    with pytest.raises(ValueError, match=r"atom \d+ \(atomic number 29\).*max_num_elements=20"):
        m(to_batch(default_structures()[:1]))


def test_atom_without_neighbours_gets_finite_outputs():
    lonely = Atoms("CuO", positions=[[0, 0, 0], [9, 9, 9]], cell=[20, 20, 20], pbc=True)
    structures = [lonely, *default_structures()[:1]]
    out = hydra().eval()(to_batch(structures))
    assert torch.isfinite(out["energy"]["energy"]).all()
    forces = out["forces"]["forces"]
    assert torch.isfinite(forces).all()
    assert torch.equal(forces[:2], torch.zeros(2, 3))  # no neighbours: no direction to push along


def test_coincident_atoms_are_refused():
    atoms = default_structures()[0]
    atoms.positions[1] = atoms.positions[0]
    with pytest.raises(ValueError, match="same position"):
        hydra().eval()(to_batch([atoms]))


def test_empty_batch_is_refused():
    batch = to_batch(default_structures()[:1])
    for key in ("pos", "atomic_numbers", "batch", "tags", "fixed"):
        batch[key] = batch[key][:0]
    with pytest.raises(ValueError, match="empty batch"):
        hydra().eval()(batch)


def test_grid_activation_gradient_matches_autograd():
    """The memory-saving S2 activation recomputes the grid in backward; its gradient is exact."""
    from fairchem_equiformerv2.nn.activation import S2Activation
    from fairchem_equiformerv2.so3.grid import S2Grid

    layout = EdgeLayout(4, 2)
    act = S2Activation(S2Grid(4, 2, layout.index, layout.rescale, resolution=12)).double()
    x = torch.randn(7, layout.num_coefficients, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(act, (x,))
    grid = act.grid
    reference = grid.from_grid(torch.nn.functional.silu(grid.to_grid(x)))
    torch.testing.assert_close(act(x), reference)


def test_radial_linear_gradient_matches_autograd():
    """The m = 0 map with radial weights recomputed in backward (w = h rw^T + rb)."""
    from fairchem_equiformerv2.nn.ops.so2 import _RadialLinear

    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    rw = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    rb = torch.randn(6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    expected = torch.nn.functional.linear(x * (h @ rw.T + rb), weight, bias)
    torch.testing.assert_close(_RadialLinear.apply(x, h, rw, rb, weight, bias), expected)
    assert torch.autograd.gradcheck(_RadialLinear.apply, (x, h, rw, rb, weight, bias))
    assert torch.autograd.gradcheck(_RadialLinear.apply, (x, h, rw, rb, weight, None))


def test_recomputed_in_backward_keeps_notes_not_the_tensor():
    """Views of the tensor kept for backward are recomputed once, from the recipe; the tensor itself
    is freed after the forward pass, the recomputed one after the backward pass (no reference cycle:
    the garbage collector is off), and the gradients are those of keeping it."""
    import gc
    import weakref

    from fairchem_equiformerv2.nn.ops.recompute import recomputed_in_backward

    a, w = torch.randn(6, 4, requires_grad=True), torch.randn(2, 3, requires_grad=True)

    def loss_of(t):  # keeps two overlapping views of t for backward
        return (t[:, :2] @ w).sin().sum() + (t[:, 1:] * 2).pow(2).sum()

    expected = torch.autograd.grad(loss_of(a.exp()), (a, w))
    calls, kept = [], []

    def recompute():
        calls.append(1)
        kept.append(weakref.ref(value := a.detach().exp()))
        return value

    gc.disable()
    try:
        t = a.exp()
        original = weakref.ref(t)
        with recomputed_in_backward(t, recompute):
            loss = loss_of(t)
        del t
        assert original() is None and not calls  # only notes of its views were kept
        grads = torch.autograd.grad(loss, (a, w))
        del loss
        assert len(calls) == 1 and kept[0]() is None
    finally:
        gc.enable()
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad(), recomputed_in_backward(a, recompute):  # a no-op without gradients
        pass


@pytest.mark.parametrize("autocast", [False, True])
def test_attention_messages_recomputed_in_backward_give_the_same_gradients(autocast):
    """Recomputing the edge messages in backward instead of keeping them changes no bit of the
    gradients (the same operations on the same inputs), also when the forward ran under bf16 autocast
    and the backward outside it (as fairchem's trainers run ``amp``)."""
    from fairchem_equiformerv2.nn.attention import GraphAttention

    batch = to_batch(default_structures())
    model = hydra(edge_roll="deterministic").eval()
    grads = []
    for recompute in (False, True):
        for module in model.modules():
            if isinstance(module, GraphAttention):
                module.recompute_messages = recompute
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(batch)
        (out["energy"]["energy"].pow(2).sum() + out["forces"]["forces"].pow(2).sum()).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)
    assert not hydra(activation_checkpoint=True).backbone.blocks[0].ga.recompute_messages


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_radial_maps_under_autocast_give_gradients_of_their_inputs_dtype(x_dtype):
    """Under bf16 autocast both SO(2) maps with radial weights take float32 or bf16 inputs (the
    backward's products in the incoming gradient's dtype), with autograd's gradients to bf16 rounding."""
    from fairchem_equiformerv2.nn.so2_conv import SO2Convolution

    torch.manual_seed(0)
    conv = SO2Convolution(8, 8, EdgeLayout(2, 1), [4, 8, 8], extra_m0_channels=4)
    edge_features = torch.randn(10, 4)
    grads = []
    for autocast in (False, True):
        x = torch.randn(10, 7, 8, generator=torch.Generator().manual_seed(1)).to(x_dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, extra = conv(x.float() if not autocast else x, edge_features)
        (y.float().pow(2).sum() + extra.float().pow(2).sum()).backward()
        grads.append([x.grad.float(), *(p.grad.clone() for p in conv.parameters())])
        conv.zero_grad()
    for name, plain, cast in zip(["x", *dict(conv.named_parameters())], *grads):
        assert cast.dtype == plain.dtype, name
        assert ((cast - plain).norm() / plain.norm()) < 3e-2, name


def test_so3_linear_gradient_matches_autograd():
    """The per-degree linear map keeping the per-degree weight (not one matrix per coefficient)."""
    from fairchem_equiformerv2.nn.ops.linear import _SO3Linear, so3_linear
    from fairchem_equiformerv2.so3.layout import degree_of_coefficients

    x = torch.randn(3, 9, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    degree = degree_of_coefficients(2)
    expected = torch.einsum("nfi,foi->nfo", x, weight[degree])
    expected[:, 0] += bias
    torch.testing.assert_close(so3_linear(x, weight, bias, degree), expected)
    assert torch.autograd.gradcheck(_SO3Linear.apply, (x, weight, bias, degree))


def test_complex_linear_is_the_complex_product_and_its_gradient_matches_autograd():
    """The m > 0 SO(2) map in three matmuls (Gauss) equals the four-matmul complex product."""
    from fairchem_equiformerv2.nn.ops.so2 import _ComplexLinear, _complex_product as complex_linear

    x = torch.randn(5, 2, 6, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    rw = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    rb = torch.randn(6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    w_r, w_i = weight.chunk(2)
    w = h @ rw.T + rb
    z = torch.complex(x[:, 0] * w, x[:, 1] * w)
    expected = z @ torch.complex(w_r, w_i).T
    expected = torch.stack((expected.real, expected.imag), dim=1)
    torch.testing.assert_close(complex_linear(x, w, weight), expected)
    torch.testing.assert_close(_ComplexLinear.apply(x, h, rw, rb, weight), expected)
    assert torch.autograd.gradcheck(_ComplexLinear.apply, (x, h, rw, rb, weight))
    assert torch.autograd.gradcheck(_ComplexLinear.apply, (x, None, None, None, weight))


@pytest.mark.parametrize("block_bytes", [2**30, 600])  # all edges at once; two edges per block
def test_rotated_gather_and_sum_match_autograd(monkeypatch, block_bytes):
    """``gather_pairs``/``scatter_sum`` through the edge rotations, block by block on the CPU, equal the
    plain gather-concatenate-bmm (and bmm-index_add) with their gradients."""
    from fairchem_equiformerv2.nn.ops import scatter

    monkeypatch.setattr(scatter, "EDGE_BLOCK_BYTES", block_bytes)
    num_nodes, num_edges = 4, 11
    source, target = torch.randint(0, num_nodes, (2, num_edges))
    x = torch.randn(num_nodes, 9, 2, dtype=torch.float64, requires_grad=True)
    to_edge = torch.randn(num_edges, 5, 9, dtype=torch.float64)
    assert len(scatter.edge_blocks(num_edges, 2 * x[0].numel() * 8, x.device)) == (1 if block_bytes > 2**20 else 6)
    expected = torch.bmm(to_edge, torch.cat((x[source], x[target]), dim=-1))
    torch.testing.assert_close(scatter.gather_pairs(x, source, target, to_edge), expected)
    assert torch.autograd.gradcheck(lambda x: scatter.gather_pairs(x, source, target, to_edge), (x,))

    src = torch.randn(num_edges, 5, 3, dtype=torch.float64, requires_grad=True)
    from_edge = torch.randn(num_edges, 9, 5, dtype=torch.float64)
    expected = torch.zeros(num_nodes, 9, 3, dtype=torch.float64).index_add(0, target, torch.bmm(from_edge, src))
    torch.testing.assert_close(scatter.scatter_sum(src, target, num_nodes, from_edge), expected)
    assert torch.autograd.gradcheck(lambda src: scatter.scatter_sum(src, target, num_nodes, from_edge), (src,))
