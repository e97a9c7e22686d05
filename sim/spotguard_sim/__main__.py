"""`python -m spotguard_sim`: the same as the `spotguard-sim` command."""

from spotguard_sim.cli import main

raise SystemExit(main())
