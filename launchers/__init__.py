"""SLURM launchers (submitit): job kinds as registrations (``kinds``), cluster profiles and flags resolved to
sbatch parameters (``options``), the code each task runs (``job``, ``rendezvous``) and the status it leaves
(``status``), submission and chains (``submit``), the project's job index (``records``), and the ``mlfm launch`` /
``mlfm jobs`` commands."""
