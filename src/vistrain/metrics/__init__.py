"""Metrics: classification, calibration, retrieval / re-identification."""
