"""A meta-learned generator: recovery starts from what earlier API visits learnt (--meta_generator).

The paper's recovery starts every set from a fresh generator G and fresh codes z ~ N(0, I) and runs
generate_iterations zero-order steps. Here one meta-generator φ is kept per recovered set kind
(support, query) across visits, with a bank of latent codes per absolute class:

    start:   G <- φ_kind;  z_i <- Z_kind[c_i] if class c_i was recovered before, else z_i ~ N(0, I)
    recover: meta_generator_steps zero-order steps on (G, z), queries only (synthesis/recover.py)
    Reptile: φ_kind <- φ_kind + ε (φ' - φ_kind)
             Z_kind[c] <- Z_kind[c] + ε (z'_c - Z_kind[c])    (Z_kind[c] <- z'_c for a new class)

with ε = meta_generator_lr and (φ', z') what the visit's recovery ended with. Nothing in the update
needs more than the queries the recovery already made.

Why per kind: the query set is recovered with the boundary term against the adapted student, a
different objective (and 3x the images per class) from the support set's, so one φ would be pulled
between two optima. Why per absolute class: an API's outputs are relative indices 0..way-1 that name
different classes in different APIs, but every API says which absolute class each output is
(`api.classes`, the same ids the task memory stores), so codes that an API already maps to class c
are a head start wherever c appears again (APIs of a pool share classes, and are revisited).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.errors import CheckpointError

KINDS = ("support", "query")


@dataclass
class MetaGenerator:
    """φ per kind (a generator's state_dict, None until the first visit) and the class code banks."""
    lr: float = 1.0                                             # ε, the Reptile step size
    generators: dict = field(default_factory=dict)              # kind -> {name: tensor}
    codes: dict = field(default_factory=lambda: {k: {} for k in KINDS})  # kind -> {class: [per_class, nz]}
    updates: int = 0                                            # Reptile steps taken (all kinds)

    def start(self, kind: str, classes, per_class: int, nz: int, device,
              generator: torch.Generator | None = None) -> dict | None:
        """recover()'s `init`: {"generator": φ_kind or absent, "z": [way*per_class, nz]}, grouped by
        class as recover's targets are; None before anything was learnt (the paper's fresh start)."""
        _check_kind(kind)
        bank = self.codes[kind]
        if kind not in self.generators and not bank:
            return None
        # one draw for the whole set, so unseen classes cost the RNG the same as a fresh start
        z = torch.randn(len(classes) * per_class, nz, device=device, generator=generator)
        for i, c in enumerate(classes):
            known = bank.get(int(c))
            if known is not None and known.shape == (per_class, nz):
                z[i * per_class:(i + 1) * per_class] = known.to(device)
        init = {"z": z}
        if kind in self.generators:
            init["generator"] = {k: v.to(device) for k, v in self.generators[kind].items()}
        return init

    def update(self, kind: str, classes, final: dict) -> None:
        """The Reptile step toward `final` = recover()'s {"generator": φ', "z": z'}."""
        _check_kind(kind)
        self.generators[kind] = reptile(self.generators.get(kind), final["generator"], self.lr)
        per_class = final["z"].shape[0] // len(classes)
        bank = self.codes[kind]
        for i, c in enumerate(classes):
            zc = final["z"][i * per_class:(i + 1) * per_class].detach().cpu()
            old = bank.get(int(c))
            bank[int(c)] = zc.clone() if old is None or old.shape != zc.shape else old + self.lr * (zc - old)
        self.updates += 1

    def state_dict(self) -> dict:
        """Plain tensors and numbers (a checkpoint's `meta_generator`)."""
        return {"lr": self.lr, "updates": self.updates,
                "generators": {k: {n: t.clone() for n, t in g.items()} for k, g in self.generators.items()},
                "codes": {k: {int(c): z.clone() for c, z in b.items()} for k, b in self.codes.items()}}

    def load_state_dict(self, sd: dict) -> None:
        try:
            self.updates = int(sd["updates"])
            self.generators = {k: dict(g) for k, g in sd["generators"].items()}
            self.codes = {k: {int(c): z for c, z in sd["codes"].get(k, {}).items()} for k in KINDS}
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"the checkpoint's meta_generator state is malformed ({e!r}); "
                                  "resume with the flags of the run that wrote it") from None


def reptile(phi: dict | None, phi_new: dict, lr: float) -> dict:
    """φ + ε (φ' - φ) per tensor, on the CPU; φ' itself when there is no φ yet. Integer buffers
    (batch-norm's step counter) take φ''s value."""
    out = {}
    for name, new in phi_new.items():
        new = new.detach().cpu()
        old = None if phi is None else phi.get(name)
        if old is None or not new.is_floating_point():
            out[name] = new.clone()
        else:
            out[name] = old + lr * (new - old)
    return out


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"meta-generator kind must be one of {', '.join(KINDS)}, got {kind!r}")
