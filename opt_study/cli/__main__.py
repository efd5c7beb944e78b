from opt_study.cli.main import main

raise SystemExit(main())
