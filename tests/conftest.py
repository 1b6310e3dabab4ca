"""Test-session setup: 8 fake CPU devices, so sharded-vs-unsharded tests run on any machine.

XLA reads the flag once, when jax first initialises its backend, so it is set here, before any
test module imports jax.
"""
import os

import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
# A subprocess told its own device count (the multi-process sweep's) keeps it.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


def pytest_configure(config):
  """One XLA persistent compilation cache for the session, its xdist workers and the subprocesses
  its tests launch (inherited through the environment): a resumed, relaunched or rerun job compiles
  the programs an earlier one already did, and a loaded executable computes what a fresh compile
  does, bitwise (tests/test_stages.py). A cache the caller names is kept as it is."""
  if hasattr(config, "workerinput") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import tempfile
  config._rlhf_jax_cache = tempfile.mkdtemp(prefix="rlhf_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = config._rlhf_jax_cache
  # Most programs of the tiny models compile in well under a second: caching every one costs
  # more in writes than the rare reload saves.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
  # A size limit turns on the cache's file lock: workers and subprocesses write entries at once.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


def pytest_unconfigure(config):
  import shutil
  if getattr(config, "_rlhf_jax_cache", None):
    shutil.rmtree(config._rlhf_jax_cache, ignore_errors=True)


# The slowest modules first (their wall seconds on 2 cores, measured with --durations): under
# `--dist loadfile` a worker takes a whole module at a time, and a long one started last is the
# suite's tail.
_SLOW_MODULES = ("test_bucket_sweep", "test_faults", "test_sweep", "test_lora", "test_online", "test_smollm2_cpu",
                 "test_evaluate", "test_sweep_checkpoints", "test_notebook", "test_storage_runs", "test_pm",
                 "test_train_ppo", "test_sharding")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_SLOW_MODULES)}
  items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable


def shared_across_workers(tmp_path_factory, name: str, build) -> str:
  """A directory `build(path)` fills once per test session, however many xdist workers ask for it:
  the first builds it under a file lock, the others wait and reuse it. Tests only read it."""
  from filelock import FileLock
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's directory, above each worker's own
  path, built = root / name, root / f"{name}.built"
  with FileLock(str(root / f"{name}.lock")):
    if not built.exists():
      if path.exists():  # a worker failed while building it: start again
        import shutil
        shutil.rmtree(path)
      path.mkdir()
      build(str(path))
      built.touch()
  return str(path)


def small_run_config(config, steps: int, max_examples: int):
  """An LM / PM config shrunk for an in-process test run on all 8 fake devices (FSDP)."""
  config.train.steps = steps
  config.train.batch_size = 8
  config.train.seq_len = 64
  config.train.log_every = 1
  config.train.eval_every = steps
  config.train.checkpoint_every = 1000
  config.data.max_examples = max_examples
  config.mesh.shape = (1, -1, 1)
  config.progress_bar = False
  return config


def micro_sweep_config(**changes):
  """experiments/tiny_sweep.py shrunk to seconds per stage: one size (the per-size stages cost
  about a minute of compilation each), few steps, data parallel."""
  from rlhf_jax.experiments.config_files import load_module
  c = load_module(os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "tiny_sweep.py")).get_config()
  size = lambda d, layers: {"d_model": d, "num_layers": layers, "num_heads": d // 16, "num_kv_heads": 1,
                            "head_dim": 16, "mlp_dim": 2 * d, "vocab_size": 512}
  c.sizes = ("xs",)
  c.models = {"xs": size(32, 1), "s": size(48, 1), "gold": size(64, 2)}
  c.data.max_examples = 300
  data_parallel = {"mesh": {"shape": (-1, 1, 1)}}  # data parallel over the 8 fake devices
  short = lambda steps: {"steps": steps, "batch_size": 8, "seq_len": 64, "eval_every": steps,
                         "checkpoint_every": steps, "log_every": 5, "async_checkpointing": False}
  c.lm = {**data_parallel, "train": short(30)}
  c.sft = {"objective": "sft", "train": short(10)}
  c.pm = {**data_parallel, "train": short(20)}
  c.gold_pm = {"train": short(30)}
  c.labels.num_pairs, c.labels.batch_size = 64, 64
  c.rl = {**data_parallel, "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "log_every": 1,
                                  "async_checkpointing": False},
          "ppo": {"rollout_batch": 16, "num_minibatches": 2, "epochs": 1},
          "sampling": {"prompt_len": 24, "max_new_tokens": 8},
          "eval": {"num_prompts": 8}}
  c.bon = {"ns": (1, 2, 4), "num_prompts": 8, "seed": 0}
  # Dr. GRPO, GSPO and DAPO are left to the tiny sweep (make run): each would add a stage's
  # compilation to every micro sweep; tests/test_train_ppo.py runs them through train_ppo.
  c.methods = ("ppo", "rloo", "grpo", "dpo")
  c.rloo = c.grpo = {"ppo": {"samples_per_prompt": 4}}  # 4 prompts x 4 samples
  c.dpo = {"betas": (0.1,), "loss": "dpo", "optimizer": {"learning_rate": 1e-3},
           "train": {**short(4), "eval_every": 2, "log_every": 1}}
  c.evals = {"suites": "bias_cloze,winogender,bbq,ood,mc,elo", "batch_size": 32,
             "bias_cloze": {"occupations": ("nurse", "engineer", "baker", "carpenter")},
             "bbq": {"max_per_category": 3}, "ood": {"max_prompts": 24, "ks": (0, 1, 4)},
             "elo": {"bon_ns": (2,)}}
  c.progress_bar = False
  for key, value in changes.items():
    c[key] = value
  return c


@pytest.fixture(scope="session")
def micro_sweep_dir(tmp_path_factory):
  """A whole micro sweep, run once per test session (the sweep and notebook tests share it)."""
  from rlhf_jax.experiments.sweep import run_sweep
  return shared_across_workers(tmp_path_factory, "micro_sweep", lambda workdir: run_sweep(micro_sweep_config(), workdir))


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
  """A 3-step tiny LM and a 3-step PM started from it: the (policy_from, pm_dir) every PPO test
  needs, trained once per session."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
  from configs import lm as lm_config
  from configs import pm as pm_config
  from rlhf_jax.trainers import train_lm, train_pm

  def build(root):
    train_lm.train(small_run_config(lm_config.get_config("tiny"), 3, max_examples=120), os.path.join(root, "lm"))
    config = small_run_config(pm_config.get_config("tiny"), 3, max_examples=120)
    config.init_from = os.path.join(root, "lm")
    train_pm.train(config, os.path.join(root, "pm"))
  root = shared_across_workers(tmp_path_factory, "tiny_runs", build)
  return os.path.join(root, "lm"), os.path.join(root, "pm")


def micro_online_config(**changes):
  """The micro sweep's sizes and stages, two online rounds of 32 labels, few evaluation prompts."""
  import ml_collections
  c = micro_sweep_config()
  for key in ("bon", "evals", "methods", "rloo", "grpo", "dpo"):  # sweep-only sections
    del c[key]
  c.online = ml_collections.ConfigDict({"rounds": 2, "pairs_per_round": 32, "agreement": 0.8, "seeds": (0,),
                                        "eval_pairs": 8, "elo_prompts": 8})
  c.labels.batch_size = 32
  for key, value in changes.items():
    c[key] = value
  return c


@pytest.fixture(scope="session")
def micro_online_dir(micro_sweep_dir, tmp_path_factory):
  """A micro online run (2 rounds, both arms), run once per session; its base stages are copied
  from the micro sweep (same settings, so they are skipped)."""
  import shutil

  from rlhf_jax.experiments import online

  def build(workdir):
    for name in ("tokenizer", "lm_xs", "lm_gold", "sft_xs", "pm_gold", "tfds"):
      shutil.copytree(os.path.join(micro_sweep_dir, name), os.path.join(workdir, name))
    online.run_online(micro_online_config(), workdir)
  return shared_across_workers(tmp_path_factory, "micro_online", build)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """One fake-gcs-server per session (bucket `runs`), with this process's environment pointed at
  it; subprocesses get `gcs_server.env`. Local stand-ins of bucket data (rlhf_jax.data.locations.
  local_cache) go to a session directory, not ~/.cache."""
  from fake_gcs import FakeGCS
  server = FakeGCS(buckets=("runs",))
  server.env["RLHF_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("rlhf_jax_cache"))
  saved = {k: os.environ.get(k) for k in server.env}
  os.environ.update(server.env)
  yield server
  server.kill()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
