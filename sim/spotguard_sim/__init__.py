"""Emulators and the local control plane, for tests, the demo and `spotguard-sim`; never imported by the daemon."""
