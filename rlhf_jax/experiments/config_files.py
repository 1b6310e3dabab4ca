"""Experiment config files (experiments/*.py, each with get_config()) loaded by path: one builds on
another (online_tiny.py and trust_tiny.py on tiny_sweep.py), and tests load them as users do."""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import ml_collections


def load_module(path: str) -> ModuleType:
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling_config(this_file: str, name: str) -> ml_collections.ConfigDict:
  """get_config() of the config file `name` in the directory of this_file (a config's __file__)."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(this_file)), name)).get_config()
