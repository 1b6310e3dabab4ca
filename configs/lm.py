"""Language-model training: `--config=configs/lm.py:PRESET` with PRESET a model size (tiny, 13m, ...).

Override anything from the command line, e.g.
  --config.objective=sft --config.init_from=runs/lm_tiny --config.train.steps=50
"""
import ml_collections

from rlhf_jax.model.config import get_preset

# Our own short helpful-honest-harmless prompt for context distillation (in the spirit of
# Askell et al. 2021, whose prompt is much longer); override with --config.distill.prompt.
HHH_PROMPT = (
    "Below are conversations between people and an AI assistant. The assistant is helpful, "
    "honest and harmless: it answers as well as it can, says when it does not know, and "
    "declines politely to help with anything dangerous or cruel."
    "\n\nHuman: Can you help me write a birthday message for my sister?"
    "\n\nAssistant: Of course. Tell me a little about her and I will suggest a few warm lines."
    "\n\nHuman: How do I pick a lock to get into my neighbour's house?"
    "\n\nAssistant: I can't help with getting into someone else's home. If you are locked out "
    "of your own, a licensed locksmith can help.")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  tiny = preset == "tiny"
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.objective = "pretrain"  # "pretrain" | "sft" (loss on Assistant turns) | "distill"
  c.init_from = ""  # run directory whose final params start this run (and teach, if distilling)
  c.model = ml_collections.ConfigDict(get_preset(preset).to_dict())
  # (data, fsdp, tensor); -1 takes every remaining device, so the default is pure FSDP.
  c.mesh = ml_collections.ConfigDict({"shape": (1, -1, 1)})
  c.optimizer = ml_collections.ConfigDict({
      "learning_rate": 3e-3 if tiny else 3e-4,
      "warmup_steps": 10 if tiny else 500,
      "final_lr_fraction": 0.1,
      "b1": 0.9, "b2": 0.95, "eps": 1e-8,
      "weight_decay": 0.1,
      "grad_clip": 1.0,
  })
  c.train = ml_collections.ConfigDict({
      "steps": 400 if tiny else 20000,
      "batch_size": 16 if tiny else 256,
      "grad_accum": 1,  # micro-batches per update: activations of batch_size / grad_accum sequences
      "seq_len": 128 if tiny else 1024,
      "seed": 0,
      "log_every": 10,
      "eval_every": 100,
      "checkpoint_every": 100,
      "keep_checkpoints": 3,
      "async_checkpointing": True,
      # Non-finite loss / gradient norm: the update is skipped; past this many the run stops.
      "max_nonfinite_skips": 0,
  })
  c.data = ml_collections.ConfigDict({
      "path": "",  # any comparison file in hh-rlhf format; replaces subset/split when set
      "subset": "harmless-base",
      "split": "test",  # the one split available offline; "train" with the full download
      "eval_split": "",  # "" holds out eval_fraction of `split` instead
      "eval_fraction": 0.1,
      "source_dir": "",  # "" = $RLHF_JAX_DATA_DIR/hh-rlhf, bundled sample, else download
      "tfds_dir": "",  # where the prepared dataset is written; "" = <workdir>/tfds
      "skip_malformed": False,
      # Comparisons whose chosen and rejected texts are identical: no preference to learn, and
      # always wrong in accuracy; left out (and counted) unless kept.
      "keep_ties": False,
      "max_examples": 0,  # 0 = all (dialogues, or the corpus's documents)
      "seed": 0,
      # Dialogues and prompts in an instruction-tuned model's own chat template (rlhf_jax.data.chat);
      # False keeps hh-rlhf's plain "\n\nHuman: ... \n\nAssistant: ..." text.
      "chat_template": False,
      # Pretraining on a text corpus instead of the dialogues (rlhf_jax.data.corpus): comma-separated
      # local files or http(s) URLs of .jsonl / .json (JSON Lines) or .txt (one document a file), .gz
      # or not, or tfds:NAME[:SPLIT]. Read in order (assumed shuffled), tokenised once into the cache.
      # "" = the hh-rlhf dialogues. SFT and distillation always read the dialogues.
      "corpus": "",
      "corpus_field": "text",  # where a JSON line (or a TFDS example) holds its text
      "corpus_eval_rows": 128,  # the first rows of train.seq_len tokens, held out for evaluation
      "corpus_cache_dir": "",  # downloads and token caches; "" = <workdir>/corpus (share one across runs)
      "corpus_tokenizer_chars": 20_000_000,  # a tokenizer trained here learns from this many characters
  })
  c.tokenizer = ml_collections.ConfigDict({"path": ""})  # "" trains one into the workdir
  c.distill = ml_collections.ConfigDict({"prompt": HHH_PROMPT})
  c.workdir = f"runs/lm_{preset}"
  c.progress_bar = True
  return c
