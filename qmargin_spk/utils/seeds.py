"""One random generator per component of a training run, each derived from the run's ``seed``.

Runs of different losses with the same seed are *paired* (``docs/training.md``, "Seeds"): the same
backbone weights, the same data order, the same augmentation. That holds only if no component draws
from another's generator, so a head of another size (sub-center AAM's ``K x C`` prototypes,
SphereFace2's bias) cannot shift what the augmentation draws after it:

- ``backbone``: torch's global generator, seeded with ``seed`` itself by the settings fragment
  (``seed_everything``) right before the backbone is built, as in every earlier version, so a
  seed's backbone weights have not changed;
- ``head``: built by the training stage inside :func:`seeded_global_rng` with ``component_seed(seed,
  "head")``: it draws from a fresh global generator, and the global one is restored afterwards;
- ``augment``: the augmenter's private ``torch.Generator`` seeded with ``component_seed(seed,
  "augment")`` (the settings fragments' ``augment_seed``); ``RNGState`` saves it in checkpoints.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

COMPONENTS = ("head", "augment")


def component_seed(seed: int, component: str) -> int:
    """The seed of ``component``: the first 8 bytes of ``sha256("qmargin-spk/<component>/<seed>")``.

    Read big-endian and shifted right by one bit (63 bits, which ``torch.Generator.manual_seed``
    takes as it is). A hash, not ``seed + k``, so that the components of one seed never coincide
    with those of a neighbouring seed.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
    digest = hashlib.sha256(f"qmargin-spk/{component}/{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@contextmanager
def seeded_global_rng(seed: int | None) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded with ``seed``, and restore its state after it.

    ``None`` leaves the global generator alone (no fork). Only the CPU generator is forked and
    seeded: modules are built on the CPU, and CUDA generators are left untouched.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
