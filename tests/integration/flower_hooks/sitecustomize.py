"""Test-only hooks for the Flower processes of tests/integration/test_deployment.py (on PYTHONPATH of one
SuperNode, so its ClientApps get them too; nothing of FADAL's code changes):

* ``FADAL_TEST_HEARTBEAT_S``: Flower's heartbeat interval (30 s; the SuperLink marks a node offline, and a
  SuperNode an app, after 2 missed), shortened so that a test can outlast it in seconds.
* ``FADAL_TEST_SLOW_FLAG``: a file; while it exists, each local training first waits as many seconds as the file
  says (the site's round takes that much longer; heartbeats go on, as during real training), writing
  ``<flag>.started`` when the wait begins.
"""

import os

if os.environ.get("FADAL_TEST_HEARTBEAT_S"):
    import flwr.common.constant as _constant

    _constant.HEARTBEAT_DEFAULT_INTERVAL = float(os.environ["FADAL_TEST_HEARTBEAT_S"])

if os.environ.get("FADAL_TEST_SLOW_FLAG"):
    import importlib.abc
    import importlib.machinery
    import sys

    class _SlowTraining(importlib.abc.MetaPathFinder):
        """Wraps ``fadal.model.engine.fit`` once that module is loaded (before site_task binds the name)."""

        def find_spec(self, name, path, target=None):
            if name != "fadal.model.engine":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            exec_module = spec.loader.exec_module

            def patched(module):
                exec_module(module)
                fit = module.fit

                def slow_fit(*args, **kwargs):
                    import pathlib
                    import time

                    flag = pathlib.Path(os.environ["FADAL_TEST_SLOW_FLAG"])
                    if flag.exists():
                        seconds = float(flag.read_text())
                        pathlib.Path(f"{flag}.started").write_text(str(time.time()))
                        time.sleep(seconds)
                    return fit(*args, **kwargs)

                module.fit = slow_fit

            spec.loader.exec_module = patched
            return spec

    sys.meta_path.insert(0, _SlowTraining())
