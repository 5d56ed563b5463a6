"""Plots and the HTML report of a run directory.

Importing this package does not import matplotlib: the plotting functions import it (and pick the Agg
backend, per figure) when they are called.
"""

from vistrain.viz.plots import confusion_matrix_png, reliability_diagram_png, training_plots
from vistrain.viz.report import write_report

__all__ = ["confusion_matrix_png", "reliability_diagram_png", "training_plots", "write_report"]
