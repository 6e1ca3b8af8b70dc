"""Judging: detector scores → category scores → a decision, under a policy."""
