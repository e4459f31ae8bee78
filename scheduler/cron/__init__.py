"""Cron schedules: the rules (rules.py), schedules.yaml and firing (schedules.py), pause/resume/run-now
(admin.py) and the beat process that ticks them and runs the reconciler (beat.py)."""
