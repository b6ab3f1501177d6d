"""Per-sample sampling seeds: one stream per (prompt, sample), whatever the request layout.

A request carries one ``sampling_seed`` (SGLang's name) for all its prompts and their ``n`` samples. Both the
embedded engine and the trainer read it the same way:

    prompt i of the request:     prompt seed  = request seed + i            (``prompt_seeds``)
    sample j of that prompt:     sample seed  = prompt seed                 when j = 0
                                                crc32("<prompt seed>/<j>")  otherwise (``sample_seed``)

So the n samples of one prompt draw from n different streams (a group's samples differ), a request's layout
does not matter (prompt g of a batch gets base + g whether the pool sends it alone or with others), and a
request for one prompt and one sample uses its seed as is: sending sample j alone, seeded with
``sample_seed(prompt seed, j)``, draws the same response as sample j of the grouped request. That is how the pool
serves SGLang, which applies one ``sampling_seed`` to every sample of a request (``split_seeded``).
"""
from __future__ import annotations

import zlib

SEED_MOD = 2**31
"""Seeds stay 31-bit: SGLang's ``sampling_seed`` is an int that its samplers hash, torch takes any int64."""


def prompt_seeds(request_seed: int | None, count: int) -> list[int | None]:
    """The seed of each of ``count`` prompts of a request seeded with ``request_seed`` (all None if unseeded)."""
    if request_seed is None:
        return [None] * count
    return [(int(request_seed) + i) % SEED_MOD for i in range(count)]


def sample_seed(prompt_seed: int | None, sample: int) -> int | None:
    """The seed of sample ``sample`` of a prompt seeded with ``prompt_seed`` (None stays None)."""
    if prompt_seed is None or sample == 0:
        return prompt_seed
    return zlib.crc32(f"{int(prompt_seed)}/{int(sample)}".encode()) % SEED_MOD
