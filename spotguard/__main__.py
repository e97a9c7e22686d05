from spotguard.cli import main

raise SystemExit(main())
