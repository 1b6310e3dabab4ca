"""Sweep sizes that are checkpoints: `config.models.<size> = {"from": "hf:DIR"}` (or "gguf:FILE").

Such a size is not pretrained by the sweep: its `lm_<size>` stage imports the checkpoint into
<workdir>/lm_<size> (rlhf_jax.hf.runs), so the stages that read lm_<size> (SFT, the PMs, the labels,
the policies) start from it as they start from a pretrained LM. The stage's settings are the source,
a hash of its contents and the model, so a checkpoint edited since it was imported is refused as a
changed setting. Its ModelConfig is the checkpoint's; the entry may add runtime fields (dtype,
scan_layers, ...), which otherwise are the base preset's, as every size of the sweep computes.

The sweep's tokenizer is then the checkpoints' (no tokenizer stage): every size and the gold size
must name checkpoints with byte-identical tokenizer files, checked before anything runs.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

from rlhf_jax import hosts, storage
from rlhf_jax.errors import ConfigError
from rlhf_jax.experiments.stages import STAGE_DONE, Stage, barrier
from rlhf_jax.hf import config as hf_config
from rlhf_jax.hf import gguf_model, runs
from rlhf_jax.model.config import ModelConfig, get_preset

FROM = "from"


def source(config, name: str) -> Optional[str]:
  """The checkpoint `hf:DIR` / `gguf:FILE` size `name` names, None for a size the sweep pretrains."""
  if name not in config.models:
    raise ConfigError(f"size {name!r} has no entry in config.models (known: {sorted(config.models)})")
  spec = config.models[name]
  if FROM not in spec:
    return None
  ref = spec[FROM]
  if not isinstance(ref, str) or not (runs.is_hf(ref) or gguf_model.is_gguf(ref)):
    raise ConfigError(f"models.{name}.{FROM}={ref!r}: expected 'hf:DIR' or 'gguf:FILE'")
  return ref


def _runtime(config, name: str) -> dict:
  spec = dict(config.models[name])
  extra = sorted(set(spec) - {FROM, *hf_config.RUNTIME_FIELDS})
  if extra:
    raise ConfigError(f"models.{name}: {extra} beside {FROM!r}: a checkpoint's model is its own; only runtime "
                      f"fields {list(hf_config.RUNTIME_FIELDS)} may be set")
  preset = get_preset(config.base_preset)
  return {k: spec.get(k, getattr(preset, k)) for k in hf_config.RUNTIME_FIELDS}


def model_config(config, name: str) -> ModelConfig:
  """The ModelConfig of checkpoint size `name`: the checkpoint's, with the runtime fields."""
  return runs.reference_model(source(config, name), _runtime(config, name))


def all_checkpoints(config, names: Sequence[str]) -> bool:
  """Whether the sizes `names` are checkpoints (True) or all pretrained here (False). Mixed sizes, and
  checkpoints whose tokenizers differ, are refused: the sizes of a sweep share one tokenizer."""
  refs = {name: source(config, name) for name in names}
  own = [name for name, ref in refs.items() if ref is None]
  if not own:
    first, *rest = names
    tokenizer = runs.tokenizer_bytes(refs[first])
    for name in rest:
      if refs[name] != refs[first] and runs.tokenizer_bytes(refs[name]) != tokenizer:
        raise ConfigError(f"sizes {first!r} ({refs[first]}) and {name!r} ({refs[name]}) have different "
                          f"tokenizers: every size of a sweep, the gold size included, shares one")
    return True
  if len(own) < len(names):
    named = [name for name in names if name not in own]
    raise ConfigError(f"sizes {named} are checkpoints but {own} are pretrained here, with a tokenizer trained "
                      f"on the corpus, which a checkpoint's cannot be: name a checkpoint for every size and the "
                      f"gold size, or for none")
  return False


def settings(config, name: str) -> dict:
  """What lm_<name> depends on: the checkpoint, by reference and by content, and its model."""
  ref = source(config, name)
  return {"source": ref, "source_hash": runs.content_hash(ref), "model": model_config(config, name).to_dict()}


def provenance(config, workdir: str, name: str) -> dict:
  """The keys a results row of size `name` adds: its checkpoint and the content hash its lm_<name>
  stage imported (none for a size pretrained here, whose rows stay as they were)."""
  ref = source(config, name)
  if ref is None:
    return {}
  done = json.loads(storage.read_text(storage.join(workdir, f"lm_{name}", STAGE_DONE)))
  return {"source": ref, "source_hash": done["settings"]["source_hash"]}


def import_stage(config, workdir: str, name: str, mesh_shape: Sequence[int]) -> Stage:
  """lm_<name>: the checkpoint imported as the run directory <workdir>/lm_<name> (weights on a mesh
  of mesh_shape while they are written)."""
  ref, runtime = source(config, name), _runtime(config, name)
  stage_name = f"lm_{name}"

  def run(d):
    # The import writes a new directory and renames it into place: the one the runner made (or a
    # killed import left without stage_done.json) goes first.
    if hosts.is_lead():
      storage.rmtree(d)
    barrier(f"{stage_name}: cleared")
    runs.import_into(ref, d, runtime, tuple(mesh_shape))
    return {"source": ref, "source_path": storage.absolute(runs.source_path(ref))}
  return Stage(stage_name, settings(config, name), run)
