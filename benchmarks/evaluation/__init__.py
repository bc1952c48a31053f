"""The evaluation suite: an image model of its own, cases with truth, scoring and a report.

Written independently of `trainer.data` (it must never import the trainer: the suite measures
the shipped ensemble on data the training generator did not make). Rooms:

- `optics`: the physics of a HAADF-STEM image (aberrated probe, source size, Z-contrast, scan
  geometry, detector);
- `samples`: atom positions in picometres (graphene sheet, amorphous films, heavy atoms and
  clusters, a nanoparticle, a perovskite);
- `cases`: the frames with truth (drift movie, heavy atoms, nanoparticle, perovskite, OOD);
- `movie`: the drift movie's file format (reused by the ELIT loop);
- `scoring`: matching and figures; `baseline`: the tuned classical peak finder;
- `runner`: the artifact through the service's own engine and post-processing;
- `report`: table, markdown, JSON and pictures.

Entry point: `python -m benchmarks.evaluate` (see docs/evaluation.md).
"""
