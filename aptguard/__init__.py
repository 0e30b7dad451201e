"""aptguard: an APT mirror that verifies every signature and hash before it promotes a snapshot."""

__version__ = "0.1.0"
