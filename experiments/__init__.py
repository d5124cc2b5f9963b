"""Experiments on the compiler, kept apart from it (not installed with ``tardis_onnx``).

Run from the repository root: ``python -m experiments.evaluate`` (MiniLM on STS-B: TARDIS vs
pruning), ``python -m experiments.perplexity`` (causal-LM perplexity), ``python -m experiments.demo``
(what ``make demo`` shows). ``baselines`` holds the pruning baselines (magnitude, Wanda, RIA). Data
comes from ``--data`` or ``$TARDIS_DATA`` (:func:`experiments.data.data_dir`); models from the recipes
in ``models/``.
"""
