"""The command-line jobs, each a module with ``main(argv=None) -> int`` and ``run`` (``dit_gspn.cli.command``):

- ``train``: ``dit-gspn-train`` / ``python train.py`` (a YAML config and ``section.key=value`` overrides);
- ``sample``: ``dit-gspn-sample`` / ``python sample.py`` (a labelled grid, or an ADM ``.npz`` of N samples);
- ``extract``: ``dit-gspn-extract`` / ``python extract_latents.py`` (an image folder into latent shards);
- ``demo``: ``dit-gspn-demo`` / ``make demo`` (the built-in job end to end on a CPU).

The evaluation jobs are the top-level ``evaluation`` package (``dit-gspn-eval`` / ``python -m evaluation``).
"""
