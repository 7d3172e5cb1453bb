"""Around the model: checkpoint conversion, leaderboard submissions, demo data, safe writes and the
``fairchem-eqv2`` command line. Nothing below imports these."""
