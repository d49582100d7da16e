"""FADAL: Federated Anatomical Data Amplification and Learning."""

__version__ = "0.1.0"
