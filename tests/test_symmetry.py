"""Energy invariance and force equivariance, in float64.

The SO(2) convolutions, gates and norms are exactly equivariant; the S2 grid activations are not
(a pointwise nonlinearity on a finite grid aliases), and together with the edge frames' roll they
make the network only approximately equivariant. Measured errors (float64, this file's model and
structures, max |difference| / max |value|) and the bounds asserted, per variant:

=========================  ===============  ===============  ====================
variant                    rotation energy  rotation forces  bound (energy, forces)
=========================  ===============  ===============  ====================
gate activations           6.6e-15          1.5e-14          1e-10, 1e-10
separable S2 (published)   4.8e-05          1.5e-02          5e-04, 6e-02
separable S2 grid MLP, 18  3.3e-05          4.5e-03          3e-04, 2e-02
=========================  ===============  ===============  ====================

Translations, permutations and periodic images move no edge vector, so they are exact to
rounding for every variant, provided the neighbour list does not depend on rounding: with a
``max_neighbors`` cut inside a shell of equidistant periodic images the choice among them is
arbitrary (fairchem's graph), so these tests keep ``max_neighbors`` above the neighbour count.
"""
import pytest
import torch
from e3nn import o3
from fairchem.core.models.base import HydraModel
from structures import default_structures, moved, rotated, to_batch

SMALL = dict(
    num_layers=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
    attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16, max_radius=5.0, max_neighbors=500,
    lmax_list=[4], mmax_list=[2], alpha_drop=0.0, drop_path_rate=0.0,
)
VARIANTS = {
    "gate": dict(use_gate_act=True),
    "separable_s2": dict(),
    "separable_grid_mlp": dict(use_grid_mlp=True, grid_resolution=18, norm_type="layer_norm_sh"),
}
# (energy, forces) bounds on the relative error under a random rotation, from the measurements in
# the module docstring with a margin of 3-10x.
ROTATION_BOUNDS = {"gate": (1e-10, 1e-10), "separable_s2": (5e-4, 6e-2), "separable_grid_mlp": (3e-4, 2e-2)}
EXACT = 1e-10


def model(variant: str) -> HydraModel:
    torch.manual_seed(0)
    m = HydraModel(
        backbone={"model": "fairchem_equiformerv2.EquiformerV2Backbone", **SMALL, **VARIANTS[variant]},
        heads={"energy": {"module": "fairchem_equiformerv2.EnergyHead"}, "forces": {"module": "fairchem_equiformerv2.ForceHead"}},
    )
    with torch.no_grad():  # move LayerNorm weights and biases off their trivial values
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.double().eval()


def predict(m, structures):
    out = m(to_batch(structures, dtype=torch.float64))
    return out["energy"]["energy"], out["forces"]["forces"]


def rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.fixture(scope="module")
def structures():
    return default_structures()


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param, model(request.param)


def test_rotation(variant, structures):
    name, m = variant
    energy, forces = predict(m, structures)
    torch.manual_seed(1)
    rotation = o3.rand_matrix(dtype=torch.float64).numpy()
    energy_r, forces_r = predict(m, rotated(structures, rotation))
    e_bound, f_bound = ROTATION_BOUNDS[name]
    e_err, f_err = rel(energy, energy_r), rel(forces @ torch.from_numpy(rotation).T, forces_r)
    print(f"{name}: rotation energy {e_err:.1e}, forces {f_err:.1e}")
    assert e_err <= e_bound and f_err <= f_bound


def test_translation_and_periodic_images(variant, structures):
    _, m = variant
    energy, forces = predict(m, structures)
    energy_m, forces_m = predict(m, moved(structures))
    assert rel(energy, energy_m) <= EXACT and rel(forces, forces_m) <= EXACT


def test_permutation(variant, structures):
    _, m = variant
    energy, forces = predict(m, structures)
    permutations = [torch.randperm(len(a), generator=torch.Generator().manual_seed(i)) for i, a in enumerate(structures)]
    permuted = [atoms[p.numpy()] for atoms, p in zip(structures, permutations)]
    energy_p, forces_p = predict(m, permuted)
    offsets = torch.tensor([0] + [len(a) for a in structures]).cumsum(0)
    expected = torch.cat([forces[o + p] for o, p in zip(offsets, permutations)])
    assert rel(energy, energy_p) <= EXACT and rel(expected, forces_p) <= EXACT


def test_supercell(variant, structures):
    """A 2x2x1 supercell holds the same atoms four times: 4x the energy, the same per-atom forces."""
    _, m = variant
    energy, forces = predict(m, structures)
    energy_s, forces_s = predict(m, [a.repeat((2, 2, 1)) for a in structures])
    assert rel(4 * energy, energy_s) <= EXACT
    offsets = torch.tensor([0] + [len(a) for a in structures]).cumsum(0)
    offsets_s = 4 * offsets
    for i in range(len(structures)):
        per_copy = forces_s[offsets_s[i] : offsets_s[i + 1]].view(4, -1, 3)  # ASE repeats the whole cell
        assert rel(forces[offsets[i] : offsets[i + 1]].expand(4, -1, -1), per_copy) <= EXACT
