from vistrain.cli import main

raise SystemExit(main())
