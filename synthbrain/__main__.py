from synthbrain.cli import main

raise SystemExit(main())
