"""Test and demo support for hub_transfer.

The Globus Auth + Transfer stand-in lives in ``hub_transfer.testing.standin``.
It is not imported here on purpose: ``python -m hub_transfer.testing.standin``
must be able to run that module as ``__main__`` without it already sitting in
``sys.modules`` (which would make runpy warn and load it twice).
"""
