"""What ``vistrain audit`` finds in a data set: label issues, duplicates and leakage, outliers, class health.

The whole audit (reading the data or run, writing ``audit/``) is ``audit/run.py``; each other module here
computes one kind of finding from plain arrays and the item table, so each can be tested on its own.
"""
