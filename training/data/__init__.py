"""The data pipeline both training tasks share: shard reading and skip accounting (:mod:`.shards`),
the resumable stream and loader (:mod:`.stream`), and per-task sample builders: image-caption pairs for
SigLIP (:mod:`.pairs`), image + prompt/answer token rows for the VLM (:mod:`.vlm`), with precomputed
tower features read from a feature cache (:mod:`.feature_cache`)."""

from .pairs import PairBuilder, TokenizeOne, build_dataset
from .shards import (
    CAPTION_FIELDS,
    IMAGE_EXTENSIONS,
    SKIP_REASONS,
    ShardSpec,
    SkipCounter,
    SkipSample,
    check_shard_specs,
    default_decode_image,
    distributed_info,
    expand_shards,
    iter_tar_samples,
    read_caption,
    read_image,
    shard_paths,
)
from .stream import (
    TRUNCATION_WARN_SHARE,
    ResumePlan,
    SampleBuilder,
    ShardDataset,
    ShardLoader,
    batches_before,
    shard_dataset,
)

__all__ = [
    "CAPTION_FIELDS",
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "TRUNCATION_WARN_SHARE",
    "PairBuilder",
    "ResumePlan",
    "SampleBuilder",
    "ShardDataset",
    "ShardLoader",
    "ShardSpec",
    "SkipCounter",
    "SkipSample",
    "TokenizeOne",
    "batches_before",
    "build_dataset",
    "check_shard_specs",
    "default_decode_image",
    "distributed_info",
    "expand_shards",
    "iter_tar_samples",
    "read_caption",
    "read_image",
    "shard_dataset",
    "shard_paths",
]
