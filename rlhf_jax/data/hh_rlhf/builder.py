"""hh-rlhf as a tensorflow-datasets builder that needs no TensorFlow (ArrayRecord files).

  builder = HhRlhf(config="harmless-base", data_dir=..., file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=SRC))
  test = builder.as_data_source("test")  # random access; text fields come back as bytes

Online, the files are downloaded from the upstream repository and checked against
`checksums.tsv` (sizes and SHA-256; run once with `register_checksums=True` to record a split
not yet listed). Offline, point `manual_dir` at a directory laid out like the upstream repository
(`harmless-base/test.jsonl.gz`, ...): only the splits found there are built, each file first
checked against the same sizes and SHA-256 (`catalog.verify_file`).

Comparisons whose two texts are identical (ties) are left out unless `keep_ties=True`; malformed
records are an error unless `skip_malformed=True`. Either way the counts are kept in the prepared
dataset's metadata: {split: {"skipped": {problem: n}, "first_errors": [...], "ties": n,
"ties_kept": bool}}.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from rlhf_jax import storage
from rlhf_jax.data.hh_rlhf import catalog
from rlhf_jax.data.hh_rlhf.records import read_comparisons, read_red_team

_COMPARISON_FEATURES = {
    "chosen": tfds.features.Text(), "rejected": tfds.features.Text(), "prompt": tfds.features.Text(),
    "chosen_response": tfds.features.Text(), "rejected_response": tfds.features.Text(),
    "line": tfds.features.Scalar(dtype=np.int32),
}
_RED_TEAM_FEATURES = {
    "transcript": tfds.features.Text(), "task_description": tfds.features.Text(),
    "rating": tfds.features.Scalar(dtype=np.float32),
    "min_harmlessness_score_transcript": tfds.features.Scalar(dtype=np.float32),
    "line": tfds.features.Scalar(dtype=np.int32),
}


class HhRlhf(tfds.core.GeneratorBasedBuilder):
  """Anthropic's helpful/harmless comparisons (Bai et al. 2022) and red-team attempts."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Comparisons split into shared prompt and responses; validated.",
      "1.1.0": "Ties (chosen == rejected) left out unless keep_ties=True, counted in the metadata; "
               "local source files checked against checksums.tsv; an empty, truncated or corrupt "
               "file is an error.",
  }
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=s, description=f"hh-rlhf {s}") for s in catalog.SUBSETS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Offline: place the upstream files in manual_dir with the upstream layout, e.g. "
      "harmless-base/test.jsonl.gz (see rlhf_jax.data.hh_rlhf.catalog.split_files).")

  def __init__(self, *, skip_malformed: bool = False, keep_ties: bool = False, **kwargs):
    self._skip_malformed, self._keep_ties = skip_malformed, keep_ties
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = _RED_TEAM_FEATURES if self.builder_config.name == catalog.RED_TEAM else _COMPARISON_FEATURES
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(features),
        homepage="https://github.com/anthropics/hh-rlhf",
        metadata=tfds.core.MetadataDict(),  # {split: counts of skipped records and ties}
        citation="Bai et al. 2022, Training a Helpful and Harmless Assistant with Reinforcement "
                 "Learning from Human Feedback, arXiv:2204.05862")

  def _split_generators(self, dl_manager):
    files = catalog.split_files(self.builder_config.name)
    try:
      manual = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:
      if "not enabled" not in str(e):  # a manual dir was given but is missing or empty
        raise FileNotFoundError(f"hh-rlhf manual_dir: {e}") from None
      paths = dl_manager.download({s: catalog.url(rel) for s, rel in files.items()})
      return {s: self._generate_examples(s, os.fspath(p)) for s, p in paths.items()}
    found = {s: storage.join(manual, rel) for s, rel in files.items()
             if storage.exists(storage.join(manual, rel))}
    if not found:
      raise FileNotFoundError(f"none of {sorted(files.values())} found under manual_dir {manual}")
    missing = sorted(set(files) - set(found))
    if missing:
      logging.warning("hh-rlhf %s: splits %s not in %s; building %s only",
                      self.builder_config.name, missing, manual, sorted(found))
    for s, p in found.items():  # once per build: a prepared dataset is not read from here again
      catalog.verify_file(p, files[s])
    return {s: self._generate_examples(s, p) for s, p in found.items()}

  def _generate_examples(self, split: str, path: str):
    if self.builder_config.name == catalog.RED_TEAM:
      records, report = read_red_team(path, skip_malformed=self._skip_malformed)
    else:
      records, report = read_comparisons(path, skip_malformed=self._skip_malformed, keep_ties=self._keep_ties)
    # Kept in the prepared dataset's metadata, so later (cached) loads still report them.
    self.info.metadata[split] = {"skipped": dict(report.skipped), "first_errors": report.first_errors,
                                 "ties": report.ties, "ties_kept": report.ties_kept}
    if report.num_skipped or report.ties:
      logging.warning("%s", report.summary())
    for record in records:
      yield record["line"], record
