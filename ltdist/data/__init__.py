"""Long-tailed data layer: shard writers, index, the rebalancing training stream and eval loading."""

from ltdist.data.ensure import ensure_shards
from ltdist.data.evaluation import iterate_split, scan_split
from ltdist.data.index import LongTailIndex, ShardInfo, read_index
from ltdist.data.stream import Batch, DataSkipError, TrainStream, build_train_stream

__all__ = [
    "Batch", "DataSkipError", "LongTailIndex", "ShardInfo", "TrainStream", "build_train_stream", "ensure_shards",
    "iterate_split", "read_index", "scan_split",
]
