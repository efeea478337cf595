"""Evaluation: confusion-matrix metrics, CAM writing and scoring, classification mAP."""
