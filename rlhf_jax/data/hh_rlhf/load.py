"""Loading hh-rlhf splits through the TFDS builder, as Python strings."""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

from rlhf_jax import storage
from rlhf_jax.data import locations
from rlhf_jax.data.hh_rlhf import catalog
from rlhf_jax.errors import DataError


class Split(NamedTuple):
  records: list[dict]  # in file order, text fields as str
  skipped: dict[str, int]  # malformed records skipped while preparing: {problem: count}
  ties: int = 0  # comparisons with chosen == rejected in the source (in records only if kept)


def load_split(subset: str = "harmless-base", split: str = "test", *, data_dir: Optional[str] = None,
               source_dir: Optional[str] = None, skip_malformed: bool = False,
               keep_ties: bool = False) -> Split:
  """Records of one split, prepared once by the TFDS builder and read back.

  source_dir: a local copy laid out like upstream; default: the best local copy
    (`catalog.local_source_dir`), and a download from upstream if there is none.
  data_dir: where TFDS writes the prepared ArrayRecord files (default: TFDS's own default). In a
    bucket (gs://...), this host's `locations.local_cache` stands in for it: ArrayRecord files are
    written and read by C++ through plain open(), which cannot reach a bucket (without TensorFlow's
    file system, not installed), and the prepared data are derived deterministically from the source
    files, so each host prepares its own copy once; nothing is written to the bucket.
  keep_ties: keep comparisons whose two texts are identical (left out, and counted, by default).
  """
  import tensorflow_datasets as tfds  # heavy: only data preparation pays for it

  from rlhf_jax.data.hh_rlhf.builder import HhRlhf

  tfds.disable_progress_bar()  # one bar per split and shard floods the logs of a training run
  catalog.split_files(subset)  # validates the names early
  if source_dir and not storage.exists(storage.join(source_dir, catalog.split_files(subset)[split])):
    # An explicit local copy without the split is a mistake to report, not a reason to download.
    raise FileNotFoundError(f"hh-rlhf {subset}/{split}: {catalog.split_files(subset)[split]} not found "
                            f"under source_dir {source_dir}")
  source_dir = source_dir or catalog.local_source_dir(subset, split)
  if data_dir:
    data_dir = locations.local_cache("tfds", data_dir, storage.absolute(source_dir) if source_dir else catalog.UPSTREAM)
  make = lambda: HhRlhf(config=subset, data_dir=data_dir, file_format="array_record",
                        skip_malformed=skip_malformed, keep_ties=keep_ties)
  with locations.preparing(os.fspath(make().data_dir)):
    builder = make()  # made again once the lock is held: what another process prepared meanwhile is read
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(source_dir) if source_dir else None))
  if split not in builder.info.splits:
    raise FileNotFoundError(f"hh-rlhf {subset}/{split} was not built (source: {source_dir}); "
                            f"available: {sorted(builder.info.splits)}")
  source = builder.as_data_source(split)
  records = [{k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in source[i].items()}
             for i in range(len(source))]
  meta = builder.info.metadata.get(split, {})
  records = _with_ties(records, meta, keep_ties, f"hh-rlhf {subset}/{split} prepared in {builder.data_dir}")
  return Split(sorted(records, key=lambda r: r["line"]), dict(meta.get("skipped", {})), meta.get("ties", 0))


def _with_ties(records: list[dict], meta: dict, keep_ties: bool, where: str) -> list[dict]:
  """The prepared copy is reused whatever keep_ties it was built with: ties are left out here if
  it kept them, and a copy without them cannot serve keep_ties=True."""
  if not keep_ties:
    kept = [r for r in records if "chosen" not in r or r["chosen"] != r["rejected"]]
    if records and not kept:
      raise DataError(f"{where}: no records ({len(records)} ties (chosen == rejected) left out)")
    return kept
  if meta.get("ties") and not meta.get("ties_kept"):
    raise DataError(f"{where} has its {meta['ties']} ties left out; prepare it again elsewhere "
                    f"(another data_dir, e.g. data.tfds_dir) to keep them")
  return records
