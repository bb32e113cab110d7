from mgdm_core.cli import main

raise SystemExit(main())
