"""Helpers below the network: configs (config/), the data path (data/), run folders and atomic I/O, forks, metrics,
tracking, reports, torchrun."""
