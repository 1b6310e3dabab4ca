"""Text in, arrays out. May import: errors.

  hh_rlhf/        hh-rlhf: upstream catalog and checksums, validated readers, TFDS builder, sample
  locations.py    where local copies of the data sets live ($RLHF_JAX_DATA_DIR), and this host's stand-ins
                  for data directories in a bucket that only a local disk can hold ($RLHF_JAX_CACHE_DIR)
  dialogue.py     dialogue turns and the (prompt, chosen, rejected) split
  tokenizer.py    SentencePiece, trained on the corpus or a pretrained model's; special tokens;
                  load_tokenizer, which picks the kind a run directory holds
  json_tokenizer.py  a pretrained model's tokenizer.json (byte-level BPE) behind the same calls
  sequence_start.py  what every tokenizer shares: BOS where a sequence starts, prompts
  chat.py         dialogues and prompts in a model's chat template (data.chat_template)
  batching.py     encoding with loss masks, truncation, packing, seeded resumable order
  lm_data.py      dialogue records and their LM batches (pretraining, SFT)
  corpus_sources.py  a pretraining corpus's documents: local or downloaded JSONL / text, gzip, TFDS
  corpus.py       the corpus tokenised once into a memory-mapped cache, packed rows, resumable batches
  pm_data.py      comparison batches ([batch, K, seq], best first), DPO's response-only pairs
  prompts.py      prompts for the policy-gradient trainers, left-padded
  inputs.py       the one call a trainer makes: records with their report, tokenizer, batchers
"""
