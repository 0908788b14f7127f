from kloudmeter_py.cli import main

raise SystemExit(main())
