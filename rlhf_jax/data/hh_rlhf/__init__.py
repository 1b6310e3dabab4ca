"""hh-rlhf (Anthropic, MIT licence): catalog, validated readers, and a TFDS builder (imported lazily)."""
from rlhf_jax.data.hh_rlhf.catalog import SUBSETS, local_source_dir, split_files
from rlhf_jax.data.hh_rlhf.records import (
    MalformedRecordError,
    ReadReport,
    read_comparisons,
    read_prompts,
    read_red_team,
)
