"""Benchmarks of emlisten against a private Dovecot and the Creatio stand-in.

Run ``python -m bench --help``. Not part of the default test run (tests/bench only smoke-tests
each scenario with a handful of mailboxes). Results: bench/results/<scenario>-<timestamp>.{json,md}.
"""
