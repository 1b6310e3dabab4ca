"""Fits, tables and figures of what experiments wrote. May import: errors, training (the
command line), evals (the headline numbers).

  results.py  results.jsonl read and checked, series and mean curves
  fits.py     reward against sqrt(KL): Bai et al.'s line, Gao et al.'s forms
  tables.py   scaling.md and fits.json
  figures.py  reward against sqrt(KL), proxy against gold, slope against size
  methods.py  every method at matched KL: methods.md, methods_frontier.png
  report.py   all of the above for one sweep directory          (job analyse)
  evals.py    the evaluations across sizes (alignment tax or bonus)
  online.py   online against static arms, round by round
"""
