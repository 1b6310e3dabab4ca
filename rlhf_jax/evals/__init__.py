"""Evaluations of a trained model beyond PM reward (Bai et al. 2022, sections 3 and 5).
May import: errors, model, data, objectives, training, hf, trainers.

Every evaluation is a function of a `loglik.Scorer` (params and model config on a mesh), a
tokenizer and its data, returning a dict of metrics; only `loglik` calls the model.

- loglik: jitted, bucketed scoring of continuations, and mean activations (the one model caller)
- multiple_choice: MC accuracy (acc, acc_norm) over a generic JSONL format, and converters
- bias_cloze: occupation / gender-term log-probability differences
- winogender: pronoun log-probabilities against the share of women per occupation
- bbq: BBQ accuracy and bias scores (Parrish et al. 2022)
- ood: harmful-request detection by (relative) Mahalanobis distance on activations
- policy_elo: Elo of policies from PM-judged win rates
- suite: the named suites that the evaluate job and the sweep run
- stage: the sweep's evals stage
- evaluate: the evaluate job
"""
