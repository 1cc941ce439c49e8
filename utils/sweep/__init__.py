"""Sweeps as data: exps/sweeps/*.json read into runs (spec.py), each run's state read from its run folder
(plan.py), main.py's command for that state (command.py), and the executors that start them: this machine
(local.py), SLURM through submitit (slurm.py), or none (dry, in cli.py), around one loop (drive.py).
``python -m utils.sweep FILE``; docs/sweeps.md."""
