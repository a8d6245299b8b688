"""Training entry points: ``python -m train.<job> --config configs/<file>.yaml [key=value ...]``."""
