"""The shared behaviour suite: what every adapter must do at shutdown, run against each adapter.

``test_contract.py`` holds the tests; ``harness.py`` what a case provides; ``cases/`` one module
per adapter. Adding an adapter to the suite is adding one module to ``cases/`` (see
``docs/adapters.md``, "Testing an adapter").
"""
