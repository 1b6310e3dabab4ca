"""Stand-ins the evaluation tests share."""

from rlhf_jax.data.sequence_start import SequenceStart


class CharTok(SequenceStart):
  """One token per character, so requests decode back to their text exactly."""
  eos_id = 2

  def encode(self, text):
    return [ord(ch) for ch in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


# lm-evaluation-harness task over our MC JSONL (rlhf_jax.evals.harness): the choices carry their
# leading space, so no delimiter is added, and acc_norm counts the choice as it stands (the space
# included), as the mc suite does.
HARNESS_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_harness_task(directory, name: str, path: str) -> str:
  """<directory>/<name>.yaml: a harness task over the MC JSONL file at path; returns directory."""
  import os
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
    f.write(HARNESS_TASK_YAML.format(name=name, path=os.path.abspath(path)))
  return str(directory)
