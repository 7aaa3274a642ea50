from easel.cli import main

raise SystemExit(main())
