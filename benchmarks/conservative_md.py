"""NVE molecular dynamics: total-energy drift with gradient forces against direct forces.

Runs ASE's Velocity Verlet on a slab with an adsorbate from the demo data's generator
(``demo_structures.random_system``, seed ``--structure-seed``; its fixed bottom layers stay fixed)
from a Maxwell-Boltzmann start at ``--temperature``, through fairchem's ``OCPCalculator``
(``fairchem_equiformerv2.calculator``, float32, as users run it), once with each checkpoint: a
direct-force model (configs/demo/s2ef.yml) and a conservative one (configs/demo/s2ef_conservative.yml),
the same backbone shape trained on the same data (``benchmarks/conservative_learning.py`` makes both).

Prints, per model: the drift (slope of a least-squares line through the total energy, per atom per
ps), the largest |E_total(t) - E_total(0)| per atom, the temperature range; writes the energy
curves to a plot and the numbers to JSON.

    python benchmarks/conservative_md.py --direct D.pt --conservative C.pt        # 2,000 steps of 0.5 fs
    python benchmarks/conservative_md.py --direct D.pt --conservative C.pt --steps 200   # a quick look
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet

import fairchem_equiformerv2
from fairchem_equiformerv2.tools.demo_structures import random_system

ROOT = Path(__file__).resolve().parents[1]


def run_nve(checkpoint: Path, atoms, steps: int, dt_fs: float, temperature: float, seed: int, every: int) -> dict:
    atoms = atoms.copy()
    atoms.calc = fairchem_equiformerv2.calculator(checkpoint, seed=seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    Stationary(atoms)
    times, energies, temperatures = [], [], []

    def record():
        times.append(len(times) * every * dt_fs / 1000.0)  # ps
        energies.append(atoms.get_total_energy())
        temperatures.append(atoms.get_temperature())

    dynamics = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    dynamics.attach(record, interval=every)
    start = time.perf_counter()
    dynamics.run(steps)
    seconds = time.perf_counter() - start
    t, e = np.array(times), np.array(energies) / len(atoms)
    slope = float(np.polyfit(t, e, 1)[0])
    return {"checkpoint": str(checkpoint), "times_ps": t.tolist(), "energy_per_atom": (e - e[0]).tolist(),
            "drift_eV_per_atom_per_ps": slope, "max_deviation_eV_per_atom": float(np.abs(e - e[0]).max()),
            "temperature_min": float(min(temperatures)), "temperature_max": float(max(temperatures)),
            "seconds": seconds}


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot(r["times_ps"], np.array(r["energy_per_atom"]) * 1000,
                label=f"{name}: drift {r['drift_eV_per_atom_per_ps'] * 1000:+.2f} meV/atom/ps")
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("E_total(t) - E_total(0) (meV/atom)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--direct", type=Path, required=True, help="direct-force checkpoint")
    parser.add_argument("--conservative", type=Path, required=True, help="gradient-force checkpoint")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--dt", type=float, default=0.5, help="time step, fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="initial temperature, K")
    parser.add_argument("--structure-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="velocities")
    parser.add_argument("--every", type=int, default=5, help="record the energy every this many steps")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "conservative_md.png")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    atoms = random_system(np.random.default_rng(args.structure_seed))
    results = {}
    for name, checkpoint in (("direct forces", args.direct), ("gradient forces", args.conservative)):
        results[name] = run_nve(checkpoint, atoms, args.steps, args.dt, args.temperature, args.seed, args.every)
    fixed = sum(len(c.get_indices()) for c in atoms.constraints)
    title = (f"NVE, {atoms.get_chemical_formula()} ({fixed} fixed), {args.temperature:g} K start, "
             f"{args.steps} x {args.dt:g} fs, OCPCalculator float32")
    print(title)
    print("| forces | drift (meV/atom/ps) | max abs(E(t) - E(0)) (meV/atom) | T range (K) | wall time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['drift_eV_per_atom_per_ps'] * 1000:+.3f} | {r['max_deviation_eV_per_atom'] * 1000:.3f} | "
              f"{r['temperature_min']:.0f}-{r['temperature_max']:.0f} | {r['seconds']:.0f} |")
    plot(results, args.plot, title)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
