"""Human evaluation (report §3.4): raters compare two models' answers to the same instruction.

  store.py    the SQLite database: prompts, models, answers (generated once), raters' assignments and ratings
  answers.py  prompts files and answer generation with the decoding core (qwenkit.generation)
  app.py      the rating page: FastAPI routes and static/ (one instruction, two anonymized answers)
  ratings.py  win/tie/loss per pair, Bradley-Terry ratings with bootstrap intervals, per-category
              breakdown, a PNG chart, and the export to TRL preference pairs for the reward model

The command is `qwenkit arena` (docs/arena.md).
"""
