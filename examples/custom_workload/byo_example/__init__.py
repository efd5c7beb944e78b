"""A study's own workload, optimizer and metric, named by import path in study.yaml."""
