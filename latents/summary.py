"""`sit inspect`: what a latent dataset holds - its card, counts, classes and storage size."""

from __future__ import annotations

from collections import Counter

import numpy as np

from latents.autoencoder import LatentTransform, describe_identity
from latents.dataset import LatentIndex, read_rejects
from latents.format import CARD_NAME, MANIFEST_NAME, SAMPLES_NAME
from latents.words import plural


def summarize(url: str, storage_options: dict | None = None) -> dict:
    """A JSON-able summary of the dataset at ``url`` (raises DatasetError if it is not complete)."""
    index = LatentIndex.open(url, storage_options)
    card, spec = index.card, index.card.spec
    histogram = np.zeros(card.num_classes, dtype=np.int64)
    for _, table in index.iter_samples(["label"]):  # streamed: a few shards' labels at a time
        counts = np.bincount(table.column("label").to_numpy(), minlength=len(histogram))
        histogram = np.pad(histogram, (0, len(counts) - len(histogram))) + counts
    per_shard = index.shard_column("num_samples")
    index_bytes = sum(index.root.size(n) for n in (CARD_NAME, MANIFEST_NAME, SAMPLES_NAME))
    rejects = read_rejects(index.root)
    reasons = {} if rejects is None else dict(Counter(rejects.column("reason").to_pylist()).most_common())
    return {
        "url": index.root.url,
        "card": {k: v for k, v in vars(card).items() if k not in ("channel_mean", "channel_std")},
        "channel_mean": card.channel_mean,
        "channel_std": card.channel_std,
        "samples": card.num_samples,
        "shards": card.num_shards,
        "samples_per_shard": {"min": int(per_shard.min()), "max": int(per_shard.max())},
        "classes_present": int((histogram > 0).sum()),
        "class_histogram": histogram.tolist(),
        "class_count": {"min": int(histogram.min()), "max": int(histogram.max()), "mean": float(histogram.mean())},
        "shard_bytes": card.total_bytes,
        "index_bytes": index_bytes,
        "bytes_per_sample": card.total_bytes / card.num_samples,
        "raw_bytes_per_sample": spec.raw_sample_bytes,
        "compression_ratio": spec.raw_sample_bytes * card.num_samples / card.total_bytes,
        "rejected": None if rejects is None else rejects.num_rows,  # inputs the encoder could not encode
        "rejected_by_reason": reasons,
    }


def format_summary(s: dict) -> str:
    card = s["card"]
    gib = 2**30
    lines = [
        f"{s['url']}",
        f"  format        {card['format']} v{card['format_version']}, written by {card['tool_version']}",
        f"  latents       {card['stored']} {card['storage_dtype']} {tuple(card['latent_shape'])} "
        f"from {card['resolution']} px images, flips {'stored' if card['flips'] else 'not stored'}",
        f"  autoencoder   {card['vae']}: {describe_identity(card['autoencoder'])}, "
        f"{'posterior mean+std' if card['stored'] == 'posterior' else card['stored']} stored",
        f"  transform     {LatentTransform.from_dict(card['transform']).describe()} (applied by the reader), "
        f"model latents {tuple(LatentTransform.from_dict(card['transform']).model_shape(card['latent_shape']))}",
        f"  samples       {s['samples']:,} in {plural(s['shards'], 'shard')} "
        f"({s['samples_per_shard']['min']:,}-{s['samples_per_shard']['max']:,} per shard)",
        f"  classes       {s['classes_present']:,} of {card['num_classes']:,} present; per class "
        f"min {s['class_count']['min']:,}, mean {s['class_count']['mean']:,.1f}, max {s['class_count']['max']:,}",
        f"  storage       {s['shard_bytes'] / gib:,.3f} GiB of shards + {s['index_bytes'] / 2**20:,.2f} MiB index; "
        f"{s['bytes_per_sample']:,.0f} B/sample ({s['raw_bytes_per_sample']:,} B raw, "
        f"compression ratio {s['compression_ratio']:.3f})",
        f"  channel mean  {', '.join(f'{v:+.4f}' for v in s['channel_mean'])}",
        f"  channel std   {', '.join(f'{v:.4f}' for v in s['channel_std'])}",
        f"  source        {card['source_fingerprint'] or '(not recorded)'}",
    ]
    if s["rejected"] is not None:
        why = ", ".join(f"{reason} {n:,}" for reason, n in s["rejected_by_reason"].items())
        lines.append(f"  rejected      {s['rejected']:,} inputs (rejects.parquet){': ' + why if why else ''}")
    return "\n".join(lines)
