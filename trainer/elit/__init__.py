"""The ELIT loop on experimental movies: run the ensemble over a movie (`experiment`), report
and suggest members (`report`), relabel the good part (`relabel`, `intensity`, `multiclass`),
retrain and iterate (`iterate`), and score against truth where a movie has it (`scoring`).
Imports `trainer.data` and `trainer.model`."""
