from emlisten._cli import main

raise SystemExit(main())
