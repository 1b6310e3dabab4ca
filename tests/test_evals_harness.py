"""lm-evaluation-harness over our model, offline: harness tasks defined by local YAML over local
JSONL (the bundled MC sample, and an ARC-style file converted to our format) give the `mc` suite's
acc and acc_norm; loglikelihood, is_greedy, loglikelihood_rolling and generate_until against
brute force on a tiny random model; unknown tasks and unparsable task files are named."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from rlhf_jax.errors import ConfigError  # noqa: E402
from rlhf_jax.evals import harness  # noqa: E402
from rlhf_jax.evals import multiple_choice as mc  # noqa: E402
from rlhf_jax.evals.loglik import Scorer, encode_requests  # noqa: E402
from rlhf_jax.model.sampling import generate  # noqa: E402
from rlhf_jax.model.transformer import Transformer  # noqa: E402

from eval_fakes import write_harness_task  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
SAMPLE = os.path.join(ROOT, "rlhf_jax", "evals", "data", "mc_sample.jsonl")
ARC = [  # ARC's published layout: question.stem, choices [{label, text}], answerKey
    {"id": "a1", "question": {"stem": "Which gas do plants take in from the air?",
                              "choices": [{"label": "A", "text": "oxygen"}, {"label": "B", "text": "carbon dioxide"},
                                          {"label": "C", "text": "helium"}]}, "answerKey": "B"},
    {"id": "a2", "question": {"stem": "What does a thermometer measure?",
                              "choices": [{"label": "A", "text": "mass"}, {"label": "B", "text": "temperature"},
                                          {"label": "C", "text": "length"}, {"label": "D", "text": "time"}]},
     "answerKey": "B"},
    {"id": "a3", "question": {"stem": "Which of these is a mammal?",
                              "choices": [{"label": "1", "text": "a whale"}, {"label": "2", "text": "a shark"}]},
     "answerKey": "1"},
]
@pytest.fixture(scope="module")
def model(tmp_path_factory):
  from rlhf_jax.data.tokenizer import train_tokenizer
  from rlhf_jax.model.config import ModelConfig
  from rlhf_jax.model.transformer import init_params
  root = tmp_path_factory.mktemp("harness")
  sample = mc.read_task(SAMPLE)
  texts = [ex["context"] + c for ex in sample for c in ex["choices"]] * 12
  texts += [a["question"]["stem"] + " " + c["text"] for a in ARC for c in a["question"]["choices"]] * 12
  tok = train_tokenizer(texts, 300, str(root / "tok"))
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64, max_seq_len=64)
  params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))
  return Scorer(params, cfg, batch_size=8), tok, root


def _tasks_dir(root) -> str:
  tasks = root / "tasks"
  arc_src = root / "arc.jsonl"
  arc_src.write_text("".join(json.dumps(a) + "\n" for a in ARC))
  mc.convert("arc", str(arc_src), str(root / "arc_converted.jsonl"))
  for name, path in (("rlhf_jax_mc_sample", SAMPLE), ("rlhf_jax_arc_converted", str(root / "arc_converted.jsonl"))):
    write_harness_task(tasks, name, path)
  return str(tasks)


def test_harness_tasks_give_the_mc_suites_acc_and_acc_norm(model):
  scorer, tok, root = model
  got = harness.run_tasks(scorer, tok, ["rlhf_jax_mc_sample", "rlhf_jax_arc_converted"], include_path=_tasks_dir(root))
  for task, path in (("rlhf_jax_mc_sample", SAMPLE), ("rlhf_jax_arc_converted", str(root / "arc_converted.jsonl"))):
    ours = mc.evaluate(scorer, tok, mc.read_task(path), name=task)
    assert got[task]["acc,none"] == pytest.approx(ours["acc"], abs=1e-12), task
    assert got[task]["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12), task
  # The check can fail: with the choices' space left out of their lengths (the harness's count for a
  # task with target_delimiter " "), this model's acc_norm on the sample would be another number.
  examples = mc.read_task(SAMPLE)
  sums = scorer.continuation_sums(encode_requests(tok, [ex["context"] for ex in examples for _ in ex["choices"]],
                                                  [c for ex in examples for c in ex["choices"]]))
  bounds = np.cumsum([0] + [len(ex["choices"]) for ex in examples])
  without_space = np.mean([np.argmax(sums[a:b] / np.array([len(c) - 1 for c in ex["choices"]])) == ex["label"]
                           for ex, a, b in zip(examples, bounds[:-1], bounds[1:])])
  assert without_space != pytest.approx(got["rlhf_jax_mc_sample"]["acc_norm,none"])


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_and_is_greedy_against_one_forward_pass(model):
  scorer, tok, _ = model
  lm = harness.RunLM(scorer, tok)
  pairs = [("Question: What colour is the sky?\nAnswer:", " blue"), ("Which of these is a mammal?", " a whale"),
           ("Hi", " there")]
  got = lm.loglikelihood(_instances("loglikelihood", pairs))
  apply = jax.jit(lambda t: Transformer(scorer.cfg).apply({"params": scorer.params}, t).logits)
  for (ctx, cont), (ll, greedy), (ctx_ids, cont_ids) in zip(pairs, got, encode_requests(tok, *zip(*pairs))):
    logits = np.asarray(apply(jnp.asarray([ctx_ids + cont_ids])), np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    rows = range(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)  # token t is predicted at t - 1
    assert ll == pytest.approx(sum(logp[r, t] for r, t in zip(rows, cont_ids)), abs=1e-4 * len(cont_ids))
    assert greedy == all(int(np.argmax(logits[r])) == t for r, t in zip(rows, cont_ids))
  # A continuation that is the model's own greedy choice is greedy.
  ctx_ids = encode_requests(tok, ["Hi"], [" x"])[0][0]
  argmax = int(np.argmax(np.asarray(apply(jnp.asarray([ctx_ids])))[0, -1]))
  scores = scorer.continuation_scores([(ctx_ids, [argmax])])
  assert bool(scores[0][1].all())


def test_loglikelihood_rolling_scores_every_token_once(model):
  scorer, tok, _ = model
  lm = harness.RunLM(scorer, tok)
  short = "Question: How many legs does a dog have? Answer: four"
  ids = tok.encode(short)
  assert len(ids) < scorer.max_len - 1
  got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(short,)]))[0]
  start = tok.bos_prefix() or [tok.eos_id]
  want = scorer.continuation_sums([(start, ids)])[0]
  assert got == pytest.approx(want, abs=1e-4 * len(ids))
  # Longer than a window: still every token once (the sum of per-token terms over the document).
  long = " ".join([short] * 6)
  n = len(tok.encode(long))
  assert n > scorer.max_len
  total = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(long,)]))[0]
  assert np.isfinite(total) and total < 0
  assert total / n == pytest.approx(got / len(ids), rel=0.5)  # about the same per-token loss


def test_generate_until_is_the_greedy_decode_cut_at_the_stop_string(model):
  scorer, tok, _ = model
  lm = harness.RunLM(scorer, tok)
  contexts = ["Question: What colour is the sky?\nAnswer:", "Hi"]
  full = lm.generate_until(_instances("generate_until", [(c, {"until": [], "max_gen_toks": 12}) for c in contexts]))
  for ctx, text in zip(contexts, full):
    ids = (tok.bos_prefix() or []) + tok.encode(ctx)
    gen = generate(scorer.params, jnp.asarray([ids]), jnp.ones((1, len(ids)), bool), jax.random.PRNGKey(0),
                   model=Transformer(scorer.cfg), max_new_tokens=12, temperature=0.0, eos_id=tok.eos_id,
                   pad_id=tok.pad_id)
    assert text == tok.decode(np.asarray(gen.tokens[0])[np.asarray(gen.mask[0])])
  stop = full[0][len(full[0]) // 2:][:2]
  if stop:
    cut = lm.generate_until(_instances("generate_until", [(contexts[0], {"until": [stop], "max_gen_toks": 12})]))[0]
    assert cut == full[0][:full[0].index(stop)]


def test_unknown_tasks_and_unparsable_task_files_are_named(model, tmp_path):
  scorer, tok, _ = model
  with pytest.raises(ConfigError, match="unknown task.*no_such_task"):
    harness.run_tasks(scorer, tok, ["no_such_task"])
  (tmp_path / "broken.yaml").write_text("task: broken_task\ndataset_path: [unclosed\n")
  with pytest.raises(ConfigError, match="broken_task"):
    harness.run_tasks(scorer, tok, ["broken_task"], include_path=str(tmp_path))
