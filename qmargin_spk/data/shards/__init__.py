"""The training set as tar shards: their layout and index, the writer, and the crop dataset that streams them.

``index.py`` holds the layout (``shards.json``), ``writer.py`` writes the shards
(:func:`write_shards`) and ``reader.py`` streams them as training crops in exact epochs
(:class:`ShardCropDataset`); ``docs/data_shards.md`` describes all three. The public names are
re-exported here, so ``qmargin_spk.data.shards.ShardCropDataset`` names the dataset in hparams files.
"""

from qmargin_spk.data.shards.index import INDEX_NAME, SHARD_FORMAT, ShardIndex, ShardInfo, shard_name
from qmargin_spk.data.shards.reader import (
    ShardCropDataset,
    ShardSpan,
    buffered_shuffle,
    epoch_shard_order,
    slot_spans,
    worker_item_counts,
)
from qmargin_spk.data.shards.writer import plan_shards, write_shards

__all__ = [
    "INDEX_NAME",
    "SHARD_FORMAT",
    "ShardCropDataset",
    "ShardIndex",
    "ShardInfo",
    "ShardSpan",
    "buffered_shuffle",
    "epoch_shard_order",
    "plan_shards",
    "shard_name",
    "slot_spans",
    "worker_item_counts",
    "write_shards",
]
