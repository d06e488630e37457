"""The one table mapping the models' logical axis names to mesh axes, and the FSDP rule.

Logical names in use (grep `with_logical_partitioning` / `with_logical_constraint` in models/):
  activations: `batch`, `length`, `embed`, `vocab` (logits);
  parameters:  `vocab`, `embed`, `mlp`, `heads`, `kv` (head dim), `pos` (ViT position tokens),
               `layers` (stacked blocks under nn.scan), and None for small never-sharded axes.

Rules (MaxText style: the first rule whose mesh axes are still free wins):
  batch -> ("data", "fsdp")         every batch is split over all data-parallel devices
  heads, mlp, vocab -> "tensor"     Megatron-style tensor parallelism (no-op when tensor == 1)
  everything else -> replicated     (embed, kv, length, pos, layers)
FSDP rule (applied to parameters and their optimizer state by `parallel.sharding`, not a table entry
because it depends on shapes): each parameter is additionally sharded over "fsdp" on its largest
dimension that is divisible by the fsdp size and not already used by "tensor" (never the stacked
`layers` axis: nn.scan slices it per step); a parameter with no such dimension stays replicated
over "fsdp". A mesh axis that does not divide its dimension is dropped (that dim is replicated).
"""

from __future__ import annotations

from typing import Optional, Sequence

from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, object], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("length", None),
    ("embed", None),
    ("kv", None),
    ("pos", None),
    ("layers", None),
)

LOGICAL_NAMES = tuple(name for name, _ in RULES)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def fit_spec(spec: P, shape: Sequence[int], axis_sizes: dict) -> P:
    """Drop mesh axes of size 1 and axes that do not divide their dimension (-> replicated there)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        kept, prod = [], 1
        for a in _axes(entry):
            if axis_sizes[a] > 1 and dim % (prod * axis_sizes[a]) == 0:
                kept.append(a)
                prod *= axis_sizes[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def add_fsdp(spec: P, shape: Sequence[int], names: Optional[Sequence], fsdp_size: int) -> P:
    """The FSDP rule: shard the largest free dimension divisible by `fsdp_size` over "fsdp"."""
    entries = list(tuple(spec) + (None,) * (len(shape) - len(spec)))
    if fsdp_size <= 1 or any("fsdp" in _axes(e) for e in entries):
        return P(*entries)
    names = tuple(names) if names is not None else (None,) * len(shape)
    best = None
    for d, size in enumerate(shape):
        if entries[d] is None and names[d] != "layers" and size % fsdp_size == 0:
            if best is None or size > shape[best]:
                best = d
    if best is not None:
        entries[best] = "fsdp"
    return P(*entries)
