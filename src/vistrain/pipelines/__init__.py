"""The commands: one module per verb, each declaring its arguments (``add_arguments``), its help line and its
``run_<verb>(args)``, which parses, calls one function of the API (``vistrain.api``) and prints. ``cli.py`` builds
the parser from ``VERBS`` in this order (the order ``vistrain --help`` lists them)."""

VERBS = ("train", "evaluate", "compare", "runs", "predict", "calibrate", "export", "serve", "search", "report", "demo",
         "init", "import_config", "tune", "doctor", "split", "manifest", "audit", "augment", "convert_checkpoint")
