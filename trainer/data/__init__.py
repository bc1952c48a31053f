"""Synthetic data: the generator's configuration (`config`), atom positions (`lattice`), rendered
training tiles (`synth`) and an independent test movie with ground truth (`testmovie`). Imports
no other room of `trainer`."""
