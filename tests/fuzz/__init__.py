"""Fuzz suite of the file formats: mutated matrix files (TransitionMatrix.save) and
expansion files (llm.save_expansion), each loaded in a persistent subprocess; a signal or
a hang fails.  ``python -m tests.fuzz --mutants 10000`` runs the long budget."""
