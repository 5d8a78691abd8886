from trichat.cli import main

raise SystemExit(main())
