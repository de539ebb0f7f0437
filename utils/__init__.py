"""Helper package of the Circuits by Example course: the reference code the chapters build.

The learner's API is one module per job (tasks, models, train, circuits, residual_paths, fourier,
proofs, superposition, plots, widgets, claims) and the exercise checkers (checks, a package with one module per
chapter); importing the package itself does nothing. utils/tooling holds the instructors' and
maintainers' tools: the chapter builder, the grader, the benchmark and the Binder files.
"""
