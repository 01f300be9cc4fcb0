"""nemoforge: the Llama-Nemotron recipe (Puzzle NAS -> KD -> CPT -> ...) as a Kubeflow pipeline."""

__version__ = "0.1.0"
