"""rlhf_jax.data.locations: the one data setting, $RLHF_JAX_DATA_DIR, and the copies the readers
pick by it (hh-rlhf's catalog, the evaluations' full data sets). Each test sets or unsets the
variable itself: `make test` passes ../shared/data where there is one, a bare pytest may not."""
import ast
import os
import pathlib
import re

import pytest

import rlhf_jax
from rlhf_jax.data import locations
from rlhf_jax.data.hh_rlhf import catalog
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.evals import bbq, suite, winogender

ENV = "RLHF_JAX_DATA_DIR"


@pytest.mark.parametrize("value", [None, ""])
def test_unset_or_empty_means_no_local_copy(monkeypatch, value):
  if value is None:
    monkeypatch.delenv(ENV, raising=False)
  else:
    monkeypatch.setenv(ENV, value)  # the Makefile exports nothing then, but a shell may export ""
  assert locations.ENV == ENV
  assert locations.data_dir() is None
  assert locations.local_copy(locations.HH_RLHF) is None and locations.local_copy("evals", "bbq") is None


def test_the_setting_is_read_at_each_call_and_made_absolute(tmp_path, monkeypatch):
  (tmp_path / "data" / "evals" / "bbq").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv(ENV, "data")
  assert locations.data_dir() == str(tmp_path / "data")
  assert locations.local_copy("evals", "bbq") == str(tmp_path / "data" / "evals" / "bbq")
  assert locations.local_copy(locations.HH_RLHF) is None  # absent: each reader's own fallback applies
  monkeypatch.delenv(ENV)
  assert locations.local_copy("evals", "bbq") is None


@pytest.mark.parametrize("kind, says", [("missing", "does not exist"), ("file", "is not a directory")])
def test_a_setting_that_is_not_a_directory_is_one_clear_error(tmp_path, monkeypatch, kind, says):
  path = tmp_path / "data"
  if kind == "file":
    path.write_text("")
  monkeypatch.setenv(ENV, str(path))
  with pytest.raises(ConfigError) as info:
    locations.data_dir()
  message = str(info.value)
  assert isinstance(info.value, UserError)  # the entry points print it as one line and exit 2
  assert "\n" not in message and message.startswith(f"$RLHF_JAX_DATA_DIR={path}: {says}; ")
  # Every reader refuses it the same way; none quietly falls back to a bundled sample.
  for read in (lambda: locations.local_copy("evals"), lambda: catalog.local_source_dir("harmless-base", "test"),
               lambda: suite.full_data_dir("bbq")):
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
      read()


def test_unset_the_package_finds_its_bundled_samples(monkeypatch):
  monkeypatch.delenv(ENV, raising=False)
  assert catalog.local_source_dir("harmless-base", "test") == catalog.SAMPLE_DIR
  package = os.path.dirname(os.path.abspath(rlhf_jax.__file__))
  for bundled in (catalog.SAMPLE_DIR, bbq.SAMPLE_DIR, winogender.BUNDLED_DIR):
    assert os.path.realpath(bundled).startswith(os.path.realpath(package) + os.sep), bundled
  assert len(bbq.load_bbq(None, categories=("Age",))) == 120
  assert len(winogender.load_winogender(None).pairs) == 240


def test_full_eval_data_come_from_the_setting_only(tmp_path, monkeypatch):
  monkeypatch.delenv(ENV, raising=False)
  with pytest.raises(ConfigError, match=re.escape("full=True: no full copy of bbq found ($RLHF_JAX_DATA_DIR is "
                                                  "not set); put it in $RLHF_JAX_DATA_DIR/evals/bbq/")):
    suite.full_data_dir("bbq")
  (tmp_path / "evals" / "winogender").mkdir(parents=True)
  monkeypatch.setenv(ENV, str(tmp_path))
  assert suite.full_data_dir("winogender") == str(tmp_path / "evals" / "winogender")
  with pytest.raises(ConfigError, match=re.escape(f"($RLHF_JAX_DATA_DIR={tmp_path} has no evals/bbq/); ")):
    suite.full_data_dir("bbq")


def test_the_configured_real_copies_are_chosen():
  """Under `make test` (RLHF_JAX_DATA_DIR=../shared/data): the full copies, not the samples."""
  root = locations.data_dir()
  if root is None or not os.path.exists(os.path.join(root, "hh-rlhf", "harmless-base", "test.jsonl.gz")):
    pytest.skip(f"no real hh-rlhf harmless-base/test in ${ENV}={os.environ.get(ENV)!r}")
  assert catalog.local_source_dir("harmless-base", "test") == os.path.join(root, "hh-rlhf")
  for name in ("bbq", "winogender"):
    if os.path.isdir(os.path.join(root, "evals", name)):
      assert suite.full_data_dir(name) == os.path.join(root, "evals", name)


def test_no_module_counts_its_way_out_of_the_package():
  """Data locations are settings: no path built from os.pardir or ".." in the package's code."""
  package = pathlib.Path(rlhf_jax.__file__).parent
  found = []
  for path in sorted(package.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if (isinstance(node, ast.Attribute) and node.attr == "pardir") or (
          isinstance(node, ast.Constant) and isinstance(node.value, str) and ".." in node.value.split("/")):
        found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
  assert found == []
